"""The scoring server of a split deployment: FastAPI on uvicorn, several worker processes.

Each worker loads every run folder once (lifespan) and scores what edge devices send: an encoded
image (PNG, JPEG, WebP: the server runs the whole detector) or a feature payload (the edge ran the
backbone; the server decodes it and runs the head). Requests are independent and the server keeps no
state between them, so replicas scale out behind any HTTP load balancer (round robin, no sticky
sessions): each replica needs only the same run folders and API key file.

Untrusted input is checked before any work, in this order: open connections per client address (503),
header arrival time (408, then closed), API key (401), model name (404), body size (413, from
Content-Length before reading, and while reading), body read time (408), then the payload or image header
(400/409/413/415/422 with the reason). Inference runs in a small thread pool per worker
with a deadline per request (503 when the server is too busy to answer in time).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hmac
import io
import json
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from edgead.edge.answers import (
    MAP_SIDE,
    ErrorAnswer,
    Health,
    MapFormat,
    ModelInfo,
    ModelList,
    ScoreAnswer,
    Timings,
    is_model_name,
)
from edgead.edge.auth import API_KEY_HEADER, read_api_key
from edgead.edge.codecs import (
    MAX_IMAGE_PIXELS,
    Codec,
    WebpCodec,
    create_codec,
    feature_shape_of,
    image_format,
)
from edgead.edge.payload import CODEC_IDS, PayloadError, is_payload, parse_payload
from edgead.edge.pq import Codebook, load_run_codebook
from edgead.errors import EdgeadError, RunFolderError, UsageError
from edgead.metrics import normalize_scores
from edgead.runs import RunConfig, load_run, read_config

ENV_CONFIG = "EDGEAD_SERVE_CONFIG"


class Limits(BaseModel):
    """Per-request and per-connection limits (each worker enforces them on its own)."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, ge=1024)
    body_timeout_s: float = Field(30.0, gt=0)
    request_timeout_s: float = Field(30.0, gt=0)
    slots: int = Field(2, ge=1, le=64, description="requests scored at once per worker")
    header_timeout_s: float = Field(10.0, gt=0, le=600, allow_inf_nan=False, description=(
        "from connection open, or the end of the previous response, to complete request headers"))
    keep_alive_s: float = Field(5.0, gt=0, le=600, allow_inf_nan=False,
                                description="an idle keep-alive connection is closed after this")
    max_connections_per_client: int = Field(8, ge=1, le=1024, description=(
        "open connections per client address and worker; one more gets a 503 and is closed"))


@dataclass
class ServedModel:
    """One run folder, loaded once per worker: the pipeline, its decision rule and its decoders."""

    name: str
    pipeline: torch.nn.Module
    config: RunConfig
    codebook: Codebook | None
    codecs: dict[str, Codec]

    def info(self) -> ModelInfo:
        c = self.config
        return ModelInfo(name=self.name, model=c.model, backbone=c.backbone, input_size=c.image_size,
                         feature_shape=list(feature_shape_of(self.pipeline)), accepted_codecs=list(self.codecs),
                         pq_codebook_id=self.codebook.id_hex if self.codebook else None, threshold=c.threshold)

    def score(self, body: bytes, include_map: bool, map_format: MapFormat = "png") -> ScoreAnswer:
        """Decode, check, score: everything a request costs, run in a worker thread.

        The timings end with the score: the optional anomaly map is encoded after them.
        """
        start = time.perf_counter()
        if is_payload(body):
            payload = parse_payload(body)
            codec = self.codecs.get(payload.codec)
            if codec is None:
                raise PayloadError(f"model {self.name} does not accept {payload.codec} payloads (it accepts "
                                   f"{', '.join(self.codecs)}): train its PQ codebook first", status=422)
            tensor, codec_name, is_image = codec.decode(payload), payload.codec, codec.takes == "image"
        else:  # an encoded image; the WebP codec's decoder reads PNG and JPEG too
            tensor, codec_name, is_image = self.codecs["webp"].decode(body), image_format(body).lower(), True
        decoded = time.perf_counter()
        with torch.inference_mode():
            features = self.pipeline.features(tensor) if is_image else tensor
            backbone_done = time.perf_counter()
            maps, scores = self.pipeline.score_features(features)
        done = time.perf_counter()
        score = float(scores[0])
        if not np.isfinite(score):
            raise PayloadError("these features give a NaN or infinite score: they are not features of this "
                               "model's backbone", status=422)
        c = self.config
        normalized = float(normalize_scores(np.array([score]), c.threshold, c.score_min, c.score_max)[0])
        answer = ScoreAnswer(
            model=self.name, codec=codec_name, payload_bytes=len(body), score=score, normalized_score=normalized,
            decision="anomalous" if score >= c.threshold else "normal",
            timings=Timings(decode_ms=_ms(decoded - start), backbone_ms=_ms(backbone_done - decoded),
                            head_ms=_ms(done - backbone_done), total_ms=_ms(time.perf_counter() - start)),
        )
        if include_map and map_format == "float16":
            anomaly_map = maps[0, 0].numpy()
            answer.anomaly_map_float16 = _map_float16(anomaly_map)
            answer.anomaly_map_shape = list(anomaly_map.shape)
        elif include_map:
            answer.anomaly_map_png = _map_png(maps[0, 0].numpy(), c)
        return answer


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _map_float16(anomaly_map: np.ndarray) -> str:
    finite16 = np.finfo(np.float16).max  # clipped, so a huge value stays the top rank instead of inf
    values = np.clip(anomaly_map, -finite16, finite16).astype("<f2")
    return base64.b64encode(values.tobytes()).decode("ascii")


