"""The `edgead` command. Thin on purpose: it parses arguments and calls the library.

Errors a user can cause are printed as one line (no traceback) with a non-zero exit code.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from edgead import __version__
from edgead.errors import EdgeadError, UsageError

app = typer.Typer(
    help="edgead: visual anomaly detection for edge hardware (fit on good images, flag defects).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ParamOption = Annotated[
    list[str] | None,
    typer.Option(
        "--param", "-p", help="Model hyperparameter KEY=VALUE, e.g. -p coreset_ratio=0.05 (repeatable)."
    ),
]


RuntimeOption = Annotated[
    str | None,
    typer.Option(
        help="torch (run folders), onnxruntime or openvino (.onnx / .xml), litert (.tflite); default: the file's own."
    ),
]
ModelArgument = Annotated[
    Path, typer.Argument(help="Run folder written by `edgead fit`, or a file written by `edgead export`.")
]

BorderOption = Annotated[
    str,
    typer.Option(
        help="Border of the 3x3 feature aggregation: zeros (pad with zeros, the default) or valid "
        "(average the inside pixels only)."
    ),
]

DatasetsArgument = Annotated[
    list[Path], typer.Argument(help="Datasets, or folders of categories (e.g. mvtec_ad/).")
]


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """'2,3,4' -> (2, 3, 4); None or 'default' keeps the backbone's default stages."""
    if text is None or text == "default":
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--layers expects stage indices like 2,3 (got '{text}')") from None


def parse_params(params: list[str] | None) -> dict[str, Any]:
    """KEY=VALUE pairs; values parsed as JSON when they can be (numbers, null, true), else strings."""
    parsed: dict[str, Any] = {}
    for item in params or []:
        if "=" not in item:
            raise UsageError(f"--param expects KEY=VALUE, got '{item}'")
        key, value = item.split("=", 1)
        try:
            parsed[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key.strip()] = value
    return parsed


def print_metrics(metrics: dict[str, Any]) -> None:
    keys = ["image_auroc", "pixel_auroc", "aupro", "f1_max", "precision", "recall", "threshold"]
    for key in keys:
        value = metrics.get(key)
        if value is not None or key in ("image_auroc", "pixel_auroc"):
            shown = "n/a (no masks)" if value is None else f"{value:.4f}"
            typer.echo(f"  {key:<12} {shown}")


@app.command()
def fit(
    dataset: Annotated[
        Path,
        typer.Argument(help="MVTec-layout category (train/good, ...) or plain folder (good/, <defect>/)."),
    ],
    out: Annotated[str, typer.Option("--out", "-o", help="Run folder to write.")] = "runs/latest",
    model: Annotated[str, typer.Option(help="Method: patchcore, padim, tinyglass, student, autoencoder, simclr or differnet.")] = "patchcore",
    backbone: Annotated[str, typer.Option(help="Backbone name, see `edgead list`.")] = "efficientnet_lite0",
    image_size: Annotated[int, typer.Option(help="Square input size in pixels.")] = 256,
    layers: Annotated[
        str | None, typer.Option(help="Backbone stages, e.g. 2,3 (stride 8+16, the default) or 2,3,4.")
    ] = None,
    weights: Annotated[
        Path | None, typer.Option(help="Backbone weights file (for backbones not shipped here).")
    ] = None,
    random_init: Annotated[bool, typer.Option(help="Random backbone weights (testing only).")] = False,
    validation_fraction: Annotated[
        float, typer.Option(help="Share of train/good kept for the threshold.")
    ] = 0.1,
    validation: Annotated[
        Path | None,
        typer.Option(
            help="Folder of other good images for the threshold (train/good, good/ or the images in it); fits on all of "
            "DATASET's. Use it when DATASET's images are consecutive video frames."
        ),
    ] = None,
    threshold_quantile: Annotated[float, typer.Option(help="Quantile of normal validation scores.")] = 0.99,
    seed: Annotated[int, typer.Option()] = 0,
    param: ParamOption = None,
    aggregation_border: BorderOption = "zeros",
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing run in --out (its export/ and test/ too).")
    ] = False,
    pq_codebook: Annotated[
        bool,
        typer.Option("--pq-codebook", help="Also train the product-quantization codebook of `edgead edge --mode pq`."),
    ] = False,
) -> None:
    """Fit a detector on the normal (train/good) images of DATASET and save a run folder."""
    from edgead.training import fit_run

    _, config = fit_run(
        dataset,
        out,
        model=model,
        backbone=backbone,
        image_size=image_size,
        layers=parse_layers(layers),
        weights_path=str(weights) if weights else None,
        pretrained=not random_init,
        validation_fraction=validation_fraction,
        threshold_quantile=threshold_quantile,
        seed=seed,
        hyperparameters=parse_params(param),
        aggregation_border=aggregation_border,
        force=force,
        pq_codebook=pq_codebook,
        validation_dataset=validation,
    )
    typer.echo(
        f"fitted {config.model} on {config.extra['n_train']} images in {config.extra['fit_seconds']} s; "
        f"threshold {config.threshold:.4f}; run saved to {out}"
    )


