"""Trust nothing that arrives: the edge client against a hostile fake server (NaN scores, missing or absurd
fields, garbage maps, endless answers), the real server against slow and greedy clients (trickled headers,
too many connections from one address), bounded link options, malformed --server URLs and damaged weights
at serve start-up. Every failure is one clear error, never a traceback and never a "normal" decision."""

from __future__ import annotations

import base64
import csv
import json
import math
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import running_server
from PIL import Image

from edgead.edge.client import (
    MAX_ANSWER_BYTES,
    EdgeClientError,
    EdgeResult,
    Link,
    ScoringClient,
    check_server_url,
    parse_bandwidth,
    prepare_codec,
    run_edge,
    send_frame,
)
from edgead.edge.codecs import CODECS, create_codec
from edgead.errors import UsageError

MODEL = "parts"
HEADER_TIMEOUT_S = 1.0
PER_CLIENT = 3
GOOD_INFO = {"name": MODEL, "model": "padim", "backbone": "resnet18", "input_size": 64, "feature_shape": [152, 8, 8],
             "accepted_codecs": list(CODECS), "pq_codebook_id": None, "threshold": 1.0}
GOOD_SCORE = {"model": MODEL, "codec": "webp", "payload_bytes": 100, "score": 0.5, "normalized_score": 0.4,
              "decision": "normal", "timings": {"decode_ms": 1.0, "backbone_ms": 2.0, "head_ms": 0.5, "total_ms": 3.5}}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ------------------------------------------------------------------------------------ a hostile server


@dataclass
class FakeServer:
    """A tiny HTTP server on loopback whose answers each test sets: (status, JSON-able or bytes) per route."""

    url: str
    routes: dict[str, tuple[int, object]] = field(default_factory=dict)

    def answer(self, models: object = None, score: object = None, status: int = 200) -> None:
        self.routes["/v1/models"] = (200, {"models": [GOOD_INFO]} if models is None else models)
        self.routes["score"] = (status, GOOD_SCORE if score is None else score)


def _handler(fake: FakeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # noqa: ANN002
            pass

        def do_GET(self) -> None:
            self.reply(*fake.routes.get(self.path.split("?")[0], (404, {"detail": "no such route"})))

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.reply(*fake.routes["score"])

        def reply(self, status: int, content: object) -> None:
            if callable(content):  # streams its own answer
                content(self)
                return
            body = content if isinstance(content, bytes) else json.dumps(content).encode()  # NaN stays NaN
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    hostile = FakeServer("")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hostile))
    server.daemon_threads = True
    hostile.url = f"http://127.0.0.1:{server.server_address[1]}"
    hostile.answer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield hostile
    finally:
        server.shutdown()
        server.server_close()


def _frames(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((64, 64, 3), 40 * (i + 1), np.uint8)).save(folder / f"f{i}.png")
    return folder


def _send(fake: FakeServer, map_format: str | None = None) -> EdgeResult:
    client = ScoringClient(fake.url, retries=0, timeout_s=5)
    try:
        result = EdgeResult(0, "frame", "webp")
        send_frame(np.zeros((64, 64, 3), np.uint8), result, create_codec("webp", 64), None, 64, client, MODEL,
                   Link(1e6), map_format=map_format)
        return result
    finally:
        client.close()


def test_the_fake_server_itself_gives_a_normal_row(fake: FakeServer) -> None:
    result = _send(fake)
    assert result.error is None and result.decision == "normal" and result.score == 0.5


