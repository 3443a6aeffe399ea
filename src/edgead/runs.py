"""Run folders: a fitted pipeline saved as config.json + model.safetensors (no pickle anywhere).

The folder is self-contained: the backbone's weights are saved too, so a run loads without the
weights package and gives the same numbers on another machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    ValidationError,
    model_validator,
)
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from typing_extensions import TypedDict

from edgead import __version__
from edgead.backbones import BACKBONES, create_backbone
from edgead.backbones.weights import sha256_of
from edgead.errors import EdgeadError, NonFiniteError, RunFolderError
from edgead.integrity import canonical_sha256, check_seal, require_hash, seal
from edgead.models import HEADS, Pipeline, create_head, create_pipeline
from edgead.outputs import atomic_dir, atomic_write_text, check_output_dir, default_file_mode
from edgead.validation import describe

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "edgead-run"
FORMAT_VERSION = 2  # 2: config.json is sealed (edgead.integrity); runs of format 1 are refused
SEAL_KEY = "config_sha256"  # the seal of every other field of config.json
# Head settings whose default changed after runs were saved without them (they keep what they had).
LEGACY_HEAD_DEFAULTS: dict[str, dict[str, Any]] = {
    "patchcore": {"image_score": "reweighted"},
    "padim": {"storage": "float32"},
}
MAX_IMAGE_SIZE = 2048  # a square input side beyond this needs more memory than edge devices have


def _known_model(value: str) -> str:
    if value not in HEADS:
        raise ValueError(f"unknown model {value!r}: choose one of {', '.join(sorted(HEADS))}")
    return value


def _known_backbone(value: str) -> str:
    if value not in BACKBONES:
        raise ValueError(f"unknown backbone {value!r}: choose one of {', '.join(BACKBONES)}")
    return value


# Declared once, used by run configs and by the fit options (edgead.training.FitSettings).
ModelName = Annotated[str, AfterValidator(_known_model)]
BackboneName = Annotated[str, AfterValidator(_known_backbone)]
StageIndex = Annotated[int, Field(ge=0, le=4)]
ImageSize = Annotated[int, Field(ge=32, le=MAX_IMAGE_SIZE, multiple_of=32)]


class RunExtra(TypedDict, total=False):
    """The keys of ``RunConfig.extra`` that edgead reads back, with their types; others are kept as they are."""

    __pydantic_config__ = ConfigDict(extra="allow")  # type: ignore[misc]

    dataset: str | None
    dataset_name: str
    n_train: Annotated[int, Field(ge=0)]
    n_validation: Annotated[int, Field(ge=0)]
    validation_fraction: Annotated[float, Field(gt=0, lt=1)]
    seed: Annotated[int, Field(ge=0)]
    fit_seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    pretrained: bool
    weights_path: str | None
    pruned_channels: dict[str, dict[str, Annotated[int, Field(ge=1)]]]
    pruning: dict[str, Any]
    codebook_sha256: Annotated[str, Field(pattern="^[0-9a-f]{64}$")]  # the run's PQ codebook (edge.pq)


class RunConfig(BaseModel):
    """Everything needed to rebuild a pipeline and to decide on its scores.

    A run folder's config.json and an exported file's metadata are untrusted input: every field is
    declared with its type and range and checked (strict types, no NaN, no unknown keys), and the head
    hyperparameters are checked by the head itself, before anything is built from them.
    """

    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=(), validate_assignment=True)

    model: ModelName
    head: dict[str, Any]
    backbone: BackboneName
    layers: list[StageIndex] | None
    image_size: ImageSize
    blur_sigma: Annotated[float, Field(ge=0, le=64, allow_inf_nan=False)]
    threshold: FiniteFloat
    score_min: FiniteFloat
    score_max: FiniteFloat
    threshold_quantile: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
    # Runs written before this field existed averaged the border of the 3x3 aggregation over the
    # inside pixels only: reading them keeps that, so an old run still gives its own numbers.
    aggregation_border: Literal["zeros", "valid"] = "valid"
    model_sha256: Annotated[str, Field(pattern="^[0-9a-f]{64}$")] | None = None
    extra: RunExtra = {}

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if not self.score_min < self.score_max:
            raise ValueError(f"score_min ({self.score_min}) must be below score_max ({self.score_max})")
        if not self.score_min <= self.threshold <= self.score_max:
            raise ValueError(
                f"threshold ({self.threshold}) must lie between score_min and score_max "
                f"({self.score_min}, {self.score_max})"
            )
        return self

    def to_json(self) -> dict[str, Any]:
        """config.json's contents, sealed: every field, then ``config_sha256`` over all of them."""
        data = {"format": FORMAT, "format_version": FORMAT_VERSION, "edgead_version": __version__}
        data.update(self.model_dump(mode="json"))
        return seal(data, SEAL_KEY)

    def identity(self) -> str:
        """sha256 of everything that decides (weights' hash, threshold, normalisation, preprocessing, head):
        an exported file records its run's, and is compared only with a run of the same identity."""
        return canonical_sha256(self.model_dump(mode="json"))

    @classmethod
    def from_json(cls, data: Any, source: Path) -> RunConfig:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise RunFolderError(f"{source} is not an edgead run config (no 'format: {FORMAT}')")
        if data.get("format_version") != FORMAT_VERSION:
            raise RunFolderError(
                f"{source} has run format version {data.get('format_version')!r}, this edgead reads "
                f"{FORMAT_VERSION} (runs of format 1 have no seal over their threshold and settings): refit "
                "the model with this version"
            )
        fields = {
            k: v for k, v in data.items() if k not in ("format", "format_version", "edgead_version", SEAL_KEY)
        }
        try:
            config = cls.model_validate(fields)
        except ValidationError as exc:
            raise RunFolderError(f"{source} is not a valid edgead run config: {describe(exc)}") from None
        # Settings whose default changed: a run that does not name them was fitted with the old one.
        config.head = {**LEGACY_HEAD_DEFAULTS.get(config.model, {}), **config.head}
        try:
            create_head(config.model, **config.head)
        except EdgeadError as exc:
            raise RunFolderError(f"{source}: {exc}") from None
        # Types first (a malformed value is named), then the seal: any well-formed edit is refused too.
        remedy = "restore the file or refit the model (the threshold is set by `edgead fit`, never by hand)"
        check_seal(data, SEAL_KEY, source, remedy)
        require_hash(data, "model_sha256", source, remedy)
        return config


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
            config.backbone,
            layers=layers,
            pretrained=False,
            expanded_channels=expanded,
            aggregation_border=config.aggregation_border,
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
        aggregation_border=config.aggregation_border,
        **config.head,
    )


