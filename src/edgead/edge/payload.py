"""The binary format of feature payloads, shared by the edge client and the server.

One fixed little-endian header (``struct``), then a body whose sections depend on the codec. Both
sides use this module only, so the format has exactly one implementation. The decoder trusts nothing:
every field is checked before any of the body is used, and any malformed, truncated, oversized or
inconsistent input raises :class:`PayloadError` with the reason (never ``IndexError`` or
``struct.error``). The format is documented in docs/edge_payload.md.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from edgead.errors import EdgeadError

MAGIC = b"EDGF"
VERSION = 1

# magic, version, codec, dtype, flags, channels, height, width, positions, pq_m, pq_nbits, reserved,
# codebook id, body length, crc32
HEADER = struct.Struct("<4sBBBBHHHIHBB8sII")
HEADER_SIZE = HEADER.size  # 38 bytes

CODEC_IDS = {"image": 1, "features": 2, "rs": 3, "pq": 4, "rs+pq": 5, "rs+webp": 6}
CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}
DTYPE_IDS = {"uint8": 1, "float16": 2}
DTYPE_NAMES = {v: k for k, v in DTYPE_IDS.items()}
# The element type of each codec's data section.
CODEC_DTYPES = {
    "image": "uint8",
    "features": "float16",
    "rs": "float16",
    "pq": "uint8",
    "rs+pq": "uint8",
    "rs+webp": "uint8",
}
MASKED_CODECS = ("rs", "rs+pq", "rs+webp")  # a position mask follows the header
PQ_CODECS = ("pq", "rs+pq")

MAX_SIDE = 4096  # channels, height or width
MAX_ELEMENTS = 1 << 26  # channels x height x width: 64 M values (128 MB in float16) at most
MAX_PQ_NBITS = 16
NO_CODEBOOK = bytes(8)


class PayloadError(EdgeadError):
    """A payload or request body that cannot be used; ``status`` is the HTTP status the server answers."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def mask_bytes(positions: int) -> int:
    """Bytes of the position mask for a grid of ``positions`` cells (one bit each)."""
    return (positions + 7) // 8


def pq_code_size(m: int, nbits: int) -> int:
    """Bytes per position of a product-quantization code (faiss packs ``m`` codes of ``nbits`` bits)."""
    return (m * nbits + 7) // 8


@dataclass
class Payload:
    """A decoded (or to-be-encoded) payload: header fields plus the body's sections.

    ``mask`` (bool, height*width, row-major) says which positions were sent (rs codecs only);
    ``ranges`` holds the per-channel (min, max) as float16 [C, 2] (rs+webp only); ``data`` is the rest.
    """

    codec: str
    shape: tuple[int, int, int]  # (channels, height, width); (3, H, W) for raw images
    data: bytes
    mask: np.ndarray | None = None
    ranges: np.ndarray | None = None
    pq_m: int = 0
    pq_nbits: int = 0
    codebook_id: bytes = NO_CODEBOOK
    positions: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        c, h, w = self.shape
        self.positions = int(self.mask.sum()) if self.mask is not None else h * w

    @property
    def dtype(self) -> str:
        return CODEC_DTYPES[self.codec]

    def body(self) -> bytes:
        parts = []
        if self.mask is not None:
            parts.append(np.packbits(self.mask.astype(bool), bitorder="little").tobytes())
        if self.ranges is not None:
            parts.append(np.ascontiguousarray(self.ranges, dtype="<f2").tobytes())
        parts.append(bytes(self.data))
        return b"".join(parts)

    def to_bytes(self) -> bytes:
        """The wire form; checks itself with :func:`parse_payload`, so the edge never sends a bad one."""
        data = pack(
            codec=CODEC_IDS[self.codec],
            dtype=DTYPE_IDS[self.dtype],
            shape=self.shape,
            positions=self.positions,
            pq_m=self.pq_m,
            pq_nbits=self.pq_nbits,
            codebook_id=self.codebook_id,
            body=self.body(),
        )
        parse_payload(data)
        return data


def pack(
    codec: int,
    dtype: int,
    shape: tuple[int, int, int],
    positions: int,
    body: bytes,
    pq_m: int = 0,
    pq_nbits: int = 0,
    codebook_id: bytes = NO_CODEBOOK,
    magic: bytes = MAGIC,
    version: int = VERSION,
    flags: int = 0,
    reserved: int = 0,
    body_length: int | None = None,
) -> bytes:
    """Header + body with the CRC computed, fields taken as given (tests use it to build bad payloads)."""
    fields_ = (magic, version, codec, dtype, flags, *shape, positions, pq_m, pq_nbits, reserved, codebook_id)
    length = len(body) if body_length is None else body_length
    head = HEADER.pack(*fields_, length, 0)[:-4]
    crc = zlib.crc32(body, zlib.crc32(head))
    return head + struct.pack("<I", crc) + body


def is_payload(data: bytes) -> bool:
    """True when ``data`` starts with the payload magic (the server tells payloads from images this way)."""
    return bytes(data[:4]) == MAGIC


