"""What an operator sees on each frame: the heat map, the score, the decision and the loop's FPS.

The decision is also drawn as a thick frame border (red: anomalous, green: normal) so that it can be
read back from the video by a program as well as by eye (the demo's test does exactly that).
"""

from __future__ import annotations

import cv2
import numpy as np

from edgead.reporting import overlay_heatmap

ANOMALOUS_RGB = (230, 30, 30)
NORMAL_RGB = (30, 200, 60)
ERROR_RGB = (128, 128, 128)
BORDER = 8  # pixels


def border_colour(decision: str | None) -> tuple[int, int, int]:
    return {"anomalous": ANOMALOUS_RGB, "normal": NORMAL_RGB}.get(decision or "", ERROR_RGB)


def annotate_frame(
    image: np.ndarray,
    anomaly_map: np.ndarray | None,
    vmin: float,
    vmax: float,
    decision: str | None,
    score: float | None = None,
    fps: float | None = None,
    message: str | None = None,
) -> np.ndarray:
    """RGB uint8 frame with the heat map blended in, a coloured border and a one-line caption."""
    frame = overlay_heatmap(image, anomaly_map, vmin, vmax) if anomaly_map is not None else image.copy()
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