@pytest.mark.parametrize("change, reason", [
    ({"score": math.nan}, "score: input should be a finite number"),
    ({"score": math.inf}, "score: input should be a finite number"),
    ({"score": "0.1"}, "score: input should be a valid number"),
    ({"normalized_score": 7.0}, "normalized_score"),
    ({"decision": "maybe"}, "decision"),
    ({"decision": None}, "decision"),
    ({"timings": {"decode_ms": 1.0}}, "timings.backbone_ms"),
    ({"timings": {**GOOD_SCORE["timings"], "total_ms": -5}}, "timings.total_ms"),
    ({"model": "other"}, "not 'parts'"),
    ({"model": "\x1b[31mred"}, "model"),
    ({"codec": "gif"}, "codec"),
    ({"payload_bytes": 10**20}, "payload_bytes"),
])
def test_a_bad_score_answer_is_an_error_row_never_normal(fake: FakeServer, change: dict, reason: str) -> None:
    fake.answer(score={**GOOD_SCORE, **change})
    result = _send(fake)
    assert result.error is not None and reason in result.error, result.error
    assert result.decision is None and result.score is None and "\x1b" not in result.error


@pytest.mark.parametrize("body", [b"not json", b"", b"[1, 2]", b"{" * 100_000, json.dumps({"detail": "x"}).encode()])
def test_a_score_answer_that_is_not_json_or_not_an_answer(fake: FakeServer, body: bytes) -> None:
    fake.answer(score=body)
    result = _send(fake)
    assert result.decision is None and "score answer is not valid" in result.error


def _float16(values: np.ndarray) -> str:
    return base64.b64encode(values.astype("<f2").tobytes()).decode()


@pytest.mark.parametrize("extra, reason", [
    ({}, "no float16 anomaly map"),
    ({"anomaly_map_float16": _float16(np.zeros((64, 64))), "anomaly_map_shape": [64, 65]}, "base64 characters"),
    ({"anomaly_map_float16": _float16(np.zeros((64, 64))), "anomaly_map_shape": [10**6, 10**6]}, "anomaly_map_shape"),
    ({"anomaly_map_float16": _float16(np.zeros((64, 64)))}, "come together"),
    ({"anomaly_map_float16": "!" * 10924, "anomaly_map_shape": [64, 64]}, "not base64"),
    ({"anomaly_map_float16": _float16(np.full((64, 64), np.nan)), "anomaly_map_shape": [64, 64]}, "NaN"),
    ({"anomaly_map_float16": "A" * 12_000_000, "anomaly_map_shape": [2048, 2048]}, "anomaly_map_float16"),
])
def test_a_garbage_float16_map_fails_the_frame(fake: FakeServer, extra: dict, reason: str) -> None:
    fake.answer(score={**GOOD_SCORE, **extra})
    result = _send(fake, map_format="float16")
    assert result.decision is None and result.error is not None and reason in result.error, result.error
    assert len(result.error) < 400


def test_a_good_float16_map_and_a_garbage_png_map(fake: FakeServer) -> None:
    from edgead.edge.client import decode_map

    values = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    fake.answer(score={**GOOD_SCORE, "anomaly_map_float16": _float16(values), "anomaly_map_shape": [64, 64]})
    client = ScoringClient(fake.url, retries=0)
    answer, _ = client.score(MODEL, b"x", include_map=True, map_format="float16")
    assert np.allclose(decode_map(answer), values, atol=1e-3)
    assert np.allclose(decode_map(answer.model_dump()), values, atol=1e-3)  # the dict send_frame returns
    client.close()
    for garbage, reason in (("%%%", "not a base64 image"), (base64.b64encode(b"GIF89a" + bytes(50)).decode(), "image"),
                            (None, "no PNG anomaly map")):
        fake.answer(score={**GOOD_SCORE, "anomaly_map_png": garbage})
        result = _send(fake, map_format="png")
        assert result.decision is None and reason in result.error, result.error
    import io

    big = io.BytesIO()
    Image.new("L", (300, 300)).save(big, "PNG")
    fake.answer(score={**GOOD_SCORE, "anomaly_map_png": base64.b64encode(big.getvalue()).decode()})
    assert "300x300" in _send(fake, map_format="png").error


