"""The student model's training recipe (EfficientAD's, scheduled for a CPU).

One step, on a batch of normal training images with EfficientAD's colour jitter (brightness, contrast
or saturation by a factor in [0.8, 1.2]; ``views`` fixed versions of each image, drawn and passed
through the frozen teacher once, before the steps):

- teacher features of the batch, standardised with the training set's channel statistics;
- student loss: the **hard-feature loss**, the mean of the squared student-teacher differences at or
  above their ``hard_quantile`` (0.999), so the student spends its capacity on what it does worst;
- **penalty**: EfficientAD keeps the student from imitating the teacher off the training distribution
  with ImageNet images; with no ImageNet here, procedural textures (noise, stripes, checker, speckle,
  marble) stand in: the student's teacher half is pushed towards 0 on them;
- autoencoder loss: autoencoder vs teacher, and student (second half) vs autoencoder.

One student forward serves both of its losses (EfficientAD runs the student on the plain and on the
jittered image; once is half the cost on 2 cores). Adam, ``lr`` divided by 10 for the last 5% of the
steps, as EfficientAD. The last step's weights are kept: nothing is selected.

After training, the map normalisation quantiles (``quantile_low`` 0.9, ``quantile_high`` 0.995) come from the
normal validation images' maps; the test set is never looked at.
"""

from __future__ import annotations

import numpy as np
import torch

from edgead.data.anomaly_synthesis import make_texture
from edgead.data.datasets import Sample
from edgead.errors import DatasetError
from edgead.models.base import Pipeline
from edgead.models.image_training import colour_jitter, decay_at_the_end, load_images, training_step
from edgead.progress import progress as progress_bar

PENALTY_TEXTURES = 64  # pre-drawn procedural textures the penalty batches are sampled from
PENALTY_BATCH = 2


@torch.no_grad()
def cache_views(teacher, pipeline: Pipeline, images: torch.Tensor, views: int, batch_size: int, seed: int, progress: bool):
    """``views`` versions of every training image (view 0 as is, the others colour-jittered, uint8) and the
    teacher's features of each (float16): the frozen teacher then runs once per view, not once per step."""
    generator = torch.Generator().manual_seed(seed)
    inputs, targets = [], []
    jobs = [(view, start) for view in range(views) for start in range(0, len(images), batch_size)]
    for view, start in progress_bar(jobs, "teacher features", progress):
        batch = images[start : start + batch_size]
        if view > 0:
            batch = (colour_jitter(batch.float() / 255, generator) * 255).round().to(torch.uint8)
        inputs.append(batch)
        targets.append(teacher(pipeline.preprocess(batch.float() / 255)).half())
    return torch.cat(inputs), torch.cat(targets)


def teacher_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel mean and std of teacher features [N, C, h, w] over every image and position."""
    flat = features.double().transpose(0, 1).reshape(features.shape[1], -1)
    mean, std = flat.mean(dim=1), flat.std(dim=1).clamp_min(1e-6)
    return mean.float().view(1, -1, 1, 1), std.float().view(1, -1, 1, 1)


def penalty_images(size: int, seed: int) -> torch.Tensor:
    """The stand-in for EfficientAD's ImageNet penalty images: procedural textures, uint8 [K, 3, S, S]."""
    rng = np.random.default_rng(seed)
    textures = [make_texture(size, rng) for _ in range(PENALTY_TEXTURES)]
    return torch.from_numpy(np.stack(textures)).permute(0, 3, 1, 2).contiguous()


def hard_feature_loss(distance: torch.Tensor, quantile: float) -> torch.Tensor:
    """Mean of the squared differences from their ``quantile``'s position (rounded up) on: the values at or
    above EfficientAD's torch.quantile threshold; kthvalue, because torch.quantile refuses over 16M values."""
    flat = distance.flatten()
    threshold = torch.kthvalue(flat, int(np.ceil(quantile * (flat.numel() - 1))) + 1).values
    return flat[flat >= threshold].mean()


@torch.no_grad()
def map_quantiles(head, pipeline: Pipeline, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[1, n, 1, 1]: q_low, q_high of the student-teacher maps (then of the autoencoder maps) over normal images."""
    st, ae = [], []
    for start in range(0, len(images), batch_size):
        features = pipeline.features(images[start : start + batch_size].float() / 255)
        a, b = head.distances(features)
        st.append(a.flatten())
        if b is not None:
            ae.append(b.flatten())
    values = []
    for maps in (st, ae) if ae else (st,):
        flat = torch.cat(maps).double().numpy()
        low, high = np.quantile(flat, (head.quantile_low, head.quantile_high))
        values += [low, max(high, low + 1e-6)]
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)


def train_student(head, pipeline: Pipeline, samples: list[Sample], validation: list[Sample] | None, progress: bool):
    """Fit the student (and autoencoder) in ``pipeline.backbone`` and the head's normalisation."""
    if len(samples) < 2:
        raise DatasetError("the student model needs at least 2 training images (after the validation split)")
    extractor = pipeline.backbone
    teacher, student, autoencoder = extractor.teacher, extractor.student, extractor.autoencoder
    c = extractor.teacher_channels
    images = load_images(samples, pipeline.image_size, progress, "load images")
    inputs, targets = cache_views(teacher, pipeline, images, head.views, head.batch_size, head.seed, progress)
    mean, std = teacher_statistics(targets[: len(images)])  # the plain training images (view 0)
    textures = penalty_images(pipeline.image_size, head.seed) if head.penalty else None

    torch.manual_seed(head.seed)
    generator = torch.Generator().manual_seed(head.seed)
    trained = [student] + ([autoencoder] if autoencoder is not None else [])
    parameters = [p for module in trained for p in module.parameters()]
    optimiser = torch.optim.Adam(parameters, lr=head.lr, weight_decay=head.weight_decay)
    head.history_ = []
    for module in trained:
        module.train()
    for step in progress_bar(range(head.steps), "train student", progress):
        decay_at_the_end(optimiser, step, head.steps, head.lr)
        index = torch.randint(0, len(inputs), (head.batch_size,), generator=generator)
        batch = pipeline.preprocess(inputs[index].float() / 255)
        target = (targets[index].float() - mean) / std
        output = student(batch)
        loss = hard_feature_loss((target - output[:, :c]) ** 2, head.hard_quantile)
        if textures is not None:
            pick = torch.randint(0, len(textures), (PENALTY_BATCH,), generator=generator)
            loss = loss + (student(pipeline.preprocess(textures[pick].float() / 255))[:, :c] ** 2).mean()
        if autoencoder is not None:
            reconstruction = autoencoder(batch)
            loss = loss + ((target - reconstruction) ** 2).mean()
            loss = loss + ((reconstruction - output[:, c:]) ** 2).mean()
        training_step(optimiser, loss, step, head.steps, head.history_, "student")
    for module in trained:
        module.eval()
    head.set_fitted(teacher_mean_=mean, teacher_std_=std, quantiles_=torch.zeros(1, 4 if autoencoder else 2, 1, 1))
    normal = load_images(validation, pipeline.image_size, False, "") if validation else images
    head.set_fitted(quantiles_=map_quantiles(head, pipeline, normal, head.batch_size))
