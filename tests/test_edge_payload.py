"""The feature payload format: round trips, every field checked, and seeded fuzzing (no crash, only PayloadError)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from edgead.edge.payload import (
    CODEC_IDS,
    DTYPE_IDS,
    HEADER_SIZE,
    MAGIC,
    NO_CODEBOOK,
    VERSION,
    Payload,
    PayloadError,
    pack,
    parse_payload,
)

SHAPE = (8, 4, 5)  # channels, height, width: small, with a grid (20) that is not a multiple of 8


def _mask(rng: np.random.Generator, n: int = 7) -> np.ndarray:
    mask = np.zeros(SHAPE[1] * SHAPE[2], dtype=bool)
    mask[rng.choice(mask.size, n, replace=False)] = True
    return mask


def sample_payloads(seed: int = 0) -> list[Payload]:
    """One valid payload of every codec."""
    rng = np.random.default_rng(seed)
    c, h, w = SHAPE
    grid, mask = h * w, _mask(rng)
    halves = lambda n: rng.standard_normal(n * c).astype("<f2").tobytes()  # noqa: E731
    ranges = np.stack([np.full(c, -1.0), np.full(c, 2.0)], axis=1)
    book = bytes(range(1, 9))
    return [
        Payload("image", (3, h, w), rng.integers(0, 256, grid * 3, dtype=np.uint8).tobytes()),
        Payload("features", SHAPE, halves(grid)),
        Payload("rs", SHAPE, halves(7), mask=mask),
        Payload("pq", SHAPE, rng.integers(0, 256, grid * 4, dtype=np.uint8).tobytes(), pq_m=4, pq_nbits=8,
                codebook_id=book),
        Payload("rs+pq", SHAPE, rng.integers(0, 256, 7 * 3, dtype=np.uint8).tobytes(), mask=mask, pq_m=4,
                pq_nbits=6, codebook_id=book),
        Payload("rs+webp", SHAPE, b"RIFF\x00\x00\x00\x00WEBPVP8 ", mask=mask, ranges=ranges),
    ]


def _fields(payload: Payload) -> dict:
    """The arguments of :func:`pack` that rebuild ``payload`` exactly (tests then change one)."""
    return {
        "codec": CODEC_IDS[payload.codec],
        "dtype": DTYPE_IDS[payload.dtype],
        "shape": payload.shape,
        "positions": payload.positions,
        "pq_m": payload.pq_m,
        "pq_nbits": payload.pq_nbits,
        "codebook_id": payload.codebook_id,
        "body": payload.body(),
    }


@pytest.mark.parametrize("payload", sample_payloads(), ids=lambda p: p.codec)
def test_round_trip(payload: Payload) -> None:
    data = payload.to_bytes()
    assert data[:4] == MAGIC and len(data) == HEADER_SIZE + len(payload.body())
    back = parse_payload(data)
    assert (back.codec, back.shape, back.positions, back.data) == (
        payload.codec, payload.shape, payload.positions, payload.data)
    assert (back.pq_m, back.pq_nbits, back.codebook_id) == (payload.pq_m, payload.pq_nbits, payload.codebook_id)
    if payload.mask is not None:
        assert np.array_equal(back.mask, payload.mask)
    if payload.ranges is not None:
        assert np.array_equal(back.ranges, payload.ranges)
    assert pack(**_fields(payload)) == data


def test_header_is_fixed_little_endian() -> None:
    data = sample_payloads()[1].to_bytes()
    assert HEADER_SIZE == 38
    magic, version, codec, dtype = struct.unpack_from("<4sBBB", data)
    assert (magic, version, codec, dtype) == (MAGIC, VERSION, CODEC_IDS["features"], DTYPE_IDS["float16"])
    assert struct.unpack_from("<HHH", data, 8) == SHAPE


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"magic": b"EDGX"}, "magic"),
        ({"version": 2}, "version 2"),
        ({"codec": 99}, "unknown codec"),
        ({"dtype": DTYPE_IDS["uint8"]}, "dtype"),
        ({"flags": 1}, "reserved"),
        ({"reserved": 3}, "reserved"),
        ({"shape": (0, 4, 5)}, "out of range"),
        ({"shape": (8, 5000, 5)}, "out of range"),
        ({"shape": (4096, 4096, 4096)}, "out of range"),
        ({"shape": (8, 4, 6), "positions": 24}, "data bytes"),  # the body no longer matches the shape
        ({"positions": 19}, "sends every position"),
        ({"positions": 0}, "positions"),
        ({"pq_m": 2}, "uses no codebook"),
        ({"codebook_id": b"12345678"}, "uses no codebook"),
        ({"body_length": 10}, "trailing bytes"),
        ({"body_length": 10**6}, "truncated"),
    ],
)
def test_every_field_is_checked(change: dict, reason: str) -> None:
    fields = {**_fields(sample_payloads()[1]), **change}
    with pytest.raises(PayloadError, match=reason):
        parse_payload(pack(**fields))


@pytest.mark.parametrize(
    ("index", "change", "reason"),
    [
        (0, {"shape": (4, 4, 5)}, "3 channels"),
        (2, {"positions": 8}, "mask marks 7"),
        (2, {"positions": 21}, "grid has"),
        (3, {"pq_m": 3}, "does not fit"),  # 3 does not divide 8 channels
        (3, {"pq_nbits": 17}, "does not fit"),
        (3, {"codebook_id": NO_CODEBOOK}, "needs a codebook"),
        (3, {"pq_nbits": 4}, "data bytes"),
    ],
)
def test_codec_specific_fields(index: int, change: dict, reason: str) -> None:
    fields = {**_fields(sample_payloads()[index]), **change}
    with pytest.raises(PayloadError, match=reason):
        parse_payload(pack(**fields))


def test_mask_and_ranges_are_checked() -> None:
    rs, webp = sample_payloads()[2], sample_payloads()[5]
    body = bytearray(rs.body())
    body[2] |= 0x80  # bit 23: beyond the 20-position grid
    with pytest.raises(PayloadError, match="beyond the grid"):
        parse_payload(pack(**{**_fields(rs), "body": bytes(body)}))
    for bad in (np.nan, np.inf, -5.0):  # -5: max below min
        ranges = webp.ranges.copy()
        ranges[0, 1] = bad
        payload = Payload("rs+webp", SHAPE, webp.data, mask=webp.mask, ranges=ranges)
        with pytest.raises(PayloadError, match="ranges"):
            parse_payload(pack(**_fields(payload)))
    with pytest.raises(PayloadError, match="no image data"):
        parse_payload(pack(**{**_fields(webp), "body": webp.body()[: -len(webp.data)]}))


def test_size_limit_and_crc() -> None:
    data = sample_payloads()[1].to_bytes()
    with pytest.raises(PayloadError, match="over the limit") as info:
        parse_payload(data, max_bytes=len(data) - 1)
    assert info.value.status == 413
    damaged = bytearray(data)
    damaged[-1] ^= 0x01
    with pytest.raises(PayloadError, match="CRC32"):
        parse_payload(bytes(damaged))


def test_every_truncation_is_refused() -> None:
    for payload in sample_payloads():
        data = payload.to_bytes()
        for end in range(len(data)):
            with pytest.raises(PayloadError):
                parse_payload(data[:end])


def test_fuzz_bit_flips_truncations_and_random_fields() -> None:
    """1,500 seeded mutations: every one raises PayloadError (the CRC covers header and body), nothing else."""
    rng = np.random.default_rng(17)
    valid = [p.to_bytes() for seed in range(3) for p in sample_payloads(seed)]
    refused = 0
    for i in range(500):  # single and multiple bit flips
        data = bytearray(valid[i % len(valid)])
        for _ in range(1 + i % 3):
            bit = int(rng.integers(len(data) * 8))
            data[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(PayloadError):
            parse_payload(bytes(data))
        refused += 1
    for i in range(500):  # random bytes after a valid-looking start, and random lengths
        start = valid[i % len(valid)][: int(rng.integers(0, HEADER_SIZE + 4))]
        data = start + rng.integers(0, 256, int(rng.integers(0, 200)), dtype=np.uint8).tobytes()
        if data in valid:
            continue
        with pytest.raises(PayloadError):
            parse_payload(data)
        refused += 1
    for _ in range(500):  # random header fields with a correct CRC: valid only when consistent
        fields = _fields(sample_payloads(int(rng.integers(3)))[int(rng.integers(6))])
        key = ["codec", "dtype", "shape", "positions", "pq_m", "pq_nbits", "codebook_id", "body"][int(rng.integers(8))]
        fields[key] = {
            "codec": int(rng.integers(0, 256)),
            "dtype": int(rng.integers(0, 256)),
            "shape": tuple(int(v) for v in rng.integers(0, 1 << 16, 3)),
            "positions": int(rng.integers(0, 1 << 32)),
            "pq_m": int(rng.integers(0, 1 << 16)),
            "pq_nbits": int(rng.integers(0, 256)),
            "codebook_id": rng.integers(0, 256, 8, dtype=np.uint8).tobytes(),
            "body": rng.integers(0, 256, int(rng.integers(0, 400)), dtype=np.uint8).tobytes(),
        }[key]
        try:
            parse_payload(pack(**fields))
        except PayloadError as exc:
            assert str(exc)
            refused += 1
    assert refused >= 1400