def test_an_endless_answer_is_cut_with_bounded_memory(fake: FakeServer) -> None:
    def endless(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(10**12))
        handler.end_headers()
        chunk = b" " * (1 << 20)
        try:
            for _ in range(64):  # 64 MiB at most: the client must stop well before
                handler.wfile.write(chunk)
        except OSError:
            pass

    fake.routes["score"] = (200, endless)
    client = ScoringClient(fake.url, retries=0, timeout_s=5)
    tracemalloc.start()
    try:
        with pytest.raises(EdgeClientError, match="over 16 MiB"):
            client.score(MODEL, b"x")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        client.close()
    assert peak < 3 * MAX_ANSWER_BYTES


def test_error_details_are_clipped_and_printable(fake: FakeServer) -> None:
    fake.answer(status=400, score={"detail": "\x1b]0;owned\x07" + "y" * 10_000})
    result = _send(fake)
    assert "server answered 400" in result.error and "\x1b" not in result.error and "\x07" not in result.error
    assert len(result.error) < 400 and result.decision is None


@pytest.mark.parametrize("info, reason", [
    ({k: v for k, v in GOOD_INFO.items() if k != "accepted_codecs"}, "accepted_codecs: field required"),
    ({**GOOD_INFO, "input_size": "abc"}, "input_size: input should be a valid integer"),
    ({**GOOD_INFO, "input_size": "64"}, "input_size: input should be a valid integer"),
    ({**GOOD_INFO, "input_size": 10**9}, "input_size: input should be less than or equal to 2048"),
    ({**GOOD_INFO, "input_size": 100}, "input_size: input should be a multiple of 32"),
    ({**GOOD_INFO, "feature_shape": [4096, 4096, 4096]}, "feature_shape"),
    ({**GOOD_INFO, "accepted_codecs": ["webp", "zip"]}, "accepted_codecs.1"),
    ({**GOOD_INFO, "threshold": math.nan}, "threshold"),
    ({**GOOD_INFO, "backbone": "x" * 10_000}, "backbone"),
    ({**GOOD_INFO, "pq_codebook_id": "not hex"}, "pq_codebook_id"),
])
def test_a_bad_model_description_stops_before_any_frame(fake: FakeServer, info: dict, reason: str) -> None:
    fake.answer(models={"models": [info]})
    client = ScoringClient(fake.url, retries=0)
    tracemalloc.start()
    try:
        with pytest.raises(EdgeClientError, match="model list is not valid") as caught:
            prepare_codec(client, MODEL, "webp")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        client.close()
    assert reason in str(caught.value) and len(str(caught.value)) < 400 and peak < 20 * 2**20


def test_a_model_list_that_is_not_one(fake: FakeServer) -> None:
    for models in ({"models": "all"}, {"models": [GOOD_INFO] * 2000}, b"<html>", {"model": []}):
        fake.answer(models=models)
        client = ScoringClient(fake.url, retries=0)
        try:
            with pytest.raises(EdgeClientError, match="model list is not valid"):
                client.model_info(MODEL)
        finally:
            client.close()


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "edgead", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_cli_edge_against_a_hostile_server(fake: FakeServer, tmp_path: Path) -> None:
    frames = _frames(tmp_path / "frames")
    fake.answer(score={**GOOD_SCORE, "score": math.nan})
    done = _cli("edge", frames, "--server", fake.url, "--model", MODEL, "--out", tmp_path / "nan", "--bandwidth", "inf")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("score: input should be a finite number") == 2
    rows = list(csv.DictReader((tmp_path / "nan" / "predictions.csv").open()))
    assert len(rows) == 2 and all(row["decision"] == "" and row["error"] for row in rows)

    fake.answer(models={"models": [{**GOOD_INFO, "input_size": "abc"}]})
    done = _cli("edge", frames, "--server", fake.url, "--model", MODEL, "--out", tmp_path / "abc")
    assert done.returncode == 1 and "input_size" in _one_error_line(done.stderr)


