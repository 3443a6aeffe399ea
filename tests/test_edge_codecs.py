"""Codecs on the edge/server cut: round trips with bounded error, the rs fill rule, PQ codebooks, the edge
backbone export, decoding hostile inputs, and the client's link model."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgead.edge.codecs import (
    CODECS,
    FeatureCodec,
    create_codec,
    decode_image_bytes,
    feature_shape_of,
    fill_missing,
)
from edgead.edge.payload import Payload, PayloadError, pack, parse_payload
from edgead.edge.pq import CODEBOOK_FILE, Codebook, default_subquantizers, train_codebook
from edgead.errors import RunFolderError, UsageError

SHAPE = (16, 8, 8)


def smooth_features(seed: int = 0, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """Feature-like maps: smooth in space, correlated across channels."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = rng.standard_normal((c, 1, 1))
    maps = np.maximum(0, base * np.sin(3 * xx + 2 * yy + base) + 0.5 + 0.05 * rng.standard_normal((c, h, w)))
    return maps.astype(np.float32)


def smooth_image(size: int = 96) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([xx, yy, 0.5 + 0.4 * np.sin(6 * xx * yy)], axis=2)
    return np.round(rgb * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def codebook() -> Codebook:
    vectors = np.concatenate([smooth_features(s).reshape(SHAPE[0], -1).T for s in range(8)])
    return Codebook.train(vectors, m=8, nbits=6, seed=0)


@pytest.fixture(scope="module")
def padim_run(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgead.training import fit_run

    run_dir = tmp_path_factory.mktemp("edge_codecs") / "padim64"
    fit_run(synthetic_dataset, run_dir, model="padim", image_size=64, progress=False)
    return run_dir


def test_image_codecs_round_trip() -> None:
    image = smooth_image(96)
    raw = create_codec("image", 64)
    decoded = raw.decode(raw.encode(image))
    assert decoded.shape == (1, 3, 64, 64)
    from edgead.data.images import resize_image

    expected = torch.from_numpy(resize_image(image, 64)).permute(2, 0, 1)[None].float() / 255
    assert torch.equal(decoded, expected)  # raw RGB is exact
    webp = create_codec("webp", 64)
    data = webp.encode(image)
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) < 64 * 64 * 3 / 4
    error = (webp.decode(data) - expected).abs()
    assert error.mean() < 0.02 and error.max() < 0.25
    # The server's image decoder also takes PNG and JPEG of any size.
    for fmt in ("PNG", "JPEG"):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, fmt)
        assert webp.decode(buffer.getvalue()).shape == (1, 3, 64, 64)


def test_features_codec_is_float16_exact() -> None:
    features = smooth_features()
    codec = create_codec("features", 64, SHAPE)
    data = codec.encode(torch.from_numpy(features)[None])
    assert len(data) == 38 + features.size * 2
    decoded = codec.decode(data)[0].numpy()
    assert np.allclose(decoded, features.astype(np.float16).astype(np.float32))
    assert np.abs(decoded - features).max() <= 1e-3 * np.abs(features).max()


def test_rs_sends_a_seeded_share_and_fills_from_the_nearest_received_position() -> None:
    features = smooth_features()
    c, h, w = SHAPE
    codec = FeatureCodec("rs", SHAPE, ratio=0.25, seed=3)
    data = codec.encode(features)
    payload = parse_payload(data)
    assert payload.positions == round(0.25 * h * w) == int(payload.mask.sum())
    decoded = codec.decode(data)[0].numpy()
    received = np.flatnonzero(payload.mask)
    sent = features.reshape(c, -1)[:, received]
    assert np.allclose(decoded.reshape(c, -1)[:, received], sent, atol=1e-3 * np.abs(sent).max())
    # Every other position holds the vector of a received position at the smallest grid distance.
    rows, cols = np.divmod(received, w)
    for position in np.flatnonzero(~payload.mask):
        r, q = divmod(position, w)
        distance = (rows - r) ** 2 + (cols - q) ** 2
        nearest = received[distance == distance.min()]
        assert any(np.array_equal(decoded.reshape(c, -1)[:, position], decoded.reshape(c, -1)[:, k]) for k in nearest)
    # Seeded: the same seed gives the same sequence of masks; successive frames use different positions.
    again = FeatureCodec("rs", SHAPE, ratio=0.25, seed=3)
    assert again.encode(features) == data
    assert parse_payload(codec.encode(features)).mask.tolist() != payload.mask.tolist()


def test_fill_missing_keeps_a_full_mask_unchanged() -> None:
    values = np.arange(12, dtype=np.float32).reshape(6, 2)
    full = fill_missing(values, np.ones(6, dtype=bool), 2, 3)
    assert np.array_equal(full, values.T.reshape(2, 2, 3))
    one = fill_missing(values[:1], np.eye(1, 6, 4, dtype=bool)[0], 2, 3)  # one position sent: it fills all
    assert np.array_equal(one, np.broadcast_to(values[0][:, None, None], (2, 2, 3)))


