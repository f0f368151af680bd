"""The toy shapes world: deterministic 32x32 images of one flat shape, with captions.

Why a toy world: it lets the trainer run offline on a CPU in minutes and still show a measurable effect.
Every image holds one shape (circle, square, triangle) of one palette color, of a given size, at one of
five positions, on a white or black background; its caption names all of these with a fixed vocabulary of
one-token words (see :data:`VOCABULARY`), so a tiny tokenizer maps each word to exactly one token.

The new concept: the color ``purple`` (:data:`NEW_COLOR`) never appears in the pretraining data
(:data:`HELD_IN_COLORS`); the demo dataset teaches it. :func:`make_demo_samples` takes any subset of
(shape, color) combinations, so a generalization benchmark can teach purple on some shapes and test it on
the others.

Everything here is a pure function of its seed: ``make_sample(seed)`` always returns the same pixels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DEMO_DATA_DIR = Path(__file__).resolve().parent / "demo_data"
"""The demo dataset shipped with the package (kohya layout: NAME.png + NAME.txt); rebuild it with
``python -m bilora_diffusion.toy.world``."""
DEMO_SIZE = 24
DEMO_SEED = 1234

IMAGE_SIZE = 32
"""Side of every toy image in pixels (the tiny VAE maps it to a 4x8x8 latent)."""

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (235, 215, 0),
    "green": (30, 170, 40),
    "cyan": (0, 195, 215),
    "blue": (30, 60, 230),
    "purple": (150, 30, 200),
}
"""Foreground colors, far apart in RGB (>= 95 apart pairwise) and from white and black, so the analyzer
can classify a blurry generated region by its nearest palette entry."""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0)}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, tuple[int, ...]] = {"small": (8, 10), "large": (14, 16)}
"""Size word -> possible sides of the shape's bounding box in pixels. Even sides only: an odd-sided disc
rasterised on the pixel grid is a rounded square (fills 94 % of its box), which no analyzer could tell
from a square."""
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (9, 9),
    "top right": (23, 9),
    "bottom left": (9, 23),
    "bottom right": (23, 23),
    "center": (16, 16),
}
"""Position words -> nominal center (x, y); samples jitter it by up to 2 pixels."""

NEW_COLOR = "purple"
"""The demo concept: a color the pretrained model has never seen."""
HELD_IN_COLORS: tuple[str, ...] = tuple(c for c in PALETTE if c != NEW_COLOR)
"""Colors used in pretraining."""
HELD_IN_SHAPES: tuple[str, ...] = SHAPES
"""Shapes used in pretraining (all of them: only the color is new)."""
COLORS: tuple[str, ...] = tuple(PALETTE)

VOCABULARY: tuple[str, ...] = (
    "a",
    "on",
    "background",
    ",",
    *SIZES,
    *COLORS,
    *SHAPES,
    *BACKGROUNDS,
    "top",
    "bottom",
    "left",
    "right",
    "center",
)
"""Every word a caption may contain (each becomes one token in the toy tokenizers)."""

_JITTER = 2


@dataclass(frozen=True)
class ShapeSpec:
    """Everything that defines one toy image; ``render`` is a pure function of it."""

    shape: str
    color: str
    background: str
    size: str
    position: str
    side: int
    cx: int
    cy: int

    @property
    def caption(self) -> str:
        """E.g. ``"a large red circle on a white background, top left"``."""
        return f"a {self.size} {self.color} {self.shape} on a {self.background} background, {self.position}"


def sample_spec(
    rng: np.random.Generator,
    shapes: Sequence[str] = HELD_IN_SHAPES,
    colors: Sequence[str] = HELD_IN_COLORS,
    combos: Sequence[tuple[str, str]] | None = None,
) -> ShapeSpec:
    """Draw a random spec; ``combos`` (a list of (shape, color)) overrides ``shapes`` x ``colors``."""
    if combos is not None:
        shape, color = combos[int(rng.integers(len(combos)))]
    else:
        shape = shapes[int(rng.integers(len(shapes)))]
        color = colors[int(rng.integers(len(colors)))]
    background = ("white", "black")[int(rng.integers(2))]
    size = tuple(SIZES)[int(rng.integers(len(SIZES)))]
    position = tuple(POSITIONS)[int(rng.integers(len(POSITIONS)))]
    sides = SIZES[size]
    side = sides[int(rng.integers(len(sides)))]
    x0, y0 = POSITIONS[position]
    cx = x0 + int(rng.integers(-_JITTER, _JITTER + 1))
    cy = y0 + int(rng.integers(-_JITTER, _JITTER + 1))
    return ShapeSpec(shape, color, background, size, position, side, cx, cy)


def shape_mask(shape: str, side: int, cx: int, cy: int, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean (H, W) mask of a shape whose bounding box is ``side`` pixels wide, centred on (cx, cy).

    Hard edges (no anti-aliasing): the analyzer's fill-ratio test relies on crisp training images.
    The triangle points up, with its base on the bottom of the bounding box.
    """
    ys, xs = np.mgrid[0:image_size, 0:image_size].astype(np.float64) + 0.5
    x0 = cx - side / 2.0
    y0 = cy - side / 2.0
    u = (xs - x0) / side  # 0..1 across the bounding box
    v = (ys - y0) / side
    inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    if shape == "square":
        return inside
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "triangle":
        return inside & (np.abs(u - 0.5) <= v / 2.0)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(spec: ShapeSpec, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Pixels of ``spec`` as a uint8 (H, W, 3) array."""
    image = np.empty((image_size, image_size, 3), dtype=np.uint8)
    image[:] = BACKGROUNDS[spec.background]
    image[shape_mask(spec.shape, spec.side, spec.cx, spec.cy, image_size)] = PALETTE[spec.color]
    return image


def make_sample(
    seed: int,
    shapes: Sequence[str] = HELD_IN_SHAPES,
    colors: Sequence[str] = HELD_IN_COLORS,
    combos: Sequence[tuple[str, str]] | None = None,
) -> tuple[np.ndarray, str, ShapeSpec]:
    """One deterministic (image uint8 HxWx3, caption, spec) from ``seed``."""
    spec = sample_spec(np.random.default_rng(seed), shapes, colors, combos)
    return render(spec), spec.caption, spec


def make_samples(
    n: int,
    seed: int = 0,
    shapes: Sequence[str] = HELD_IN_SHAPES,
    colors: Sequence[str] = HELD_IN_COLORS,
    combos: Sequence[tuple[str, str]] | None = None,
) -> list[tuple[np.ndarray, str, ShapeSpec]]:
    """``n`` samples; sample ``i`` uses seed ``seed * 1_000_003 + i`` so sets from different seeds differ."""
    return [make_sample(seed * 1_000_003 + i, shapes, colors, combos) for i in range(n)]


def held_in_combos() -> list[tuple[str, str]]:
    """(shape, color) pairs seen in pretraining."""
    return [(s, c) for s in HELD_IN_SHAPES for c in HELD_IN_COLORS]


def new_concept_combos(shapes: Iterable[str] = SHAPES) -> list[tuple[str, str]]:
    """(shape, NEW_COLOR) pairs for the given shapes: the combinations a demo or benchmark may teach."""
    return [(s, NEW_COLOR) for s in shapes]


def concept_split(taught_shapes: Sequence[str]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(taught, unseen) new-concept combinations for a generalization benchmark.

    Teach ``NEW_COLOR`` on ``taught_shapes`` (make_demo_samples(combos=taught)) and test it on the other
    shapes (evaluate.new_concept_score(shapes=...)): a fine-tune that generalizes draws purple there too.
    """
    unknown = set(taught_shapes) - set(SHAPES)
    if unknown:
        raise ValueError(f"unknown shapes {sorted(unknown)}; expected some of {SHAPES}")
    rest = [s for s in SHAPES if s not in taught_shapes]
    return new_concept_combos(taught_shapes), new_concept_combos(rest)


def make_demo_samples(
    n: int = DEMO_SIZE,
    combos: Sequence[tuple[str, str]] | None = None,
    seed: int = DEMO_SEED,
) -> list[tuple[np.ndarray, str, ShapeSpec]]:
    """The demo dataset: ``n`` images of the new concept over ``combos`` (default: purple, all shapes).

    Samples cycle through ``combos`` in order, so every combination is equally represented whatever ``n``;
    the rest of each spec (background, size, position) comes from ``seed``.
    """
    combos = list(combos) if combos is not None else new_concept_combos()
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        spec = sample_spec(rng, combos=[combos[i % len(combos)]])
        out.append((render(spec), spec.caption, spec))
    return out


def write_kohya_folder(samples: Sequence[tuple[np.ndarray, str, ShapeSpec]], folder: str | Path) -> Path:
    """Write ``NAME.png`` + ``NAME.txt`` (caption) pairs, the layout kohya's sd-scripts and our loader read."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, caption, spec) in enumerate(samples):
        name = f"{i:03d}_{spec.color}_{spec.shape}"
        Image.fromarray(image).save(folder / f"{name}.png", optimize=True)
        (folder / f"{name}.txt").write_text(caption + "\n")
    return folder


def eval_prompts(
    n: int,
    seed: int = 7,
    combos: Sequence[tuple[str, str]] | None = None,
) -> list[tuple[str, ShapeSpec]]:
    """``n`` (caption, spec) pairs to prompt a model with; defaults to the held-in combinations.

    Cycles through combos (balanced) and draws the other attributes from ``seed``.
    """
    combos = list(combos) if combos is not None else held_in_combos()
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        spec = sample_spec(rng, combos=[combos[i % len(combos)]])
        out.append((spec.caption, spec))
    return out


def write_demo_dataset(
    folder: str | Path = DEMO_DATA_DIR,
    n: int = DEMO_SIZE,
    combos: Sequence[tuple[str, str]] | None = None,
    seed: int = DEMO_SEED,
) -> Path:
    """Write the demo dataset (or a benchmark's teaching set, given ``combos``) as a kohya folder.

    The folder is emptied of earlier .png/.txt files first, so it always holds exactly this set.
    """
    folder = Path(folder)
    if folder.exists():
        for old in [*folder.glob("*.png"), *folder.glob("*.txt")]:
            old.unlink()
    return write_kohya_folder(make_demo_samples(n, combos, seed), folder)


if __name__ == "__main__":
    print(f"wrote the demo dataset to {write_demo_dataset()}")
