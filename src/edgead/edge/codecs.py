"""Codecs on the edge/server cut: what an edge device sends and how the server gets a tensor back.

One interface, :class:`Codec`: ``encode(image or features) -> bytes`` on the edge and
``decode(bytes) -> tensor`` on the server. Image codecs cut before the backbone (the server runs the
whole detector), feature codecs between backbone and head (the edge runs ``Pipeline.features``, the
server ``Pipeline.score_features``):

- ``image``: raw RGB uint8 at the model's input size, in a payload (the uncompressed reference).
- ``webp``: a standard WebP file (Pillow, quality 80 by default, method 6) at the model's input size; the server
  also takes PNG and JPEG files the same way.
- ``features``: the feature map in float16 (the uncompressed feature reference).
- ``rs``: random sampling: a seeded random share ``ratio`` of the feature-map positions is sent (float16),
  with a bit mask of which. The server fills every position it did not receive with the vector of the
  nearest received position (Euclidean distance on the feature grid; ties broken by scipy's exact
  distance transform), then scores the full map.
- ``pq``: product quantization (faiss): every position's C-vector becomes M bytes (M sub-quantizers of
  8 bits) using the run's codebook, whose id travels in the payload and must match the server's.
- ``rs+pq``: random sampling, then product quantization of the sent positions.
- ``rs+webp``: random sampling, then each channel's sent values are scaled to 0..255 by its own
  (min, max) (float16, in the payload), tiled into one 8-bit image and WebP-coded.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from edgead.data.images import _pil_to_rgb, resize_image
from edgead.edge.payload import (
    MASKED_CODECS,
    Payload,
    PayloadError,
    parse_payload,
)
from edgead.edge.pq import Codebook
from edgead.errors import EdgeadError, UsageError

CODECS = ("image", "webp", "features", "rs", "pq", "rs+pq", "rs+webp")
IMAGE_CODECS = ("image", "webp")
FEATURE_CODECS = ("features", "rs", "pq", "rs+pq", "rs+webp")
DEFAULT_QUALITY = 80
# libwebp's slowest, best rate-distortion search: about 5 ms more per 256 px image on the edge, 5% fewer
# bytes, and fine threads (screw) survive better at the same quality (docs/results/edge_server_webp_method.md).
WEBP_METHOD = 6
DEFAULT_RATIO = 0.25
MAX_IMAGE_PIXELS = 16_777_216  # 4096 x 4096: far above any inspection frame, far below a bomb

_SIGNATURES = {"PNG": (b"\x89PNG\r\n\x1a\n",), "JPEG": (b"\xff\xd8\xff",)}


def image_format(data: bytes) -> str | None:
    """'PNG', 'JPEG' or 'WEBP' from the first bytes, None for anything else."""
    head = bytes(data[:12])
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for name, signatures in _SIGNATURES.items():
        if head.startswith(signatures):
            return name
    return None


def open_image_bytes(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, expect_size: tuple[int, int] | None = None
                     ) -> Image.Image:
    """Open a PNG/JPEG/WebP from bytes and decode it, refusing huge images from their header alone.

    The size in the header is checked before any pixel is decoded (decompression bombs); anything
    Pillow cannot decode becomes a :class:`PayloadError`.
    """
    fmt = image_format(data)
    if fmt is None:
        raise PayloadError("the body is neither an edgead payload nor a PNG, JPEG or WebP image", status=415)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            image = Image.open(io.BytesIO(data), formats=[fmt])
            width, height = image.size
            if width * height > max_pixels:
                raise PayloadError(
                    f"{fmt} image of {width}x{height} pixels is over the limit of {max_pixels:,}: send it at "
                    "the model's input size", status=413)
            if expect_size is not None and (width, height) != expect_size:
                raise PayloadError(f"the {fmt} image is {width}x{height}, expected {expect_size[0]}x{expect_size[1]}")
            image.load()
            return image
    except PayloadError:
        raise
    except Image.DecompressionBombError as exc:
        raise PayloadError(f"{fmt} image is over the limit of {max_pixels:,} pixels ({exc})", status=413) from None
    except Exception as exc:  # Pillow's parsers raise many types on hostile input; all mean "bad image"  # noqa: BLE001
        raise PayloadError(f"cannot decode the {fmt} image (truncated or corrupt): {type(exc).__name__}: {exc}"
                           ) from None


def decode_image_bytes(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """An encoded image (PNG/JPEG/WebP) as RGB uint8 H x W x 3, as `edgead.data.images` converts files."""
    image = open_image_bytes(data, max_pixels)
    try:
        return _pil_to_rgb(image)
    except Exception as exc:  # noqa: BLE001
        raise PayloadError(f"cannot convert the image (mode {image.mode}) to RGB: {exc}") from None


def _image_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)


def _feature_array(features: torch.Tensor | np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """One frame's features as float32 [C, h, w], checked against the model's shape."""
    array = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.shape != tuple(shape):
        raise EdgeadError(f"features of shape {array.shape} do not match the model's {tuple(shape)}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise EdgeadError("the features hold NaN or infinite values: the backbone is broken")
    return array


class Codec:
    """encode (edge) -> bytes -> decode (server) -> tensor: an image [1, 3, S, S] in 0..1 or features [1, C, h, w]."""

    name: ClassVar[str] = ""
    takes: ClassVar[str] = ""  # "image" or "features"

    def encode(self, x) -> bytes:  # noqa: ANN001
        raise NotImplementedError

    def decode(self, data: bytes) -> torch.Tensor:
        raise NotImplementedError


class RawImageCodec(Codec):
    """Raw RGB at the model's input size (the reference: what an edge device sends uncompressed)."""

    name, takes = "image", "image"

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def encode(self, image: np.ndarray) -> bytes:
        rgb = resize_image(np.asarray(image, dtype=np.uint8), self.image_size)
        return Payload("image", (3, self.image_size, self.image_size), rgb.tobytes()).to_bytes()

    def decode(self, data: bytes | Payload) -> torch.Tensor:
        payload = data if isinstance(data, Payload) else parse_payload(data)
        _check_codec(payload, self.name)
        s = self.image_size
        if payload.shape != (3, s, s):
            raise PayloadError(f"raw image of shape {_shape(payload.shape)}, this model takes 3x{s}x{s}")
        return _image_tensor(np.frombuffer(payload.data, np.uint8).reshape(s, s, 3))