@app.command()
def test(
    run: ModelArgument,
    dataset: Annotated[
        Path | None, typer.Option(help="Dataset to test on (default: the one it was fitted on).")
    ] = None,
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="Report folder (default: RUN/test).")
    ] = None,
    runtime: RuntimeOption = None,
) -> None:
    """Evaluate a run or an exported model on a test split: metrics.json, scores.csv, ROC, heat maps.

    An INT8 file is also compared with its fp32 run (when that folder is still there).
    """
    from edgead.evaluation import evaluate_run

    metrics = evaluate_run(run, dataset, out, runtime=runtime)
    typer.echo(
        f"{metrics['model']} ({metrics['runtime']}) on {metrics['dataset']} ({metrics.get('n_normal')} "
        f"normal, {metrics.get('n_anomalous')} anomalous):"
    )
    print_metrics(metrics)
    for key in ("image_auroc", "pixel_auroc"):
        if f"{key}_change" in metrics:
            typer.echo(
                f"  {key} change vs fp32: {100 * metrics[key + '_change']:+.2f} points "
                f"(fp32 {metrics['fp32_' + key]:.4f})"
            )
    if "fp32_comparison_refused" in metrics:
        typer.echo(f"warning: not compared with fp32: {metrics['fp32_comparison_refused']}", err=True)
    typer.echo(f"report written to {metrics['report_dir']}")


@app.command()
def predict(
    run: ModelArgument,
    sources: Annotated[
        list[str],
        typer.Argument(help="Images and/or folders, OR one video file, OR one camera index (0, 1...)."),
    ],
    out: Annotated[
        str, typer.Option("--out", "-o", help="Folder for the annotated video or PNGs and predictions.csv.")
    ] = "predictions",
    runtime: RuntimeOption = None,
    blur: Annotated[
        str | None, typer.Option(help="Blur these before inference and before anything is written: faces.")
    ] = None,
    blur_regions: Annotated[
        Path | None,
        typer.Option(help='JSON file of polygons to blur, in source pixels: {"polygons": \\[\\[\\[x, y], ...]]}.'),
    ] = None,
    output: Annotated[
        str, typer.Option(help="auto (PNGs for images, a video for videos/cameras), video, png or none.")
    ] = "auto",
    video_format: Annotated[
        str, typer.Option(help="Container of the annotated video: mp4, webm or avi.")
    ] = "mp4",
    max_frames: Annotated[
        int | None, typer.Option(help="Stop after this many frames (cameras run until Ctrl-C).")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="Inference threads for onnxruntime/openvino (default: all cores).")
    ] = None,
) -> None:
    """Score images, a video or a camera: per-frame score, decision, heat-map overlay, FPS, and a CSV."""
    from edgead.runtime import run_stream
    from edgead.runtime.cvpaths import printable
    from edgead.runtime.sources import source_kind

    per_frame_lines = source_kind(sources) == "images"  # a video's frames go to the CSV, not the terminal

    def show(result) -> None:  # noqa: ANN001
        name = printable(result.name)
        if result.error:
            typer.echo(f"{name}: error: {result.error}", err=True)
        elif per_frame_lines:
            typer.echo(f"{name}: score {result.score:.4f} ({result.normalized_score:.2f}) {result.decision}")

    summary = run_stream(
        run,
        sources,
        out,
        runtime=runtime,
        blur=blur,
        blur_regions=blur_regions,
        output=output,
        video_format=video_format,
        max_frames=max_frames,
        threads=threads,
        on_result=show,
    )
    for warning in summary.warnings:
        typer.echo(f"warning: {warning}", err=True)
    written = summary.video or summary.png_dir or "nothing (--output none)"
    typer.echo(
        f"{summary.scored} frames scored, {summary.failed} failed, {summary.anomalous} anomalous; "
        f"{summary.fps:.1f} FPS end to end on {summary.runtime}; output: {written}; scores: {summary.csv}"
    )
    if summary.failed or not summary.results:
        raise typer.Exit(1)


