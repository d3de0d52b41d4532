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


def _components(mask: np.ndarray) -> np.ndarray:
    """A label per pixel of `mask`, the same for two pixels exactly when an 8-connected path inside `mask` joins
    them (the smallest flat index of the component); mask.size outside `mask`. Union-find by rounds: each pixel's
    root is hooked to the smallest label among its neighbours (`parent`), then every label follows its parents to
    the root (pointer jumping). A whole branch moves at once, so rounds grow with log(path length), not with it."""
    h, w = mask.shape
    outside = mask.size
    parent = np.arange(outside + 1, dtype=np.int32 if outside < 2**31 - 1 else np.int64)  # parent[outside] = outside
    label = np.where(mask, parent[:-1].reshape(h, w), outside)
    inside = mask.ravel()
    while True:
        p = np.pad(label, 1, constant_values=outside)
        low = label
        for dy in range(3):
            for dx in range(3):
                low = np.minimum(low, p[dy:dy + h, dx:dx + w])
        np.minimum.at(parent, label.ravel()[inside], low.ravel()[inside])
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
        settled = parent[label]
        if np.array_equal(settled, label):
            return label
        label = settled


def hysteresis(thin: np.ndarray, low: float, high: float) -> np.ndarray:
    """The pixels above `low` whose 8-connected component above `low` holds a pixel above `high`."""
    weak = thin > low
    label = _components(weak)
    strong = np.zeros(weak.size + 1, dtype=bool)
    strong[label[thin > high]] = True
    return strong[label] & weak


def canny(image: Image.Image, low: float = LOW, high: float = HIGH) -> Image.Image:
    """The Canny edge map of `image`: white edges on black, RGB, same size."""
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    gx, gy = _sobel(gray)
    edges = hysteresis(_thin(np.abs(gx) + np.abs(gy), gx, gy), low, high)
    return Image.fromarray((edges * 255).astype(np.uint8), "L").convert("RGB")
