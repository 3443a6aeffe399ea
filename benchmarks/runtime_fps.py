"""End-to-end FPS of `edgead predict` on a 640x480, 30 s video (issue: runtime), written to docs/results/runtime.md.

Fits TinyGLASS on decoded frames of a synthetic belt video of good parts, exports it to ONNX (fp32 and
INT8), makes a 30 s inspection video at 30 fps, and runs the live loop (decode + privacy stage +
preprocess + inference + overlay + encode, pipelined) with several runtimes. Also times decoding alone,
the floor under any end-to-end number.

    .venv/bin/python benchmarks/runtime_fps.py [--reuse] [--seconds 30]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edgead.data.synthetic_video import read_truth, write_belt_video
from edgead.demo import frame_agreement, record_good_parts
from edgead.deploy.export import export_run, file_megabytes
from edgead.reporting import markdown_table, results_header
from edgead.runs import WEIGHTS_FILE
from edgead.runtime import run_stream
from edgead.runtime.sources import open_source
from edgead.training import fit_run


def decode_only_fps(video: Path) -> float:
    source, start = open_source([video]), time.perf_counter()
    frames = sum(1 for _ in source)
    source.close()
    return frames / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/runtime"))
    parser.add_argument("--out", type=Path, default=Path("docs/results/runtime.md"))
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--model", default="tinyglass")
    parser.add_argument("--reuse", action="store_true", help="keep the fitted run and exports in --work")
    args = parser.parse_args(argv)

    run_dir = args.work / f"{args.model}_belt"
    if not (args.reuse and (run_dir / WEIGHTS_FILE).is_file()):
        dataset = record_good_parts(args.work / "dataset", 150, 30.0, 640, 480)
        fit_run(dataset, run_dir, model=args.model)
    export = run_dir / "export"
    if not (args.reuse and (export / "model.int8.onnx").is_file()):
        export_run(run_dir, "onnx", export, int8=True)
    video, truth_csv = write_belt_video(args.work / "belt_30fps.mp4", seconds=args.seconds, fps=30.0, seed=0)
    labels = read_truth(truth_csv)

    int8 = export / "model.int8.onnx"
    configs = [  # (name, model file, runtime, inference threads, --blur)
        ("onnxruntime INT8", int8, "onnxruntime", 1, None),
        ("onnxruntime INT8", int8, "onnxruntime", 2, None),
        ("onnxruntime INT8 + --blur faces", int8, "onnxruntime", 1, "faces"),
        ("onnxruntime fp32", export / "model.onnx", "onnxruntime", 2, None),
        ("openvino fp32", export / "model.onnx", "openvino", 2, None),
        ("torch fp32 (eager)", run_dir, "torch", 1, None),
        ("torch fp32 (eager)", run_dir, "torch", 2, None),
    ]
    rows = [{"config": "decode only (OpenCV, no model)", "fps": round(decode_only_fps(video), 1)}]
    for index, (name, model, runtime, threads, blur) in enumerate(configs):
        summary = run_stream(
            model,
            [video],
            args.work / "out" / f"{index}_{runtime}_{model.stem}_{threads}",
            runtime=runtime,
            threads=threads,
            blur=blur,
            progress=False,
        )
        facts = summary.as_dict()
        agreement = frame_agreement(
            labels, [r.decision for r in summary.results], [r.normalized_score for r in summary.results]
        )
        rows.append(
            {
                "config": name,
                "threads": threads,
                "frames": facts["scored"],
                "seconds": facts["seconds"],
                "fps": facts["fps"],
                "inference_ms_p50": facts["inference_ms_p50"],
                "model_mb": file_megabytes(model)
                if model.is_file()
                else file_megabytes(model / WEIGHTS_FILE),
                "detection_rate": agreement["detection_rate"],
                "false_alarm_rate": agreement["false_alarm_rate"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    command = ".venv/bin/python benchmarks/runtime_fps.py " + " ".join(sys.argv[1:] if argv is None else argv)
    columns = [
        "config",
        "threads",
        "frames",
        "seconds",
        "fps",
        "inference_ms_p50",
        "model_mb",
        "detection_rate",
        "false_alarm_rate",
    ]
    lines = [
        *results_header("Runtime: end-to-end FPS of the live loop on a 640x480, 30 fps video", command),
        f"- Video: `{video.name}`, 640x480, {args.seconds:g} s at 30 fps ({len(labels)} frames), synthetic belt "
        "with every third part defective (mp4v). Model: TinyGLASS (default settings) fitted on 150 decoded "
        "frames of a good-parts video; INT8 = ONNX Runtime QDQ from `edgead export --int8`.",
        "- fps = scored frames / wall time of `run_stream` (the code behind `edgead predict RUN VIDEO`): open, "
        "decode, privacy stage, resize, inference, heat-map overlay, caption, mp4 encode, CSV. Decoding runs in "
        "a reader thread and overlay + encoding in a writer thread, overlapping inference. threads = inference "
        "threads of the runtime.",
        "- `--blur faces` runs OpenCV's Haar face detector on every frame before inference (there are no faces "
        "in this video: the row is the cost of the privacy stage).",
        "- detection_rate / false_alarm_rate: per frame against the video's ground truth (frames with a "
        "half-visible defect left out); threshold from held-out good frames.",
        "",
        markdown_table(rows, columns),
        "",
    ]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