@app.command()
def benchmark(
    datasets: DatasetsArgument,
    models: Annotated[
        str, typer.Option(help="Comma-separated models (see `edgead list`).")
    ] = "patchcore,padim",
    out: Annotated[
        str, typer.Option("--out", "-o", help="Markdown table to write (JSON beside it).")
    ] = "docs/results/baselines.md",
    runs_dir: Annotated[str, typer.Option(help="Where the fitted runs go (refitted unless --reuse-runs).")] = (
        "runs/benchmark"
    ),
    image_size: Annotated[int, typer.Option()] = 256,
    backbone: Annotated[str, typer.Option()] = "efficientnet_lite0",
    layers: Annotated[
        list[str] | None, typer.Option(help="Layer set(s) to compare, e.g. --layers 2,3 --layers 2,3,4.")
    ] = None,
    note: Annotated[
        list[str] | None, typer.Option(help="A line of context for the report (repeatable).")
    ] = None,
    param: ParamOption = None,
    runtime: Annotated[
        list[str] | None,
        typer.Option(
            help="Also export and test on: onnxruntime, onnxruntime-int8, openvino, openvino-int8, litert, litert-int8 (repeatable)."
        ),
    ] = None,
    reuse_runs: Annotated[
        bool, typer.Option("--reuse-runs", help="Load runs already in --runs-dir instead of refitting them.")
    ] = False,
    hardware: Annotated[
        bool,
        typer.Option(
            "--hardware",
            help="Also p50/p95 latency, fps, throughput, file size, peak RAM and per-device energy "
            "estimates (from MACs): hardware_benchmark.csv and accuracy_vs_latency.png beside --out.",
        ),
    ] = False,
    aggregation_border: BorderOption = "zeros",
    compare: Annotated[
        list[Path] | None,
        typer.Option(help="An earlier benchmark JSON whose rows on these datasets are shown beside (repeatable)."),
    ] = None,
) -> None:
    """Fit + test every model on every dataset (and runtime); write one markdown table and JSON."""
    from edgead.benchmark import run_benchmark

    model_names = [m.strip() for m in models.split(",") if m.strip()]
    params = parse_params(param)
    rows = run_benchmark(
        datasets,
        model_names,
        out,
        runs_dir=runs_dir,
        image_size=image_size,
        backbone=backbone,
        hyperparameters={m: params for m in model_names},
        layer_sets=[parse_layers(text) for text in layers] if layers else [None],
        notes=note or (),
        runtimes=runtime or ("torch",),
        reuse_runs=reuse_runs,
        hardware=hardware,
        aggregation_border=aggregation_border,
        compare=compare or (),
    )
    for row in rows:
        typer.echo(
            f"{row['dataset']:<24} {row['model']:<10} {row['runtime']:<17} layers {row['layers']:<6} "
            f"image AUROC {row['image_auroc']:.4f}"
        )
    typer.echo(f"table written to {out}")
    if hardware:
        typer.echo(
            f"hardware view written to {Path(out).parent / 'hardware_benchmark.csv'} and accuracy_vs_latency.png"
        )


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="Run folder written by `edgead fit`.")],
    format: Annotated[
        str, typer.Option("--format", "-f", help="onnx, openvino, tflite, imx500, or edge (the backbone alone, RUN/edge).")
    ] = "onnx",
    out: Annotated[str | None, typer.Option("--out", "-o", help="Folder (default: RUN/export).")] = None,
    int8: Annotated[
        bool, typer.Option("--int8", help="Also write an INT8 post-training-quantized file.")
    ] = False,
    calibration: Annotated[int, typer.Option(help="Number of calibration images for --int8.")] = 64,
    calibration_defects: Annotated[
        int | None,
        typer.Option(
            help="Synthetic-defect versions of calibration images added to the INT8 calibration set (default: "
            "one in eight for PatchCore on the IMX500 and for PatchCore runs with -p bank_size, none otherwise).",
        ),
    ] = None,
    calibration_dir: Annotated[
        Path | None, typer.Option(help="Folder of normal images (default: the run's train/good).")
    ] = None,
    float_input: Annotated[
        bool, typer.Option("--float-input", help="Graph input float 0..1 instead of uint8 0..255.")
    ] = False,
    qat: Annotated[
        bool,
        typer.Option(
            "--qat",
            help="Quantization-aware training first: fine-tune the run (student, autoencoder, tinyglass) with "
            "fake INT8 quantization into OUT/qat_run and export that.",
        ),
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Write into --out although it holds other files or another run's export (same names replaced)."
        ),
    ] = False,
) -> None:
    """Export a run to one static graph (ONNX opset 17, OpenVINO IR, or IMX500 packerOut.zip)."""
    from edgead.deploy.export import export_run

    report = export_run(
        run,
        format,
        out,
        int8=int8,
        calibration=calibration,
        calibration_dir=calibration_dir,
        input_dtype="float32" if float_input else "uint8",
        qat=qat,
        calibration_defects=calibration_defects,
        force=force,
    )
    if "parity_max_abs_diff_map" in report:
        typer.echo(
            f"parity vs torch on {report['parity_images']} images: max abs diff map "
            f"{report['parity_max_abs_diff_map']:.2e}, score {report['parity_max_abs_diff_score']:.2e}"
        )
    for key, path in report.get("files", {}).items():
        typer.echo(f"{key:<14} {path} ({report['sizes_mb'][key]:.2f} MB)")
    for key, value in report.items():
        if key not in ("files", "sizes_mb") and not key.startswith("parity"):
            typer.echo(f"{key}: {value}")