def save_run(pipeline: Pipeline, config: RunConfig, run_dir: str | Path, force: bool = False) -> Path:
    """Write the run folder atomically (a temporary sibling renamed into place), with the model's sha256.

    An existing run folder is replaced only with ``force`` (and then wholly: no stale export/ or test/
    is left beside the new model). Non-finite weights are refused: a diverged fit is not saved.
    """
    run_dir = check_output_dir(run_dir, CONFIG_FILE, force=force, kind="run")
    if not pipeline.head.is_fitted:
        raise EdgeadError("refusing to save an unfitted pipeline")
    tensors = {k: v.detach().contiguous().clone() for k, v in pipeline.state_dict().items()}
    broken = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise NonFiniteError(
            f"the fitted model has NaN or infinite values in {', '.join(broken[:3])}: not saved "
            "(a diverged fit, or degenerate training images)"
        )
    with atomic_dir(run_dir) as staging:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": FORMAT, "model": config.model})
        os.chmod(staging / WEIGHTS_FILE, default_file_mode())
        config.model_sha256 = sha256_of(staging / WEIGHTS_FILE)
        (staging / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2) + "\n")
    return run_dir


def update_config(run_dir: str | Path, config: RunConfig) -> None:
    """Rewrite a run's config.json (sealed, atomically) after edgead added to the run, e.g. its PQ codebook."""
    atomic_write_text(Path(run_dir) / CONFIG_FILE, json.dumps(config.to_json(), indent=2) + "\n")


def read_config(run_dir: str | Path) -> RunConfig:
    run_dir = Path(run_dir)
    if run_dir.is_file():
        hint = (
            " (an exported file: export, budget and prune take the run folder it was exported from)"
            if run_dir.suffix in (".onnx", ".xml", ".tflite")
            else ""
        )
        raise RunFolderError(f"{run_dir} is a file, not a run folder{hint}: pass the folder `edgead fit` wrote")
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


def fitted_split(config: RunConfig) -> tuple[list, list] | None:
    """The run's training and normal validation samples, split as its fit split them; None where the run's
    dataset is not on this machine, the run records no split, or the folder changed since the fit."""
    from edgead.data.datasets import open_dataset, split_validation

    extra = config.extra
    dataset = extra.get("dataset")
    if not dataset or not Path(dataset).is_dir() or "validation_fraction" not in extra:
        return None
    train, validation = split_validation(
        open_dataset(dataset).train, fraction=extra["validation_fraction"], seed=extra.get("seed", 0)
    )
    if len(validation) != extra.get("n_validation", len(validation)):
        return None  # the folder changed since the fit: not the same images
    return train, validation


def load_run(run_dir: str | Path, expect_model: str | None = None) -> tuple[Pipeline, RunConfig]:
    """Rebuild a fitted pipeline from its run folder, checking every tensor name and shape."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    if expect_model is not None and config.model != expect_model:
        raise RunFolderError(f"{run_dir} holds a '{config.model}' model, not '{expect_model}'")
    weights_path = run_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        raise RunFolderError(f"{run_dir} has no {WEIGHTS_FILE}: the fit did not finish, refit the model")
    if sha256_of(weights_path) != config.model_sha256:
        raise RunFolderError(
            f"{weights_path} does not match the sha256 recorded in {CONFIG_FILE}: the file was changed or "
            "damaged since the fit; restore it or refit the model"
        )
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