# ------------------------------------------------------------------------------ link and URL options


def test_link_options_are_bounded() -> None:
    for bad in ("1e400kB/s", "1B/s", "99B/s", "1000GB/s", "1e30 B/s", 1e-300, 0.5, math.nan, -1.0):
        with pytest.raises(UsageError, match="bandwidth"):
            parse_bandwidth(bad)
    assert parse_bandwidth("100B/s") == 100 and parse_bandwidth("100GB/s") == 100e9
    for bandwidth, latency in ((1e-300, 0.0), (1e12, 0.0), (math.nan, 0.0), (1e5, 1e12), (1e5, math.nan),
                               (1e5, math.inf), (1e5, -1.0)):
        with pytest.raises(UsageError):
            Link(bandwidth, latency)
    assert Link(math.inf, 60_000).transfer_ms(10**9) == 60_000


def test_link_options_are_checked_before_any_work(tmp_path: Path) -> None:
    frames = _frames(tmp_path / "frames")
    dead = f"http://127.0.0.1:{free_port()}"
    for options in ({"latency_ms": 1e12}, {"bandwidth": "1e400kB/s"}, {"bandwidth": "1B/s"}, {"latency_ms": math.nan}):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        with pytest.raises(UsageError):
            run_edge([frames], dead, MODEL, "webp", out, throttle=True, progress=False, **options)
        assert not out.exists()  # nothing made, no server asked


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "ftp://host", "http://", "http://:8000", "http://host:99999",
                                 "http://host:abc", "http://[::1", "http://host:0", "http://ho st", "http://host/?q=1",
                                 "http://host/#x", "", "http://host\x00", "javascript:alert(1)"])
def test_malformed_server_urls(url: str) -> None:
    with pytest.raises(UsageError, match="--server"):
        check_server_url(url)
    with pytest.raises(UsageError, match="--server"):
        ScoringClient(url)


