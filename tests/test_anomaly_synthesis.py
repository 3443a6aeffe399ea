"""Local anomaly synthesis (GLASS LAS) and training augmentations: deterministic, local, never empty."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from edgead.data.anomaly_synthesis import (
    TEXTURE_FAMILIES,
    foreground_mask,
    local_anomaly,
    make_texture,
    perlin_mask,
    perlin_noise,
)
from edgead.data.augment import augment_image
from edgead.data.images import load_rgb, resize_image
from edgead.data.synthetic import render_part

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _disc_image(size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A bright, slightly noisy disc on a dark background, and the true disc."""
    yy, xx = np.mgrid[0:size, 0:size]
    disc = np.hypot(yy - size * 0.45, xx - size * 0.55) < size * 0.3
    image = np.where(disc[..., None], np.array([200, 180, 150]), np.array([30, 30, 35]))
    image = image + _rng(1).normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), disc


def _part(seed: int = 0, size: int = 128) -> np.ndarray:
    return render_part(_rng(seed), size, None)[0]


def test_perlin_noise_shape_range_and_determinism():
    for size, scale in [((64, 64), (4, 4)), ((50, 70), (3, 8)), ((33, 17), (1, 1))]:
        noise = perlin_noise(size, scale, _rng(3))
        assert noise.shape == size and noise.dtype == np.float32
        assert np.abs(noise).max() <= 1.01 and noise.std() > 0.01
        assert (noise == perlin_noise(size, scale, _rng(3))).all()
        assert not (noise == perlin_noise(size, scale, _rng(4))).all()


def test_perlin_mask_never_empty_and_deterministic():
    for seed in range(30):
        mask = perlin_mask(64, _rng(seed))
        assert mask.shape == (64, 64) and mask.dtype == bool
        assert mask.sum() >= 0.002 * 64 * 64
        assert (mask == perlin_mask(64, _rng(seed))).all()
    # A threshold the noise never reaches forces the ellipse fallback, which is still not empty.
    assert perlin_mask(64, _rng(0), threshold=2.0).any()
    assert perlin_mask((40, 60), _rng(0)).shape == (40, 60)


def test_perlin_mask_stays_inside_the_foreground():
    _, disc = _disc_image(96)
    for seed in range(20):
        mask = perlin_mask(96, _rng(seed), foreground=disc)
        assert mask.any() and not (mask & ~disc).any()
    # Even the fallback ellipse respects a tiny foreground.
    speck = np.zeros((96, 96), bool)
    speck[40:43, 50:53] = True
    mask = perlin_mask(96, _rng(0), threshold=2.0, foreground=speck)
    assert mask.any() and not (mask & ~speck).any()
    with pytest.raises(ValueError, match="shape"):
        perlin_mask(64, _rng(0), foreground=disc)


def test_foreground_mask_finds_a_disc_and_gives_up_on_noise():
    image, disc = _disc_image(128)
    fg = foreground_mask(image)
    assert fg.dtype == bool and fg.shape == disc.shape
    assert (fg & disc).sum() / (fg | disc).sum() > 0.8
    noise = _rng(2).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    assert foreground_mask(noise).all()
    assert foreground_mask(np.full((64, 64, 3), 90, np.uint8)).all()


def test_make_texture_families_are_varied():
    sources = [_part(1), _part(2)]
    for family in TEXTURE_FAMILIES:
        texture = make_texture(64, _rng(0), sources, family=family)
        assert texture.shape == (64, 64, 3) and texture.dtype == np.uint8
        assert texture.std() > 10, family
        assert (texture == make_texture(64, _rng(0), sources, family=family)).all()
    for given in (None, sources):
        textures = [make_texture((48, 64), _rng(seed), given).astype(np.float32) for seed in range(8)]
        assert all(t.shape == (48, 64, 3) for t in textures)
        diffs = [np.abs(a - b).mean() for a, b in itertools.combinations(textures, 2)]
        assert min(diffs) > 15 and np.mean(diffs) > 40
    with pytest.raises(ValueError, match="source images"):
        make_texture(32, _rng(0), None, family="source")
    with pytest.raises(ValueError, match="unknown texture family"):
        make_texture(32, _rng(0), family="plaid")


def test_local_anomaly_changes_only_the_masked_region():
    image = _part(0)
    sources = [_part(1), _part(2)]
    for seed in range(12):
        aug, mask = local_anomaly(image, _rng(seed), sources=sources)
        assert aug.shape == image.shape and aug.dtype == np.uint8 and mask.shape == image.shape[:2]
        assert mask.any() and mask.mean() < 0.5
        assert (aug[~mask] == image[~mask]).all()
        changed = np.abs(aug.astype(int) - image.astype(int)).max(axis=2) > 2
        assert changed[mask].mean() > 0.5
        again, mask_again = local_anomaly(image, _rng(seed), sources=sources)
        assert (again == aug).all() and (mask_again == mask).all()
    other, _ = local_anomaly(image, _rng(99), sources=sources)
    assert not (other == aug).all()
    assert (image == _part(0)).all()  # the input is not modified


def test_local_anomaly_with_foreground_stays_on_the_object():
    image, disc = _disc_image(128)
    for seed in range(8):
        _, mask = local_anomaly(image, _rng(seed), use_foreground=True)
        assert mask.any() and (mask & ~disc).sum() <= 0.05 * mask.sum()
        _, given = local_anomaly(image, _rng(seed), foreground=disc)
        assert not (given & ~disc).any()


@pytest.mark.datasets
def test_local_anomaly_on_a_real_image():
    path = SHARED_DATASETS / "mvtec_ad" / "bottle" / "train" / "good" / "000.png"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    image = resize_image(load_rgb(path), 128)
    aug, mask = local_anomaly(image, _rng(0), use_foreground=True)
    assert mask.any() and (aug[~mask] == image[~mask]).all()


def test_augment_image_is_deterministic_and_keeps_shape():
    image = _part(0, 96)[:, :80]  # not square
    copy = image.copy()
    outputs = []
    for seed in range(8):
        out = augment_image(image, _rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8 and out.flags.c_contiguous
        assert (out == augment_image(image, _rng(seed))).all()
        outputs.append(out)
    assert (image == copy).all()
    assert len({o.tobytes() for o in outputs}) > 4
    # Nothing applied: an equal copy, not the same array.
    still = augment_image(image, _rng(0), rotate_degrees=0, translate=0, jitter=0, flips=False)
    assert (still == image).all() and still is not image
    with pytest.raises(ValueError, match="uint8"):
        augment_image(image.astype(np.float32), _rng(0))
