"""The edge client: read frames, encode them (running the backbone first in feature modes), send them to
the scoring server, and record per frame what it cost and what the server answered.

Times are measured on the edge (resize, backbone, encode) and on the server (decode, backbone, head);
the link between them is modelled, not measured: ``payload bytes / bandwidth + latency``, so results do
not depend on how fast the loopback or LAN of the test bench is (``throttle`` also sleeps that long,
for a real-time run). Only the uplink is modelled: the answer is a few hundred bytes of JSON.

A frame that cannot be read, encoded or scored (server down, an error answer after the retries) still
gets its row in predictions.csv with the reason; the CSV is rewritten atomically as frames go.

Nothing the server sends is trusted: every answer is read under a size cap and a deadline and checked
against the server's own answer models (:mod:`edgead.edge.answers`); an answer that fails (a NaN score,
a missing field, an absurd input size, a map that is not what it claims) is an error, never a decision.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image
from pydantic import BaseModel, ValidationError

from edgead.data.images import resize_image
from edgead.edge.answers import MAP_SIDE, ModelInfo, ModelList, ScoreAnswer
from edgead.edge.auth import API_KEY_HEADER, read_api_key
from edgead.edge.codecs import CODECS, DEFAULT_QUALITY, DEFAULT_RATIO, FEATURE_CODECS, Codec, create_codec
from edgead.errors import EdgeadError, UsageError
from edgead.outputs import check_output_dir, write_records_csv
from edgead.progress import progress as progress_bar
from edgead.runtime.sources import open_source
from edgead.runtime.stream import ResultCounts
from edgead.validation import describe

PREDICTIONS_CSV = "predictions.csv"
RETRY_STATUSES = (408, 429, 500, 502, 503, 504)  # worth another try; other errors will not change
CSV_EVERY = 25  # frames between two rewrites of the CSV
MAX_ANSWER_BYTES = 16 * 1024 * 1024  # the largest real answer (a 2048 px float16 map) is about 11 MB
MAX_MESSAGE = 300  # characters of a server's words quoted in an error
MIN_BANDWIDTH, MAX_BANDWIDTH = 100.0, 100e9  # bytes per second (or inf): below, one frame takes hours
MAX_LATENCY_MS = 60_000.0
A = TypeVar("A", bound=BaseModel)

_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024**2, "gib": 1024**3,
          "bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8}
_BANDWIDTH = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]+)\s*(?:/\s*s|ps)?\s*$", re.IGNORECASE)


class EdgeClientError(EdgeadError):
    """The server could not be reached or answered an error (``attempts`` requests were made)."""

    def __init__(self, message: str, attempts: int = 1) -> None:
        super().__init__(message)
        self.attempts = attempts


def parse_bandwidth(text: str | float) -> float:
    """Bytes per second from '100kB/s', '1MB/s', '2 MiB/s', '800kbit/s' (kB = 1000 B); 'inf' = no limit.

    Rates are bounded (100 B/s to 100 GB/s, or inf), so the modelled time and ``--throttle``'s sleep stay sane.
    """
    if isinstance(text, int | float):
        value = float(text)
    elif str(text).strip().lower() in ("inf", "none", "unlimited"):
        value = math.inf
    else:
        match = _BANDWIDTH.match(str(text))
        unit = match.group(2).lower() if match else ""
        if unit.endswith("bps") and unit != "bps":
            unit = unit[:-3] + "bit"
        if not match or unit not in _UNITS:
            raise UsageError(f"--bandwidth {text!r} is not a rate: write e.g. 100kB/s, 1MB/s, 2MiB/s or 800kbit/s")
        value = float(match.group(1)) * _UNITS[unit]
        if not math.isfinite(value):
            raise UsageError(f"--bandwidth {text!r} overflows: write inf for no limit")
    if not value > 0:
        raise UsageError(f"--bandwidth must be above zero, got {text!r}")
    check_bandwidth(value, text)
    return value


def check_bandwidth(value: float, text: object = None) -> None:
    """A :class:`UsageError` unless ``value`` (bytes per second) is inf or within 100 B/s..100 GB/s."""
    if not (value == math.inf or MIN_BANDWIDTH <= value <= MAX_BANDWIDTH):
        raise UsageError(f"--bandwidth {text if text is not None else value!r} is out of range: "
                         f"{MIN_BANDWIDTH:g} B/s to {MAX_BANDWIDTH / 1e9:g} GB/s, or inf for no limit")


@dataclass
class Link:
    """The modelled uplink: time = bytes / bandwidth + latency."""

    bandwidth: float  # bytes per second (inf: no transfer time)
    latency_ms: float = 0.0

    def __post_init__(self) -> None:
        check_bandwidth(self.bandwidth)
        if not 0 <= self.latency_ms <= MAX_LATENCY_MS:  # NaN fails too
            raise UsageError(f"--latency-ms must be 0..{MAX_LATENCY_MS:g}, got {self.latency_ms}")

    def transfer_ms(self, n_bytes: int) -> float:
        return n_bytes / self.bandwidth * 1000.0 + self.latency_ms


@dataclass
class EdgeResult:
    """One frame's row of predictions.csv."""

    index: int
    name: str
    mode: str
    payload_bytes: int | None = None
    edge_ms: float | None = None  # resize + backbone (feature modes) + encode, on the edge
    link_ms: float | None = None  # modelled uplink time
    server_ms: float | None = None  # decode + backbone + head, measured by the server
    total_ms: float | None = None  # edge + link + server
    http_ms: float | None = None  # measured request round trip (loopback here: not part of total)
    score: float | None = None
    normalized_score: float | None = None
    decision: str | None = None
    attempts: int = 0
    error: str | None = None


