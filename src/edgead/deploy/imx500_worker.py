"""IMX500 worker: quantize a fitted TinyGLASS, student or PatchCore run with Sony's MCT, convert it with ``imxconv-pt``.

This script runs INSIDE the isolated IMX500 toolchain environment built by ``scripts/setup_imx500.sh``
(torch 2.6, model-compression-toolkit 2.5.1, imx500-converter 3.19.2), never in edgead's own
environment. :func:`edgead.deploy.imx500.export_imx500` starts it with that environment's Python and
with only the calling edgead package on ``PYTHONPATH``, so both sides run the same edgead code.

What goes on the sensor (the "sensor net", :mod:`edgead.deploy.imx500_nets`): preprocess + backbone +
the head as plain modules, i.e.

    image [1, 3, S, S], RGB scaled to 0..1  ->  patch scores [1, 1, S/8, S/8]

The input contract is the pipeline's own (``Pipeline.forward`` and the ONNX export take 0..1 images):
the backbone normalisation ``(x - 0.5) / 0.5`` is the graph's first op, so the 8-bit input tensor is
the sensor's 8-bit RGB image with no normalisation to configure when packaging. The postprocess
(upsample to S x S, Gaussian blur, max, normalisation and threshold) stays on the host:
``postprocess`` in the summary holds what it needs (:mod:`edgead.deploy.imx500_host` does it).

Steps: load run -> build sensor net -> N calibration images (the run's training split of train/good,
seeded) + M synthetic-defect versions of them (``--n-defects``: PatchCore's distances would otherwise be
calibrated to normal values only) -> MCT post-training quantization with the IMX500 target platform
capabilities -> quantized ONNX (MCT's own format, for the converter) and the same graph as standard QDQ
ONNX (``*.fakequant.onnx``, for ONNX Runtime on any CPU) -> optionally the test split scored by the float
and the quantized net (``--score-test``, evaluation only) -> ``imxconv-pt -i <name>.onnx -o OUT`` -> parse
``OUT/<name>_MemoryReport.json`` -> write ``OUT/imx500_summary.json`` next to ``packerOut.zip``. A stage
that fails (an op MCT or the converter refuses, a network that does not fit) is recorded in the summary
with the tool's own message, and the worker exits with status 2 (1 is left for crashes of the worker itself).

Usage (inside the toolchain env): ``python imx500_worker.py RUN_DIR OUT_DIR [--n-calibration 64] [--n-defects 8]``.
"""

import sys
from pathlib import Path

# Run as a script, Python puts this file's folder (edgead/deploy) first on sys.path, where sibling
# modules could shadow top-level packages; edgead itself comes from PYTHONPATH.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import glob  # noqa: E402
import importlib.metadata as metadata  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any  # noqa: E402

SUMMARY_FILE = "imx500_summary.json"
CONVERTER_LOG = "imxconv.log"
# MCT's quantized graph as plain ONNX (QDQ): the sensor's model for ONNX Runtime on any CPU
FAKEQUANT_SUFFIX = "fakequant.onnx"
TPC_VERSION = "v1"  # MCT 2.5.1's IMX500 target platform capabilities
TOOL_PACKAGES = (
    "torch",
    "torchvision",
    "model-compression-toolkit",
    "mct-quantizers",
    "imx500-converter",
    "onnx",
    "onnxruntime",
)


def log(message: str) -> None:
    print(f"[imx500] {message}", file=sys.stderr, flush=True)


class StageError(Exception):
    """A toolchain stage refused the model; ``detail`` is the tool's own message."""

    def __init__(self, stage: str, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.stage = stage
        self.message = message
        self.detail = detail


# ---- calibration and test data -------------------------------------------------------------------------


def as_images(arrays):
    """uint8 HxWx3 arrays -> one float [N, 3, H, W] tensor in 0..1 (the sensor net's input)."""
    import numpy as np
    import torch

    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)


