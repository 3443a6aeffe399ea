"""The edge part of a split pipeline: preprocess + backbone, as an ONNX file or from the run folder.

In feature modes the edge device computes ``Pipeline.features`` itself. :func:`export_edge` writes that
part alone as one ONNX file (uint8 RGB NCHW in, features out; opset 17, checked against torch) into a
folder with a copy of the run's PQ codebook, which is all an edge device needs. :func:`load_edge`
runs such a folder with ONNX Runtime, or a whole run folder with torch.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgead.edge.codecs import feature_shape_of
from edgead.edge.pq import CODEBOOK_FILE, Codebook, load_run_codebook
from edgead.errors import EdgeadError

EDGE_DIR = "edge"
EDGE_ONNX = "features.onnx"
INPUT_NAME, OUTPUT_NAME = "images", "features"


class _FeatureGraph(nn.Module):
    def __init__(self, pipeline) -> None:  # noqa: ANN001
        super().__init__()
        self.pipeline = pipeline.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pipeline.features(images.float() / 255.0)


class EdgeBackbone:
    """``features(rgb)``: one H x W x 3 uint8 frame at the model's input size -> float32 [1, C, h, w]."""

    def __init__(self, image_size: int, feature_shape: tuple[int, int, int], runtime: str,
                 codebook: Codebook | None, session=None, pipeline=None) -> None:  # noqa: ANN001
        self.image_size, self.feature_shape, self.runtime = image_size, tuple(feature_shape), runtime
        self.codebook, self.session, self.pipeline = codebook, session, pipeline

    def features(self, rgb: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(rgb.transpose(2, 0, 1)[None])
        if self.session is not None:
            return self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        with torch.inference_mode():
            return _FeatureGraph(self.pipeline)(torch.from_numpy(batch)).numpy()


def export_edge(run_dir: str | Path, out_dir: str | Path | None = None, tolerance: float = 1e-3) -> Path:
    """Write ``features.onnx`` (+ the run's codebook, if any) to ``out_dir`` (default RUN/edge).

    The file is checked against torch on random images: max |onnx - torch| relative to the features'
    scale must stay under ``tolerance``, or nothing is written.
    """
    import onnxruntime as ort

    from edgead.deploy.onnx_export import OPSET, simplify_graph, write_metadata
    from edgead.outputs import atomic_file
    from edgead.runs import load_run

    run_dir = Path(run_dir)
    pipeline, config = load_run(run_dir)
    codebook = load_run_codebook(run_dir)
    codebook_sha256 = codebook.sha256 if codebook is not None else None
    out_dir = Path(out_dir) if out_dir is not None else run_dir / EDGE_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    graph = _FeatureGraph(pipeline)
    s = config.image_size
    images = np.random.default_rng(0).integers(0, 256, (2, 3, s, s), dtype=np.uint8)
    with atomic_file(out_dir / EDGE_ONNX) as staging:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, (torch.from_numpy(images[:1]),), str(staging), input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              opset_version=OPSET, dynamo=False)
        simplify_graph(staging)
        with torch.no_grad():
            reference = graph(torch.from_numpy(images)).numpy()
        got = ort.InferenceSession(str(staging), providers=["CPUExecutionProvider"]).run(None, {INPUT_NAME: images})[0]
        diff = float(np.abs(got - reference).max())
        if not diff <= tolerance * max(1.0, float(np.abs(reference).max())):
            raise EdgeadError(f"the edge ONNX file differs from torch by {diff:.3g}: not written")
        write_metadata(staging, {
            "edgead_part": "edge features",
            "model": config.model,
            "backbone": config.backbone,
            "input_size": str(s),
            "input_format": "uint8 NCHW RGB, 0..255",
            "feature_shape": json.dumps(list(feature_shape_of(pipeline))),
            "source_model_sha256": config.model_sha256,
            **({"codebook_sha256": codebook_sha256} if codebook_sha256 else {}),
        })
    if codebook is not None:
        codebook.save(out_dir / CODEBOOK_FILE)
    return out_dir / EDGE_ONNX


def _codebook_beside(folder: Path, recorded: str | None) -> Codebook | None:
    """The edge folder's codebook: the one its features.onnx names (by sha256), or none if it names none."""
    path = folder / CODEBOOK_FILE
    if recorded is None:
        return None
    if not path.is_file():
        raise EdgeadError(f"{folder} has no {CODEBOOK_FILE}, which its {EDGE_ONNX} names: export the edge again")
    codebook = Codebook.load(path)
    if codebook.sha256 != recorded:
        raise EdgeadError(f"{path} is not the codebook its {EDGE_ONNX} was exported with: export the edge again")
    return codebook


def load_edge(path: str | Path, threads: int | None = None) -> EdgeBackbone:
    """An edge folder or ``features.onnx`` (ONNX Runtime), or a run folder (torch backbone)."""
    import onnxruntime as ort

    from edgead.runs import CONFIG_FILE, load_run

    path = Path(path)
    if path.is_dir() and (path / EDGE_ONNX).is_file():
        path = path / EDGE_ONNX
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        pipeline, config = load_run(path)
        return EdgeBackbone(config.image_size, feature_shape_of(pipeline), "torch", load_run_codebook(path),
                            pipeline=pipeline)
    if not (path.is_file() and path.suffix.lower() == ".onnx"):
        raise EdgeadError(
            f"{path} is neither a run folder nor an edge model: make one with edgead.edge.backbone.export_edge")
    from edgead.deploy.onnx_export import read_part_metadata

    meta = read_part_metadata(path)  # sealed and hashed like every exported file: a changed one is refused
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        size, shape = int(meta["input_size"]), tuple(json.loads(meta["feature_shape"]))
    except Exception as exc:  # noqa: BLE001 - a foreign or damaged file
        raise EdgeadError(f"{path} is not an edge model written by export_edge: {exc}") from None
    codebook = _codebook_beside(path.parent, meta.get("codebook_sha256"))
    return EdgeBackbone(size, shape, "onnxruntime", codebook, session=session)
