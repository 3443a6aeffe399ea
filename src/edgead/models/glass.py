"""TinyGLASS: GLASS (Chen et al., ECCV 2024) as a small, static, 4D-only graph (Bonazzi et al.).

Inference is backbone features -> standardise -> adaptor (1x1 conv) -> discriminator (1x1 convs)
-> one patch-score map in [0, 1]. Every op is a 4D convolution, batch norm or pointwise activation,
so the graph exports and quantises as is.

Training follows GLASS on features of normal images:
- GAS (global anomaly synthesis): Gaussian noise on normal adapted features, then gradient ascent on
  the discriminator's loss, projected back into a distance band [r, 2r] around the normal feature
  ("manifold") or around the feature centre ("hypersphere");
- LAS (local anomaly synthesis): Perlin-shaped texture patches blended into normal images, with the
  mask max-pooled to the feature grid;
- loss: BCE(normal -> 0) + BCE(GAS -> 1) + focal loss on the LAS features against their mask;
- AdamW, lr 1e-4 for the adaptor and 2e-4 for the discriminator (the paper's values).

CPU budget: the backbone is frozen, so its features are computed once for a fixed number of (augmented)
views of each training image (and their LAS versions) and cached; the epochs then only run the small
head.

Model selection never looks at the test set. When normal validation images are given (``edgead fit``
holds out 10% of train/good), they and LAS versions of them form a selection set; after every epoch the
head is scored on it (mean of image AUROC, normal vs synthetic, and patch AUROC on the synthetic masks)
and the best epoch's weights are kept. Without validation images the last epoch is kept.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from edgead.data.datasets import Sample
from edgead.data.images import load_rgb, resize_image
from edgead.errors import DatasetError, SizeError
from edgead.metrics import image_auroc
from edgead.models.base import Pipeline, TrainableHead
from edgead.progress import progress as progress_bar
from edgead.validation import (
    BatchSize,
    Channels,
    Epochs,
    NonNegativeFloat,
    PositiveFloat,
    Ratio,
    Seed,
    Views,
    check_memory,
    hyperparameters,
)

# A 2048 px image at stride 8 has 65,536 feature positions: more patches per image are never drawn.
MAX_PATCHES_PER_IMAGE = 65_536


def focal_loss(probabilities: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss on probabilities: down-weights the many easy patches of an LAS image."""
    p = probabilities.clamp(1e-6, 1 - 1e-6)
    p_true = torch.where(targets > 0.5, p, 1 - p)
    return (-((1 - p_true) ** gamma) * torch.log(p_true)).mean()


def project_to_band(
    points: torch.Tensor, anchors: torch.Tensor, low: torch.Tensor | float, high: torch.Tensor | float
):
    """Move each point along its direction from its anchor so that the distance lies in [low, high]."""
    offset = points - anchors
    norm = offset.norm(dim=1, keepdim=True)
    scale = norm.clamp(min=low, max=high) / (norm + 1e-10)
    return anchors + offset * scale