def calibration_images(config, n: int, seed: int = 0, n_defects: int = 0):
    """``n`` images from the run's training split of train/good (never validation or test), 0..1, followed
    by ``n_defects`` synthetic-defect versions of them (keeps anomalous distances inside the INT8 range)."""
    import numpy as np

    from edgead.data import open_dataset, resize_image, split_validation
    from edgead.data.anomaly_synthesis import synthetic_defect_images
    from edgead.data.images import load_rgb
    from edgead.errors import DatasetError

    dataset_path = config.extra.get("dataset")
    if not dataset_path:
        raise DatasetError("the run's config.json does not name the dataset it was fitted on (extra.dataset)")
    if not Path(dataset_path).is_dir():
        raise DatasetError(
            f"the run was fitted on {dataset_path}, which is not here: calibration needs its train/good images"
        )
    data = open_dataset(dataset_path)
    train, _ = split_validation(
        data.train,
        fraction=config.extra.get("validation_fraction", 0.1),
        seed=config.extra.get("seed", 0),
    )
    rng = np.random.default_rng(seed)
    picks = rng.permutation(len(train))[: min(n, len(train))]
    arrays = [resize_image(load_rgb(train[i].path), config.image_size) for i in sorted(picks.tolist())]
    arrays += synthetic_defect_images(arrays, n_defects, seed)
    return as_images(arrays), [str(train[i].path) for i in sorted(picks.tolist())]


def score_test_split(config, nets: dict, out_path: Path, batch_size: int = 8) -> int:
    """Patch scores of every net in ``nets`` (name -> module) on the run's dataset's TEST split, saved to
    ``out_path`` (.npz: ``paths`` and one [N, 1, h, w] array per net) for the host to score. Evaluation
    only: nothing here feeds back into the quantization."""
    import numpy as np
    import torch

    from edgead.data import open_dataset, resize_image
    from edgead.data.images import load_rgb

    data = open_dataset(config.extra["dataset"])
    outputs: dict[str, list] = {name: [] for name in nets}
    for start in range(0, len(data.test), batch_size):
        part = data.test[start : start + batch_size]
        images = as_images([resize_image(load_rgb(s.path), config.image_size) for s in part])
        with torch.no_grad():
            for name, net in nets.items():
                device = next(net.parameters()).device
                outputs[name].append(net(images.to(device)).cpu().numpy().astype(np.float32))
        log(f"scored {min(start + batch_size, len(data.test))}/{len(data.test)} test images")
    arrays = {name: np.concatenate(parts) for name, parts in outputs.items()}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial.npz")
    np.savez(partial, paths=np.array([str(s.path) for s in data.test]), **arrays)
    os.replace(partial, out_path)
    return len(data.test)


# ---- MCT ---------------------------------------------------------------------------------------------


def quantize(net, images, batch_size: int):
    """MCT post-training quantization for the IMX500 target platform."""
    import model_compression_toolkit as mct

    batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]

    def representative_data():
        for batch in batches:
            yield [batch]

    tpc = mct.get_target_platform_capabilities("pytorch", "imx500", target_platform_version=TPC_VERSION)
    quantized, _ = mct.ptq.pytorch_post_training_quantization(
        net, representative_data, target_platform_capabilities=tpc
    )
    return quantized, representative_data


def fidelity(net, quantized, images) -> dict[str, float]:
    """How far MCT's simulated INT8 patch scores are from the float ones, on the calibration images.

    The image score here is the max of the raw patch scores (before the host's upsample and blur).
    """
    import torch

    with torch.no_grad():
        device = next(quantized.parameters()).device
        reference = torch.cat([net(images[i : i + 8]) for i in range(0, len(images), 8)])
        simulated = torch.cat(
            [quantized(images[i : i + 8].to(device)).cpu() for i in range(0, len(images), 8)]
        )
    a, b = reference.flatten().double(), simulated.flatten().double()
    corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
    ref_max, sim_max = reference.amax(dim=(1, 2, 3)).double(), simulated.amax(dim=(1, 2, 3)).double()
    return {
        "patch_score_max_abs_error": float((a - b).abs().max()),
        "patch_score_mean_abs_error": float((a - b).abs().mean()),
        "patch_score_correlation": corr,
        "image_score_max_abs_error": float((ref_max - sim_max).abs().max()),
    }


