"""Diagnostic: can a TinyGLASS-sized per-patch head represent a good anomaly score at all?

GLASS's discriminator scores every patch feature on its own with a small MLP (1x1 convolutions).
This script takes GAS and LAS out of the question: it trains heads of the same shape (adaptor +
hidden layers) by plain regression onto a kNN teacher, the distance from each patch feature to the
nearest patch of *other* normal training images (PatchCore's score), on the cached training views and
their LAS versions. If even that student cannot rank the test images, no GLASS training recipe on
these features and this head size can, and the limit is the head's function class, not the synthesis.

It uses the feature cache of ``tinyglass_ablation.py`` (same ``--cache``) and reads the test set after
every epoch on purpose: it is a diagnosis, never a way to pick settings.

    python benchmarks/tinyglass_capacity.py ../shared/datasets/mvtec_ad/screw --heads 256 1024 512x2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tinyglass_ablation import load_cache, report
from torch import nn

from edgead.metrics import image_auroc
from edgead.models.patchcore import NearestNeighbourIndex


def standardise(normal: torch.Tensor):
    mean, std = normal.mean(dim=(0, 2, 3), keepdim=True), normal.std(dim=(0, 2, 3), keepdim=True)
    return lambda x: (x - mean) / std.clamp_min(1e-6)


def rows(features: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N * H * W, C] patch features."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def teacher_targets(normal, synthetic, scale, n_images: int, bank_size: int, patches: int, generator):
    """Patch features of the training views and LAS views, with their kNN distance to other images.

    The training images are split into halves; queries from one half search a bank of (at most
    ``bank_size`` random) patches of the other half's unaugmented views, so no patch finds itself.
    """
    image_of_view = torch.arange(len(normal)) % n_images  # views are stored view-major
    half = torch.randperm(n_images, generator=generator) < n_images // 2
    xs, ys = [], []
    for side in (True, False):
        bank = rows(scale(normal[:n_images][half != side]))
        bank = bank[torch.randperm(len(bank), generator=generator)[:bank_size]]
        index = NearestNeighbourIndex(bank)
        views = half[image_of_view] == side
        for features in (normal[views], synthetic[views]):
            queries = rows(scale(features))
            n_patches = features.shape[2] * features.shape[3]
            picks = torch.cat(
                [
                    i * n_patches + torch.randperm(n_patches, generator=generator)[:patches]
                    for i in range(len(features))
                ]
            )
            distance, _ = index.search(queries[picks])
            xs.append(queries[picks])
            ys.append(distance[:, 0])
    return torch.cat(xs), torch.cat(ys)


def make_head(channels: int, spec: str) -> nn.Sequential:
    """Adaptor, then ``width`` or ``width x depth`` hidden layers (BN + LeakyReLU), then one output."""
    width, _, depth = spec.partition("x")
    layers: list[nn.Module] = [nn.Linear(channels, channels)]
    size = channels
    for _ in range(int(depth or 1)):
        layers += [nn.Linear(size, int(width)), nn.BatchNorm1d(int(width)), nn.LeakyReLU(0.2)]
        size = int(width)
    return nn.Sequential(*layers, nn.Linear(size, 1))


def test_auroc(head: nn.Module, test: torch.Tensor, labels: torch.Tensor) -> float:
    head.eval()
    with torch.no_grad():
        maps = head(rows(test)).reshape(test.shape[0], 1, *test.shape[2:])
    head.train()
    return round(image_auroc(labels.numpy(), maps.amax(dim=(1, 2, 3)).numpy()), 3)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("dataset")
    parser.add_argument("--heads", nargs="+", default=["256", "1024", "512x2"], help="hidden width[xdepth]")
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--bank", type=int, default=32768, help="random bank patches per half")
    parser.add_argument("--patches", type=int, default=256, help="query patches per cached view")
    parser.add_argument("--views", type=int, default=4, help="views per image in the cache (the default)")
    parser.add_argument("--cache", type=Path, default=None, help="feature cache of tinyglass_ablation.py")
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line per head here")
    args = parser.parse_args()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    cache = load_cache(args.dataset, args.cache, {})
    normal, synthetic, _ = cache["train"]
    scale = standardise(normal)
    start = time.perf_counter()
    n_images = len(normal) // args.views
    x, y = teacher_targets(normal, synthetic, scale, n_images, args.bank, args.patches, generator)
    teacher_s = time.perf_counter() - start
    target = (y - y.mean()) / y.std()
    test, labels = scale(cache["test"]), cache["labels"]
    bank = rows(scale(normal[:n_images]))
    teacher = NearestNeighbourIndex(bank[torch.randperm(len(bank), generator=generator)[: 2 * args.bank]])
    teacher_maps = teacher.search(rows(test))[0].reshape(test.shape[0], -1)
    teacher_auroc = round(image_auroc(labels.numpy(), teacher_maps.amax(dim=1).numpy()), 3)
    for spec in args.heads:
        torch.manual_seed(0)
        head = make_head(x.shape[1], spec)
        optimiser = torch.optim.AdamW(head.parameters(), lr=1e-3)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, args.epochs)
        curve, start = [], time.perf_counter()
        for _ in range(args.epochs):
            for batch in torch.randperm(len(x)).split(4096):
                loss = F.mse_loss(head(x[batch])[:, 0], target[batch])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            schedule.step()
            curve.append(test_auroc(head, test, labels))
        result = {
            "dataset": Path(args.dataset).name,
            "head": spec,
            "params": sum(p.numel() for p in head.parameters()),
            "teacher_test_auroc": teacher_auroc,
            "training_patches": len(x),
            "teacher_s": round(teacher_s),
            "train_s": round(time.perf_counter() - start),
            "student_test_auroc_last": curve[-1],
            "student_test_auroc_max": max(curve),
            "student_test_auroc_by_epoch": curve,
        }
        report(result, args.out)


if __name__ == "__main__":
    main()