def _map_png(anomaly_map: np.ndarray, config: RunConfig) -> str:
    values = np.nan_to_num(normalize_scores(anomaly_map, config.threshold, config.score_min, config.score_max))
    image = Image.fromarray(np.round(values * 255).astype(np.uint8)).resize((MAP_SIDE, MAP_SIDE), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def parse_run_args(runs: Sequence[str | Path]) -> dict[str, Path]:
    """``RUN`` or ``NAME=RUN`` -> {name: folder}; the name defaults to the folder's name."""
    named: dict[str, Path] = {}
    for item in runs:
        text = str(item)
        name, _, path = text.partition("=") if "=" in text and not Path(text).exists() else ("", "", text)
        path = Path(path)
        name = name or path.resolve().name
        if not is_model_name(name):
            raise UsageError(f"model name {name!r} (from {text}) must be 1..128 letters, digits, '-', '_' or '.'")
        if name in named:
            raise UsageError(f"two runs are served as {name!r}: name them, e.g. {name}_b={path}")
        read_config(path)  # a missing or broken run folder fails here, before the server starts
        named[name] = path
    if not named:
        raise UsageError("no run folder given: pass at least one RUN made by `edgead fit`")
    return named


def load_model(name: str, run_dir: Path, limits: Limits) -> ServedModel:
    pipeline, config = load_run(run_dir)
    codebook = load_run_codebook(run_dir)
    shape = feature_shape_of(pipeline)
    codecs: dict[str, Codec] = {"webp": WebpCodec(config.image_size, max_pixels=limits.max_image_pixels)}
    for codec in CODEC_IDS:
        if codec in ("pq", "rs+pq") and codebook is None:
            continue
        codecs[codec] = create_codec(codec, config.image_size, shape, codebook, max_pixels=limits.max_image_pixels)
    return ServedModel(name, pipeline, config, codebook, codecs)


def _error(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def create_app(runs: Sequence[str | Path] | dict[str, Path], api_key: str | None = None,
               limits: Limits | None = None, threads: int | None = None) -> FastAPI:
    """The FastAPI app serving ``runs`` (``RUN`` or ``NAME=RUN``); models load once, at startup."""
    named = runs if isinstance(runs, dict) else parse_run_args(runs)
    limits = limits or Limits()

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        if threads:
            torch.set_num_threads(threads)
            import faiss

            faiss.omp_set_num_threads(threads)
        app.state.models = {name: load_model(name, path, limits) for name, path in named.items()}
        app.state.executor = ThreadPoolExecutor(limits.slots, thread_name_prefix="edgead-score")
        app.state.slots = asyncio.Semaphore(limits.slots)
        yield
        app.state.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="edgead scoring server", lifespan=lifespan,
                  responses={400: {"model": ErrorAnswer}, 401: {"model": ErrorAnswer}})
    app.state.api_key, app.state.limits = api_key, limits

    @app.exception_handler(PayloadError)
    async def payload_error(request: Request, exc: PayloadError) -> JSONResponse:
        return _error(exc.status, str(exc))

    @app.exception_handler(EdgeadError)
    async def edgead_error(request: Request, exc: EdgeadError) -> JSONResponse:
        return _error(400, str(exc))

    @app.get("/healthz", response_model=Health)
    async def healthz(request: Request) -> Health:
        return Health(status="ok", models=list(request.app.state.models))

    router = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @router.get("/models", response_model=ModelList)
    async def models(request: Request) -> ModelList:
        return ModelList(models=[m.info() for m in request.app.state.models.values()])

    @router.post("/models/{name}/score", response_model=ScoreAnswer,
                 responses={k: {"model": ErrorAnswer} for k in (404, 408, 409, 413, 415, 422, 503)})
    async def score(
        request: Request,
        model: Annotated[ServedModel, Depends(served_model)],
        body: Annotated[bytes, Depends(read_body)],
        include_map: Annotated[bool, Query(alias="map", description="add the anomaly map")] = False,
        map_format: Annotated[MapFormat, Query(description=f"png: {MAP_SIDE}x{MAP_SIDE} grey, normalised; "
                                               "float16: raw values at the input size")] = "png",
    ) -> ScoreAnswer:
        """Score one frame: an encoded image (PNG/JPEG/WebP) or an edgead feature payload as the raw body."""
        state = request.app.state
        deadline = request.state.started + state.limits.request_timeout_s
        return await run_with_deadline(state, lambda: model.score(body, include_map, map_format), deadline)

    app.include_router(router)
    return app


api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False)