def test_pq_codecs_round_trip_with_bounded_error(codebook: Codebook) -> None:
    features = smooth_features(9)
    assert (codebook.m, codebook.nbits, codebook.code_size) == (8, 6, 6)  # 16 channels: 8 x 2 dims, 48 bits
    baseline = np.abs(features - features.mean(axis=(1, 2), keepdims=True)).mean()
    pq = create_codec("pq", 64, SHAPE, codebook)
    data = pq.encode(features)
    assert len(data) == 38 + 64 * codebook.code_size
    error = np.abs(pq.decode(data)[0].numpy() - features).mean()
    assert error < 0.5 * baseline
    rs_pq = create_codec("rs+pq", 64, SHAPE, codebook, ratio=0.5)
    data = rs_pq.encode(features)
    payload = parse_payload(data)
    assert payload.positions == 32 and payload.codebook_id == codebook.id
    decoded = rs_pq.decode(data)[0].numpy().reshape(SHAPE[0], -1)
    assert np.abs(decoded[:, payload.mask] - features.reshape(SHAPE[0], -1)[:, payload.mask]).mean() < 0.5 * baseline


def test_pq_refuses_another_codebook(codebook: Codebook) -> None:
    other = Codebook.train(np.random.default_rng(1).standard_normal((512, SHAPE[0])).astype(np.float32), m=8,
                           nbits=6)
    data = create_codec("pq", 64, SHAPE, other).encode(smooth_features())
    with pytest.raises(PayloadError, match="codebook") as info:
        create_codec("pq", 64, SHAPE, codebook).decode(data)
    assert info.value.status == 409
    with pytest.raises(UsageError, match="codebook"):
        create_codec("rs+pq", 64, SHAPE, None)


def test_rs_webp_round_trip_with_bounded_error() -> None:
    features = smooth_features(4)
    codec = create_codec("rs+webp", 64, SHAPE, ratio=1.0, quality=90)
    data = codec.encode(features)
    payload = parse_payload(data)
    assert payload.positions == 64 and payload.ranges.shape == (SHAPE[0], 2)
    span = payload.ranges[:, 1] - payload.ranges[:, 0]
    error = np.abs(codec.decode(data)[0].numpy() - features).reshape(SHAPE[0], -1)
    assert (error.mean(axis=1) <= 4 / 255 * span + 1e-6).all()  # a few grey levels of each channel's range
    assert (payload.ranges[:, 0] <= features.reshape(SHAPE[0], -1).min(axis=1)).all()
    sampled = create_codec("rs+webp", 64, SHAPE, ratio=0.25)
    assert sampled.decode(sampled.encode(features)).shape == (1, *SHAPE)


@pytest.mark.parametrize("name", CODECS)
def test_every_codec_checks_what_it_decodes(name: str, codebook: Codebook) -> None:
    """Wrong shapes, wrong codec, damaged data: PayloadError with a reason, never another exception."""
    codec = create_codec(name, 64, SHAPE, codebook)
    other_shape = create_codec(name, 32, (16, 4, 4), codebook) if name != "webp" else None
    if name in ("image", "webp"):
        data = codec.encode(smooth_image(64))
    else:
        data = codec.encode(smooth_features())
    if other_shape is not None:
        with pytest.raises(PayloadError, match="shape"):
            other_shape.decode(data)
    rng = np.random.default_rng(0)
    for _ in range(60):
        damaged = bytearray(data)
        start = 38 if name != "webp" else 0
        for _ in range(4):
            damaged[int(rng.integers(start, len(damaged)))] = int(rng.integers(256))
        if name != "webp":  # re-seal the damaged body so the codec itself must cope with it
            fields = parse_payload(data)
            damaged = _reseal(fields, bytes(damaged[38:]))
        try:
            codec.decode(bytes(damaged))
        except PayloadError as exc:
            assert str(exc)


def _reseal(payload: Payload, body: bytes) -> bytes:
    from edgead.edge.payload import CODEC_IDS, DTYPE_IDS

    return pack(CODEC_IDS[payload.codec], DTYPE_IDS[payload.dtype], payload.shape, payload.positions, body,
                payload.pq_m, payload.pq_nbits, payload.codebook_id)


