"""`--control-preprocess canny`: a Canny edge map from a photo, with numpy and Pillow only (no model download).

The steps of Canny's detector as OpenCV's `cv2.Canny(image, 100, 200)` (the thresholds the ControlNet canny
preprocessors use) runs them: Sobel gradients of the gray image (3x3, L1 magnitude |gx| + |gy|), non-maximum
suppression along the gradient direction quantised to 0/45/90/135 degrees, then hysteresis: pixels above the high
threshold are edges, and pixels above the low one are edges when connected (8-neighbourhood) to one. The output is
white edges on black, RGB, the size of the input: what the Union ControlNets' canny condition was trained on. It is
close to OpenCV's, not bit-identical (OpenCV rounds the direction test in fixed point).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

LOW, HIGH = 100, 200  # the ControlNet canny preprocessors' thresholds
PREPROCESSORS = ("canny",)


def _sobel(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.pad(gray, 1, mode="reflect")  # OpenCV's default border, BORDER_REFLECT_101
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return gx, gy


def _thin(mag: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Non-maximum suppression: keep a pixel that is a maximum along its gradient direction."""
    p = np.pad(mag, 1)
    h, w = mag.shape
    at = {d: p[1 + d[0]:1 + d[0] + h, 1 + d[1]:1 + d[1] + w] for d in
          ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (-1, -1), (1, -1), (-1, 1))}
    ax, ay = np.abs(gx), np.abs(gy)
    tan22 = np.tan(np.pi / 8)
    horizontal = ay <= ax * tan22  # gradient along x: compare left and right
    vertical = ax <= ay * tan22
    same_sign = (gx * gy) > 0
    keep = np.where(horizontal, (mag > at[(0, -1)]) & (mag >= at[(0, 1)]),
                    np.where(vertical, (mag > at[(-1, 0)]) & (mag >= at[(1, 0)]),
                             np.where(same_sign, (mag > at[(-1, -1)]) & (mag >= at[(1, 1)]),
                                      (mag > at[(-1, 1)]) & (mag >= at[(1, -1)]))))
    return np.where(keep, mag, 0)


def _hysteresis(thin: np.ndarray, low: float, high: float) -> np.ndarray:
    """Strong pixels, grown through weak ones (8-connected) until nothing changes."""
    weak = thin > low
    edges = thin > high
    while True:
        p = np.pad(edges, 1)
        grown = weak & (p[:-2, :-2] | p[:-2, 1:-1] | p[:-2, 2:] | p[1:-1, :-2] | p[1:-1, 2:] | p[2:, :-2]
                        | p[2:, 1:-1] | p[2:, 2:] | edges)
        if (grown == edges).all():
            return edges
        edges = grown


def canny(image: Image.Image, low: float = LOW, high: float = HIGH) -> Image.Image:
    """The Canny edge map of `image`: white edges on black, RGB, same size."""
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    gx, gy = _sobel(gray)
    edges = _hysteresis(_thin(np.abs(gx) + np.abs(gy), gx, gy), low, high)
    return Image.fromarray((edges * 255).astype(np.uint8), "L").convert("RGB")