@app.command()
def budget(
    run: Annotated[
        Path,
        typer.Argument(
            help="Run folder written by `edgead fit` or `edgead prune`, or a .tflite file (coral)."
        ),
    ],
    device: Annotated[
        list[str] | None, typer.Option(help="imx500, rpi5, jetson-nano or coral (repeatable; default: all).")
    ] = None,
    image_size: Annotated[int | None, typer.Option(help="Input size (default: the run's).")] = None,
) -> None:
    """Does the model fit the device? INT8 weights + data + peak activations vs memory; latency/energy estimates.

    With --device coral, the Edge TPU's requirements are also checked on a .tflite file: the one given,
    or RUN/export/model.int8.tflite where `edgead export RUN --format tflite --int8` wrote it."""
    from edgead.deploy.budget import budget_run, format_budget, list_devices
    from edgead.deploy.coral import check_file, format_edgetpu

    if run.suffix == ".tflite":
        if device and set(device) != {"coral"}:
            raise UsageError(
                "a .tflite file is checked for --device coral only; give the run folder for the others"
            )
        typer.echo(format_edgetpu(check_file(run)))
        return
    for name in device or list_devices():
        typer.echo(format_budget(budget_run(run, name, image_size=image_size)))
        if name == "coral":
            exported = run / "export" / "model.int8.tflite"
            if exported.is_file():
                typer.echo(format_edgetpu(check_file(exported)))
            else:
                typer.echo(
                    f"edge tpu      no {exported} to check: `edgead export {run} --format tflite --int8`, then "
                    f"`edgead budget {exported} --device coral`"
                )


@app.command()
def prune(
    run: Annotated[Path, typer.Argument(help="Run folder written by `edgead fit`.")],
    ratio: Annotated[float, typer.Option(help="Share of channels to remove, in (0, 1).")] = 0.5,
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="New run folder (default: RUN_pruned<percent>).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing run in --out.")] = False,
    dataset: Annotated[
        Path | None,
        typer.Option(help="Training dataset to refit on (default: the one the run was fitted on)."),
    ] = None,
) -> None:
    """Structured channel pruning of the backbone's last stages and the head, then refit the head."""
    from edgead.deploy.prune import prune_run

    if out is None:
        out = str(run.with_name(f"{run.name}_pruned{int(round(ratio * 100))}"))
    _, config = prune_run(run, out, ratio, dataset=dataset, force=force)
    typer.echo(f"pruned {run} by {ratio:.0%}: run saved to {out}; {config.extra.get('pruning', '')}")


