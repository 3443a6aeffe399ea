"""Parameter and MAC counts: checked by hand on small nets, plausible on the real backbone."""

from __future__ import annotations

import torch
from torch import nn

from edgead.backbones import create_backbone
from edgead.models import create_pipeline
from edgead.profiling import count_macs, model_profile


def test_conv_macs_match_the_hand_count():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    # Every output element (16 x 16 x 8) is a 3 x 3 x 3 dot product.
    assert count_macs(conv, (1, 3, 16, 16)) == 16 * 16 * 8 * 3 * 3 * 3


def test_depthwise_linear_and_batchnorm():
    depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    assert count_macs(depthwise, (1, 8, 16, 16)) == 16 * 16 * 8 * 3 * 3
    assert count_macs(nn.Linear(64, 10), (2, 64)) == 2 * 64 * 10
    # BatchNorm and ReLU count 0: BN folds into the convolution before it at deployment.
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    assert count_macs(net, (1, 3, 16, 16)) == 8 * 8 * 8 * 3 * 3 * 3
    assert net.training  # the mode is restored


def test_efficientnet_lite0_features_at_256():
    extractor = create_backbone("efficientnet_lite0", pretrained=False)
    macs = count_macs(extractor, (1, 3, 256, 256))
    print(f"efficientnet_lite0 features (layers {extractor.layers}) at 256x256: {macs / 1e6:.1f} M MACs")
    # The whole network is about 0.4 G MACs at 224x224, so about 0.53 G at 256x256 (x (256/224)^2);
    # cut after the stride-16 stage it skips the costly stride-32 blocks and the 1280-channel head.
    assert 0.2e9 < macs < 0.45e9


def test_model_profile_of_a_fitted_pipeline():
    pipeline = create_pipeline("padim", pretrained=False, image_size=64, n_features=20)
    with torch.no_grad():
        features = pipeline.features(torch.rand(4, 3, 64, 64))
    unfitted = model_profile(pipeline)
    assert unfitted["head_macs"] is None and unfitted["macs"] is None

    pipeline.head.fit(features)
    profile = model_profile(pipeline)
    c, h, w = profile["feature_shape"]
    assert (c, h, w) == (152, 8, 8)
    assert profile["params"] == profile["backbone_params"] + profile["head_params"]
    assert profile["weights_bytes"] == 4 * profile["params"]
    assert profile["head_data"]["cov_inv_"] == [h * w, 20, 20]
    assert profile["head_data_bytes"] > 2 * h * w * 20 * 20  # float16 Gaussians
    assert profile["head_macs"] >= h * w * 20 * 20  # the Mahalanobis product
    assert profile["macs"] == profile["backbone_macs"] + profile["head_macs"] + profile["postprocess_macs"]
    # upsample + blur as two matrix products: [64, 8] @ [8, 8], then [64, 8] @ [8, 64]
    assert profile["postprocess_macs"] == 64 * 8 * 8 + 64 * 8 * 64


def test_memory_bank_is_data_and_external_work_can_be_reported():
    pipeline = create_pipeline("patchcore", pretrained=False, image_size=64, coreset_ratio=0.1)
    with torch.no_grad():
        pipeline.head.fit(pipeline.features(torch.rand(2, 3, 64, 64)))
    profile = model_profile(pipeline)
    assert profile["head_params"] == 0
    entries, channels = profile["head_data"]["memory_bank_"]
    assert channels == 152 and entries == round(0.1 * 2 * 8 * 8)
    # The kNN counted as the exported graph computes it: exact, patches x bank x C.
    search = 8 * 8 * entries * channels
    assert search <= profile["head_macs"] < 1.1 * search  # the search dominates the head