def parse_payload(data: bytes, max_bytes: int | None = None) -> Payload:
    """Check every field of a payload and split its body into sections; :class:`PayloadError` if wrong."""
    data = bytes(data)
    if max_bytes is not None and len(data) > max_bytes:
        raise PayloadError(f"payload of {len(data):,} bytes is over the limit of {max_bytes:,}", status=413)
    if len(data) < 4 or data[:4] != MAGIC:
        raise PayloadError(f"not an edgead payload: it does not start with the magic bytes {MAGIC!r}")
    if len(data) < 5:
        raise PayloadError("truncated payload: it ends inside the header")
    if data[4] != VERSION:
        raise PayloadError(f"payload format version {data[4]} is not supported: this side reads version {VERSION}")
    if len(data) < HEADER_SIZE:
        raise PayloadError(f"truncated payload: {len(data)} bytes, the header alone is {HEADER_SIZE}")
    (_, _, codec_id, dtype_id, flags, c, h, w, positions, pq_m, pq_nbits, reserved, codebook_id, length, crc) = (
        HEADER.unpack_from(data)
    )
    body = data[HEADER_SIZE:]
    if length != len(body):
        what = "truncated payload" if len(body) < length else "payload has trailing bytes"
        raise PayloadError(f"{what}: the header announces a body of {length:,} bytes, {len(body):,} arrived")
    if zlib.crc32(body, zlib.crc32(data[: HEADER_SIZE - 4])) != crc:
        raise PayloadError("payload CRC32 mismatch: it was damaged in transit")
    if codec_id not in CODEC_NAMES:
        raise PayloadError(f"unknown codec id {codec_id}: known ids are {sorted(CODEC_NAMES)}", status=415)
    codec = CODEC_NAMES[codec_id]
    if DTYPE_NAMES.get(dtype_id) != CODEC_DTYPES[codec]:
        raise PayloadError(f"codec {codec} carries {CODEC_DTYPES[codec]} data, the header says dtype id {dtype_id}")
    if flags or reserved:
        raise PayloadError("reserved header fields are not zero: a newer or damaged payload")
    if not (0 < c <= MAX_SIDE and 0 < h <= MAX_SIDE and 0 < w <= MAX_SIDE) or c * h * w > MAX_ELEMENTS:
        raise PayloadError(f"shape {c}x{h}x{w} is out of range (each side 1..{MAX_SIDE}, {MAX_ELEMENTS:,} values)")
    if codec == "image" and c != 3:
        raise PayloadError(f"a raw image payload has 3 channels (RGB), the header says {c}")
    grid = h * w
    if not 0 < positions <= grid:
        raise PayloadError(f"{positions} positions sent, but the {h}x{w} grid has 1..{grid}")
    if codec not in MASKED_CODECS and positions != grid:
        raise PayloadError(f"codec {codec} sends every position ({grid}), the header says {positions}")
    if codec in PQ_CODECS:
        if not (0 < pq_m <= c and c % pq_m == 0 and 0 < pq_nbits <= MAX_PQ_NBITS):
            raise PayloadError(
                f"product quantization with {pq_m} sub-quantizers of {pq_nbits} bits does not fit {c} channels"
            )
        if codebook_id == NO_CODEBOOK:
            raise PayloadError(f"codec {codec} needs a codebook id, the header has none")
    elif pq_m or pq_nbits or codebook_id != NO_CODEBOOK:
        raise PayloadError(f"codec {codec} uses no codebook, but the header names one")

    offset, mask, ranges = 0, None, None
    if codec in MASKED_CODECS:
        n_mask = mask_bytes(grid)
        if len(body) < n_mask:
            raise PayloadError(f"body of {len(body):,} bytes is too short for the {n_mask}-byte position mask")
        bits = np.unpackbits(np.frombuffer(body, np.uint8, n_mask), bitorder="little")
        if bits[grid:].any():
            raise PayloadError("the position mask has bits set beyond the grid")
        mask = bits[:grid].astype(bool)
        if int(mask.sum()) != positions:
            raise PayloadError(f"the position mask marks {int(mask.sum())} positions, the header says {positions}")
        offset = n_mask
    if codec == "rs+webp":
        n_ranges = c * 2 * 2
        if len(body) < offset + n_ranges:
            raise PayloadError(f"body is too short for the {c} per-channel ranges")
        ranges = np.frombuffer(body, "<f2", c * 2, offset).reshape(c, 2).astype(np.float32)
        if not np.isfinite(ranges).all() or (ranges[:, 0] > ranges[:, 1]).any():
            raise PayloadError("per-channel ranges must be finite with min <= max")
        offset += n_ranges
    data_bytes = body[offset:]
    expected = _data_size(codec, c, positions, pq_m, pq_nbits)
    if expected is not None and len(data_bytes) != expected:
        raise PayloadError(
            f"codec {codec} with shape {c}x{h}x{w} and {positions} positions needs {expected:,} data bytes, "
            f"the body holds {len(data_bytes):,}"
        )
    if expected is None and not data_bytes:
        raise PayloadError(f"codec {codec} payload has no image data")
    return Payload(codec, (c, h, w), data_bytes, mask=mask, ranges=ranges, pq_m=pq_m, pq_nbits=pq_nbits,
                   codebook_id=codebook_id)


def _data_size(codec: str, channels: int, positions: int, pq_m: int, pq_nbits: int) -> int | None:
    """Exact data bytes for fixed-size codecs; None for WebP data (variable)."""
    if codec == "image":
        return positions * 3
    if codec in ("features", "rs"):
        return positions * channels * 2
    if codec in PQ_CODECS:
        return positions * pq_code_size(pq_m, pq_nbits)
    return None

