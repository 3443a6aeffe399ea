"""What the heads that train networks on images share: the training images as one tensor, and jitter."""

from __future__ import annotations

import numpy as np
import torch

from edgead.data.datasets import Sample
from edgead.data.images import load_rgb, resize_image
from edgead.errors import NonFiniteError
from edgead.progress import progress as progress_bar

_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


def load_images(samples: list[Sample], size: int, progress: bool = False, desc: str = "load images") -> torch.Tensor:
    """uint8 [N, 3, S, S] images, resized as every other path does it (8 bits each: 200 images are 40 MB)."""
    arrays = [resize_image(load_rgb(s.path), size) for s in progress_bar(samples, desc, progress)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def colour_jitter(images: torch.Tensor, generator: torch.Generator, strength: float = 0.2) -> torch.Tensor:
    """EfficientAD's augmentation: per image, one of brightness, contrast or saturation scaled in [1 -+ s]."""
    n = len(images)
    factor = 1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * strength
    kind = torch.randint(0, 3, (n, 1, 1, 1), generator=generator)
    grey = (images * _LUMA).sum(dim=1, keepdim=True)
    brightness = images * factor
    contrast = (images - grey.mean(dim=(2, 3), keepdim=True)) * factor + grey.mean(dim=(2, 3), keepdim=True)
    saturation = grey + (images - grey) * factor
    out = torch.where(kind == 0, brightness, torch.where(kind == 1, contrast, saturation))
    return out.clamp(0, 1)


@torch.no_grad()
def zero_denormals_(optimiser: torch.optim.Optimizer, below: float = 1e-30) -> None:
    """Set weights and optimiser state smaller than ``below`` to exactly 0.

    Adam with weight decay shrinks the weights of units that get no gradient (dead ReLUs) geometrically
    until they are denormal floats, which the CPU multiplies many times slower: a 2000-step student fit
    slowed from 0.28 s to 1.5 s per step. ``torch.set_flush_denormal`` only reaches the calling thread,
    not the OpenMP workers, so the values are cut here, after every step (about 1 ms).
    """
    for group in optimiser.param_groups:
        for parameter in group["params"]:
            tensors = [parameter, *(v for v in optimiser.state.get(parameter, {}).values() if torch.is_tensor(v))]
            for tensor in tensors:
                if tensor.is_floating_point() and tensor.dim() > 0:
                    tensor.masked_fill_(tensor.abs() < below, 0.0)


def training_step(
    optimiser: torch.optim.Optimizer, loss: torch.Tensor, step: int, steps: int, history: list, what: str
) -> None:
    """One optimiser step of a recipe: fail closed on a NaN or infinite loss, keep weights off denormals,
    log the loss every 50 steps and at the last one (``history``, kept on the head as ``history_``)."""
    if not torch.isfinite(loss):
        raise NonFiniteError(
            f"{what} training diverged (loss {float(loss.detach())} at step {step + 1}): nothing saved; "
            "try a lower lr (-p lr=...)"
        )
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    zero_denormals_(optimiser)
    if step % 50 == 0 or step == steps - 1:
        history.append({"step": step + 1, "loss": float(loss.detach())})


def decay_at_the_end(optimiser: torch.optim.Optimizer, step: int, steps: int, lr: float) -> None:
    """EfficientAD's schedule: ``lr`` until 95% of the steps, then a tenth of it."""
    if step == int(0.95 * steps):
        for group in optimiser.param_groups:
            group["lr"] = lr * 0.1
