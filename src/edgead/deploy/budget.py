"""Does a fitted pipeline fit an edge device? Memory, latency and energy budgets at INT8.

The device profiles (memory, peak MAC/s, GMAC per joule, each with its source) live in one data file,
``devices.json`` next to this module. :func:`budget_report` measures the pipeline itself:

- **params and MACs** come from :func:`edgead.profiling.model_profile` (MACs of one image at batch 1:
  backbone + head + postprocess);
- **weight bytes**: 1 byte per backbone parameter (INT8). The head's parameters count 1 byte only
  on a device whose exporter quantizes the head (``head_in_int8`` in devices.json: the IMX500);
  elsewhere edgead's INT8 files keep the head in float, so 4 bytes. BatchNorm parameters are counted
  too, although they fold into the convolution before them at deployment (slightly pessimistic);
- **data bytes**: what the head learned without gradients (memory bank, Gaussians, feature
  statistics), counted apart: at 1 byte per value where the head is quantized, else at the bytes
  the exported file stores them in (float32 Gaussians are 4 bytes each, not 1);
- **peak activation bytes** at INT8 (1 byte per value), estimated from one traced forward pass of the
  whole exported graph (preprocess + backbone + head + postprocess) on one image: every torch
  operation is recorded with the tensors it reads and writes, and a tensor is live from the
  operation that creates it to the last operation that reads it. Live tensors include the inputs and
  output of the running operation and everything still needed later (residual skips, the stride-8
  features kept for the final concatenation). As a runtime's memory planner would, an element-wise
  operation, a BatchNorm or a padding whose input dies there writes into its input's buffer
  (conv + BN + activation fusion, padding fused into the convolution). The peak is the largest sum
  of live tensor sizes. Weights are not activations and are excluded. Work done outside torch
  (PatchCore's faiss search) is not seen. It is an estimate: a real runtime may tile large tensors
  (less) or keep extra scratch buffers (more);
- **total** = weights + data + peak activations, and **fits** compares what the device's memory
  must hold (the total, or only weights + data for a parameter cache such as the Edge TPU's) with
  its memory;
- **latency** = MACs / peak MAC/s: a lower bound, since real kernels never run at peak;
- **energy** = MACs / (GMAC per joule): a best-case estimate for the accelerator alone.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from edgead.errors import UsageError
from edgead.models import Pipeline
from edgead.models.postprocess import Postprocess
from edgead.profiling import model_profile

DEVICES_FILE = "devices.json"
INT8_BYTES = 1
FLOAT_BYTES = 4

# Operations whose output may take over the buffer of their (dying) first input: element-wise ops
# (torch tags them "pointwise"), BatchNorm (folds into the conv before it) and padding (fused into
# the conv after it).
_IN_PLACE_CAPABLE = ("batch_norm", "constant_pad_nd", "reflection_pad", "replication_pad")


def load_devices() -> dict[str, dict[str, Any]]:
    """The device profiles from ``devices.json``: name -> profile (memory, peak MAC/s, GMAC/J, sources)."""
    text = resources.files("edgead.deploy").joinpath(DEVICES_FILE).read_text(encoding="utf-8")
    return json.loads(text)["devices"]


def list_devices() -> list[str]:
    """Known device names, as accepted by :func:`get_device`."""
    return sorted(load_devices())


def get_device(name: str) -> dict[str, Any]:
    """One device profile by name; an EdgeadError listing the known names if there is none."""
    devices = load_devices()
    if name not in devices:
        raise UsageError(f"unknown device '{name}': choose one of {', '.join(sorted(devices))}")
    return devices[name]


class _ActivationTrace(TorchDispatchMode):
    """Records every torch operation with the storages it reads and writes (see the module docstring)."""

    def __init__(self, constants: set[int]) -> None:
        super().__init__()
        self.constants = constants  # storages of parameters and buffers: weights, not activations
        self.events: list[tuple[str, list[int], list[int]]] = []  # (op, input keys, output keys)
        self.numel: dict[int, int] = {}
        self.names: list[str] = []  # the innermost module running each event
        self.module_stack: list[str] = []
        self._keep: list[torch.Tensor] = []  # hold every tensor so that no storage address is reused

    def _keys(self, tree: Any) -> list[int]:
        keys = []
        for t in tree_leaves(tree):
            if not isinstance(t, torch.Tensor) or t.numel() == 0:
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self.constants or key == 0:
                continue
            self._keep.append(t)
            size = storage.nbytes() // max(t.element_size(), 1)
            self.numel[key] = max(self.numel.get(key, 0), size)
            keys.append(key)
        return keys

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        inputs = self._keys((args, kwargs))
        outputs = [k for k in self._keys(out) if k not in inputs]  # in-place ops and views: no new tensor
        op = "pointwise" if torch.Tag.pointwise in func.tags else func.overloadpacket.__name__
        self.events.append((op, inputs, outputs))
        self.names.append(self.module_stack[-1] if self.module_stack else "")
        return out


def _peak_live(trace: _ActivationTrace) -> tuple[int, int]:
    """(peak live elements, index of the event where it occurs), with buffer reuse by fusable ops."""
    last_use: dict[int, int] = {}
    for i, (_, inputs, _) in enumerate(trace.events):
        for key in inputs:
            last_use[key] = i
    buffer_of: dict[int, int] = {}  # tensor key -> buffer id (the key of the tensor that owns it)
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    size: dict[int, int] = {}

    def touch(buffer: int, key: int, i: int) -> None:
        first.setdefault(buffer, i)
        last[buffer] = max(last.get(buffer, i), i, last_use.get(key, i))
        size[buffer] = max(size.get(buffer, 0), trace.numel[key])

    for i, (op, inputs, outputs) in enumerate(trace.events):
        for key in inputs:
            touch(buffer_of.setdefault(key, key), key, i)
        fusable = op == "pointwise" or any(name in op for name in _IN_PLACE_CAPABLE)
        for j, key in enumerate(outputs):
            if key not in buffer_of:
                reuse = fusable and j == 0 and inputs and last_use.get(inputs[0]) == i
                buffer_of[key] = buffer_of[inputs[0]] if reuse else key
            touch(buffer_of[key], key, i)
    if not first:
        return 0, 0
    n = len(trace.events)
    delta = [0] * (n + 1)
    for buffer, start in first.items():
        delta[start] += size[buffer]
        delta[last[buffer] + 1] -= size[buffer]
    peak, at, live = 0, 0, 0
    for i in range(n):
        live += delta[i]
        if live > peak:
            peak, at = live, i
    return peak, at


@torch.no_grad()
def peak_activations(pipeline: Pipeline, image_size: int | None = None, sensor: bool = False) -> dict[str, Any]:
    """Peak number of live activation values in one forward pass at batch 1, and where it occurs.

    The pass is the exported graph (preprocess, backbone, head, postprocess), or with ``sensor`` the IMX500
    sensor graph (:mod:`edgead.deploy.imx500_nets`: PatchCore's bank as chunked convolutions; the
    postprocess runs on the host); see the module docstring for how liveness and buffer reuse are
    modelled. Needs a fitted head.
    """
    size = image_size or pipeline.image_size
    pipeline.head.check_fitted()
    post = pipeline.postprocess
    if size != pipeline.image_size:
        post = Postprocess(size, sigma=pipeline.postprocess.sigma, grid=size // pipeline.backbone.stride)
    if sensor:
        from edgead.deploy.imx500_nets import build_sensor_net

        net = build_sensor_net(pipeline)
        image = torch.zeros(1, 3, size, size)
        return _traced_peak(net, lambda: net(image), size, "output")
    image = torch.zeros(1, 3, size, size)
    was_training = pipeline.training
    pipeline.eval()
    try:
        return _traced_peak(
            pipeline, lambda: post(pipeline.head(pipeline.features(image))), size, "postprocess", post.buffers()
        )
    finally:
        pipeline.train(was_training)


def _traced_peak(
    root: nn.Module, forward: Any, size: int, last_name: str, extra_constants: Any = ()
) -> dict[str, Any]:
    """Peak live activations of ``forward()`` (a pass through ``root``), named by the module running at the peak."""
    constants = {t.untyped_storage().data_ptr() for t in [*root.parameters(), *root.buffers(), *extra_constants]}
    trace = _ActivationTrace(constants)
    hooks = []

    def enter(name: str):
        return lambda module, args: trace.module_stack.append(name)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        trace.module_stack.pop()

    for name, module in root.named_modules():
        if name:
            hooks.append(module.register_forward_pre_hook(enter(name)))
            hooks.append(module.register_forward_hook(leave))
    try:
        with trace, torch.no_grad():
            forward()
    finally:
        for hook in hooks:
            hook.remove()
    peak, at = _peak_live(trace)
    return {"image_size": size, "peak_values": peak, "peak_at": trace.names[at] or last_name}


def budget_report(pipeline: Pipeline, device: str, image_size: int | None = None) -> dict[str, Any]:
    """Memory (INT8), latency and energy budget of a fitted pipeline on ``device`` (one image).

    Returns params and MACs (from :func:`edgead.profiling.model_profile`), ``weight_bytes`` (1 byte
    per parameter), ``data_bytes`` (memory bank / Gaussians / statistics, 1 byte per value),
    ``activation_bytes`` (estimated peak of live activations, 1 byte per value), ``total_bytes``,
    the device's ``memory_bytes``, ``fits``, ``latency_ms_lower_bound`` (MACs / peak MAC/s) and
    ``energy_mj_estimate`` (MACs / GMAC per joule), with the sources of the device figures.
    """
    profile_ = get_device(device)
    pipeline.head.check_fitted()
    profile = model_profile(pipeline, image_size=image_size)
    # On the IMX500 a PatchCore bank runs as chunked convolutions (never the whole distance matrix at once)
    sensor = device == "imx500" and pipeline.head.name == "patchcore"
    activations = peak_activations(pipeline, image_size=image_size, sensor=sensor)
    head_in_int8 = bool(profile_.get("head_in_int8", {}).get("value", True))
    # The INT8 file stores a head's weights in int8 where the head asks for it (DifferNet's flow)
    head_weight_bytes = INT8_BYTES if head_in_int8 or pipeline.head.int8_head_weights else FLOAT_BYTES
    weight_bytes = profile["backbone_params"] * INT8_BYTES + profile["head_params"] * head_weight_bytes
    # The head's data at the bytes the exported file stores it in (float) unless the device's exporter
    # quantizes it: counting it at 1 byte would promise a 42 MB PaDiM file fits in 10 MB.
    data_bytes = profile["head_data_values"] * INT8_BYTES if head_in_int8 else profile["head_data_bytes"]
    activation_bytes = activations["peak_values"] * INT8_BYTES
    total = weight_bytes + data_bytes + activation_bytes
    memory = profile_["memory_bytes"]
    covers = memory.get("covers", "weights_and_activations")
    required = weight_bytes + data_bytes if covers == "weights" else total
    macs = profile["macs"]
    peak_rate = profile_["peak_macs_per_second"]["value"]
    efficiency = profile_["gmacs_per_joule"]["value"]
    return {
        "device": device,
        "device_name": profile_["name"],
        "image_size": profile["image_size"],
        "params": profile["params"],
        "backbone_params": profile["backbone_params"],
        "head_params": profile["head_params"],
        "macs": macs,
        "weight_bytes": weight_bytes,
        "data_bytes": data_bytes,
        "activation_bytes": activation_bytes,
        "activation_peak_at": activations["peak_at"],
        "total_bytes": total,
        "memory_bytes": memory["value"],
        "memory_covers": covers,
        "required_bytes": required,
        "fits": required <= memory["value"],
        "headroom_bytes": memory["value"] - required,
        "latency_ms_lower_bound": macs / peak_rate * 1e3,
        "energy_mj_estimate": macs / (efficiency * 1e9) * 1e3,
        "head_in_int8": head_in_int8,
        "head_weights_in_int8": head_weight_bytes == INT8_BYTES,
        "assumptions": [
            "INT8: 1 byte per backbone weight and per activation value"
            + (
                ", and per head weight and data value (the device's exporter quantizes the head)"
                if head_in_int8
                else "; the head's weights and data at the bytes the INT8 file stores them in (float)"
            ),
            "data (memory bank, Gaussians, feature statistics) counted apart from weights",
            "activations: estimated peak of live tensors in one traced forward pass at batch 1 "
            "(element-wise ops, BatchNorm and padding reuse their dying input's buffer)",
            "latency = MACs / peak MAC/s (lower bound); energy = MACs / GMAC per joule (best case)",
        ],
        "sources": {
            "memory_bytes": memory["source"],
            "peak_macs_per_second": profile_["peak_macs_per_second"]["source"],
            "gmacs_per_joule": profile_["gmacs_per_joule"]["source"],
        },
    }


def budget_run(run_dir: str | Path, device: str, image_size: int | None = None) -> dict[str, Any]:
    """:func:`budget_report` of a run folder written by ``edgead fit`` (or ``edgead prune``)."""
    from edgead.runs import MAX_IMAGE_SIZE, load_run

    get_device(device)  # an unknown device fails before the run is loaded
    if image_size is not None and not (32 <= image_size <= MAX_IMAGE_SIZE and image_size % 32 == 0):
        raise UsageError(f"--image-size must be a multiple of 32 between 32 and {MAX_IMAGE_SIZE}, got {image_size}")
    pipeline, config = load_run(run_dir)
    report = budget_report(pipeline, device, image_size=image_size)
    report["run"] = str(run_dir)
    if device == "imx500":
        report["converter_report"] = converter_report(Path(run_dir), config.model_sha256)
    return report


def converter_report(run_dir: Path, model_sha256: str | None) -> dict[str, Any] | None:
    """The IMX500 converter's own memory report for this run, if ``edgead export RUN --format imx500`` wrote
    one into RUN/export for the model the run holds now; None otherwise. It is the authority: the budget
    is an estimate."""
    from edgead.deploy.imx500 import SUMMARY_FILE, SUMMARY_SEAL_KEY
    from edgead.integrity import IntegrityError, check_seal

    path = run_dir / "export" / SUMMARY_FILE
    try:
        summary = json.loads(path.read_text())
        memory = summary["memory"]
        used = int(memory["memory_usage_bytes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not model_sha256 or summary.get("source_model_sha256") != model_sha256:
        return None  # another model's report (refitted since the export)
    try:
        check_seal(summary, SUMMARY_SEAL_KEY, path, "")
    except IntegrityError:
        return None  # edited since the export: not the converter's report
    return {
        "file": str(path),
        "model_bytes": memory.get("model_memory_bytes"),
        "runtime_bytes": memory.get("runtime_memory_bytes"),
        "total_bytes": used,
        "utilization": memory.get("utilization"),
        "fits": memory.get("fits") is True,
    }


def format_budget(report: dict[str, Any]) -> str:
    """A few human-readable lines for a :func:`budget_report` result (what ``edgead budget`` prints)."""

    def size(n: int) -> str:
        return f"{n / 1e6:.2f} MB" if abs(n) >= 10_000 else f"{n} bytes"

    verdict = "fits" if report["fits"] else "does NOT fit"
    head = "int8" if report["head_in_int8"] else "float"
    precision = "int8" if report["head_in_int8"] else "mixed"
    held = "weights + data" if report["memory_covers"] == "weights" else "weights + data + activations"
    lines = [
        f"device        {report['device']} ({report['device_name']})",
        f"image size    {report['image_size']}",
        f"params        {report['params'] / 1e6:.3f} M  (backbone {report['backbone_params'] / 1e6:.3f} M, "
        f"head {report['head_params'] / 1e6:.3f} M)",
        f"MACs          {report['macs'] / 1e9:.3f} G per image",
        f"weights       {size(report['weight_bytes'])} ({precision}: backbone int8, head "
        f"{'int8' if report['head_weights_in_int8'] else 'float'})",
        f"data          {size(report['data_bytes'])} ({head}: memory bank / Gaussians / statistics, as the "
        "exported file holds them)",
        f"activations   {size(report['activation_bytes'])} peak (int8, estimate; at "
        f"{report['activation_peak_at']})",
        f"total         {size(report['total_bytes'])}",
        f"memory        {size(report['memory_bytes'])} for {held}: {verdict} "
        f"(headroom {size(report['headroom_bytes'])})",
        f"latency       >= {report['latency_ms_lower_bound']:.2f} ms (MACs / peak MAC/s, lower bound)",
        f"energy        ~{report['energy_mj_estimate']:.3f} mJ per image (MACs / GMAC per J, estimate)",
    ]
    converter = report.get("converter_report")
    if converter:
        lines.append(
            f"converter     model {size(converter['model_bytes'] or 0)} + runtime {size(converter['runtime_bytes'] or 0)} "
            f"= {size(converter['total_bytes'])} ({converter['utilization']}): "
            f"{'fits' if converter['fits'] else 'does NOT fit'} (imxconv-pt's own report, {converter['file']})"
        )
    elif report["device"] == "imx500":
        lines.append("converter     no report yet: `edgead export RUN --format imx500` gives the converter's own")
    return "\n".join(lines)