async def require_key(request: Request, key: Annotated[str | None, Depends(api_key_header)]) -> None:
    """401 unless the request carries the configured key (compared in constant time)."""
    request.state.started = time.monotonic()
    expected = request.app.state.api_key
    if expected is None:
        return
    if key is None:
        auth = request.headers.get("authorization", "")
        key = auth[7:] if auth.lower().startswith("bearer ") else None
    if key is None or not hmac.compare_digest(key.encode("utf-8", "surrogateescape"), expected.encode("utf-8")):
        raise HTTPException(401, f"missing or wrong API key: send it in the {API_KEY_HEADER} header",
                            headers={"WWW-Authenticate": "ApiKey"})


async def served_model(request: Request, name: str) -> ServedModel:
    models = request.app.state.models
    if name not in models:
        raise HTTPException(404, f"no model named {name!r} here; served: {', '.join(models)}")
    return models[name]


async def read_body(request: Request) -> bytes:
    """The raw body, refused as soon as it is known to be over the limit or too slow to arrive."""
    limits: Limits = request.app.state.limits
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPException(400, f"Content-Length {declared!r} is not a number")
        if int(declared) > limits.max_body_bytes:
            raise HTTPException(413, f"body of {int(declared):,} bytes is over the limit of {limits.max_body_bytes:,}")
    chunks: list[bytes] = []
    size = 0

    async def collect() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise HTTPException(413, f"body is over the limit of {limits.max_body_bytes:,} bytes")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(collect(), timeout=limits.body_timeout_s)
    except TimeoutError:
        raise HTTPException(408, f"the body did not arrive within {limits.body_timeout_s:g} s") from None
    except ClientDisconnect:
        raise HTTPException(400, "the client went away before the body arrived") from None
    if size == 0:
        raise HTTPException(400, "empty body: send an encoded image or an edgead feature payload")
    return b"".join(chunks)


