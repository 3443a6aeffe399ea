"""Run folders: a fitted pipeline saved as config.json + model.safetensors (no pickle anywhere).

The folder is self-contained: the backbone's weights are saved too, so a run loads without the
weights package and gives the same numbers on another machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from edgead import __version__
from edgead.backbones import create_backbone
from edgead.errors import EdgeadError, RunFolderError
from edgead.models import HEADS, Pipeline, create_head, create_pipeline

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "edgead-run"
FORMAT_VERSION = 1


@dataclass
class RunConfig:
    """Everything needed to rebuild a pipeline and to decide on its scores."""

    model: str
    head: dict[str, Any]
    backbone: str
    layers: list[int] | None
    image_size: int
    blur_sigma: float
    threshold: float
    score_min: float
    score_max: float
    threshold_quantile: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = {"format": FORMAT, "format_version": FORMAT_VERSION, "edgead_version": __version__}
        data.update(self.__dict__)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], source: Path) -> RunConfig:
        if data.get("format") != FORMAT:
            raise RunFolderError(f"{source} is not an edgead run config (no 'format: {FORMAT}')")
        if data.get("format_version") != FORMAT_VERSION:
            raise RunFolderError(
                f"{source} has run format version {data.get('format_version')}, this edgead reads "
                f"{FORMAT_VERSION}: refit the model with this version"
            )
        if data.get("model") not in HEADS:
            raise RunFolderError(f"{source} names unknown model '{data.get('model')}'")
        names = [f for f in cls.__dataclass_fields__ if f != "extra"]
        missing = [n for n in names if n not in data]
        if missing:
            raise RunFolderError(f"{source} lacks {', '.join(missing)}: it was not written by edgead fit")
        return cls(**{n: data[n] for n in names}, extra=data.get("extra", {}))


def build_from_config(config: RunConfig) -> Pipeline:
    """An unfitted pipeline of the run's architecture; weights come from the run folder, not a package.

    A channel-pruned run (``edgead.deploy.prune``) records its backbone's pruned widths in
    ``extra["pruned_channels"]["backbone"]`` (block index -> expanded channels), and its head's in the
    head hyperparameters, so the pruned shapes are rebuilt before the weights are loaded.
    """
    layers = tuple(config.layers) if config.layers is not None else None
    expanded = (config.extra.get("pruned_channels") or {}).get("backbone")
    if expanded:
        backbone = create_backbone(
            config.backbone, layers=layers, pretrained=False, expanded_channels=expanded
        )
        head = create_head(config.model, **config.head)
        return Pipeline(backbone, head, image_size=config.image_size, blur_sigma=config.blur_sigma)
    return create_pipeline(
        config.model,
        backbone=config.backbone,
        image_size=config.image_size,
        layers=layers,
        pretrained=False,
        blur_sigma=config.blur_sigma,
        **config.head,
    )


def save_run(pipeline: Pipeline, config: RunConfig, run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not pipeline.head.is_fitted:
        raise EdgeadError("refusing to save an unfitted pipeline")
    tensors = {k: v.detach().contiguous().clone() for k, v in pipeline.state_dict().items()}
    save_file(tensors, str(run_dir / WEIGHTS_FILE), metadata={"format": FORMAT, "model": config.model})
    (run_dir / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2) + "\n")
    return run_dir


def read_config(run_dir: str | Path) -> RunConfig:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} does not exist: make one with `edgead fit`")
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise RunFolderError(f"{run_dir} is not a run folder: it has no {CONFIG_FILE} (made by `edgead fit`)")
    try:
        data = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunFolderError(f"{config_path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RunFolderError(f"{config_path} is not an edgead run config")
    return RunConfig.from_json(data, config_path)


def load_run(run_dir: str | Path, expect_model: str | None = None) -> tuple[Pipeline, RunConfig]:
    """Rebuild a fitted pipeline from its run folder, checking every tensor name and shape."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    if expect_model is not None and config.model != expect_model:
        raise RunFolderError(f"{run_dir} holds a '{config.model}' model, not '{expect_model}'")
    weights_path = run_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        raise RunFolderError(f"{run_dir} has no {WEIGHTS_FILE}: the fit did not finish, refit the model")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise RunFolderError(f"{weights_path} is not a readable safetensors file: {exc}") from None
    pipeline = build_from_config(config)
    head_prefix = "head."
    fitted = {}
    for name in pipeline.head.fitted_buffers:
        key = head_prefix + name
        if key not in tensors:
            raise RunFolderError(
                f"{weights_path} has no '{key}': it was saved by another model than '{config.model}'"
            )
        fitted[name] = tensors[key]
    pipeline.head.set_fitted(**fitted)
    expected = pipeline.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", wrong_shape),
            )
            if keys
        )
        raise RunFolderError(
            f"{weights_path} does not match the '{config.model}' model with backbone '{config.backbone}' "
            f"described in {CONFIG_FILE} ({detail}): was the folder mixed with another run?"
        )
    pipeline.load_state_dict(tensors, strict=True)
    pipeline.eval()
    return pipeline, config
