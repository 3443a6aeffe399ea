"""Load test of the scoring server (issue 17): N workers, C concurrent clients sending WebP frames on loopback.

Starts `edgead.edge.server.serve` in a subprocess on a free loopback port, warms it up, then keeps
``--clients`` requests in flight for ``--seconds`` (or until ``--max-requests``), and reports requests/s,
latency p50/p95/p99, errors (must be 0) and the server's memory (all its processes) before and after.
It stops by itself and always stops the server. Without ``--run`` it fits PatchCore at 256 px on a
synthetic dataset in ``--work`` first. The result becomes the "## Load test" section of ``--out``
(docs/results/edge_server.md, the split experiment's page: run the experiment first, it rewrites the
page), replacing an earlier one; the numbers also go to edge_load.json beside it.

    .venv/bin/python benchmarks/edge_load.py [--run RUN] [--workers 2] [--clients 16] [--seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from edgead.data.images import list_images, load_rgb
from edgead.edge.client import EdgeClientError, wait_until_healthy
from edgead.edge.codecs import create_codec
from edgead.outputs import atomic_write_text
from edgead.reporting import markdown_table, results_header
from edgead.runs import read_config

SERVE = """
import sys
from edgead.edge.server import serve
serve([sys.argv[1]], port=int(sys.argv[2]), workers=int(sys.argv[3]), log_level="warning")
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tree_rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants (from /proc), in MB."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    family, frontier = {pid}, [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier and p not in family]
        family.update(children)
        frontier = children
    total = 0
    for p in family:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


async def load(url: str, model: str, bodies: list[bytes], clients: int, seconds: float, max_requests: int) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    stop_at = time.monotonic() + seconds
    sent = 0

    async def client(index: int) -> None:
        nonlocal sent
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            k = index
            while time.monotonic() < stop_at and sent < max_requests:
                sent += 1
                body = bodies[k % len(bodies)]
                k += clients
                start = time.perf_counter()
                try:
                    response = await http.post(f"/v1/models/{model}/score", content=body)
                    status = str(response.status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                latencies.append((time.perf_counter() - start) * 1000)
                if status != "200":
                    errors[status] = errors.get(status, 0) + 1

    start = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.monotonic() - start
    ms = np.array(latencies)
    return {
        "requests": len(latencies),
        "seconds": round(elapsed, 2),
        "requests_per_s": round(len(latencies) / elapsed, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "errors": sum(errors.values()),
        "error_kinds": errors,
    }


def fit_default_run(work: Path) -> Path:
    from edgead.data.synthetic import make_synthetic_dataset
    from edgead.training import fit_run

    run = work / "patchcore256"
    if not (run / "config.json").is_file():
        dataset = make_synthetic_dataset(work / "parts", seed=0)
        fit_run(dataset, run, model="patchcore", image_size=256, force=True)
    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="run folder to serve (default: fit one in --work)")
    parser.add_argument("--work", type=Path, default=Path("runs/edge_load"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--quality", type=int, default=80)
    parser.add_argument("--out", type=Path, default=Path("docs/results/edge_server.md"))
    args = parser.parse_args(argv)

    run = args.run or fit_default_run(args.work)
    config = read_config(run)
    dataset = Path(config.extra.get("dataset") or "")
    paths = [p for sub in ("test/good", "train/good") if (dataset / sub).is_dir() for p in list_images(dataset / sub)]
    if not paths:
        sys.exit(f"the run's dataset {dataset} is not here: the load test sends its images")
    webp = create_codec("webp", config.image_size, quality=args.quality)
    bodies = [webp.encode(load_rgb(p)) for p in paths[:64]]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-c", SERVE, str(run), str(port), str(args.workers)],
                               start_new_session=True)
    try:
        try:
            wait_until_healthy(url, lambda: process.poll() is None, timeout_s=180)
        except EdgeClientError as exc:
            sys.exit(str(exc))
        model = run.resolve().name
        asyncio.run(load(url, model, bodies, args.clients, 3.0, 200))  # warm-up: every worker has scored
        before = tree_rss_mb(process.pid)
        result = asyncio.run(load(url, model, bodies, args.clients, args.seconds, args.max_requests))
        after = tree_rss_mb(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    result.update({
        "workers": args.workers, "clients": args.clients, "model": f"{config.model} {config.image_size}px",
        "payload": f"webp q{args.quality}", "mean_payload_bytes": int(np.mean([len(b) for b in bodies])),
        "server_rss_before_mb": round(before, 1), "server_rss_after_mb": round(after, 1),
        "rss_growth_pct": round(100 * (after - before) / before, 1),
    })
    columns = ["workers", "clients", "model", "payload", "mean_payload_bytes", "requests", "requests_per_s",
               "p50_ms", "p95_ms", "p99_ms", "errors", "server_rss_before_mb", "server_rss_after_mb",
               "rss_growth_pct"]
    section = "## Load test"
    lines = [section, ""] + results_header("", "python " + " ".join(sys.argv))[2:]
    lines += ["", markdown_table([result], columns, floatfmt=".2f"), ""]
    page = args.out.read_text().split(section)[0].rstrip() + "\n\n" if args.out.is_file() else ""
    atomic_write_text(args.out, page + "\n".join(lines))
    atomic_write_text(args.out.with_name("edge_load.json"), json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