def test_feature_payload_with_nan_is_refused() -> None:
    codec = create_codec("features", 64, SHAPE)
    values = smooth_features().astype("<f2")
    values[0, 0, 0] = np.nan
    data = Payload("features", SHAPE, values.tobytes()).to_bytes()
    with pytest.raises(PayloadError, match="NaN"):
        codec.decode(data)


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims width x height pixels (the data would take gigabytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(
        b"IEND", b"")


def test_hostile_images_are_refused_before_decoding() -> None:
    with pytest.raises(PayloadError, match="over the limit|too large") as info:
        decode_image_bytes(png_bomb())
    assert info.value.status == 413
    with pytest.raises(PayloadError, match="over the limit"):
        decode_image_bytes(png_bomb(3000, 3000), max_pixels=1_000_000)
    buffer = io.BytesIO()
    Image.fromarray(smooth_image(64)).save(buffer, "PNG")
    for bad in (buffer.getvalue()[:60], buffer.getvalue()[: len(buffer.getvalue()) // 2]):
        with pytest.raises(PayloadError, match="cannot decode"):
            decode_image_bytes(bad)
    with pytest.raises(PayloadError, match="neither") as info:
        decode_image_bytes(b"GIF89a" + bytes(100))
    assert info.value.status == 415


def test_codebook_file_round_trip_and_checks(codebook: Codebook, tmp_path: Path) -> None:
    path = codebook.save(tmp_path / CODEBOOK_FILE)
    loaded = Codebook.load(path)
    assert loaded.id == codebook.id and len(codebook.id) == 8
    codes = codebook.encode(smooth_features().reshape(SHAPE[0], -1).T)
    assert np.array_equal(loaded.decode(codes), codebook.decode(codes))
    damaged = bytearray(path.read_bytes())
    damaged[-3] ^= 0xFF  # a centroid changed: another id
    assert Codebook.from_bytes(bytes(damaged)).id != codebook.id
    for junk in (b"", b"\x80\x04K\x01.", path.read_bytes()[:50]):  # empty, a pickle, truncated
        with pytest.raises(RunFolderError):
            Codebook.from_bytes(junk)
    assert default_subquantizers(152) == 19 and default_subquantizers(160) == 20 and default_subquantizers(7) == 1


def test_train_codebook_from_a_run_and_export_the_edge_part(padim_run: Path) -> None:
    from edgead.edge.backbone import export_edge, load_edge
    from edgead.runs import load_run

    book = train_codebook(padim_run, nbits=6)
    assert (padim_run / CODEBOOK_FILE).is_file()
    assert Codebook.load(padim_run / CODEBOOK_FILE).id == book.id
    pipeline, config = load_run(padim_run)
    shape = feature_shape_of(pipeline)
    assert shape == (152, 8, 8) and (book.m, book.dim) == (19, 152)

    onnx_path = export_edge(padim_run)
    edge = load_edge(onnx_path.parent)
    assert (edge.runtime, edge.image_size, edge.feature_shape) == ("onnxruntime", 64, shape)
    assert edge.codebook is not None and edge.codebook.id == book.id
    from edgead.data.images import list_images, load_rgb, resize_image

    test_good = Path(config.extra["dataset"]) / "test" / "good"
    image = resize_image(load_rgb(list_images(test_good)[0]), 64)  # a part the codebook has not seen
    with torch.no_grad():
        reference = pipeline.features(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255).numpy()
    got = edge.features(image)
    assert np.abs(got - reference).max() <= 1e-3 * max(1.0, np.abs(reference).max())
    torch_edge = load_edge(padim_run)
    assert torch_edge.runtime == "torch" and np.allclose(torch_edge.features(image), reference, atol=1e-5)
    # Real features through PQ: better than sending each channel's mean.
    codec = create_codec("pq", 64, shape, book)
    error = np.abs(codec.decode(codec.encode(reference))[0].numpy() - reference[0]).mean()
    assert error < np.abs(reference[0] - reference[0].mean(axis=(1, 2), keepdims=True)).mean() + 1e-6
    # Two images give 128 vectors: too few for 256 centroids, so 7 bits are used instead of failing.
    small = train_codebook(padim_run, max_images=2)
    assert small.nbits == 7 and Codebook.load(padim_run / CODEBOOK_FILE).id == small.id != book.id


def test_bandwidth_and_link_model() -> None:
    from edgead.edge.client import Link, parse_bandwidth

    assert parse_bandwidth("100kB/s") == 100_000
    assert parse_bandwidth("1MB/s") == 1_000_000
    assert parse_bandwidth("2 MiB/s") == 2 * 1024**2
    assert parse_bandwidth("800kbit/s") == 100_000
    assert parse_bandwidth("8Mbps") == 1_000_000
    assert parse_bandwidth("inf") == float("inf")
    for bad in ("fast", "100", "-1kB/s", "0MB/s", "1 parsec/s"):
        with pytest.raises(UsageError):
            parse_bandwidth(bad)
    link = Link(parse_bandwidth("100kB/s"), latency_ms=20)
    assert link.transfer_ms(50_000) == pytest.approx(520.0)
    assert Link(float("inf")).transfer_ms(10**9) == 0.0
    with pytest.raises(UsageError):
        Link(1000.0, latency_ms=-1)