@dataclass
class EdgeSummary(ResultCounts):
    server: str
    model: str
    mode: str
    link: Link
    results: list[EdgeResult]
    csv: Path
    backbone_runtime: str | None = None
    warnings: list[str] = field(default_factory=list)

    def median(self, key: str) -> float | None:
        values = [getattr(r, key) for r in self.results if getattr(r, key) is not None]
        return float(np.median(values)) if values else None


def check_server_url(url: str) -> str:
    """The server's base URL without a trailing slash; a :class:`UsageError` says what is wrong with it.

    http or https, a host, a port in 1..65535 if one is given, no query or fragment, nothing unprintable.
    """
    text = str(url)
    example = "write it like http://127.0.0.1:8000"
    if not text or any(ch.isspace() or not ch.isprintable() for ch in text):
        raise UsageError(f"--server {text!r} is empty or holds spaces or control characters: {example}")
    try:
        parts = urlsplit(text)
        port = parts.port
        httpx.URL(text)
    except (ValueError, httpx.InvalidURL) as exc:
        raise UsageError(f"--server {text!r} is not a URL ({exc}): {example}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise UsageError(f"--server {text!r} must start with http:// or https://: {example}")
    if not parts.hostname:
        raise UsageError(f"--server {text!r} names no host: {example}")
    if port == 0:
        raise UsageError(f"--server {text!r}: the port must be 1..65535")
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise UsageError(f"--server {text!r} must not hold a query or fragment (?, #): {example}")
    return text.rstrip("/")


def wait_until_healthy(url: str, alive: Callable[[], bool], timeout_s: float = 120.0) -> None:
    """Poll ``GET url/healthz`` until it answers 200, for a server just started (tests, benchmarks);
    EdgeClientError if ``alive()`` turns false (the server exited) or ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    while True:
        if not alive():
            raise EdgeClientError(f"the server at {url} exited during start-up")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise EdgeClientError(f"the server at {url} did not start within {timeout_s:g} s")
        time.sleep(0.2)


class ScoringClient:
    """HTTP to one scoring server, with retries and exponential back-off on transient failures.

    Answers are read under :data:`MAX_ANSWER_BYTES` and within ``timeout_s`` once their headers came, and
    checked against the server's answer models: a server cannot make the client buffer without bound, wait
    for ever on a trickled body, or crash it with a malformed answer.
    """

    def __init__(self, server: str, api_key: str | None = None, timeout_s: float = 30.0, retries: int = 3,
                 backoff_s: float = 0.5) -> None:
        if not (retries >= 0 and backoff_s >= 0 and 0 < timeout_s < math.inf):
            raise UsageError("retries and back-off must be zero or more, the timeout above zero and finite")
        self.server, self.retries, self.backoff_s = check_server_url(server), retries, backoff_s
        self.timeout_s = timeout_s
        headers = {API_KEY_HEADER: api_key} if api_key else {}
        # TCP_NODELAY: without it, the body segment waits for the ACK of the headers (Nagle + delayed ACK, 40 ms).
        transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout_s, transport=transport)

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kw) -> tuple[bytes, int]:
        """The body of a 2xx answer and the number of attempts; :class:`EdgeClientError` once retries are spent."""
        reason = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff_s * 2 ** (attempt - 1), 10.0))
            try:
                status, body = self._exchange(method, path, **kw)
            except httpx.TransportError as exc:
                reason = f"server {self.server} unreachable ({type(exc).__name__}: {_clip(str(exc))})"
                continue
            except EdgeClientError as exc:  # an oversized answer: another try will not change it
                exc.attempts = attempt + 1
                raise
            if 200 <= status < 300:
                return body, attempt + 1
            reason = f"server answered {status}: {_detail(body)}"
            if status not in RETRY_STATUSES:
                break
        raise EdgeClientError(f"{reason} (after {attempt + 1} attempt{'s' if attempt else ''})", attempt + 1)

    def _exchange(self, method: str, path: str, **kw) -> tuple[int, bytes]:
        with self.http.stream(method, path, **kw) as response:
            deadline = time.monotonic() + self.timeout_s
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > MAX_ANSWER_BYTES:
                    raise EdgeClientError(f"the server's answer is over {MAX_ANSWER_BYTES // 2**20} MiB: "
                                          "not an edgead scoring server's")
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout(f"the answer did not arrive within {self.timeout_s:g} s",
                                            request=response.request)
                chunks.append(chunk)
            return response.status_code, b"".join(chunks)

    def model_info(self, name: str) -> ModelInfo:
        """The server's description of ``name``, checked (bounded input size, known codecs...)."""
        body, _ = self.request("GET", "/v1/models")
        models = {m.name: m for m in parse_answer(ModelList, body, "model list").models}
        if name not in models:
            raise EdgeClientError(f"the server has no model {name!r}; it serves {_clip(', '.join(models)) or 'none'}")
        return models[name]

    def score(self, name: str, body: bytes, include_map: bool = False, map_format: str = "png"
              ) -> tuple[ScoreAnswer, int]:
        """The server's answer, checked, and the attempts it took; an invalid answer is an :class:`EdgeClientError`.

        ``include_map`` adds the anomaly map: a small PNG, or with ``map_format="float16"`` the raw map at the
        model's input size (read it with :func:`decode_map`); asked for, it must be there and well formed.
        """
        params = {"map": "true", "map_format": map_format} if include_map else None
        data, attempts = self.request("POST", f"/v1/models/{name}/score", content=body, params=params,
                                      headers={"Content-Type": "application/octet-stream"})
        try:
            answer = parse_answer(ScoreAnswer, data, "score answer")
            if answer.model != name:
                raise EdgeClientError(f"the server answered for model {answer.model!r}, not {name!r}")
            if include_map and map_format == "float16":
                decode_map(answer)
            elif include_map:
                check_map_png(answer)
        except EdgeClientError as exc:
            exc.attempts = attempts
            raise
        return answer, attempts


def parse_answer(model: type[A], body: bytes, what: str) -> A:
    """``body`` checked against the server's answer ``model``; :class:`EdgeClientError` with the first problems."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise EdgeClientError(f"the server's {what} is not valid: {_clip(describe(exc))}") from None


def decode_map(answer: ScoreAnswer | dict) -> np.ndarray:
    """The float16 anomaly map of a score answer asked for with ``map_format="float16"`` (input size, raw values).

    The answer is checked first (a dict too): a map that is absent, not base64, of another size than its
    shape says, or not finite is an :class:`EdgeClientError`.
    """
    if isinstance(answer, dict):
        try:
            answer = ScoreAnswer.model_validate(answer)
        except ValidationError as exc:
            raise EdgeClientError(f"the server's score answer is not valid: {_clip(describe(exc))}") from None
    if answer.anomaly_map_float16 is None or answer.anomaly_map_shape is None:
        raise EdgeClientError("the server's answer has no float16 anomaly map")
    height, width = answer.anomaly_map_shape
    try:
        raw = base64.b64decode(answer.anomaly_map_float16, validate=True)
    except (binascii.Error, ValueError):
        raise EdgeClientError("the server's float16 anomaly map is not base64") from None
    if len(raw) != height * width * 2:
        raise EdgeClientError(f"the server's float16 anomaly map holds {len(raw):,} bytes, not the "
                              f"{height * width * 2:,} of {height}x{width}")
    values = np.frombuffer(raw, "<f2").reshape(height, width)
    if not np.isfinite(values).all():
        raise EdgeClientError("the server's float16 anomaly map holds NaN or infinite values")
    return values


def check_map_png(answer: ScoreAnswer) -> None:
    """An :class:`EdgeClientError` unless the answer's map is a base64 PNG of MAP_SIDE x MAP_SIDE pixels."""
    if answer.anomaly_map_png is None:
        raise EdgeClientError("the server's answer has no PNG anomaly map")
    try:
        with Image.open(io.BytesIO(base64.b64decode(answer.anomaly_map_png, validate=True))) as image:
            fmt, size = image.format, image.size  # the header only: nothing is decoded
    except (binascii.Error, ValueError, OSError):
        raise EdgeClientError("the server's PNG anomaly map is not a base64 image") from None
    if fmt != "PNG" or size != (MAP_SIDE, MAP_SIDE):
        raise EdgeClientError(f"the server's anomaly map is a {fmt} of {size[0]}x{size[1]}, not a "
                              f"{MAP_SIDE}x{MAP_SIDE} PNG")


def _clip(text: str, limit: int = MAX_MESSAGE) -> str:
    """Printable and at most ``limit`` characters: what a server sends is quoted, never echoed raw."""
    text = "".join(ch if ch.isprintable() else "?" for ch in text[: limit + 1])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _detail(body: bytes) -> str:
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError, RecursionError):
        detail = None
    return _clip(str(detail if detail is not None else body[:MAX_MESSAGE].decode("utf-8", "replace")))


