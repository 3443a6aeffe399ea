"""The host side of an IMX500 model: the sensor's output tensor -> anomaly map, score, decision, overlay.

The sensor runs the graph up to the patch scores (``edgead.deploy.imx500_nets``); what it cannot do
cheaply (the upsampling to the image size, the Gaussian blur, the image maximum, the threshold) runs
on the host, a Raspberry Pi with the AI Camera. This is that code, in numpy: the same two matrices per
axis as :class:`edgead.models.postprocess.Postprocess`, the run's threshold and normalisation from
``imx500_summary.json``. On the Pi with picamera2 (not run on hardware by edgead's tests)::

    from picamera2 import Picamera2
    from picamera2.devices import IMX500
    from edgead.deploy.imx500_host import SensorDecoder

    imx500 = IMX500("network.rpk")          # imx500-package -i packerOut.zip -o out/ on the Pi
    decoder = SensorDecoder.from_summary("imx500_summary.json")
    picam2 = Picamera2(imx500.camera_num)
    picam2.start(picam2.create_preview_configuration())
    while True:
        metadata = picam2.capture_metadata()
        outputs = imx500.get_outputs(metadata)  # list of numpy arrays, dequantized by the firmware
        if outputs is not None:
            result = decoder.decode(outputs[0])
            print(result.score, result.decision)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgead.errors import EdgeadError, NonFiniteError
from edgead.integrity import check_seal
from edgead.models.postprocess import resize_blur_matrix


def gaussian_taps(sigma: float) -> np.ndarray:
    """The Postprocess's 1D Gaussian (truncated at 4 sigma, normalised); one tap of 1 for sigma 0."""
    if sigma <= 0:
        return np.ones(1, np.float32)
    radius = max(1, int(np.ceil(4.0 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (x / np.float32(sigma)) ** 2)
    return (kernel / kernel.sum()).astype(np.float32)


@dataclass(frozen=True)
class SensorResult:
    """One frame's answer: the anomaly map at the image size, the score, its normalised value and the decision."""

    anomaly_map: np.ndarray  # [S, S] float32
    score: float
    normalized_score: float
    decision: str  # "anomalous" or "normal"


class SensorDecoder:
    """Turns the sensor's patch-score tensor into the run's anomaly map, score and decision.

    ``threshold``, ``score_min`` and ``score_max`` are the run's (chosen on normal validation images);
    the decision is ``score >= threshold``, as ``edgead predict`` decides.
    """

    def __init__(
        self, image_size: int, blur_sigma: float, threshold: float, score_min: float, score_max: float
    ) -> None:
        values = (image_size, blur_sigma, threshold, score_min, score_max)
        if not all(np.isfinite(v) for v in values) or image_size < 1 or blur_sigma < 0 or not score_min < score_max:
            raise EdgeadError(f"invalid sensor postprocess settings: {values}")
        self.image_size = int(image_size)
        self.blur_sigma = float(blur_sigma)
        self.threshold = float(threshold)
        self.score_min = float(score_min)
        self.score_max = float(score_max)
        self._taps = gaussian_taps(self.blur_sigma)
        self._matrices: dict[int, np.ndarray] = {}

    @classmethod
    def from_summary(cls, summary: str | Path | dict[str, Any]) -> SensorDecoder:
        """From ``imx500_summary.json`` (its path or its parsed content) as ``edgead export --format imx500`` writes it."""
        if not isinstance(summary, dict):  # a file: untrusted, and its seal must hold (edgead.integrity)
            path = Path(summary)
            try:
                summary = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise EdgeadError(f"{path} is not a readable imx500_summary.json: {exc}") from None
            if not isinstance(summary, dict):
                raise EdgeadError(f"{path} is not an imx500_summary.json (not a JSON object)")
            check_seal(summary, "summary_sha256", path, "export the run again with `edgead export --format imx500`")
        post = summary.get("postprocess") if isinstance(summary, dict) else None
        keys = ("upsample_to", "blur_sigma", "threshold", "score_min", "score_max")
        if not isinstance(post, dict) or any(k not in post for k in keys):
            raise EdgeadError("the IMX500 summary has no complete 'postprocess' section (re-export the run)")
        size = post["upsample_to"]
        numbers = [post[k] for k in keys[1:]]
        if (
            not isinstance(size, list)
            or len(size) != 2
            or size[0] != size[1]
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers)
        ):
            raise EdgeadError(f"the IMX500 summary's postprocess section is malformed: {post}")
        return cls(size[0], *numbers)

    def _axis_matrix(self, n: int) -> np.ndarray:
        if n not in self._matrices:
            self._matrices[n] = resize_blur_matrix(n, self.image_size, self._taps)
        return self._matrices[n]

    def anomaly_map(self, patch_scores: np.ndarray) -> np.ndarray:
        """[h, w] (or [1, 1, h, w], as the sensor gives it) patch scores -> [S, S] anomaly map."""
        scores = np.asarray(patch_scores, dtype=np.float32)
        scores = scores.reshape(scores.shape[-2:]) if scores.ndim > 2 and scores.size == np.prod(scores.shape[-2:]) else scores
        if scores.ndim != 2:
            raise EdgeadError(f"expected one [h, w] patch-score map from the sensor, got shape {np.shape(patch_scores)}")
        return self._axis_matrix(scores.shape[0]) @ scores @ self._axis_matrix(scores.shape[1]).T

    def decode(self, patch_scores: np.ndarray) -> SensorResult:
        """One frame: map, score (the map's maximum), normalised score (threshold at 0.5) and decision."""
        amap = self.anomaly_map(patch_scores)
        score = float(amap.max())
        if not np.isfinite(score) or not np.isfinite(amap).all():
            raise NonFiniteError("the sensor's output holds NaN or infinite values: the model or the frame is broken")
        normalized = float(np.clip((score - self.threshold) / (self.score_max - self.score_min) + 0.5, 0.0, 1.0))
        decision = "anomalous" if score >= self.threshold else "normal"
        return SensorResult(amap.astype(np.float32), score, normalized, decision)

    def overlay(self, image: np.ndarray, result: SensorResult) -> np.ndarray:
        """The frame (RGB uint8, resized to the image size) annotated as ``edgead predict`` draws it."""
        from edgead.runtime.annotate import annotate_frame

        return annotate_frame(
            np.ascontiguousarray(image, dtype=np.uint8), result.anomaly_map, self.threshold, self.score_max, result.decision, result.score
        )
