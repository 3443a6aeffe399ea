"""The real scoring server (uvicorn subprocess, 2 workers) with the edge client: every codec end to end, API
keys, limits, hostile requests and 500+ seeded random payloads: always a 4xx with a reason, never a 5xx."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import running_server
from PIL import Image

from edgead.edge.codecs import CODECS, FEATURE_CODECS, create_codec
from edgead.edge.payload import CODEC_IDS, DTYPE_IDS, HEADER_SIZE, Payload, pack, parse_payload
from edgead.errors import EdgeadError, UsageError

MAX_BODY = 256 * 1024
MODEL = "parts"
SERVE = """
import sys
from edgead.edge.server import Limits, serve
serve([sys.argv[1]], port=int(sys.argv[2]), workers=2, api_key_file=sys.argv[3], log_level="warning",
      limits=Limits(max_body_bytes=int(sys.argv[4]), max_image_pixels=4_000_000, request_timeout_s=30))
"""


@dataclass
class Served:
    url: str
    key: str
    run: Path
    dataset: Path
    http: httpx.Client

    def score(self, body: bytes, key: str | None = None, model: str = MODEL) -> httpx.Response:
        return self.http.post(f"/v1/models/{model}/score", content=body, headers={"X-API-Key": key or self.key})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    from edgead.edge.backbone import export_edge
    from edgead.edge.pq import train_codebook
    from edgead.training import fit_run

    root = tmp_path_factory.mktemp("edge_server")
    run = root / MODEL
    fit_run(synthetic_dataset, run, model="padim", image_size=64, progress=False)
    train_codebook(run)  # the defaults: 19 sub-quantizers of 8 bits for 152 channels
    export_edge(run)
    key_file = root / "key.txt"
    key_file.write_text("k" * 8 + os.urandom(12).hex() + "\n")
    port = free_port()
    command = [sys.executable, "-c", SERVE, str(run), str(port), str(key_file), str(MAX_BODY)]
    with running_server(command, port, root / "server.log") as url, httpx.Client(base_url=url, timeout=30) as http:
        yield Served(url, key_file.read_text().strip(), run, synthetic_dataset, http)


def _detail(response: httpx.Response) -> str:
    detail = response.json()["detail"]
    return detail if isinstance(detail, str) else str(detail)


def test_models_and_health(served: Served) -> None:
    assert served.http.get("/healthz").json() == {"status": "ok", "models": [MODEL]}
    info = served.http.get("/v1/models", headers={"X-API-Key": served.key}).json()["models"][0]
    assert info["name"] == MODEL and info["input_size"] == 64 and info["feature_shape"] == [152, 8, 8]
    assert set(info["accepted_codecs"]) == set(CODECS) and len(info["pq_codebook_id"]) == 16


def test_api_key(served: Served) -> None:
    for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": served.key + "x"}, {"Authorization": "Bearer no"}):
        for response in (served.http.get("/v1/models", headers=headers),
                         served.http.post(f"/v1/models/{MODEL}/score", content=b"x", headers=headers)):
            assert response.status_code == 401 and "API key" in _detail(response)
    assert served.http.get("/v1/models", headers={"Authorization": f"Bearer {served.key}"}).status_code == 200


def test_edge_client_with_every_codec(served: Served, tmp_path: Path) -> None:
    from edgead.edge.client import run_edge

    key_file = tmp_path / "key"
    key_file.write_text(served.key)
    sources = [served.dataset / "test" / "good", served.dataset / "test" / "scratch"]
    summaries = {}
    for mode in CODECS:
        summary = run_edge(sources, served.url, MODEL, mode, tmp_path / mode, bandwidth="100kB/s", latency_ms=5,
                           edge_model=served.run / "edge" if mode in FEATURE_CODECS else None,
                           api_key_file=key_file, max_frames=6, progress=False)
        assert summary.failed == 0 and len(summary.results) == 6, [r.error for r in summary.results]
        rows = list(csv.DictReader((tmp_path / mode / "predictions.csv").open()))
        assert len(rows) == 6 and all(row["error"] == "" and row["decision"] in ("normal", "anomalous") for row in rows)
        for r in summary.results:
            assert r.link_ms == pytest.approx(r.payload_bytes / 100_000 * 1000 + 5)
            assert r.total_ms == pytest.approx(r.edge_ms + r.link_ms + r.server_ms)
        summaries[mode] = summary
    size = {mode: s.median("payload_bytes") for mode, s in summaries.items()}
    assert size["webp"] < size["image"] and size["pq"] < size["rs"] < size["features"] and size["rs+pq"] < size["pq"]
    assert summaries["features"].backbone_runtime == "onnxruntime"
    # float16 features scored on the server give the scores of the whole detector on the server.
    image_scores = np.array([r.score for r in summaries["image"].results])
    feature_scores = np.array([r.score for r in summaries["features"].results])
    assert np.allclose(feature_scores, image_scores, rtol=1e-2)


def _features_payload(served: Served) -> bytes:
    codec = create_codec("features", 64, (152, 8, 8))
    return codec.encode(np.random.default_rng(0).random((152, 8, 8), dtype=np.float32))


def _repack(data: bytes, **change) -> bytes:
    payload = parse_payload(data)
    fields = {"codec": CODEC_IDS[payload.codec], "dtype": DTYPE_IDS[payload.dtype], "shape": payload.shape,
              "positions": payload.positions, "pq_m": payload.pq_m, "pq_nbits": payload.pq_nbits,
              "codebook_id": payload.codebook_id, "body": payload.body()}
    return pack(**{**fields, **change})


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(1000))) + chunk(b"IEND", b"")


def test_malformed_requests_get_a_4xx_with_the_reason(served: Served) -> None:
    good = _features_payload(served)
    assert served.score(good).status_code == 200
    from edgead.edge.pq import Codebook

    book = Codebook.load(served.run / "pq_codebook.safetensors")
    pq = create_codec("pq", 64, (152, 8, 8), book).encode(np.zeros((152, 8, 8), np.float32))
    png = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(png, "PNG")
    cases = [
        (b"\x00" * (MAX_BODY + 1), 413, "over the limit"),
        (good[:-10], 400, "truncated"),
        (good[:20], 400, "truncated"),
        (b"EDGX" + good[4:], 415, "neither"),
        (good[:4] + b"\x07" + good[5:], 400, "version 7"),
        (_repack(good, codec=42), 415, "unknown codec"),
        (_repack(pq, codebook_id=b"\x01" * 8), 409, "codebook"),
        (_repack(good, shape=(152, 4, 16)), 422, "shape"),
        (_repack(good, shape=(76, 8, 16), positions=128), 422, "shape"),
        (png_bomb(), 413, "over the limit"),
        (png_bomb(3000, 3000), 413, "over the limit"),
        (png.getvalue()[: len(png.getvalue()) // 2], 400, "cannot decode"),
        (b"", 400, "empty body"),
    ]
    for body, status, reason in cases:
        response = served.score(body)
        assert response.status_code == status, (status, response.text)
        assert reason in _detail(response), (reason, response.text)
    response = served.score(good, model="nope")
    assert response.status_code == 404 and "nope" in _detail(response)
    # A declared length over the limit is refused before the body is read (raw socket: httpx will not lie).
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(f"POST /v1/models/{MODEL}/score HTTP/1.1\r\nHost: x\r\nX-API-Key: {served.key}\r\n"
                    "Content-Length: 999999999\r\n\r\n".encode() + good)
        assert raw.recv(4096).startswith(b"HTTP/1.1 413")


def _random_requests(served: Served, rng: np.random.Generator) -> list[tuple[str, bytes, bool]]:
    """(kind, body, may_succeed): bit flips and truncations of valid payloads of every codec (never valid),
    re-sealed random bodies and header fields (valid only by chance), and random bytes."""
    from edgead.edge.pq import Codebook

    book = Codebook.load(served.run / "pq_codebook.safetensors")
    features = np.random.default_rng(1).random((152, 8, 8), dtype=np.float32)
    valid = []
    for name in CODECS:
        codec = create_codec(name, 64, (152, 8, 8), book, ratio=0.3)
        valid.append(codec.encode(np.zeros((64, 64, 3), np.uint8) + 80 if name in ("image", "webp") else features))
    requests = []
    for i in range(560):
        data = bytearray(valid[i % len(valid)])
        kind = ["flip", "truncate", "reseal", "fields", "junk"][i % 5]
        if kind == "flip":
            for _ in range(1 + i % 4):
                bit = int(rng.integers(len(data) * 8))
                data[bit // 8] ^= 1 << (bit % 8)
            requests.append((kind, bytes(data), data[:4] == b"RIFF"))  # a flipped WebP may still decode
        elif kind == "truncate":
            requests.append((kind, bytes(data[: int(rng.integers(1, len(data)))]), False))
        elif kind == "reseal" and data[:4] == b"EDGF":
            body = bytearray(data[HEADER_SIZE:])
            for _ in range(1 + i % 8):
                body[int(rng.integers(len(body)))] = int(rng.integers(256))
            payload = parse_payload(bytes(data))
            requests.append((kind, pack(CODEC_IDS[payload.codec], DTYPE_IDS[payload.dtype], payload.shape,
                                        payload.positions, bytes(body), payload.pq_m, payload.pq_nbits,
                                        payload.codebook_id), True))
        elif kind == "fields" and data[:4] == b"EDGF":
            change = {"shape": tuple(int(v) for v in rng.integers(1, 300, 3)),
                      "positions": int(rng.integers(1, 2000)), "pq_m": int(rng.integers(0, 40)),
                      "pq_nbits": int(rng.integers(0, 17)), "codec": int(rng.integers(0, 8))}
            key = list(change)[int(rng.integers(len(change)))]
            requests.append((kind, _repack(bytes(data), **{key: change[key]}), True))
        else:
            prefix = [b"", b"EDGF", b"EDGF\x01", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\x00\x00\x00\x00WEBP"]
            junk = rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8).tobytes()
            requests.append(("junk", prefix[i % len(prefix)] + junk, False))
    return requests


def test_random_payloads_never_break_the_server(served: Served) -> None:
    rng = np.random.default_rng(2024)
    requests = _random_requests(served, rng)
    assert len(requests) >= 500
    statuses = []
    for kind, body, may_succeed in requests:
        response = served.score(body)
        statuses.append(response.status_code)
        assert response.status_code < 500, (kind, response.status_code, response.text)
        if response.status_code != 200:
            assert 400 <= response.status_code < 500 and _detail(response), (kind, response.text)
        else:
            assert may_succeed, (kind, response.text)
            assert np.isfinite(response.json()["score"])
    # A few more across the other endpoints and methods.
    for _ in range(30):
        junk = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
        for response in (served.http.post("/v1/models", content=junk, headers={"X-API-Key": served.key}),
                         served.http.get(f"/v1/models/{MODEL}/score", headers={"X-API-Key": served.key}),
                         served.http.post(f"/v1/models/{MODEL}/score?map={junk[:4].hex()}", content=junk,
                                          headers={"X-API-Key": served.key})):
            assert 400 <= response.status_code < 500
    assert sum(400 <= s < 500 for s in statuses) >= 450
    assert served.http.get("/healthz").status_code == 200
    good = served.score(_features_payload(served))
    assert good.status_code == 200 and good.json()["timings"]["total_ms"] > 0


def test_score_answer_with_map(served: Served) -> None:
    png = io.BytesIO()
    Image.fromarray(np.full((80, 120, 3), 90, np.uint8)).save(png, "PNG")
    response = served.http.post(f"/v1/models/{MODEL}/score?map=true", content=png.getvalue(),
                                headers={"X-API-Key": served.key})
    answer = response.json()
    assert response.status_code == 200 and answer["codec"] == "png"
    assert set(answer["timings"]) == {"decode_ms", "backbone_ms", "head_ms", "total_ms"}
    assert 0 <= answer["normalized_score"] <= 1 and answer["decision"] in ("normal", "anomalous")
    import base64

    anomaly_map = Image.open(io.BytesIO(base64.b64decode(answer["anomaly_map_png"])))
    assert anomaly_map.size == (64, 64) and anomaly_map.format == "PNG"


def test_failed_frames_keep_their_row(served: Served, tmp_path: Path) -> None:
    from edgead.edge.client import EdgeClientError, EdgeResult, Link, ScoringClient, _send, run_edge

    frames = tmp_path / "frames"
    frames.mkdir()
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(frames / "a.png")
    (frames / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    Image.fromarray(np.full((64, 64, 3), 60, np.uint8)).save(frames / "c.png")
    key_file = tmp_path / "key"
    key_file.write_text(served.key)
    summary = run_edge([frames], served.url, MODEL, "webp", tmp_path / "out", api_key_file=key_file, progress=False)
    assert [r.error is None for r in summary.results] == [True, False, True]
    rows = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
    assert len(rows) == 3 and "cannot read image" in rows[1]["error"] and rows[1]["score"] == ""

    dead = f"http://127.0.0.1:{free_port()}"
    client = ScoringClient(dead, retries=2, backoff_s=0.01, timeout_s=2)
    result = EdgeResult(0, "frame", "webp")
    _send(np.zeros((64, 64, 3), np.uint8), result, create_codec("webp", 64), None, 64, client, MODEL,
          Link(1e5), throttle=False)
    assert result.attempts == 3 and "unreachable" in result.error and result.decision is None
    with pytest.raises(EdgeClientError, match="unreachable"):
        run_edge([frames], dead, MODEL, "webp", tmp_path / "out2", retries=1, backoff_s=0.01, progress=False)
    # A wrong key is not retried: the answer will not change.
    client = ScoringClient(served.url, api_key="w" * 20, retries=3, backoff_s=1.0)
    start = time.monotonic()
    with pytest.raises(EdgeClientError, match="401") as info:
        client.model_info(MODEL)
    assert info.value.attempts == 1 and time.monotonic() - start < 1.0


def test_serve_checks_its_arguments_before_starting(served: Served, tmp_path: Path) -> None:
    from edgead.edge.server import parse_run_args, serve

    short = tmp_path / "short"
    short.write_text("abc")
    port = int(served.url.rsplit(":", 1)[1])
    with pytest.raises(UsageError, match="workers"):
        serve([served.run], workers=0)
    with pytest.raises(EdgeadError, match="does not exist"):
        serve([tmp_path / "missing"], port=free_port())
    with pytest.raises(UsageError, match="at least 16"):
        serve([served.run], api_key_file=short, port=free_port())
    with pytest.raises(UsageError, match="another --port"):
        serve([served.run], port=port)
    with pytest.raises(UsageError, match="two runs"):
        parse_run_args([served.run, served.run])
    assert list(parse_run_args([f"other={served.run}"])) == ["other"]


def test_request_deadline_answers_503() -> None:
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from fastapi import HTTPException

    from edgead.edge.server import Limits, run_with_deadline

    async def scenario() -> tuple[int, int]:
        state = SimpleNamespace(executor=ThreadPoolExecutor(1), slots=asyncio.Semaphore(1),
                                limits=Limits(request_timeout_s=0.1))
        try:
            await run_with_deadline(state, lambda: time.sleep(0.5), time.monotonic() + 0.1)
        except HTTPException as exc:
            slow = exc.status_code
        try:  # the slot is still held by the slow request: the next one cannot start in time
            await run_with_deadline(state, lambda: 1, time.monotonic() + 0.05)
        except HTTPException as exc:
            busy = exc.status_code
        await asyncio.sleep(0.6)
        assert await run_with_deadline(state, lambda: 7, time.monotonic() + 1) == 7
        state.executor.shutdown()
        return slow, busy

    assert asyncio.run(scenario()) == (503, 503)


def test_payload_encode_refuses_what_the_server_would(served: Served) -> None:
    with pytest.raises(EdgeadError, match="do not match"):
        create_codec("features", 64, (152, 8, 8)).encode(np.zeros((152, 4, 4), np.float32))
    with pytest.raises(EdgeadError, match="NaN"):
        create_codec("rs", 64, (152, 8, 8)).encode(np.full((152, 8, 8), np.nan, np.float32))
    assert Payload("features", (1, 1, 1), b"\x00\x00").to_bytes()[:4] == b"EDGF"