def write_edge_csv(path: Path, results: Sequence[EdgeResult]) -> Path:
    ms = ("edge_ms", "link_ms", "server_ms", "total_ms", "http_ms")
    return write_records_csv(path, EdgeResult, results, text_fields=("name",), ms_fields=ms)


def _check_edge_side(backbone, info: ModelInfo, mode: str) -> None:  # noqa: ANN001
    if backbone.image_size != info.input_size or list(backbone.feature_shape) != info.feature_shape:
        raise UsageError(
            f"the edge model takes {backbone.image_size} px and gives features {list(backbone.feature_shape)}, the "
            f"server's model {info.name} takes {info.input_size} px and features {info.feature_shape}: "
            "export the edge part from the same run")
    if mode in ("pq", "rs+pq"):
        if backbone.codebook is None:
            raise UsageError(f"mode {mode} needs pq_codebook.safetensors beside the edge model")
        if info.pq_codebook_id != backbone.codebook.id_hex:
            raise UsageError(f"the edge's PQ codebook {backbone.codebook.id_hex} is not the server's "
                             f"{info.pq_codebook_id}: copy the run's pq_codebook.safetensors to the edge")


def prepare_codec(client: ScoringClient, model: str, mode: str, backbone=None, ratio: float = DEFAULT_RATIO,  # noqa: ANN001
                  quality: int = DEFAULT_QUALITY, seed: int = 0) -> tuple[Codec, int]:
    """The codec of ``mode`` for the server's ``model`` and that model's input size.

    Asks the server first, so a mode it does not accept, or an edge part (``backbone``, feature modes)
    from another run or with another PQ codebook, fails before any frame is sent. The answer is checked
    (:class:`edgead.edge.answers.ModelInfo`), so the sizes used here are bounded.
    """
    info = client.model_info(model)
    if mode not in info.accepted_codecs:
        raise UsageError(f"the server's model {model} does not accept {mode}; it accepts "
                         f"{', '.join(info.accepted_codecs)}")
    if backbone is not None:
        _check_edge_side(backbone, info, mode)
    codec = create_codec(mode, info.input_size, tuple(info.feature_shape), backbone.codebook if backbone else None,
                         ratio=ratio, quality=quality, seed=seed)
    return codec, info.input_size


