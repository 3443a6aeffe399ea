"""Fit time and peak memory of PatchCore and PaDiM against the number of training images.

Real lines collect hundreds to thousands of good images per product; the shared categories have about
200. This makes larger training sets from one category's train/good images by augmentation (a flip,
a rotation by a multiple of 90 degrees, a shift of up to 8 pixels and a brightness change of up to 10%,
seeded), written once under runs/fit_scaling/ (never into the repository), and runs
``edgead fit`` on each size as a fresh process, alone, recording its wall time, the fit time the run
records (feature extraction + head fit) and its peak resident memory (``wait4``'s ru_maxrss).
``--global-coreset-max N`` also fits PatchCore with one chunk holding the whole pool (the greedy
coreset over all patches, edgead's earlier fit) up to N images, for comparison.

    .venv/bin/python benchmarks/fit_scaling.py ../shared/datasets/mvtec_ad/bottle --out docs/results/fit_scaling.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from edgead.data.images import list_images, load_rgb
from edgead.reporting import markdown_table, new_figure, results_header

SIZES = (100, 200, 400, 800, 1111, 1600)  # 1111 train/good images = 1000 fitted + 111 validation
WORK = Path("runs/fit_scaling")


def augmented_pool(source: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` augmented copies of ``source``'s train/good images (made once, then reused)."""
    folder = WORK / "pool" / source.name
    folder.mkdir(parents=True, exist_ok=True)
    originals = list_images(source / "train" / "good")
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"{i:05d}.png"
        choice, flip, turns = rng.integers(len(originals)), rng.integers(2), rng.integers(4)
        shift, gain = rng.integers(-8, 9, size=2), rng.uniform(0.9, 1.1)
        if not path.is_file():
            image = load_rgb(originals[choice])
            image = np.rot90(image[:, ::-1] if flip else image, k=int(turns))
            image = np.roll(image, shift=tuple(int(s) for s in shift), axis=(0, 1))
            image = np.clip(image.astype(np.float32) * gain, 0, 255).astype(np.uint8)
            Image.fromarray(np.ascontiguousarray(image)).save(path)
        paths.append(path)
    return paths


def dataset_of(pool: list[Path], size: int) -> Path:
    """An MVTec-layout folder whose train/good links to the first ``size`` pool images."""
    root = WORK / "data" / f"n{size}"
    good = root / "train" / "good"
    if good.is_dir() and len(list(good.iterdir())) == size:
        return root
    shutil.rmtree(root, ignore_errors=True)
    good.mkdir(parents=True)
    for path in pool[:size]:
        (good / path.name).symlink_to(path.resolve())
    return root


def fit_once(dataset: Path, model: str, params: list[str]) -> dict:
    """One `edgead fit` in a fresh process: wall seconds, recorded fit seconds, peak RSS."""
    run = WORK / "runs" / f"{model}_{dataset.name}{'_global' if params else ''}"
    shutil.rmtree(run, ignore_errors=True)
    edgead = Path(sys.executable).with_name("edgead")
    command = [str(edgead), "fit", str(dataset), "--model", model, "--out", str(run)]
    for param in params:
        command += ["-p", param]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"fit failed: {' '.join(command)}\n{process.stderr.read().decode()[-2000:]}")
    config = json.loads((run / "config.json").read_text())
    bank = None
    if model == "patchcore":
        from safetensors import safe_open

        with safe_open(str(run / "model.safetensors"), "pt") as f:
            bank = f.get_slice("head.memory_bank_").get_shape()[0]
    return {
        "fit_s": config["extra"]["fit_seconds"],
        "wall_s": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "n_fitted": config["extra"]["n_train"],
        "bank": bank,
    }


def plot(rows: list[dict], out: Path) -> None:
    fig = new_figure(10, 4)
    time_ax, memory_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for label in dict.fromkeys(r["variant"] for r in rows):
        picked = [r for r in rows if r["variant"] == label]
        x = [r["n_fitted"] for r in picked]
        time_ax.plot(x, [r["fit_s"] for r in picked], "o-", label=label)
        memory_ax.plot(x, [r["peak_rss_mb"] / 1024 for r in picked], "o-", label=label)
    time_ax.set(xlabel="training images fitted", ylabel="fit time (s)", title="Fit time")
    memory_ax.set(xlabel="training images fitted", ylabel="peak memory (GB)", title="Peak resident memory")
    memory_ax.axhline(4, color="grey", linestyle="--", linewidth=1, label="4 GB target")
    for ax in (time_ax, memory_ax):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="an MVTec-layout category whose train/good is augmented")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--models", default="patchcore,padim")
    parser.add_argument("--global-coreset-max", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/results/fit_scaling.md"))
    args = parser.parse_args()
    pool = augmented_pool(args.source, max(args.sizes))
    variants = [(m, m, []) for m in args.models.split(",")]
    if args.global_coreset_max:
        variants.append(("patchcore (one global coreset)", "patchcore", ["chunk_size=1000000000"]))
    rows = []
    for size in args.sizes:
        dataset = dataset_of(pool, size)
        for label, model, params in variants:
            if params and size > args.global_coreset_max:
                continue
            row = {"variant": label, "train_good": size, **fit_once(dataset, model, params)}
            row["ms_per_image"] = 1000 * row["fit_s"] / row["n_fitted"]
            rows.append(row)
            print(row, flush=True)
    for label in dict.fromkeys(r["variant"] for r in rows):
        picked = [r for r in rows if r["variant"] == label]
        for before, after in zip(picked, picked[1:], strict=False):
            after["growth_exponent"] = float(
                np.log(after["fit_s"] / before["fit_s"]) / np.log(after["n_fitted"] / before["n_fitted"])
            )
    figure = args.out.with_suffix(".png")
    plot(rows, figure)
    command = f"python benchmarks/fit_scaling.py {args.source} --sizes {' '.join(map(str, args.sizes))}"
    command += f" --models {args.models} --global-coreset-max {args.global_coreset_max} --out {args.out}"
    lines = [
        *results_header("Fit time and peak memory against training-set size", command),
        f"- Data: augmented copies of {args.source}'s train/good images (flip, rotation by k x 90 degrees, "
        "shift up to 8 px, brightness x0.9-1.1; seeded), 10% held out for validation as always. Each fit is "
        "`edgead fit DATA --model M` with the defaults (EfficientNet-Lite0, 256x256), alone on the machine, "
        "in a fresh process.",
        "- fit_s: what the run records (feature extraction + head fit: coreset and bank-neighbour search for "
        "PatchCore, streamed mean/covariance for PaDiM); wall_s: the whole command (start-up, validation "
        "scoring, saving); peak_rss_mb: the process's peak resident memory. growth_exponent: log-log slope of "
        "fit_s against the previous size (1 = linear, 2 = quadratic).",
        "",
        markdown_table(rows, ["variant", "train_good", "n_fitted", "bank", "fit_s", "ms_per_image",
                              "growth_exponent", "wall_s", "peak_rss_mb"]),
        "",
        f"![fit time and peak memory]({figure.name})",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