@app.command()
def serve(
    runs: Annotated[
        list[str],
        typer.Argument(help="Run folders to serve; NAME=RUN serves one as NAME (default: the folder's name)."),
    ],
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(help="Worker processes; each loads every model once.")] = 1,
    api_key_file: Annotated[
        Path | None, typer.Option(help="File holding the key clients must send (X-API-Key); none: no key.")
    ] = None,
    header_timeout: Annotated[
        float, typer.Option(help="Seconds a connection may take to send complete request headers (else closed).")
    ] = 10.0,
    max_client_connections: Annotated[
        int, typer.Option(help="Open connections per client address and worker; one more gets a 503.")
    ] = 8,
) -> None:
    """Serve runs over HTTP to edge devices: images or compressed features in, score and decision out."""
    from pydantic import ValidationError

    from edgead.edge.server import Limits
    from edgead.edge.server import serve as serve_runs
    from edgead.validation import describe

    try:
        limits = Limits(header_timeout_s=header_timeout, max_connections_per_client=max_client_connections)
    except ValidationError as exc:
        raise UsageError(f"--header-timeout / --max-client-connections: {describe(exc)}") from None
    serve_runs(runs, host=host, port=port, workers=workers, api_key_file=api_key_file, limits=limits,
               announce=typer.echo)


@app.command()
def edge(
    sources: Annotated[
        list[str],
        typer.Argument(help="Images and/or folders, OR one video file, OR one camera index (0, 1...)."),
    ],
    model: Annotated[str, typer.Option(help="Model name on the server (GET /v1/models lists them).")],
    server: Annotated[str, typer.Option(help="Scoring server URL.")] = "http://127.0.0.1:8000",
    mode: Annotated[str, typer.Option(help="image, webp, features, rs, pq, rs+pq or rs+webp.")] = "webp",
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for predictions.csv.")] = "edge_predictions",
    bandwidth: Annotated[str, typer.Option(help="Modelled uplink, e.g. 100kB/s, 1MB/s, 800kbit/s, inf.")] = "100kB/s",
    latency_ms: Annotated[float, typer.Option(help="Modelled one-way link latency added per frame.")] = 0.0,
    edge_model: Annotated[
        Path | None,
        typer.Option(help="Feature modes: the edge part (RUN/edge, from `edgead export RUN --format edge`) or the run."),
    ] = None,
    api_key_file: Annotated[Path | None, typer.Option(help="File holding the server's API key.")] = None,
    ratio: Annotated[float, typer.Option(help="Share of feature positions the rs modes send.")] = 0.25,
    quality: Annotated[int, typer.Option(help="WebP quality (webp, rs+webp), 0..100.")] = 80,
    seed: Annotated[int, typer.Option(help="Seed of the rs modes' position sampling.")] = 0,
    max_frames: Annotated[int | None, typer.Option(help="Stop after this many frames.")] = None,
    throttle: Annotated[
        bool, typer.Option("--throttle", help="Also sleep the modelled link time (real-time pacing).")
    ] = False,
) -> None:
    """Edge device: encode frames (running the backbone here in feature modes), send them to the server, log costs."""
    from edgead.edge.client import run_edge
    from edgead.runtime.cvpaths import printable

    def show(result) -> None:  # noqa: ANN001
        if result.error:
            typer.echo(f"{printable(result.name)}: error: {result.error}", err=True)

    summary = run_edge(
        sources,
        server,
        model,
        mode,
        out,
        bandwidth=bandwidth,
        latency_ms=latency_ms,
        edge_model=edge_model,
        api_key_file=api_key_file,
        ratio=ratio,
        quality=quality,
        seed=seed,
        max_frames=max_frames,
        throttle=throttle,
        on_result=show,
    )
    for warning in summary.warnings:
        typer.echo(f"warning: {warning}", err=True)
    keys = ("payload_bytes", "edge_ms", "link_ms", "server_ms", "total_ms")
    medians = ", ".join(f"{k} {summary.median(k):.1f}" for k in keys if summary.median(k) is not None)
    typer.echo(
        f"{summary.scored} frames scored, {summary.failed} failed ({mode}, {bandwidth}); medians: {medians}; "
        f"scores: {summary.csv}"
    )
    if summary.failed or not summary.results:
        raise typer.Exit(1)


experiment_app = typer.Typer(
    help="Experiments: fit and test many runs to answer one question; each writes a report.",
    no_args_is_help=True,
)
app.add_typer(experiment_app, name="experiment")


def parse_ratios(text: str) -> list[float]:
    """'0,0.05,0.1' -> [0.0, 0.05, 0.1]."""
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--ratios expects numbers like 0,0.05,0.1 (got '{text}')") from None