def run_edge(
    sources: Sequence[str | Path],
    server: str,
    model: str,
    mode: str,
    out_dir: str | Path,
    bandwidth: str | float = "100kB/s",
    latency_ms: float = 0.0,
    edge_model: str | Path | None = None,
    api_key_file: str | Path | None = None,
    ratio: float = DEFAULT_RATIO,
    quality: int = DEFAULT_QUALITY,
    seed: int = 0,
    max_frames: int | None = None,
    retries: int = 3,
    backoff_s: float = 0.5,
    timeout_s: float = 30.0,
    throttle: bool = False,
    threads: int | None = None,
    progress: bool = True,
    on_result: Callable[[EdgeResult], None] | None = None,
) -> EdgeSummary:
    """Send every frame of ``sources`` to ``server``'s ``model`` coded with ``mode``; write predictions.csv.

    Feature modes run the backbone here, from ``edge_model``: an edge folder or ``features.onnx`` written by
    :func:`edgead.edge.backbone.export_edge` (ONNX Runtime), or the run folder itself (torch); the pq modes
    take the codebook found beside it. Options and the output folder are checked before any frame is read.
    """
    if mode not in CODECS:
        raise UsageError(f"--mode {mode!r} is not a codec: choose one of {', '.join(CODECS)}")
    if mode in FEATURE_CODECS and edge_model is None:
        raise UsageError(f"mode {mode} runs the backbone on the edge: pass --edge-model (RUN/edge or the run folder)")
    if not 0 < ratio <= 1 or not 0 <= quality <= 100:
        raise UsageError(f"--ratio must be in (0, 1] and --quality in 0..100, got {ratio} and {quality}")
    link = Link(parse_bandwidth(bandwidth), float(latency_ms))
    check_server_url(server)
    out_dir = check_output_dir(out_dir, PREDICTIONS_CSV, kind="edge predictions")
    csv_path = out_dir / PREDICTIONS_CSV
    api_key = read_api_key(api_key_file)
    backbone = None
    if mode in FEATURE_CODECS:
        from edgead.edge.backbone import load_edge

        backbone = load_edge(edge_model, threads)
    source = open_source(sources, max_frames)  # everything local is checked before the server is asked
    client = ScoringClient(server, api_key, timeout_s, retries, backoff_s)
    results: list[EdgeResult] = []
    summary = EdgeSummary(server, model, mode, link, results, csv_path, backbone.runtime if backbone else None)
    try:
        codec, size = prepare_codec(client, model, mode, backbone, ratio, quality, seed)
        for frame in progress_bar(source, "edge", progress, total=source.expected_frames):
            result = EdgeResult(frame.index, frame.name, mode, error=frame.error)
            if frame.image is not None:
                send_frame(frame.image, result, codec, backbone, size, client, model, link, throttle)
            results.append(result)
            if on_result is not None:
                on_result(result)
            if len(results) % CSV_EVERY == 0:
                write_edge_csv(csv_path, results)
        if getattr(source, "ended_early", None):
            summary.warnings.append(source.ended_early)
    finally:
        source.close()
        client.close()
        if results:  # also on Ctrl-C or an error: the frames sent so far keep their rows
            write_edge_csv(csv_path, results)
    if not results:
        write_edge_csv(csv_path, results)
    return summary


