"""Device budgets: device profiles with sources, INT8 bytes, peak activations, fits / latency / energy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgead.backbones import count_parameters
from edgead.deploy.budget import (
    budget_report,
    budget_run,
    format_budget,
    get_device,
    load_devices,
    peak_activations,
)
from edgead.errors import EdgeadError
from edgead.models import create_pipeline
from edgead.profiling import model_profile


def tinyglass(image_size: int):
    """A TinyGLASS pipeline whose head counts as fitted (random weights: shapes are all a budget needs)."""
    pipeline = create_pipeline("tinyglass", pretrained=False, image_size=image_size)
    c = pipeline.backbone.out_channels
    pipeline.head.set_fitted(feature_mean_=torch.zeros(1, c, 1, 1), feature_std_=torch.ones(1, c, 1, 1))
    return pipeline


def test_device_profiles_have_values_and_sources():
    devices = load_devices()
    assert {"imx500", "rpi5", "jetson-nano", "coral"} <= set(devices)
    for name, device in devices.items():
        for figure in ("memory_bytes", "peak_macs_per_second", "gmacs_per_joule"):
            assert device[figure]["value"] > 0, (name, figure)
            assert len(device[figure]["source"]) > 20, (name, figure)
    imx500 = get_device("imx500")["memory_bytes"]
    assert imx500["value"] == 8_000_000 and imx500["covers"] == "weights_and_activations"


def test_unknown_device_lists_the_known_ones():
    with pytest.raises(EdgeadError, match="unknown device 'imx600'.*coral.*imx500.*jetson-nano.*rpi5"):
        get_device("imx600")
    with pytest.raises(EdgeadError, match="unknown device"):
        budget_report(tinyglass(64), "imx600")


def test_int8_bytes_macs_latency_and_energy():
    pipeline = tinyglass(64)
    report = budget_report(pipeline, "rpi5")
    profile = model_profile(pipeline)
    assert report["params"] == count_parameters(pipeline) == profile["params"]
    assert report["head_params"] == count_parameters(pipeline.head)
    # What edgead's INT8 file for a CPU holds: the backbone at 1 byte per weight, the head and its feature
    # statistics (2 x 152 float32 values, data rather than weights) in float.
    assert report["weight_bytes"] == report["backbone_params"] + 4 * report["head_params"]
    assert report["data_bytes"] == 2 * 152 * 4
    # The IMX500 exporter quantizes the whole sensor graph: 1 byte for every weight and data value.
    imx500 = budget_report(pipeline, "imx500")
    assert imx500["weight_bytes"] == imx500["params"] and imx500["data_bytes"] == 2 * 152
    assert report["macs"] == profile["macs"]
    assert report["total_bytes"] == report["weight_bytes"] + report["data_bytes"] + report["activation_bytes"]
    device = get_device("rpi5")
    assert report["latency_ms_lower_bound"] == pytest.approx(
        1e3 * report["macs"] / device["peak_macs_per_second"]["value"]
    )
    assert report["energy_mj_estimate"] == pytest.approx(
        1e3 * report["macs"] / (1e9 * device["gmacs_per_joule"]["value"])
    )
    assert set(report["sources"]) == {"memory_bytes", "peak_macs_per_second", "gmacs_per_joule"}
    assert "fits" in format_budget(report)


def test_peak_activations_by_hand_and_growing_with_the_image():
    # At 256x256 the largest live set is EfficientNet-Lite0's first stride-2 depthwise conv (block 1):
    # its padded input (96 x 129 x 129, TF "SAME" padding fused into the conv) and its output
    # (96 x 64 x 64). Nothing else is alive there (no skip around a stride-2 block).
    peak = peak_activations(tinyglass(256))
    assert peak["peak_values"] == 96 * 129 * 129 + 96 * 64 * 64
    assert peak["peak_at"] == "backbone.stages.1.0._depthwise_conv"
    small = budget_report(tinyglass(64), "imx500", image_size=64)
    larger = budget_report(tinyglass(64), "imx500", image_size=128)
    assert larger["image_size"] == 128
    assert larger["activation_bytes"] > 3 * small["activation_bytes"]
    assert larger["weight_bytes"] == small["weight_bytes"]


def test_tinyglass_at_256_fits_the_imx500():
    report = budget_report(tinyglass(256), "imx500")
    assert 0.7e6 < report["params"] < 0.8e6  # the documented 0.76M
    assert report["fits"] and report["total_bytes"] < 8_000_000
    assert report["headroom_bytes"] == 8_000_000 - report["total_bytes"]


def test_memory_bank_is_data_and_a_parameter_cache_holds_weights_only():
    pipeline = create_pipeline("padim", pretrained=False, image_size=64, n_features=20)
    with torch.no_grad():
        pipeline.head.fit(pipeline.features(torch.rand(4, 3, 64, 64)))
    stored = sum(getattr(pipeline.head, name).nbytes for name in pipeline.head.fitted_buffers)
    coral = budget_report(pipeline, "coral")
    assert coral["data_bytes"] == stored  # float16 Gaussians, int64 channel indices: as the file holds them
    assert coral["memory_covers"] == "weights"
    assert coral["required_bytes"] == coral["weight_bytes"] + coral["data_bytes"]
    imx500 = budget_report(pipeline, "imx500")
    assert imx500["required_bytes"] == imx500["total_bytes"] > coral["required_bytes"]


def test_budget_of_a_run_folder(fitted_run: Path):
    report = budget_run(fitted_run, "rpi5")
    assert report["run"] == str(fitted_run)
    assert report["data_bytes"] > 0  # the PatchCore memory bank
    assert report["fits"]
    with pytest.raises(EdgeadError, match="unknown device"):
        budget_run(fitted_run, "nope")