class TinyGlass(TrainableHead):
    """Adaptor + discriminator head trained with GLASS's global and local anomaly synthesis."""

    name: ClassVar[str] = "tinyglass"
    fitted_buffers: ClassVar[tuple[str, ...]] = ("feature_mean_", "feature_std_")

    @hyperparameters
    def __init__(
        self,
        in_channels: Channels | None = None,
        hidden: Channels = 256,
        epochs: Epochs = 30,
        views: Views = 4,
        augment: bool = True,
        batch_size: BatchSize = 8,
        patches_per_image: Annotated[int, Field(ge=1, le=MAX_PATCHES_PER_IMAGE)] = 256,
        lr_adaptor: PositiveFloat = 1e-4,
        lr_discriminator: PositiveFloat = 2e-4,
        gas: Literal["manifold", "hypersphere"] = "manifold",
        noise_std: NonNegativeFloat = 0.015,
        gas_steps: Annotated[int, Field(ge=0, le=1000)] = 5,
        gas_step_size: NonNegativeFloat = 0.001,
        radius: PositiveFloat = 0.5,
        radius_quantile: Ratio = 0.75,
        use_foreground: bool = False,
        hard_mining: Annotated[float, Field(ge=0, lt=1)] = 0.5,
        seed: Seed = 0,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.hidden = hidden
        self.epochs = epochs
        self.views = views
        self.augment = augment
        self.batch_size = batch_size
        self.patches_per_image = patches_per_image
        self.lr_adaptor = lr_adaptor
        self.lr_discriminator = lr_discriminator
        self.gas = gas
        self.noise_std = noise_std
        self.gas_steps = gas_steps
        self.gas_step_size = gas_step_size
        self.radius = radius
        self.radius_quantile = radius_quantile
        self.use_foreground = use_foreground
        self.hard_mining = hard_mining
        self.seed = seed
        self.adaptor: nn.Module | None = None
        self.discriminator: nn.Module | None = None
        if in_channels is not None:
            self._build(in_channels)

    def hyperparameters(self) -> dict[str, Any]:
        names = (
            "in_channels hidden epochs views augment batch_size patches_per_image lr_adaptor lr_discriminator gas "
            "noise_std gas_steps gas_step_size radius radius_quantile use_foreground hard_mining seed"
        ).split()
        return {name: getattr(self, name) for name in names}

    def check_sizes(self, image_size: int, backbone: nn.Module | None = None) -> None:
        """The head's weights (with AdamW's state) and the discriminator's activations on a batch of
        16 feature maps must fit; a given ``in_channels`` must be the backbone's."""
        if backbone is None:
            return
        channels, positions = backbone.out_channels, (image_size // backbone.stride) ** 2
        if self.in_channels is not None and self.in_channels != channels:
            raise SizeError(
                f"bad hyperparameter for model 'tinyglass': in_channels {self.in_channels} is not the "
                f"{channels} channels of backbone {backbone.name} at layers {backbone.layers}"
            )
        parameters = channels * channels + channels * self.hidden
        check_memory(
            f"bad hyperparameter for model 'tinyglass': hidden {self.hidden} at image size {image_size}",
            16 * parameters + 4 * 16 * self.hidden * positions,
            "use a smaller hidden or image size",
        )

    def check_cache(self, pipeline: Pipeline, n_images: int) -> None:
        """The cached features (normal and LAS, ``views`` of each training image) must fit."""
        backbone = pipeline.backbone
        floats = 2 * self.views * n_images * backbone.out_channels * (pipeline.image_size // backbone.stride) ** 2
        check_memory(
            f"bad hyperparameter for model 'tinyglass': views {self.views} of {n_images} images at image size "
            f"{pipeline.image_size}",
            4 * floats,
            "use fewer views or a smaller image size",
        )

    def attach(self, in_channels: int) -> None:
        if self.adaptor is None:
            self._build(in_channels)
        elif in_channels != self.in_channels:
            raise ValueError(
                f"this TinyGLASS head was built for {self.in_channels} channels, not {in_channels}"
            )

    def _build(self, in_channels: int) -> None:
        self.in_channels = in_channels
        with torch.random.fork_rng():  # seeded initialisation without touching the caller's RNG
            torch.manual_seed(self.seed)
            self.adaptor = nn.Conv2d(in_channels, in_channels, kernel_size=1)
            self.discriminator = nn.Sequential(
                nn.Conv2d(in_channels, self.hidden, kernel_size=1),
                nn.BatchNorm2d(self.hidden),
                nn.LeakyReLU(0.2),
                nn.Conv2d(self.hidden, 1, kernel_size=1, bias=False),
                nn.Sigmoid(),
            )

    def adapt(self, features: torch.Tensor) -> torch.Tensor:
        return self.adaptor((features - self.feature_mean_) / self.feature_std_)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self.check_fitted()
        return self.discriminator(self.adapt(features))

    # ---- training -------------------------------------------------------------------------------

    @torch.no_grad()
    def _synthesise(
        self,
        pipeline: Pipeline,
        images: list[np.ndarray],
        views: int,
        rng: np.random.Generator,
        augment: bool,
        progress: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Backbone features of ``views`` views of each image and of their LAS versions, plus masks.

        View 0 is the image itself; later views are augmented when ``augment`` is set, and otherwise equal
        view 0, whose features are then computed once. The LAS textures come from procedural generators
        and crops of up to three other images of the same set.
        """
        from edgead.data.anomaly_synthesis import local_anomaly
        from edgead.data.augment import augment_image

        normal, synthetic, masks = [], [], []
        jobs = [(v, i) for v in range(views) for i in range(len(images))]
        batch: list[tuple[np.ndarray, np.ndarray, np.ndarray, bool]] = []

        def flush() -> None:
            to_tensor = lambda arrays: torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255  # noqa: E731
            fresh = [b[0] for b in batch if b[3]]
            if fresh:
                normal.append(pipeline.features(to_tensor(fresh)))
            synthetic.append(pipeline.features(to_tensor([b[1] for b in batch])))
            mask = torch.from_numpy(np.stack([b[2] for b in batch])).float()[:, None]
            masks.append(F.adaptive_max_pool2d(mask, synthetic[-1].shape[-2:]))
            batch.clear()

        for view, index in progress_bar(jobs, "synthesise + features", progress):
            image = augment_image(images[index], rng) if augment and view > 0 else images[index]
            others = [j for j in range(len(images)) if j != index] or [index]
            picks = rng.choice(len(others), size=min(3, len(others)), replace=False)
            sources = [images[others[j]] for j in picks]
            anomalous, mask = local_anomaly(image, rng, sources=sources, use_foreground=self.use_foreground)
            batch.append((image, anomalous, mask, augment or view == 0))
            if len(batch) == 16:
                flush()
        if batch:
            flush()
        normal_features = torch.cat(normal)
        if not augment:  # the views are view 0 again (jobs are view-major)
            normal_features = normal_features.repeat(views, 1, 1, 1)
        return normal_features, torch.cat(synthetic), torch.cat(masks)

    def _load_images(self, pipeline: Pipeline, samples: list[Sample], progress: bool) -> list[np.ndarray]:
        size = pipeline.image_size
        return [resize_image(load_rgb(s.path), size) for s in progress_bar(samples, "load images", progress)]

    def _cache_views(self, pipeline: Pipeline, samples: list[Sample], progress: bool):
        """Training cache: ``views`` views of each training image (augmented unless ``augment`` is off) and
        their LAS versions. Without augmentation the views differ only in their LAS, as in GLASS's own
        MVTec runs, which augment the textures but not the normal images."""
        images = self._load_images(pipeline, samples, progress)
        rng = np.random.default_rng(self.seed)
        return self._synthesise(pipeline, images, self.views, rng, augment=self.augment, progress=progress)

    def _selection_set(self, pipeline: Pipeline, samples: list[Sample], progress: bool):
        """Selection cache: each validation image as is, and two LAS versions of it (fixed seed)."""
        images = self._load_images(pipeline, samples, progress)
        rng = np.random.default_rng(self.seed + 1)
        normal, synthetic, masks = self._synthesise(pipeline, images, 2, rng, augment=False, progress=False)
        return normal[: len(images)], synthetic, masks

    @torch.no_grad()
    def selection_score(
        self, normal: torch.Tensor, synthetic: torch.Tensor, masks: torch.Tensor, postprocess: nn.Module
    ) -> float:
        """Mean of image AUROC (normal vs LAS images) and patch AUROC (LAS masks) on held-out images."""
        was_training = self.training
        self.eval()
        normal_maps, synthetic_maps = self(normal), self(synthetic)
        self.train(was_training)
        image_scores = torch.cat([postprocess(normal_maps), postprocess(synthetic_maps)]).amax(dim=(1, 2, 3))
        image_labels = np.r_[np.zeros(len(normal)), np.ones(len(synthetic))]
        patch_scores = torch.cat([normal_maps.flatten(), synthetic_maps.flatten()])
        patch_labels = torch.cat([torch.zeros(normal_maps.numel()), (masks > 0.5).float().flatten()])
        image = image_auroc(image_labels, image_scores.numpy())
        patch = image_auroc(patch_labels.numpy(), patch_scores.numpy())
        return (image + patch) / 2

    def _global_anomalies(
        self, true: torch.Tensor, centre: torch.Tensor, radius_t: torch.Tensor
    ) -> torch.Tensor:
        """GAS: noise, then gradient ascent on the discriminator loss, projected into the [r, 2r] band."""
        anchors = centre.expand_as(true) if self.gas == "hypersphere" else true.detach()
        low = radius_t if self.gas == "hypersphere" else self.radius
        offset = torch.randn_like(true) * self.noise_std
        for step in range(self.gas_steps):
            points = (true.detach() + offset).requires_grad_(True)
            loss = F.binary_cross_entropy(self.discriminator(points), torch.ones(len(points), 1, 1, 1))
            (grad,) = torch.autograd.grad(loss, points)
            grad = grad / (grad.norm(dim=1, keepdim=True) + 1e-10)
            offset = offset + self.gas_step_size * grad
            if (step + 1) % 5 == 0 or step == self.gas_steps - 1:
                projected = project_to_band(true.detach() + offset, anchors, low, 2 * low)
                offset = projected - true.detach()
        return true + offset.detach()  # gradients still reach the adaptor through ``true``

    def fit_samples(
        self,
        pipeline: Pipeline,
        samples: list[Sample],
        progress: bool = False,
        validation: list[Sample] | None = None,
    ) -> TinyGlass:
        if len(samples) < 2:
            raise DatasetError("TinyGLASS needs at least 2 training images (after the validation split): add more defect-free images")
        self.check_cache(pipeline, len(samples))
        normal, synthetic, masks = self._cache_views(pipeline, samples, progress)
        selection = self._selection_set(pipeline, validation, progress) if validation else None
        self.attach(normal.shape[1])
        mean = normal.mean(dim=(0, 2, 3), keepdim=True)
        std = normal.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        self.set_fitted(feature_mean_=mean, feature_std_=std)
        self.train_cached(normal, synthetic, masks, selection, pipeline.postprocess, progress)
        return self

    def train_cached(
        self,
        normal: torch.Tensor,
        synthetic: torch.Tensor,
        masks: torch.Tensor,
        selection: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
        postprocess: nn.Module,
        progress: bool = False,
    ) -> None:
        """The epochs on cached features; keeps the weights of the best selection epoch, if any."""
        generator = torch.Generator().manual_seed(self.seed)
        optimisers = [
            torch.optim.AdamW(self.adaptor.parameters(), lr=self.lr_adaptor),
            torch.optim.AdamW(self.discriminator.parameters(), lr=self.lr_discriminator),
        ]
        self.history_: list[dict[str, float]] = []
        self.selected_epoch_ = self.epochs
        best_score, best_state = -np.inf, None
        self.train()
        for epoch in progress_bar(range(1, self.epochs + 1), "train tinyglass", progress):
            with torch.no_grad():  # the hypersphere centre and radius of the adapted normal features
                sample = self.adapt(normal[torch.randperm(len(normal), generator=generator)[:64]])
                centre = sample.mean(dim=(0, 2, 3), keepdim=True)
                radius_t = torch.quantile((sample - centre).norm(dim=1).flatten(), self.radius_quantile)
            order = torch.randperm(len(normal), generator=generator)
            losses = []
            for start in range(0, len(order), self.batch_size):
                index = order[start : start + self.batch_size]
                losses.append(
                    self._step(
                        normal[index], synthetic[index], masks[index], centre, radius_t, optimisers, generator
                    )
                )
            record = {"epoch": epoch, "loss": float(np.mean(losses))}
            if selection is not None:
                record["selection"] = self.selection_score(*selection, postprocess)
                if record["selection"] >= best_score:  # ties go to the later, longer-trained epoch
                    best_score, best_state = record["selection"], copy.deepcopy(self.state_dict())
                    self.selected_epoch_ = epoch
            self.history_.append(record)
        if best_state is not None:
            self.load_state_dict(best_state)
        self.eval()

    def _step(self, normal, synthetic, masks, centre, radius_t, optimisers, generator) -> float:
        n, c, h, w = normal.shape
        # GAS works on a random subset of patches per image (the head is per-patch, so this is plain SGD).
        k = min(self.patches_per_image, h * w)
        picks = torch.stack([torch.randperm(h * w, generator=generator)[:k] for _ in range(n)])
        patches = normal.flatten(2).gather(2, picks[:, None, :].expand(n, c, k))  # [n, c, k]
        patches = patches.permute(0, 2, 1).reshape(n * k, c, 1, 1)
        true = self.adapt(patches)
        gaus = self._global_anomalies(true, centre, radius_t)
        scores = self.discriminator(torch.cat([true, gaus]))
        bce = F.binary_cross_entropy(scores[: len(true)], torch.zeros_like(scores[: len(true)]))
        bce = bce + F.binary_cross_entropy(scores[len(true) :], torch.ones_like(scores[len(true) :]))
        fake = self.adapt(synthetic)
        if self.gas == "hypersphere":  # push LAS anomalies out to [2r, 4r] from the centre, as GLASS does
            pushed = project_to_band(fake, centre.expand_as(fake), 2 * radius_t, 4 * radius_t)
            fake = torch.where(masks > 0.5, pushed, fake)
        fake_scores, fake_targets = self.discriminator(fake).flatten(), masks.flatten()
        if self.hard_mining > 0:  # GLASS's p: only the hardest share of LAS patches enters the focal loss
            error = (fake_scores.detach() - fake_targets) ** 2
            hard = error >= torch.quantile(error, self.hard_mining)
            fake_scores, fake_targets = fake_scores[hard], fake_targets[hard]
        loss = bce + focal_loss(fake_scores, fake_targets)
        for optimiser in optimisers:
            optimiser.zero_grad()
        loss.backward()
        for optimiser in optimisers:
            optimiser.step()
        return float(loss.detach())