# ---- converter ---------------------------------------------------------------------------------------

_SIZE_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}


def parse_size(text: Any) -> int | None:
    """'97.53KB' -> bytes, reading the converter's K/M/G as powers of 1024 (its 8 MB chip = 8 MiB)."""
    if isinstance(text, int | float):
        return int(text)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMG]?B)\s*", str(text))
    if not match:
        return None
    return round(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


# summary key -> the converter's key(s) in <name>_MemoryReport.json (3.19.2 writes the first).
_REPORT_FIELDS = {
    "model_memory": ("Model Memory Physical Size", "Model Memory"),
    "runtime_memory": ("Runtime Memory Physical Size", "Runtime Memory"),
    "reserved_memory": ("Reserved Memory",),
    "memory_usage": ("Memory Usage",),
    "memory_available": ("Total Memory Available On Chip",),
    "utilization": ("Memory Utilization", "Utilization"),
    "fit_in_chip": ("Fit In Chip",),
    "input_persistent": ("Input Persistent",),
}


def parse_memory_report(path: Path) -> dict[str, Any]:
    """The converter's memory report: its own strings, the sizes in bytes, and a boolean ``fits``."""
    report = json.loads(path.read_text())
    body = report.get("Memory Report", report) if isinstance(report, dict) else {}
    parsed: dict[str, Any] = {}
    for name, keys in _REPORT_FIELDS.items():
        parsed[name] = next((body[k] for k in keys if k in body), None)
    for name in ("model_memory", "runtime_memory", "reserved_memory", "memory_usage", "memory_available"):
        parsed[f"{name}_bytes"] = parse_size(parsed[name]) if parsed[name] is not None else None
    fit = parsed["fit_in_chip"]
    if fit is None or isinstance(fit, bool):
        parsed["fits"] = fit
    else:
        parsed["fits"] = str(fit).strip().lower() == "true"
    parsed["report_file"] = path.name
    parsed["report"] = report
    return parsed


def parse_l2memory(path: Path) -> dict[str, int] | None:
    """The exact byte counts of ``dnnParams.xml``'s ``<l2memory .../>`` line, if the file is there."""
    if not path.is_file():
        return None
    match = re.search(r"<l2memory\b([^>]*)/?>", path.read_text(errors="replace"))
    if not match:
        return None
    return {key: int(value) for key, value in re.findall(r'(\w+)="(\d+)"', match.group(1))}


def converter_warnings(output: str) -> list[str]:
    """The converter's WARN lines, without their timestamps."""
    return [
        re.sub(r"^[\d\-: .,]+WARN\s*:\s*", "", ln).strip() for ln in output.splitlines() if " WARN " in ln
    ]


def java_version() -> str | None:
    try:
        out = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = (out.stderr or out.stdout).splitlines()
    return first[0].strip() if first else None


def convert(onnx_path: Path, out_dir: Path, converter: str, memory_report_only: bool) -> dict[str, Any]:
    """Run imxconv-pt; its log goes to OUT/imxconv.log and its temporary files to a folder we remove."""
    command = [converter, "-i", str(onnx_path), "-o", str(out_dir), "--overwrite-output"]
    if memory_report_only:
        command.append("--memory-report")
    scratch = Path(tempfile.mkdtemp(prefix="edgead-imxconv-"))
    env = dict(os.environ, TMPDIR=str(scratch))
    # The converter's Java part writes its temporary folder to java.io.tmpdir, not TMPDIR.
    env["JAVA_TOOL_OPTIONS"] = (env.get("JAVA_TOOL_OPTIONS", "") + f" -Djava.io.tmpdir={scratch}").strip()
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.perf_counter() - start
    output = (proc.stdout or "") + (proc.stderr or "")
    # The JVM announces the option on every start; it is ours, not the converter's.
    output = "".join(ln for ln in output.splitlines(True) if not ln.startswith("Picked up JAVA_TOOL_OPTIONS"))
    (out_dir / CONVERTER_LOG).write_text(output)
    return {"command": command, "returncode": proc.returncode, "seconds": seconds, "output": output}


def converter_error(output: str) -> str:
    """The converter's error lines (the reason it refused), else the last lines of its output."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip() and "JAVA_TOOL_OPTIONS" not in ln]
    errors = [
        ln for ln in lines if re.search(r"\b(error|exception|not supported|unsupported|fail)", ln, re.I)
    ]
    return "\n".join((errors or lines)[-12:])


# ---- main --------------------------------------------------------------------------------------------


def tool_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in TOOL_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["java"] = java_version()
    return versions


def run(args: argparse.Namespace) -> dict[str, Any]:
    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "ok": False,
        "stage": None,
        "run_dir": str(Path(args.run_dir).resolve()),
        "out_dir": str(out_dir),
        "tool_versions": tool_versions(),
        "target_platform": {"device": "imx500", "mct_tpc_version": TPC_VERSION},
        "timings_s": {},
    }
    timings = summary["timings_s"]
    total_start = time.perf_counter()

    def timed(name: str, fn, *fargs, **fkwargs):
        start = time.perf_counter()
        try:
            return fn(*fargs, **fkwargs)
        finally:
            timings[name] = round(time.perf_counter() - start, 2)

    try:
        import torch

        from edgead.deploy.imx500_nets import OUTPUT_MEANINGS, SENSOR_NETS, build_sensor_net
        from edgead.models.patchcore import exact_search
        from edgead.runs import load_run

        torch.manual_seed(0)
        summary["stage"] = "load"
        log(f"loading {args.run_dir}")
        pipeline, config = timed("load_run", load_run, args.run_dir)
        if config.model not in SENSOR_NETS:
            raise StageError(
                "load",
                f"the IMX500 target supports {', '.join(SENSOR_NETS)} runs only, this run holds a "
                f"'{config.model}' model (PaDiM inverts a covariance matrix per position, which does not run "
                "on the sensor)",
            )
        if config.model == "patchcore" and len(pipeline.head.memory_bank_) > args.max_bank_entries:
            raise StageError(
                "load",
                f"this PatchCore run's memory bank holds {len(pipeline.head.memory_bank_)} entries, too many for "
                f"the sensor (at most {args.max_bank_entries}): fit a sensor-sized bank with "
                "`edgead fit DATASET --model patchcore -p bank_size=4096`",
            )
        if config.model == "patchcore" and pipeline.head.image_score != "map_max":
            raise StageError(
                "load",
                "this PatchCore run scores images by the reweighted nearest neighbour, which needs the bank's "
                "neighbours on the host: refit it with -p image_score=map_max for the sensor",
            )
        size = config.image_size
        summary.update(
            model=config.model,
            backbone=config.backbone,
            layers=config.layers,
            image_size=size,
            dataset=config.extra.get("dataset"),
            source_model_sha256=config.model_sha256,
            postprocess={
                "upsample_to": [size, size],
                "blur_sigma": config.blur_sigma,
                "image_score": "max of the blurred map",
                "threshold": config.threshold,
                "score_min": config.score_min,
                "score_max": config.score_max,
            },
        )

        summary["stage"] = "build"
        options = {"chunk_size": args.chunk_size} if config.model == "patchcore" else {}
        net = timed("build_sensor_net", build_sensor_net, pipeline, **options)
        summary["params"] = int(sum(p.numel() for p in net.parameters()))
        if config.model == "patchcore":
            summary["memory_bank"] = {
                "entries": int(len(pipeline.head.memory_bank_)),
                "channels": int(pipeline.head.memory_bank_.shape[1]),
                "chunk_size": args.chunk_size,
                "chunks": len(net.chunks),
            }

        summary["stage"] = "calibration_data"
        log(f"loading {args.n_calibration} calibration images (+ {args.n_defects} with synthetic defects)")
        images, paths = timed(
            "calibration_data", calibration_images, config, args.n_calibration, args.seed, args.n_defects
        )
        summary["n_calibration"] = len(paths)
        summary["n_calibration_defects"] = args.n_defects
        summary["calibration"] = (
            f"{len(paths)} images of the run's training split of train/good"
            + (f" + {args.n_defects} synthetic-defect versions of them" if args.n_defects else "")
            + " (never validation or test images)"
        )
        with torch.no_grad(), exact_search(pipeline.head):
            patch_scores = net(images[:1])
            reference = pipeline.head(pipeline.features(images[:1]))
        summary["input"] = {
            "shape": [1, 3, size, size],
            "layout": "NCHW",
            "dtype": "float32, quantized to 8 bits by the converter",
            "range": "RGB in 0..1 (pixel / 255); the backbone normalisation is inside the graph",
        }
        summary["output"] = {
            "shape": list(patch_scores.shape),
            "meaning": OUTPUT_MEANINGS[config.model],
        }
        summary["float_fold_max_abs_error"] = float((patch_scores - reference).abs().max())

        summary["stage"] = "quantize"
        log(f"MCT post-training quantization (IMX500 TPC {TPC_VERSION}) on {len(paths)} images")
        try:
            quantized, representative_data = timed("quantize", quantize, net, images, args.batch_size)
        except Exception as exc:  # MCT refuses ops with many exception types
            raise StageError(
                "quantize", f"MCT could not quantize the network: {exc}", traceback.format_exc()
            ) from exc
        summary["quantization_fidelity"] = timed("fidelity", fidelity, net, quantized, images)

        summary["stage"] = "export_onnx"
        onnx_path = out_dir / f"edgead_{config.model}.onnx"
        log(f"exporting the quantized ONNX to {onnx_path}")
        try:
            import model_compression_toolkit as mct

            timed(
                "export_onnx",
                mct.exporter.pytorch_export_model,
                quantized,
                save_model_path=str(onnx_path),
                repr_dataset=representative_data,
            )
        except Exception as exc:
            raise StageError(
                "export_onnx", f"MCT could not export the quantized ONNX: {exc}", traceback.format_exc()
            ) from exc

        summary["stage"] = "export_fakequant"
        fake_path = out_dir / f"edgead_{config.model}.{FAKEQUANT_SUFFIX}"
        log(f"exporting the same quantized graph as standard ONNX (QuantizeLinear/DequantizeLinear) to {fake_path}")
        try:
            timed(
                "export_fakequant",
                mct.exporter.pytorch_export_model,
                quantized,
                save_model_path=str(fake_path),
                repr_dataset=representative_data,
                serialization_format=mct.exporter.PytorchExportSerializationFormat.ONNX,
                quantization_format=mct.exporter.QuantizationFormat.FAKELY_QUANT,
            )
        except Exception as exc:
            raise StageError(
                "export_fakequant", f"MCT could not export the fake-quantized ONNX: {exc}", traceback.format_exc()
            ) from exc
        summary["fakequant_onnx"] = fake_path.name

        if args.score_test:
            summary["stage"] = "score_test"
            log("scoring the test split with the float and the MCT-quantized sensor graph (evaluation only)")
            summary["test_images"] = timed(
                "score_test", score_test_split, config, {"float": net, "int8": quantized}, Path(args.score_test)
            )
            summary["test_scores_file"] = str(Path(args.score_test).resolve())

        summary["stage"] = "convert"
        log("converting with imxconv-pt" + (" (memory report only)" if args.memory_report_only else ""))
        for stale in glob.glob(str(out_dir / "*_MemoryReport.json")) + [str(out_dir / "packerOut.zip")]:
            Path(stale).unlink(missing_ok=True)
        result = convert(onnx_path, out_dir, args.converter, args.memory_report_only)
        timings["convert"] = round(result["seconds"], 2)
        summary["converter"] = {
            "command": result["command"],
            "returncode": result["returncode"],
            "memory_report_only": args.memory_report_only,
            "log": CONVERTER_LOG,
        }
        summary["converter"]["warnings"] = converter_warnings(result["output"])
        reports = sorted(out_dir.glob("*_MemoryReport.json"))
        if reports:
            summary["memory"] = parse_memory_report(reports[0])
            summary["memory"]["l2memory_bytes"] = parse_l2memory(out_dir / "dnnParams.xml")
            summary["fits"] = summary["memory"]["fits"]
        if result["returncode"] != 0:
            reason = converter_error(result["output"])
            if reports and summary.get("fits") is False:
                raise StageError(
                    "convert",
                    f"the network does not fit in the IMX500's memory: {summary['memory']['memory_usage']} "
                    f"needed ({summary['memory']['utilization']} utilization)",
                    reason,
                )
            raise StageError(
                "convert", f"imxconv-pt refused the network (exit status {result['returncode']})", reason
            )
        if not reports:
            raise StageError(
                "convert", "imxconv-pt wrote no *_MemoryReport.json", converter_error(result["output"])
            )
        summary["stage"] = "done"
        summary["ok"] = True
    except StageError as exc:
        summary["error"] = {"stage": exc.stage, "message": exc.message, "detail": exc.detail}
    except Exception as exc:  # noqa: BLE001 - anything else is reported the same way, with its traceback
        summary["error"] = {
            "stage": summary["stage"],
            "message": f"{type(exc).__name__}: {exc}",
            "detail": traceback.format_exc(),
        }
    finally:
        timings["total"] = round(time.perf_counter() - total_start, 2)
        summary["files"] = {
            p.name: p.stat().st_size
            for p in sorted(out_dir.iterdir())
            if p.is_file() and p.name != SUMMARY_FILE
        }
        (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="an edgead run folder (config.json + model.safetensors)")
    parser.add_argument("out_dir", help="where the ONNX, packerOut.zip, the reports and the summary go")
    parser.add_argument("--n-calibration", type=int, default=64, help="calibration images (default 64)")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration batch size (default 8)")
    parser.add_argument(
        "--n-defects", type=int, default=0, help="synthetic-defect calibration images added (default 0)"
    )
    parser.add_argument("--chunk-size", type=int, default=1024, help="PatchCore bank entries per convolution")
    parser.add_argument("--max-bank-entries", type=int, default=24576, help="largest PatchCore bank accepted")
    parser.add_argument(
        "--score-test", default=None, help="also score the test split (float and INT8) into this .npz"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration image choice")
    parser.add_argument("--converter", default=None, help="imxconv-pt executable (default: next to python)")
    parser.add_argument(
        "--memory-report-only", action="store_true", help="only the memory report, no packerOut.zip (faster)"
    )
    args = parser.parse_args(argv)
    if args.converter is None:
        sibling = Path(sys.executable).parent / "imxconv-pt"
        args.converter = str(sibling) if sibling.exists() else "imxconv-pt"
    summary = run(args)
    if summary["ok"]:
        memory = summary.get("memory", {})
        log(
            f"done: {memory.get('memory_usage')} used ({memory.get('utilization')}), fits: {summary.get('fits')}"
        )
        return 0
    error = summary["error"]
    log(f"failed at stage '{error['stage']}': {error['message']}")
    if error.get("detail"):
        log(error["detail"].rstrip())
    return 2


if __name__ == "__main__":
    sys.exit(main())