def send_frame(image: np.ndarray, result: EdgeResult, codec: Codec, backbone, size: int,  # noqa: ANN001
               client: ScoringClient, model: str, link: Link, throttle: bool = False,
               map_format: str | None = None) -> dict | None:
    """Encode one frame, send it, fill its row (an error fills ``error`` instead of raising).

    Returns the server's answer (None on an error); ``map_format`` ("png", "float16") asks for the map too.
    """
    try:
        start = time.perf_counter()
        rgb = resize_image(image, size)
        body = codec.encode(backbone.features(rgb) if backbone is not None else rgb)
        result.edge_ms = (time.perf_counter() - start) * 1000.0
        result.payload_bytes = len(body)
        result.link_ms = link.transfer_ms(len(body))
        if throttle and math.isfinite(result.link_ms):
            time.sleep(result.link_ms / 1000.0)
        sent = time.perf_counter()
        answer, result.attempts = client.score(model, body, map_format is not None, map_format or "png")
        result.http_ms = (time.perf_counter() - sent) * 1000.0
        result.server_ms = answer.timings.total_ms
        result.total_ms = result.edge_ms + result.link_ms + result.server_ms
        result.score, result.normalized_score = answer.score, answer.normalized_score
        result.decision = answer.decision
    except EdgeClientError as exc:
        result.error, result.attempts = str(exc), exc.attempts
    except EdgeadError as exc:
        result.error = str(exc)
    except (KeyError, TypeError, ValueError) as exc:  # a codec's own check; answers are EdgeClientErrors
        result.error = f"cannot send the frame: {type(exc).__name__}: {_clip(str(exc))}"
    if result.error is not None:
        result.score = result.normalized_score = result.decision = None  # failed, never "normal"
        return None
    return answer.model_dump()


_send = send_frame  # its earlier, private name
