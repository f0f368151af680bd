"""A deterministic pixel-geometry analyzer for toy images: image -> (foreground color, shape).

Why geometry and not a classifier: the measure of "did the model learn purple" must not itself be learned,
so it cannot share the model's blind spots, and it must run in milliseconds on a CPU.

Method (for one 32x32 RGB image, uint8 or float in [0, 255]):

1. background = median of the border pixels;
2. foreground = pixels farther than a threshold from it; keep the largest 4-connected region;
3. color = palette entry nearest to the mean of the region's core (its pixels farthest from the
   background, so blurry edges that mix with the background do not pull the mean);
4. re-threshold at half the distance between background and that color (the "50 % edge" of a blurry
   shape), take the largest region again, and classify its geometry:
   - triangle when the top half of its bounding box holds much less mass than the bottom half
     (an upward triangle holds ~1/3 as much; circles and squares ~1),
   - else square when the shape covers more than 35 % of its bounding box's corners, the pixels wholly
     outside the box's inscribed disc (a crisp disc covers 0 % of them, a crisp square 100 %).

Why corners and not the fill ratio of the bounding box: generated squares come out with slightly concave
sides and blurred discs leak into their corners, so fill ratios of both meet around 0.8; the corners stay
apart (blurred 8-pixel discs cover <= ~30 % of them, generated squares >= ~40 %). Coverage is each pixel's
distance from the background as a fraction of the color's, floored at 10 % to ignore faint noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bilora_diffusion.toy.world import PALETTE, ShapeSpec

_PALETTE_NAMES = tuple(PALETTE)
_PALETTE_RGB = np.array([PALETTE[c] for c in _PALETTE_NAMES], dtype=np.float64)
_MIN_FOREGROUND_DISTANCE = 60.0
_MIN_REGION_PIXELS = 4
_TRIANGLE_TOP_BOTTOM_RATIO = 0.6
_SQUARE_CORNERS = 0.35
_COVERAGE_FLOOR = 0.1
"""Coverage below this fraction counts as background, so faint noise around a shape adds no mass."""


@dataclass(frozen=True)
class Analysis:
    """What the analyzer read from one image. ``color``/``shape`` are ``"none"`` when no shape was found."""

    color: str
    shape: str
    corners: float = 0.0
    top_bottom: float = 0.0
    pixels: int = 0


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected region of a boolean mask (plain flood fill: images are 32x32)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best_label, best_size, label = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if labels[y0, x0]:
            continue
        label += 1
        labels[y0, x0] = label
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        if size > best_size:
            best_label, best_size = label, size
    return labels == best_label if best_size else np.zeros_like(mask)


def _inscribed_disc_coverage(h: int, w: int, supersample: int = 4) -> np.ndarray:
    """(h, w) fraction of each pixel inside the ellipse inscribed in an h x w box."""
    ys, xs = np.mgrid[0 : h * supersample, 0 : w * supersample].astype(np.float64) + 0.5
    inside = (xs / (w * supersample) - 0.5) ** 2 + (ys / (h * supersample) - 0.5) ** 2 <= 0.25
    return inside.reshape(h, supersample, w, supersample).mean(axis=(1, 3))


def _geometry(region: np.ndarray, coverage: np.ndarray) -> tuple[str, float, float]:
    """(shape, corner coverage, top-half mass / bottom-half mass) of a boolean region.

    coverage: (H, W) in [0, 1], how much of each pixel the shape covers (1 inside a crisp shape).
    """
    ys, xs = np.nonzero(region)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = region[y0:y1, x0:x1].astype(np.float64)
    disc = _inscribed_disc_coverage(y1 - y0, x1 - x0)
    corners_mask = disc <= 0.0
    if not corners_mask.any():  # boxes under 3 pixels: take what is mostly outside
        corners_mask = disc < 0.5
    corners = float(coverage[y0:y1, x0:x1][corners_mask].mean()) if corners_mask.any() else 0.0
    rows = box.sum(axis=1)
    half = (y1 - y0) / 2.0
    centers = np.arange(y1 - y0) + 0.5
    # Split the middle row between halves by position so odd heights stay symmetric.
    top = float((rows * np.clip(half - centers + 0.5, 0.0, 1.0)).sum())
    bottom = float(rows.sum() - top)
    top_bottom = top / max(bottom, 1e-9)
    if top_bottom < _TRIANGLE_TOP_BOTTOM_RATIO:
        return "triangle", corners, top_bottom
    return ("square" if corners > _SQUARE_CORNERS else "circle"), corners, top_bottom


def analyze(image: np.ndarray) -> Analysis:
    """Read (color, shape) from one RGB image, (H, W, 3) uint8 or float in [0, 255]."""
    pixels = np.asarray(image, dtype=np.float64)[..., :3]
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - background, axis=-1)
    region = _largest_component(distance > _MIN_FOREGROUND_DISTANCE)
    if region.sum() < _MIN_REGION_PIXELS:
        return Analysis("none", "none")
    core_cut = np.quantile(distance[region], 0.5)
    core = region & (distance >= core_cut)
    mean_rgb = pixels[core].mean(axis=0)
    index = int(np.argmin(np.linalg.norm(_PALETTE_RGB - mean_rgb, axis=1)))
    color = _PALETTE_NAMES[index]
    full = float(np.linalg.norm(_PALETTE_RGB[index] - background))
    region = _largest_component(distance > max(0.5 * full, _MIN_FOREGROUND_DISTANCE))
    if region.sum() < _MIN_REGION_PIXELS:
        return Analysis(color, "none")
    coverage = np.clip((distance / full - _COVERAGE_FLOOR) / (1 - _COVERAGE_FLOOR), 0.0, 1.0)
    shape, corners, top_bottom = _geometry(region, coverage)
    return Analysis(color, shape, corners, top_bottom, int(region.sum()))


@dataclass(frozen=True)
class Score:
    """Fractions of images whose color, shape, and both, match what was asked for."""

    color: float
    shape: float
    both: float
    n: int

    def __str__(self) -> str:
        return f"color {self.color:.1%}, shape {self.shape:.1%}, both {self.both:.1%} (n={self.n})"


def score(images: Sequence[np.ndarray], specs: Sequence[ShapeSpec]) -> Score:
    """Analyzer agreement with the intended specs (the metric for generators, VAEs and diffusion models)."""
    if len(images) != len(specs) or not specs:
        raise ValueError("need as many images as specs, and at least one")
    results = [analyze(im) for im in images]
    color = np.array([r.color == s.color for r, s in zip(results, specs, strict=True)])
    shape = np.array([r.shape == s.shape for r, s in zip(results, specs, strict=True)])
    return Score(float(color.mean()), float(shape.mean()), float((color & shape).mean()), len(specs))