@experiment_app.command()
def contamination(
    datasets: DatasetsArgument,
    ratios: Annotated[
        str, typer.Option(help="Shares of the anomalous test images moved into train, comma-separated.")
    ] = "0,0.05,0.1,0.2,0.3",
    model: Annotated[str, typer.Option(help="Method, see `edgead list`.")] = "tinyglass",
    out: Annotated[
        str, typer.Option("--out", "-o", help="Markdown report to write (JSON and plots beside it).")
    ] = "docs/results/contamination.md",
    runs_dir: Annotated[str, typer.Option(help="Where the fitted runs go.")] = "runs/contamination",
    image_size: Annotated[int, typer.Option()] = 256,
    seed: Annotated[int, typer.Option()] = 0,
    same_test_set: Annotated[
        bool,
        typer.Option(
            "--same-test-set/--per-ratio-test-set",
            help="Score every ratio on the test images no ratio moved, or on what each ratio leaves.",
        ),
    ] = True,
    param: ParamOption = None,
) -> None:
    """Fit with a share of the defects moved into train; report AUROC and AUPRO against that share."""
    from edgead.experiments.contamination import run_contamination

    rows = run_contamination(
        datasets,
        parse_ratios(ratios),
        out,
        model=model,
        runs_dir=runs_dir,
        image_size=image_size,
        seed=seed,
        hyperparameters=parse_params(param),
        same_test_set=same_test_set,
    )
    for row in rows:
        auroc = "-" if row["image_auroc"] is None else f"{row['image_auroc']:.4f}"
        typer.echo(
            f"{row['dataset']:<24} ratio {row['ratio']:<5g} ({row['n_contaminated']} in train) "
            f"image AUROC {auroc}"
        )
    typer.echo(f"report written to {out}")


@experiment_app.command()
def split(
    datasets: DatasetsArgument,
    modes: Annotated[
        str, typer.Option(help="Comma-separated modes: image, webp, features, rs, pq, rs+pq, rs+webp.")
    ] = "image,webp,features,rs,pq,rs+pq,rs+webp",
    bandwidth: Annotated[str, typer.Option(help="Modelled uplink, e.g. 100kB/s, 1MB/s, 800kbit/s.")] = "100kB/s",
    latency_ms: Annotated[float, typer.Option(help="Modelled one-way link latency added per frame.")] = 0.0,
    out: Annotated[
        str, typer.Option("--out", "-o", help="Markdown report to write (JSON and two plots beside it).")
    ] = "docs/results/edge_server.md",
    runs_dir: Annotated[str, typer.Option(help="Where the fitted runs go (refitted unless --reuse-runs).")] = (
        "runs/split"
    ),
    image_size: Annotated[int, typer.Option()] = 256,
    backbone: Annotated[str, typer.Option(help="Backbone of the edge part (and of the server's head).")] = (
        "efficientnet_lite0"
    ),
    server_backbone: Annotated[
        str | None,
        typer.Option(help="Score the image modes with a run on this stronger backbone, e.g. efficientnet_lite2."),
    ] = None,
    ratio: Annotated[float, typer.Option(help="Share of feature positions the rs modes send.")] = 0.25,
    quality: Annotated[int, typer.Option(help="WebP quality (webp, rs+webp), 0..100.")] = 80,
    seed: Annotated[int, typer.Option(help="Seed of the fits and of the rs modes' sampling.")] = 0,
    max_images: Annotated[
        int | None, typer.Option(help="Send at most this many test images per dataset (spread evenly).")
    ] = None,
    workers: Annotated[int, typer.Option(help="Server worker processes.")] = 1,
    reuse_runs: Annotated[
        bool, typer.Option("--reuse-runs", help="Load runs already in --runs-dir instead of refitting them.")
    ] = False,
    param: ParamOption = None,
    webp_fit: Annotated[
        bool,
        typer.Option(help="Score webp with a run fitted on WebP-round-tripped training images (else the originals)."),
    ] = True,
) -> None:
    """Every edge/server split mode through the real server: accuracy, payload and time per frame, one report."""
    from edgead.experiments.split import run_split_experiment

    rows = run_split_experiment(
        datasets,
        out,
        modes=modes.split(","),
        bandwidth=bandwidth,
        latency_ms=latency_ms,
        runs_dir=runs_dir,
        image_size=image_size,
        backbone=backbone,
        server_backbone=server_backbone,
        ratio=ratio,
        quality=quality,
        seed=seed,
        max_images=max_images,
        workers=workers,
        reuse_runs=reuse_runs,
        hyperparameters=parse_params(param),
        webp_fit=webp_fit,
        warn=lambda message: typer.echo(f"warning: {message}", err=True),
    )
    for row in rows:
        f1 = "-" if row["pixel_f1"] is None else f"{row['pixel_f1']:.4f}"
        auroc = "-" if row["image_auroc"] is None else f"{row['image_auroc']:.4f}"
        total = "-" if row["total_ms"] is None else f"{row['total_ms']:.1f}"
        typer.echo(
            f"{row['dataset']:<24} {row['mode']:<8} image AUROC {auroc} pixel F1 {f1} "
            f"payload {row['payload_bytes']} B total {total} ms"
        )
    typer.echo(f"report written to {out}")