class WebpCodec(Codec):
    """A WebP file at the model's input size; decode takes PNG and JPEG too (any size, resized)."""

    name, takes = "webp", "image"

    def __init__(
        self, image_size: int, quality: int = DEFAULT_QUALITY, max_pixels: int = MAX_IMAGE_PIXELS,
        method: int = WEBP_METHOD,
    ) -> None:  # fmt: skip
        if not 0 <= quality <= 100:
            raise UsageError(f"WebP quality must be 0..100, got {quality}")
        self.image_size, self.quality, self.max_pixels, self.method = image_size, quality, max_pixels, method

    def encode(self, image: np.ndarray) -> bytes:
        rgb = resize_image(np.asarray(image, dtype=np.uint8), self.image_size)
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, "WEBP", quality=self.quality, method=self.method)
        return buffer.getvalue()

    def decode(self, data: bytes) -> torch.Tensor:
        return _image_tensor(resize_image(decode_image_bytes(data, self.max_pixels), self.image_size))


def _check_codec(payload: Payload, name: str) -> None:
    if payload.codec != name:
        raise PayloadError(f"a {payload.codec} payload was given to the {name} decoder")


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def fill_missing(values: np.ndarray, mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Full [C, h, w] map from the vectors [n, C] sent at ``mask`` (row-major): each position that was not
    sent takes the vector of its nearest sent position (Euclidean distance on the grid)."""
    mask2d = mask.reshape(height, width)
    grid = np.zeros((height, width, values.shape[1]), dtype=np.float32)
    grid[mask2d] = values
    if not mask2d.all():
        rows, cols = ndimage.distance_transform_edt(~mask2d, return_distances=False, return_indices=True)
        grid = grid[rows, cols]
    return np.ascontiguousarray(grid.transpose(2, 0, 1))


def tile_layout(channels: int, positions: int) -> tuple[int, int, int, int]:
    """(tile height, tile width, grid rows, grid columns) of rs+webp's image: one near-square tile per
    channel holding its sent values in row-major order, tiles in a near-square grid."""
    tile_w = math.ceil(math.sqrt(positions))
    tile_h = math.ceil(positions / tile_w)
    cols = math.ceil(math.sqrt(channels))
    rows = math.ceil(channels / cols)
    return tile_h, tile_w, rows, cols


def _float16_bounds(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float16 (min, max) that still enclose the float32 ones (rounded outwards)."""
    lo16, hi16 = lo.astype(np.float16), hi.astype(np.float16)
    lo16 = np.where(lo16.astype(np.float32) > lo, np.nextafter(lo16, np.float16(-np.inf)), lo16)
    hi16 = np.where(hi16.astype(np.float32) < hi, np.nextafter(hi16, np.float16(np.inf)), hi16)
    return lo16, hi16


class FeatureCodec(Codec):
    """The five feature codecs: optional random sampling of positions, then float16, PQ codes or WebP tiles.

    ``ratio`` is the share of positions sent by the rs codecs (ignored by ``features`` and ``pq``); the
    positions change from frame to frame, drawn from a generator seeded with ``seed``.
    """

    takes = "features"

    def __init__(
        self,
        name: str,
        feature_shape: tuple[int, int, int],
        codebook: Codebook | None = None,
        ratio: float = DEFAULT_RATIO,
        quality: int = DEFAULT_QUALITY,
        seed: int = 0,
        max_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        if name not in FEATURE_CODECS:
            raise UsageError(f"unknown feature codec {name!r}: choose one of {', '.join(FEATURE_CODECS)}")
        if not 0 < ratio <= 1:
            raise UsageError(f"the sampling ratio must be in (0, 1], got {ratio}")
        if not 0 <= quality <= 100:
            raise UsageError(f"WebP quality must be 0..100, got {quality}")
        self.name = name
        self.shape = tuple(int(v) for v in feature_shape)
        self.sampled = name in MASKED_CODECS
        self.values = {"features": "float16", "rs": "float16", "pq": "pq", "rs+pq": "pq", "rs+webp": "webp"}[name]
        if self.values == "pq":
            if codebook is None:
                raise UsageError(f"codec {name} needs the run's PQ codebook (train it with train_codebook)")
            if codebook.dim != self.shape[0]:
                raise EdgeadError(f"the PQ codebook is for {codebook.dim} channels, the model has {self.shape[0]}")
        self.codebook = codebook
        self.ratio, self.quality, self.max_pixels = ratio, quality, max_pixels
        self.rng = np.random.default_rng(seed)

    # ----- edge side -----

    def choose_positions(self) -> np.ndarray:
        """The bool mask (row-major) of the positions this frame sends."""
        grid = self.shape[1] * self.shape[2]
        mask = np.zeros(grid, dtype=bool)
        count = max(1, round(self.ratio * grid)) if self.sampled else grid
        mask[self.rng.choice(grid, count, replace=False)] = True
        return mask

    def encode(self, features: torch.Tensor | np.ndarray) -> bytes:
        array = _feature_array(features, self.shape)
        c, h, w = self.shape
        vectors = array.reshape(c, h * w).T  # [h*w, C]
        mask = self.choose_positions() if self.sampled else None
        if mask is not None:
            vectors = vectors[mask]
        extra: dict = {}
        if self.values == "float16":
            halves = vectors.astype(np.float16)
            if not np.isfinite(halves).all():
                raise EdgeadError("features beyond the float16 range (65504): use the pq or rs+webp codec")
            data = halves.astype("<f2").tobytes()
        elif self.values == "pq":
            data = self.codebook.encode(vectors).tobytes()
            extra = {"pq_m": self.codebook.m, "pq_nbits": self.codebook.nbits, "codebook_id": self.codebook.id}
        else:
            data, ranges = self._encode_webp(vectors)
            extra = {"ranges": ranges}
        return Payload(self.name, self.shape, data, mask=mask, **extra).to_bytes()

    def _encode_webp(self, vectors: np.ndarray) -> tuple[bytes, np.ndarray]:
        n, c = vectors.shape
        lo, hi = _float16_bounds(vectors.min(axis=0), vectors.max(axis=0))
        lo32, hi32 = lo.astype(np.float32), hi.astype(np.float32)
        span = np.where(hi32 > lo32, hi32 - lo32, 1.0)
        q = np.clip(np.rint((vectors - lo32) / span * 255.0), 0, 255).astype(np.uint8)  # [n, C]
        tile_h, tile_w, rows, cols = tile_layout(c, n)
        tiles = np.zeros((rows * cols, tile_h * tile_w), dtype=np.uint8)
        tiles[:c, :n] = q.T
        image = tiles.reshape(rows, cols, tile_h, tile_w).transpose(0, 2, 1, 3).reshape(rows * tile_h, cols * tile_w)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "WEBP", quality=self.quality, method=WEBP_METHOD)
        return buffer.getvalue(), np.stack([lo, hi], axis=1)

    # ----- server side -----

    def decode(self, data: bytes | Payload) -> torch.Tensor:
        payload = data if isinstance(data, Payload) else parse_payload(data)
        _check_codec(payload, self.name)
        if payload.shape != self.shape:
            raise PayloadError(
                f"features of shape {_shape(payload.shape)}, this model's backbone gives {_shape(self.shape)}",
                status=422)
        c, h, w = self.shape
        n = payload.positions
        if self.values == "float16":
            vectors = np.frombuffer(payload.data, "<f2").astype(np.float32).reshape(n, c)
            if not np.isfinite(vectors).all():
                raise PayloadError("the features hold NaN or infinite values")
        elif self.values == "pq":
            self._check_codebook(payload)
            codes = np.frombuffer(payload.data, np.uint8).reshape(n, self.codebook.code_size)
            vectors = self.codebook.decode(codes)
        else:
            vectors = self._decode_webp(payload)
        mask = payload.mask if payload.mask is not None else np.ones(h * w, dtype=bool)
        return torch.from_numpy(fill_missing(vectors, mask, h, w)).unsqueeze(0)

    def _check_codebook(self, payload: Payload) -> None:
        book = self.codebook
        if payload.codebook_id != book.id:
            raise PayloadError(
                f"the payload was coded with codebook {payload.codebook_id.hex()}, this server has {book.id_hex}: "
                "copy the run's pq_codebook.safetensors to the edge", status=409)
        if (payload.pq_m, payload.pq_nbits) != (book.m, book.nbits):
            raise PayloadError(
                f"the payload has {payload.pq_m} codes of {payload.pq_nbits} bits per position, the codebook "
                f"{book.m} of {book.nbits}")

    def _decode_webp(self, payload: Payload) -> np.ndarray:
        c = self.shape[0]
        n = payload.positions
        tile_h, tile_w, rows, cols = tile_layout(c, n)
        expect = (cols * tile_w, rows * tile_h)
        image = open_image_bytes(payload.data, self.max_pixels, expect_size=expect)
        if image.format != "WEBP":
            raise PayloadError(f"rs+webp payloads carry a WebP image, this one holds {image.format}")
        try:
            pixels = np.asarray(image.convert("L"), dtype=np.float32)
        except Exception as exc:  # noqa: BLE001
            raise PayloadError(f"cannot read the WebP tiles: {exc}") from None
        tiles = pixels.reshape(rows, tile_h, cols, tile_w).transpose(0, 2, 1, 3).reshape(rows * cols, -1)
        q = tiles[:c, :n].T  # [n, C]
        lo, hi = payload.ranges[:, 0], payload.ranges[:, 1]
        return lo + q / 255.0 * (hi - lo)


def create_codec(
    name: str,
    image_size: int,
    feature_shape: tuple[int, int, int] | None = None,
    codebook: Codebook | None = None,
    ratio: float = DEFAULT_RATIO,
    quality: int = DEFAULT_QUALITY,
    seed: int = 0,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Codec:
    """A codec by name (see :data:`CODECS`) for a model of input size ``image_size``."""
    if name == "image":
        return RawImageCodec(image_size)
    if name == "webp":
        return WebpCodec(image_size, quality, max_pixels)
    if name not in CODECS:
        raise UsageError(f"unknown codec {name!r}: choose one of {', '.join(CODECS)}")
    if feature_shape is None:
        raise UsageError(f"codec {name} needs the model's feature shape")
    return FeatureCodec(name, feature_shape, codebook, ratio, quality, seed, max_pixels)


def feature_shape_of(pipeline) -> tuple[int, int, int]:  # noqa: ANN001
    """(C, h, w) of ``pipeline.features`` at its input size, without running it."""
    side = pipeline.image_size // pipeline.backbone.stride
    return int(pipeline.backbone.out_channels), side, side

