"""The head contract every method implements, and the pipeline that wires it to a backbone.

A head follows scikit-learn's estimator contract: hyperparameters in ``__init__``, learned state
set by ``fit`` and named with a trailing underscore, ``fit`` returns self. Learned tensors are
registered as buffers listed in ``fitted_buffers`` so that run folders can save and restore them
without pickle.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from edgead.models.postprocess import Postprocess, max_score


class Head(nn.Module):
    """A method: learns from normal features, then maps features to patch scores."""

    name: ClassVar[str] = "head"
    fitted_buffers: ClassVar[tuple[str, ...]] = ()
    # INT8 exports keep the head in float; True also stores its convolution weights in int8 (weights only)
    int8_head_weights: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        for name in self.fitted_buffers:  # empty until fit(); None buffers stay out of state_dict
            self.register_buffer(name, None)

    def hyperparameters(self) -> dict[str, Any]:
        """The ``__init__`` arguments, saved in the run folder's config.json."""
        raise NotImplementedError

    def fit(self, features: torch.Tensor, progress: bool = False) -> Head:
        """Learn from the features of normal training images, shape [N, C, h, w]."""
        raise NotImplementedError

    def fit_stream(self, batches: Iterable[torch.Tensor], total: int, progress: bool = False) -> Head:
        """Learn from feature batches [B, C, h, w] of ``total`` normal images, in any order.

        Heads that fit in bounded memory (PatchCore, PaDiM) override this; the default gathers the
        batches and calls :meth:`fit`.
        """
        return self.fit(torch.cat(list(batches)), progress=progress)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Patch scores [N, 1, h, w]: higher means more anomalous."""
        raise NotImplementedError

    def default_layers(self, backbone: str) -> tuple[int, ...] | None:
        """The backbone stages this method uses when none are given; None = the backbone's default."""
        return None

    def check_sizes(self, image_size: int, backbone: nn.Module | None = None) -> None:
        """Raise SizeError if these settings cannot work at ``image_size`` or clearly would not fit in memory.

        Called before anything is built or fitted: by the fit options check with the image size alone, and
        by :class:`Pipeline` with the backbone too (its ``out_channels`` and ``stride``).
        """

    def attach(self, in_channels: int) -> None:
        """Called once the backbone is known; heads with learned layers build them here."""

    def build_extractor(self, backbone: nn.Module, image_size: int) -> nn.Module:
        """The module in the pipeline's backbone slot: the frozen backbone itself for most heads.

        A head whose own networks see the image (the student model's student and autoencoder) wraps the
        backbone here, so the pipeline still has one module that turns images into one 4D tensor.
        """
        return backbone

    def predict_images(self, pipeline: Pipeline, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Maps and scores from the images themselves (DifferNet: test-time rotations, gradient maps), or None
        for the usual features -> head -> postprocess path that ``Pipeline.predict`` takes."""
        return None

    def image_scores(self, features: torch.Tensor, patch_scores: torch.Tensor) -> torch.Tensor | None:
        """Method-specific image scores [N], or None to use the max of the anomaly map."""
        return None

    @property
    def is_fitted(self) -> bool:
        return all(getattr(self, name, None) is not None for name in self.fitted_buffers)

    def check_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit() first")

    def set_fitted(self, **tensors: torch.Tensor) -> None:
        """Store learned tensors as buffers (so state_dict, run folders and export see them)."""
        for key, value in tensors.items():
            if key not in self.fitted_buffers:
                raise KeyError(f"{key} is not a fitted buffer of {type(self).__name__}")
            self.register_buffer(key, value.detach().contiguous())
        self.on_fitted()

    def on_fitted(self) -> None:
        """Hook for heads that build caches (e.g. a search index) from their fitted buffers."""


class TrainableHead(Head):
    """A head trained end to end on images (e.g. with synthetic anomalies), not on cached features alone.

    ``fit_samples`` gets the whole pipeline (for the frozen backbone), the normal training samples and,
    optionally, normal validation samples it may use for model selection (never test samples).
    """

    def fit_samples(
        self, pipeline: Pipeline, samples: list, progress: bool = False, validation: list | None = None
    ) -> TrainableHead:
        raise NotImplementedError

    def fit(self, features: torch.Tensor, progress: bool = False) -> Head:
        raise TypeError(f"{type(self).__name__} trains on images: use fit_samples(pipeline, samples)")


class Pipeline(nn.Module):
    """Preprocess -> Backbone -> Head -> Postprocess, the one structure every detector shares.

    Input: float images in 0..1, shape [N, 3, S, S] with S = ``image_size``.
    """

    def __init__(self, backbone: nn.Module, head: Head, image_size: int, blur_sigma: float = 4.0) -> None:
        super().__init__()
        head.check_sizes(image_size, backbone)  # a range error, not an allocator error while building
        backbone = head.build_extractor(backbone, image_size)
        self.backbone = backbone
        self.head = head
        head.attach(backbone.out_channels)
        self.image_size = int(image_size)
        self.register_buffer("mean", torch.tensor(backbone.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(backbone.std).view(1, 3, 1, 1), persistent=False)
        self.postprocess = Postprocess(image_size, sigma=blur_sigma, grid=self.image_size // backbone.stride)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocess + backbone: the edge side of a split deployment."""
        return self.backbone(self.preprocess(images))

    def score_features(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Head + postprocess: anomaly maps [N, 1, S, S] and image scores [N]."""
        patch_scores = self.head(features)
        anomaly_map = self.postprocess(patch_scores)
        scores = self.head.image_scores(features, patch_scores)
        if scores is None:
            scores = max_score(anomaly_map)
        return anomaly_map, scores

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The anomaly map alone: a single-output graph for export."""
        return self.postprocess(self.head(self.features(images)))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps [N, 1, S, S] and image scores [N] for a batch of images in 0..1."""
        self.eval()
        predicted = self.head.predict_images(self, images)
        return predicted if predicted is not None else self.score_features(self.features(images))
