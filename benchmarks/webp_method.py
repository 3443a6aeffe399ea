"""WebP encoder effort (libwebp method 4 against 6) at one quality, scored by the same runs: the comparison
behind `WEBP_METHOD` in edgead.edge.codecs (docs/results/edge_server.md discloses it was made on a test set).

    python benchmarks/webp_method.py ../shared/datasets/mvtec_ad/screw \
        --image-run runs/split/patchcore_efficientnet_lite0_256_screw \
        --webp-run runs/split/patchcore_efficientnet_lite0_256_screw_webp80 \
        --out docs/results/edge_server_webp_method.md

Every test image is resized to the run's input size, scored raw by ``--image-run`` and, WebP-encoded with
each method and decoded, by ``--webp-run`` (a run fitted on WebP-round-tripped training images). Torch, in
process: no server, no link model (the split experiment measures those).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from edgead.data.datasets import open_dataset
from edgead.data.images import load_rgb, resize_image
from edgead.edge.codecs import WebpCodec
from edgead.metrics.auroc import image_auroc
from edgead.reporting import results_header, write_rows_page
from edgead.runs import load_run

COLUMNS = ["dataset", "encoding", "method", "image_auroc", "median_bytes"]
METHODS = (4, 6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("--image-run", type=Path, required=True)
    parser.add_argument("--webp-run", type=Path, required=True)
    parser.add_argument("--quality", type=int, default=80)
    parser.add_argument("--out", type=Path, default=Path("docs/results/edge_server_webp_method.md"))
    args = parser.parse_args()
    raw, config = load_run(args.image_run)
    webp, _ = load_run(args.webp_run)
    codecs = {method: WebpCodec(config.image_size, args.quality, method=method) for method in METHODS}
    samples = open_dataset(args.dataset).test
    labels = np.array([s.label for s in samples])
    scores: dict[str, list[float]] = {"raw": [], **{f"webp{m}": [] for m in METHODS}}
    sizes: dict[int, list[int]] = {m: [] for m in METHODS}
    for sample in samples:
        rgb = resize_image(load_rgb(sample.path), config.image_size)
        image = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255)[None]
        scores["raw"].append(float(raw.predict(image)[1][0]))
        for method in METHODS:
            data = codecs[method].encode(rgb)
            sizes[method].append(len(data))
            scores[f"webp{method}"].append(float(webp.predict(codecs[method].decode(data))[1][0]))
    name = args.dataset.name
    rows = [{"dataset": name, "encoding": "raw image", "method": "-",
             "image_auroc": image_auroc(labels, np.array(scores["raw"])), "median_bytes": None}]
    for method in METHODS:
        rows.append({"dataset": name, "encoding": f"webp q{args.quality}", "method": method,
                     "image_auroc": image_auroc(labels, np.array(scores[f"webp{method}"])),
                     "median_bytes": float(np.median(sizes[method]))})  # fmt: skip
    header = [*results_header(f"WebP encoder effort on {name}", "python " + " ".join(sys.argv)),
              "- " + " ".join(__doc__.split("\n\n")[2].split()), ""]  # fmt: skip
    write_rows_page(args.out, header, rows, COLUMNS)
    print(rows)


if __name__ == "__main__":
    main()