async def run_with_deadline(state, work, deadline: float):  # noqa: ANN001, ANN201
    """Run ``work`` in the worker's thread pool, at most ``slots`` at once; 503 past the deadline.

    A request that times out stops waiting, but its thread finishes (threads cannot be killed) and only
    then frees its slot, so a flood of slow requests cannot pile up work beyond the pool.
    """
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(state.slots.acquire(), timeout=max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise HTTPException(503, "the server is busy: no scoring slot freed in time; retry later",
                            headers={"Retry-After": "1"}) from None
    future = loop.run_in_executor(state.executor, work)
    future.add_done_callback(lambda _: state.slots.release())
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout=max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise HTTPException(503, f"scoring took longer than {state.limits.request_timeout_s:g} s; retry later",
                            headers={"Retry-After": "1"}) from None


def _raw_response(status: int, reason: str, detail: str) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"retry-after: 1\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body


def connection_limits() -> Limits:
    """This worker's limits, from ``EDGEAD_SERVE_CONFIG`` (set by :func:`serve`); the defaults without it."""
    return _limits_from(os.environ.get(ENV_CONFIG) or "{}")


@functools.lru_cache(maxsize=4)
def _limits_from(settings: str) -> Limits:
    return Limits(**json.loads(settings).get("limits", {}))


_open_connections: Counter[str] = Counter()  # per client address, in this worker (one event loop: no lock)


class NoDelayH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with TCP_NODELAY, a header deadline and a per-address connection cap.

    TCP_NODELAY: asyncio sets it only on sockets whose protocol number is TCP; the socket uvicorn binds for
    several workers has protocol 0, so without it every keep-alive response waits 40 ms for a delayed ACK.

    uvicorn has no header timeout: a client trickling its headers a byte at a time (or sending nothing)
    holds its connection for ever, and a few dozen such connections reach ``limit_concurrency`` and lock
    every client out. Here the request headers must be complete ``header_timeout_s`` after the connection
    opens or the previous response ends (else 408 and close), and one address may hold at most
    ``max_connections_per_client`` connections per worker (one more gets a 503 and is closed). The body has
    its own deadline (``read_body``), idle keep-alive connections uvicorn's ``timeout_keep_alive``.
    """

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.limits = connection_limits()
        self.header_timer: asyncio.TimerHandle | None = None
        self.counted_as: str | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
        address = self.client[0] if self.client else "local"
        cap = self.limits.max_connections_per_client
        if _open_connections[address] >= cap:
            self.logger.warning("%s already holds %d connections: refused one more", address, cap)
            transport.write(_raw_response(503, "Service Unavailable", f"this address already holds {cap} "
                                          "open connections: close some or retry later"))
            transport.close()
            return
        _open_connections[address] += 1
        self.counted_as = address
        self.start_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_header_timer()
        if self.counted_as is not None:
            _open_connections[self.counted_as] -= 1
            if _open_connections[self.counted_as] <= 0:
                del _open_connections[self.counted_as]
            self.counted_as = None
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a new request's headers are complete
            self.cancel_header_timer()

    def on_response_complete(self) -> None:
        cycle = self.cycle
        super().on_response_complete()
        if self.cycle is cycle and not self.transport.is_closing():  # no pipelined request started
            self.start_header_timer()

    def start_header_timer(self) -> None:
        self.cancel_header_timer()
        self.header_timer = self.loop.call_later(self.limits.header_timeout_s, self.header_timeout)

    def cancel_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def header_timeout(self) -> None:
        self.header_timer = None
        if not self.transport.is_closing():
            self.transport.write(_raw_response(408, "Request Timeout", "the request headers did not arrive within "
                                               f"{self.limits.header_timeout_s:g} s"))
            self.transport.close()


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def create_app_from_env() -> FastAPI:
    """The app factory uvicorn's worker processes call: its settings come through ``EDGEAD_SERVE_CONFIG``."""
    settings = json.loads(os.environ[ENV_CONFIG])
    api_key = read_api_key(settings.get("api_key_file"))
    runs = {name: Path(path) for name, path in settings["runs"].items()}
    return create_app(runs, api_key, Limits(**settings.get("limits", {})), threads=settings.get("threads"))


def _check_port(host: str, port: int) -> None:
    if not 0 < port < 65536:
        raise UsageError(f"--port must be 1..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UsageError(f"--host {host} cannot be resolved: {exc}") from None
    family, kind, _, _, address = infos[0]
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror}): choose another --port") from None


def check_runs_load(named: dict[str, Path], limits: Limits) -> None:
    """Load every run as a worker will, so a damaged one fails here with its reason, before anything listens.

    Inside uvicorn's start-up the same error would be a traceback per worker.
    """
    for name, path in named.items():
        try:
            load_model(name, path, limits)
        except EdgeadError:
            raise
        except (OSError, RuntimeError, ValueError) as exc:
            raise RunFolderError(f"run {path} (served as {name}) cannot be loaded: {type(exc).__name__}: {exc}") from None


def serve(
    runs: Sequence[str | Path],
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    api_key_file: str | Path | None = None,
    limits: Limits | None = None,
    log_level: str = "info",
    announce: Callable[[str], None] | None = None,
) -> None:
    """Start uvicorn with ``workers`` processes serving ``runs``; returns when the server stops (Ctrl-C).

    Everything a user can get wrong (run folders and their weights, key file, port) is checked here, before
    uvicorn starts; then ``announce`` gets the address. Each worker gets an equal share of the CPU cores for
    torch and faiss.
    """
    import uvicorn

    if not 1 <= workers <= 64:
        raise UsageError(f"--workers must be 1..64, got {workers}")
    limits = limits or Limits()
    named = parse_run_args(runs)
    read_api_key(api_key_file)
    _check_port(host, port)
    check_runs_load(named, limits)
    settings = {
        "runs": {name: str(path.resolve()) for name, path in named.items()},
        "api_key_file": str(Path(api_key_file).resolve()) if api_key_file else None,
        "limits": limits.model_dump(),
        "threads": max(1, _cpu_count() // workers),
    }
    os.environ[ENV_CONFIG] = json.dumps(settings)
    if announce is not None:
        announce(f"serving {', '.join(named)} on http://{host}:{port} with {workers} worker(s); Ctrl-C stops")
    uvicorn.run("edgead.edge.server:create_app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level=log_level, timeout_keep_alive=limits.keep_alive_s,  # type: ignore[arg-type]
                http="edgead.edge.server:NoDelayH11Protocol", limit_concurrency=64, timeout_graceful_shutdown=10)
