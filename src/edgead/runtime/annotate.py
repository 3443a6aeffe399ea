"""What an operator sees on each frame: the heat map, the score, the decision and the loop's FPS.

The decision is also drawn as a thick frame border (red: anomalous, green: normal) so that it can be
read back from the video by a program as well as by eye (the demo's test does exactly that).
"""

from __future__ import annotations

import cv2
import numpy as np

ANOMALOUS_RGB = (230, 30, 30)
NORMAL_RGB = (30, 200, 60)
ERROR_RGB = (128, 128, 128)
BORDER = 8  # pixels


def border_colour(decision: str | None) -> tuple[int, int, int]:
    return {"anomalous": ANOMALOUS_RGB, "normal": NORMAL_RGB}.get(decision or "", ERROR_RGB)


def paint_anomalies(image: np.ndarray, anomaly_map: np.ndarray, threshold: float, vmax: float) -> np.ndarray:
    """Red where the map is above the threshold (stronger the higher), outlined; the rest untouched.

    A jet map tints the whole frame and makes a small defect hard to spot on a line monitor; painting
    only what is over the decision threshold answers "where is the defect?" at a glance.
    """
    frame = np.array(image, dtype=np.uint8, copy=True)
    h, w = frame.shape[:2]
    amap = np.asarray(anomaly_map, dtype=np.float32)
    if amap.shape != (h, w):
        amap = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
    above = amap >= threshold
    if not above.any():
        return frame
    span = max(float(vmax - threshold), 1e-6)
    alpha = (0.35 + 0.4 * np.clip((amap - threshold) / span, 0.0, 1.0))[above][:, None]
    frame[above] = (frame[above] * (1 - alpha) + np.array(ANOMALOUS_RGB) * alpha + 0.5).astype(np.uint8)
    contours, _ = cv2.findContours(above.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(frame, contours, -1, ANOMALOUS_RGB, max(1, min(h, w) // 240), cv2.LINE_AA)
    return frame


def annotate_frame(
    image: np.ndarray,
    anomaly_map: np.ndarray | None,
    threshold: float,
    vmax: float,
    decision: str | None,
    score: float | None = None,
    fps: float | None = None,
    message: str | None = None,
) -> np.ndarray:
    """RGB uint8 frame with the anomalous area painted red, a coloured border and a one-line caption.

    ``threshold`` and ``vmax`` are in the model's score units (the run's threshold and score_max).
    """
    frame = paint_anomalies(image, anomaly_map, threshold, vmax) if anomaly_map is not None else image.copy()
    colour = border_colour(decision)
    h, w = frame.shape[:2]
    b = max(2, min(BORDER, h // 20, w // 20))
    frame[:b], frame[-b:], frame[:, :b], frame[:, -b:] = colour, colour, colour, colour
    parts = [message] if message else []
    if decision is not None:
        parts.append(decision.upper())
    if score is not None:
        parts.append(f"score {score:.2f}")
    if fps is not None:
        parts.append(f"{fps:.1f} FPS")
    text = "  ".join(parts)
    if text:
        scale = max(0.35, min(w, h) / 900)
        thickness = 1 if scale < 0.6 else 2
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        x, y = b + 4, b + 4 + th
        cv2.rectangle(frame, (x - 3, y - th - 3), (min(w - b, x + tw + 3), y + base), (0, 0, 0), cv2.FILLED)
        cv2.putText(frame, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness, cv2.LINE_AA)
    return frame


def read_decision(frame: np.ndarray) -> str | None:
    """The decision drawn on an annotated frame, read from the middle of its bottom border."""
    h, w = frame.shape[:2]
    b = max(2, min(BORDER, h // 20, w // 20))
    strip = frame[h - b + 1 : h - 1, w // 4 : 3 * w // 4].reshape(-1, 3).astype(float).mean(axis=0)
    colours = {"anomalous": ANOMALOUS_RGB, "normal": NORMAL_RGB, None: ERROR_RGB}
    best = min(colours, key=lambda k: float(np.abs(strip - np.array(colours[k])).sum()))
    return best
