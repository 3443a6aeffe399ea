"""The live loop: frame sources, privacy blurring, annotation, bad input, and the demo's annotated video."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from edgead.deploy.runtimes import TorchInferencer
from edgead.runtime import run_stream
from edgead.runtime.annotate import annotate_frame, paint_anomalies, read_decision
from edgead.runtime.privacy import FaceDetector, PrivacyError, PrivacyFilter
from edgead.runtime.sources import SourceError, open_source, prefetch

DATA = Path(__file__).parent / "data"


def write_video(path: Path, frames: list[np.ndarray], fps: float = 10.0, codec: str = "MJPG") -> Path:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, (w, h))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def read_video(path: Path) -> list[np.ndarray]:
    capture, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, bgr = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    capture.release()
    return frames


def checkerboard(h: int, w: int, cell: int = 4) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    board = (((yy // cell) + (xx // cell)) % 2 * 255).astype(np.uint8)
    return np.repeat(board[:, :, None], 3, axis=2)


class RecordingInferencer(TorchInferencer):
    """A real run on torch that also keeps every model input, and can fail on chosen frames."""

    def __init__(self, run_dir: Path, fail_on: int | None = None) -> None:
        super().__init__(run_dir)
        self.inputs: list[torch.Tensor] = []
        self.fail_on = fail_on

    def predict(self, images: torch.Tensor):
        self.inputs.append(images.clone())
        if self.fail_on is not None and len(self.inputs) == self.fail_on + 1:
            raise RuntimeError("simulated runtime fault")
        return super().predict(images)


# --- sources -----------------------------------------------------------------------------------------


def test_video_source_reads_every_frame_in_order(tmp_path: Path):
    frames = [np.full((48, 64, 3), 20 * i, np.uint8) for i in range(8)]
    source = open_source([write_video(tmp_path / "v.avi", frames)])
    got = list(source)
    source.close()
    assert source.kind == "video" and source.expected_frames == 8
    assert [f.index for f in got] == list(range(8))
    assert [abs(int(f.image.mean()) - 20 * i) <= 3 for i, f in enumerate(got)] == [True] * 8


def test_video_that_ends_early_is_reported(tmp_path: Path):
    rng = np.random.default_rng(0)
    path = write_video(
        tmp_path / "v.avi", [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(20)]
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    source = open_source([path])
    got = list(source)
    assert 0 < len(got) < 20
    assert "ended early" in source.ended_early and "of 20" in source.ended_early


@pytest.mark.parametrize(
    ("inputs", "message"),
    [(["missing.mp4"], "does not exist"), (["broken.mp4"], "cannot open video"), (["7"], "camera 7")],
)
def test_unusable_sources_give_clear_errors(tmp_path: Path, monkeypatch, inputs, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.mp4").write_text("not a video")
    with pytest.raises(SourceError, match=message):
        open_source(inputs)


def test_prefetch_keeps_order_and_reraises_in_the_consumer():
    assert list(prefetch(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("decoder broke")

    with pytest.raises(ValueError, match="decoder broke"):
        list(prefetch(failing()))


# --- privacy -----------------------------------------------------------------------------------------


def test_region_file_errors(tmp_path: Path):
    cases = {
        "bad.json": "{not json",
        "flat.json": '{"polygons": [[1, 2, 3]]}',
        "two.json": "[[[0, 0], [5, 5]]]",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(PrivacyError, match=name):
            PrivacyFilter(regions=tmp_path / name)
    with pytest.raises(PrivacyError, match="does not exist"):
        PrivacyFilter(regions=tmp_path / "nope.json")
    with pytest.raises(PrivacyError, match="faces"):
        PrivacyFilter(blur="licence-plates")


def regions_file(tmp_path: Path, polygons: list, name: str = "regions.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"polygons": polygons}))  # NaN and infinity are written as JSON's NaN, Infinity
    return path


@pytest.mark.filterwarnings("error")  # no RuntimeWarning may leak, whatever the file holds
def test_region_files_with_impossible_polygons_are_refused_at_load(tmp_path: Path):
    square = [[10, 10], [50, 10], [50, 50], [10, 50]]
    cases = {
        "huge coordinates": ([square, [[0, 0], [1e12, 0], [1e12, 1e12]]], r"polygon 1 has a coordinate of 1e\+12"),
        "just past the bound": ([[[0, 0], [100_001, 0], [0, 10]]], r"polygon 0 .* beyond the \+-100000"),
        "NaN": ([[[0, 0], [float("nan"), 5], [5, 5]]], "polygon 0 has a NaN or infinite coordinate"),
        "infinity": ([[[0, 0], [float("inf"), 5], [5, 5]]], "polygon 0 has a NaN or infinite coordinate"),
        "two points": ([[[0, 0], [5, 5]]], "polygon 0 must be a list of at least 3"),
        "collinear": ([square, [[0, 0], [5, 5], [10, 10], [20, 20]]], "polygon 1 has zero area"),
        "one point repeated": ([[[3, 3], [3, 3], [3, 3]]], "polygon 0 has zero area"),
        "text coordinates": ([[["0", "0"], ["5", "0"], ["5", "5"]]], "polygon 0 must be a list"),
    }
    for polygons, message in cases.values():
        with pytest.raises(PrivacyError, match=message):
            PrivacyFilter(regions=regions_file(tmp_path, polygons))


@pytest.mark.filterwarnings("error")
def test_regions_that_cover_no_pixel_of_the_frame_are_refused(tmp_path: Path):
    frame = checkerboard(96, 128)
    outside = [[1000, 1000], [2000, 1000], [2000, 2000]]
    inside = [[10, 10], [50, 10], [50, 50]]
    left = [[-100, 0], [-1, 0], [-1, 90]]  # touches no pixel centre
    with pytest.raises(PrivacyError, match="its polygon covers no pixel of the 128x96 frame"):
        PrivacyFilter(regions=regions_file(tmp_path, [outside])).apply(frame)
    with pytest.raises(PrivacyError, match="no polygon covers any pixel of the 128x96 frame"):
        PrivacyFilter(regions=regions_file(tmp_path, [outside, left])).apply(frame)
    with pytest.raises(PrivacyError, match="polygons 0, 2 cover no pixel of the 128x96 frame"):
        PrivacyFilter(regions=regions_file(tmp_path, [left, inside, outside])).apply(frame)
    # The same file is fine for a frame it does cover, and refused for a smaller one.
    privacy = PrivacyFilter(regions=regions_file(tmp_path, [[[100, 80], [120, 80], [120, 90]]]))
    assert privacy.apply(frame)[1] > 0
    with pytest.raises(PrivacyError, match="64x48 frame"):
        privacy.apply(frame[:48, :64])


@pytest.mark.filterwarnings("error")
def test_polygons_partly_outside_are_clipped_and_blur_the_inside(tmp_path: Path):
    frame = checkerboard(96, 128)
    privacy = PrivacyFilter(regions=regions_file(tmp_path, [[[-50, -50], [50, -50], [50, 50], [-50, 50]]]))
    blurred, pixels = privacy.apply(frame)
    assert pixels == 51 * 51  # pixel centres 0..50 on both axes
    mask = privacy.mask(frame)
    assert mask[:51, :51].all() and mask.sum() == pixels
    assert np.array_equal(blurred[~mask], frame[~mask])  # nothing outside the polygon is touched
    assert np.abs(np.diff(blurred[5:45, 5:45].astype(float), axis=1)).mean() < 5  # the checkerboard is gone
    # Huge but allowed coordinates around the frame cover all of it, without overflowing OpenCV.
    whole = PrivacyFilter(regions=regions_file(tmp_path, [[[-1e5, -1e5], [1e5, -1e5], [0, 1e5]]]))
    assert whole.apply(frame)[1] == 96 * 128


def test_regions_outside_every_frame_stop_the_loop_with_one_error(tmp_path: Path, fitted_run: Path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(checkerboard(96, 128)).save(images / name)
    regions = regions_file(tmp_path, [[[500, 500], [600, 500], [600, 600]]])
    with pytest.raises(PrivacyError, match="covers no pixel of the 128x96 frame"):
        run_stream(fitted_run, [images], tmp_path / "out", blur_regions=regions, progress=False)
    assert not list((tmp_path / "out").rglob("*.png"))  # no frame was written as if it were blurred


def test_face_detector_finds_and_blurs_a_real_face():
    face = np.asarray(Image.open(DATA / "astronaut_160.png").convert("RGB"))
    boxes = FaceDetector().detect(face)
    assert len(boxes) >= 1
    blurred, pixels = PrivacyFilter(blur="faces").apply(face)
    x, y, w, h = boxes[0]
    inside = (slice(max(0, y), y + h), slice(max(0, x), x + w))
    assert pixels > 0.05 * face.shape[0] * face.shape[1]

    # The face's detail is gone: far less high-frequency energy than the original.
    def detail(img):
        return np.abs(np.diff(img[inside].astype(float), axis=1)).mean()

    assert detail(blurred) < 0.35 * detail(face)
    assert not np.shares_memory(blurred, face) and face.sum() > 0  # the input is left untouched


def test_blurred_regions_never_reach_the_model_or_the_outputs(tmp_path: Path, fitted_run: Path):
    h, w = 96, 128
    secret = checkerboard(h, w)
    region = [[16, 16], [80, 16], [80, 72], [16, 72]]  # x, y pixels
    regions = tmp_path / "regions.json"
    regions.write_text(json.dumps({"polygons": [region]}))
    inside = (slice(24, 70), slice(18, 78))  # below the caption, inside the polygon
    outside = (slice(76, 88), slice(84, 120))  # clear of the polygon, the caption and the border

    def assert_secret_gone(image: np.ndarray) -> None:
        # Inside: the 4-pixel checkerboard is destroyed (no pixel-to-pixel contrast left). Outside, it is
        # still there under the red paint (so the measure can tell the two apart).
        assert np.abs(np.diff(image[inside].astype(float), axis=1)).mean() < 5
        assert np.abs(np.diff(image[outside].astype(float), axis=1)).mean() > 8

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(secret).save(images / "a.png")
    video = write_video(tmp_path / "v.avi", [secret] * 3)

    for sources, kind in (([images], "png"), ([video], "video")):
        model = RecordingInferencer(fitted_run)
        summary = run_stream(model, sources, tmp_path / f"out_{kind}", blur_regions=regions, progress=False)
        assert summary.scored == len(model.inputs) >= 1
        for tensor in model.inputs:  # what the model saw, back at the source size
            seen = (tensor[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            seen = cv2.resize(seen, (w, h), interpolation=cv2.INTER_LINEAR)
            assert np.abs(np.diff(seen[inside].astype(float), axis=1)).mean() < 5
        written = (
            read_video(summary.video)
            if kind == "video"
            else [np.asarray(Image.open(p).convert("RGB")) for p in sorted(summary.png_dir.glob("*.png"))]
        )
        assert len(written) == summary.scored
        for frame in written:
            assert_secret_gone(frame)
        assert all(r.blurred_pixels > 0 for r in summary.results)


# --- the loop ------------------------------------------------------------------------------------------


def test_loop_survives_bad_frames(tmp_path: Path, fitted_run: Path, synthetic_dataset: Path):
    good = sorted((synthetic_dataset / "test" / "good").glob("*.png"))[:3]
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, path in enumerate(good):
        shutil.copy(path, folder / f"{i}.png")
    (folder / "1b_broken.png").write_text("not an image")
    big = np.asarray(Image.open(good[0]).convert("RGB").resize((200, 150)))
    Image.fromarray(big).save(folder / "3_other_size.png")

    model = RecordingInferencer(fitted_run, fail_on=1)
    summary = run_stream(model, [folder], tmp_path / "out", output="video", progress=False)
    by_name = {Path(r.name).name: r for r in summary.results}
    assert len(summary.results) == 5
    assert "cannot" in by_name["1b_broken.png"].error
    assert "simulated runtime fault" in by_name["1.png"].error  # second frame given to the model
    assert "resized" in by_name["3_other_size.png"].note
    assert summary.scored == 3
    assert len(read_video(summary.video)) == 3
    rows = (tmp_path / "out" / "predictions.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 5


def test_only_the_area_over_the_threshold_is_painted_red():
    image = np.full((100, 100, 3), 90, np.uint8)
    amap = np.zeros((50, 50), np.float32)
    amap[10:20, 30:40] = 2.0  # over the threshold (1.0) -> red, at full strength (vmax 1.5)
    painted = paint_anomalies(image, amap, threshold=1.0, vmax=1.5)
    red = (painted[:, :, 0].astype(int) - painted[:, :, 1]) > 60
    assert red[24:36, 64:76].all()  # the area, upsampled 2x (inside the outline)
    assert not red[50:, :].any() and (painted[60:, 60:] == 90).all()  # normal areas untouched


@pytest.mark.parametrize("video_format", ["webm", "avi"])
def test_other_video_containers(tmp_path: Path, fitted_run: Path, video_format: str):
    frames = [checkerboard(96, 128, cell=8 + i) for i in range(4)]
    summary = run_stream(
        fitted_run,
        [write_video(tmp_path / "in.avi", frames)],
        tmp_path / "out",
        video_format=video_format,
        progress=False,
    )
    assert summary.video.suffix == f".{video_format}"
    assert len(read_video(summary.video)) == summary.scored == 4


def test_decision_border_survives_video_encoding(tmp_path: Path):
    frames = []
    for decision in ("anomalous", "normal", "anomalous", None):
        base = np.full((120, 160, 3), 90, np.uint8)
        frames.append(annotate_frame(base, np.zeros((32, 32)), 0.5, 1.0, decision, score=0.5, fps=12.0))
    decoded = read_video(write_video(tmp_path / "a.mp4", frames, codec="mp4v"))
    assert [read_decision(f) for f in decoded] == ["anomalous", "normal", "anomalous", None]


def test_demo_video_flags_defective_parts_and_passes_good_ones(tmp_path: Path):
    """The demo end to end; its annotated video is decoded and checked frame by frame against the truth."""
    from edgead.data.synthetic_video import read_truth
    from edgead.demo import run_demo

    # The demo's own 640x480 frames (smaller ones shrink the thin scratches below what 256x256 can see).
    result = run_demo(tmp_path / "demo", seconds=8, fps=10, n_train=60, progress=False)
    frames = read_video(Path(result["video"]))
    labels = read_truth(result["truth"])
    assert len(frames) == len(labels) == result["frames"] == 80
    shown = [read_decision(f) for f in frames]
    good = [d for d, label in zip(shown, labels, strict=True) if label == "good"]
    bad = [d for d, label in zip(shown, labels, strict=True) if label == "defective"]
    assert len(good) > 20 and len(bad) > 10
    assert sum(d == "anomalous" for d in bad) / len(bad) >= 0.8
    assert sum(d == "anomalous" for d in good) / len(good) <= 0.1
    assert "detection_rate" in Path(result["report"]).read_text()
