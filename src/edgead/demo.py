"""`edgead demo`: the whole job on a built-in synthetic dataset, runnable on a fresh machine.

Generates textured parts with synthetic defects, fits PatchCore, tests it and writes a report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgead.data.synthetic import make_synthetic_dataset
from edgead.evaluation import evaluate_run
from edgead.reporting import markdown_table
from edgead.training import fit_run


def run_demo(
    out_dir: str | Path = "demo_output",
    model: str = "patchcore",
    image_size: int = 256,
    n_train: int = 60,
    progress: bool = True,
) -> dict[str, Any]:
    out_dir = Path(out_dir)
    dataset = make_synthetic_dataset(
        out_dir / "dataset", n_train=n_train, size=image_size, seed=0, overwrite=True
    )
    run_dir = out_dir / "run"
    pipeline, config = fit_run(dataset, run_dir, model=model, image_size=image_size, progress=progress)
    metrics = evaluate_run(
        run_dir, dataset, out_dir=out_dir / "test", pipeline=pipeline, config=config, progress=progress
    )
    report = out_dir / "REPORT.md"
    columns = ["image_auroc", "pixel_auroc", "aupro", "f1_max", "precision", "recall"]
    examples = sorted((out_dir / "test" / "examples").glob("*.png"))
    report.write_text(
        "\n".join(
            [
                "# edgead demo",
                "",
                f"Model `{model}` with backbone `{config.backbone}` at {config.image_size}x{config.image_size}, "
                f"fitted on {config.extra['n_train']} synthetic good parts in {config.extra['fit_seconds']} s; "
                f"threshold {config.threshold:.4f} from {config.extra['n_validation']} normal validation images.",
                "",
                markdown_table([metrics], columns),
                "",
                "Files: `test/metrics.json`, `test/scores.csv`, `test/roc.png`, heat maps in `test/examples/`.",
                "",
                *[f"![{p.stem}](test/examples/{p.name})" for p in examples],
                "",
            ]
        )
    )
    metrics["report"] = str(report)
    return metrics