def test_good_server_urls() -> None:
    assert check_server_url("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert check_server_url("https://example.com/edgead") == "https://example.com/edgead"
    assert check_server_url("http://[::1]:8000") == "http://[::1]:8000"


@pytest.mark.parametrize("url", ["http://host:99999", "localhost:8000", "http://[::1"])
def test_cli_malformed_server_url_exits_2_with_one_line(url: str, tmp_path: Path) -> None:
    frames = _frames(tmp_path / "frames", 1)
    done = _cli("edge", frames, "--server", url, "--model", MODEL, "--out", tmp_path / "out")
    assert done.returncode == 2 and "--server" in _one_error_line(done.stderr)
    assert not (tmp_path / "out").exists()


def test_cli_link_options_out_of_range_exit_2(tmp_path: Path) -> None:
    frames = _frames(tmp_path / "frames", 1)
    for option, value in (("--latency-ms", "1e12"), ("--bandwidth", "1e400kB/s")):
        done = _cli("edge", frames, "--model", MODEL, "--out", tmp_path / "out", option, value, "--throttle")
        assert done.returncode == 2 and option.lstrip("-").split("-")[0] in _one_error_line(done.stderr)


# --------------------------------------------------------------------- the real server, slow clients


@pytest.fixture(scope="module")
def padim_run(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgead.training import fit_run

    run = tmp_path_factory.mktemp("hostile") / MODEL
    fit_run(synthetic_dataset, run, model="padim", image_size=64, progress=False)
    return run


@pytest.fixture(scope="module")
def server(padim_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`edgead serve` with a short header timeout and a small per-address cap, one worker."""
    port = free_port()
    command = [sys.executable, "-m", "edgead", "serve", str(padim_run), "--port", str(port), "--header-timeout",
               str(HEADER_TIMEOUT_S), "--max-client-connections", str(PER_CLIENT)]
    with running_server(command, port, tmp_path_factory.mktemp("hostile_log") / "server.log") as url:
        yield url


def _connect(url: str, source: str = "127.0.0.1") -> socket.socket:
    port = int(url.rsplit(":", 1)[1])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((source, 0))
    except OSError:
        sock.close()
        pytest.skip(f"cannot bind a second loopback address {source}")
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    return sock


def _trickle_until_closed(sock: socket.socket, data: bytes, limit_s: float) -> tuple[float, bytes]:
    """Send ``data`` a byte per 0.2 s until the server closes; (seconds it took, what it answered)."""
    start = time.monotonic()
    answer = b""
    for byte in data * 100:
        if time.monotonic() - start > limit_s:
            break
        try:
            sock.send(bytes([byte]))
        except OSError:  # reset or broken pipe: closed
            break
        readable, _, _ = select.select([sock], [], [], 0.2)
        if readable:
            try:
                chunk = sock.recv(4096)
            except OSError:
                break
            if not chunk:
                break
            answer += chunk
    return time.monotonic() - start, answer


SLOW_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 200


def test_trickled_headers_are_cut_after_the_header_timeout(server: str) -> None:
    with _connect(server) as sock:
        took, answer = _trickle_until_closed(sock, SLOW_REQUEST, limit_s=8)
    assert took < HEADER_TIMEOUT_S + 3, took
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    with _connect(server) as idle:  # sends nothing at all: cut too
        idle.settimeout(HEADER_TIMEOUT_S + 4)
        assert idle.recv(4096).startswith(b"HTTP/1.1 408")


def test_the_header_timeout_restarts_after_each_response(server: str) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while not first.endswith(b"}"):  # headers, then the JSON body
            first += sock.recv(4096)
        assert first.startswith(b"HTTP/1.1 200"), first[:100]
        time.sleep(0.5)
        took, answer = _trickle_until_closed(sock, SLOW_REQUEST, limit_s=8)  # keep-alive, then trickle
    assert took < HEADER_TIMEOUT_S + 3 and answer.startswith(b"HTTP/1.1 408"), (took, answer[:100])


def test_one_address_cannot_lock_others_out(server: str) -> None:
    slow = [_connect(server, "127.0.0.2") for _ in range(PER_CLIENT)]
    try:
        for sock in slow:
            sock.send(b"GET /hea")  # incomplete headers, held open
        with _connect(server, "127.0.0.2") as extra:  # one over the cap: refused at once
            extra.settimeout(3)
            assert extra.recv(4096).startswith(b"HTTP/1.1 503")
        start = time.monotonic()
        response = httpx.get(f"{server}/healthz", timeout=5)  # another address is served meanwhile
        assert response.status_code == 200 and time.monotonic() - start < 2
    finally:
        for sock in slow:
            sock.close()
    time.sleep(0.3)  # the server sees the closes; the address may connect again
    with _connect(server, "127.0.0.2") as again:
        again.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert again.recv(4096).startswith(b"HTTP/1.1 200")


def test_serve_refuses_bad_connection_limits(padim_run: Path) -> None:
    done = _cli("serve", padim_run, "--port", str(free_port()), "--header-timeout", "0")
    assert done.returncode == 2 and "header" in _one_error_line(done.stderr)


def test_damaged_weights_stop_serve_before_it_listens(padim_run: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(padim_run, damaged)
    weights = damaged / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    port = free_port()
    done = _cli("serve", damaged, "--port", str(port), timeout=120)
    assert done.returncode == 1 and "model.safetensors" in _one_error_line(done.stderr)
    assert "serving" not in done.stdout
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def test_damaged_codebook_stops_serve_too(padim_run: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged_pq"
    shutil.copytree(padim_run, damaged)
    (damaged / "pq_codebook.safetensors").write_bytes(b"\x00" * 64)
    done = _cli("serve", damaged, "--port", str(free_port()), timeout=120)
    assert done.returncode == 1 and "codebook" in _one_error_line(done.stderr)