@app.command()
def demo(
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for the videos, run and report.")] = (
        "demo_output"
    ),
    model: Annotated[str, typer.Option(help="Model to fit on the synthetic good parts.")] = "patchcore",
    seconds: Annotated[float, typer.Option(help="Length of the inspection video.")] = 20.0,
) -> None:
    """A synthetic inspection line end to end: fit on good parts, run the live loop, write the annotated video."""
    from edgead.demo import run_demo

    result = run_demo(out, model=model, seconds=seconds)
    typer.echo("demo results (synthetic belt video, per frame):")
    for key in ("frames", "detection_rate", "false_alarm_rate", "frame_auroc", "fps", "fit_seconds"):
        value = result.get(key)
        typer.echo(f"  {key:<16} {'n/a' if value is None else round(value, 4)}")
    typer.echo(f"annotated video: {result['video']}\nreport: {result['report']}")


@app.command()
def profile(run: Annotated[Path, typer.Argument(help="Run folder written by `edgead fit`.")]) -> None:
    """Parameters, MACs and bytes of a fitted run at its input size (batch 1)."""
    from edgead.profiling import model_profile
    from edgead.runs import load_run

    pipeline, config = load_run(run)
    info = model_profile(pipeline)
    typer.echo(f"{config.model} with {config.backbone} at {info['image_size']}x{info['image_size']}:")
    typer.echo(
        f"  parameters   {info['params']:,} (backbone {info['backbone_params']:,}, head {info['head_params']:,})"
    )
    typer.echo(
        f"  MACs         {info['macs'] / 1e9:.3f} G (backbone {info['backbone_macs'] / 1e9:.3f}, "
        f"head {info['head_macs'] / 1e9:.3f}, postprocess {info['postprocess_macs'] / 1e9:.3f})"
    )
    typer.echo(f"  weights      {info['weights_bytes'] / 1e6:.2f} MB float32")
    if info["head_data_values"]:
        typer.echo(f"  head data    {info['head_data_bytes'] / 1e6:.2f} MB {info['head_data']}")


@app.command(name="list")
def list_components() -> None:
    """List the available models and backbones."""
    from edgead.backbones import list_backbones
    from edgead.models import list_models

    typer.echo("models:    " + ", ".join(list_models()))
    typer.echo("backbones: " + ", ".join(list_backbones()))


@app.command()
def version() -> None:
    """Print the edgead version."""
    typer.echo(__version__)


class Terminated(BaseException):
    """SIGTERM, raised where the process is so that every atomic write removes its temporary file and the
    previous output stays (a BaseException: click turns KeyboardInterrupt into its own exit)."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated


def main() -> None:
    """Run the CLI: input errors exit 1 and usage errors 2, each with one ``error:`` line; Ctrl-C exits 130,
    SIGTERM 143, both after the writes in progress are undone."""
    for stream in (sys.stdout, sys.stderr):  # file names need not be UTF-8: print their bytes as \xNN
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        app()
    except Terminated:
        typer.echo("terminated", err=True)
        sys.exit(143)
    except UsageError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except EdgeadError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except MemoryError:
        typer.echo("error: out of memory: use smaller images (--image-size) or fewer of them", err=True)
        sys.exit(1)
    except OSError as exc:  # a full disk, a file that vanished, a device error: the environment, not a bug
        where = f": {exc.filename!r}" if exc.filename else ""
        typer.echo(f"error: {exc.strerror or exc}{where}", err=True)
        sys.exit(1)
    except SystemExit as exc:
        if exc.code == 130:  # typer turns Ctrl-C into a silent exit 130
            typer.echo("interrupted", err=True)
        raise
