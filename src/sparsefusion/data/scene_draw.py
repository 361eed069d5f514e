"""Scene primitives for the built-in corpus: palettes, the scene model, sampling, edits, drawing.

A scene is a background colour and 1-3 shapes, each in its own cell of a 3x3 grid, so shapes
never overlap. All randomness comes from a ``random.Random`` passed in by the caller.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 170),
    "orange": (250, 140, 20),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
    "pink": (250, 150, 200),
    "brown": (130, 80, 30),
    "cyan": (40, 210, 220),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
    "beige": (235, 225, 200),
    "navy": (20, 30, 80),
    "dark green": (20, 70, 40),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = ("small", "medium", "large")
SIZE_FRACTION = {"small": 0.5, "medium": 0.72, "large": 0.95}  # of half a grid cell
MIN_CONTRAST = 150.0  # Euclidean RGB distance between a shape colour and its background
POSITION: dict[tuple[int, int], str] = {
    (0, 0): "top left",
    (0, 1): "top",
    (0, 2): "top right",
    (1, 0): "left",
    (1, 1): "center",
    (1, 2): "right",
    (2, 0): "bottom left",
    (2, 1): "bottom",
    (2, 2): "bottom right",
}


def _contrasting(background: str) -> list[str]:
    bg = BACKGROUNDS[background]
    out = []
    for name, rgb in COLORS.items():
        dist = sum((a - b) ** 2 for a, b in zip(rgb, bg, strict=True)) ** 0.5
        if name != background and dist >= MIN_CONTRAST:
            out.append(name)
    return out


CONTRASTING: dict[str, list[str]] = {bg: _contrasting(bg) for bg in BACKGROUNDS}


@dataclass(frozen=True)
class Shape:
    """One shape: kind, colour name, size name and grid cell (row, col in 0..2)."""

    shape: str
    color: str
    size: str
    row: int
    col: int

    @property
    def position(self) -> str:
        return POSITION[(self.row, self.col)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "color": self.color,
            "size": self.size,
            "row": self.row,
            "col": self.col,
            "position": self.position,
        }


@dataclass(frozen=True)
class Scene:
    """A background colour name and 1-3 shapes in distinct grid cells."""

    background: str
    shapes: tuple[Shape, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"background": self.background, "shapes": [s.to_dict() for s in self.shapes]}


def free_cells(shapes: tuple[Shape, ...] | list[Shape]) -> list[tuple[int, int]]:
    """Grid cells not occupied by any of ``shapes``, in raster order."""
    used = {(s.row, s.col) for s in shapes}
    return [(r, c) for r in range(3) for c in range(3) if (r, c) not in used]


def random_shape(rng: random.Random, background: str, others: list[Shape]) -> Shape:
    """A shape in a free cell whose (shape, colour) pair differs from those of ``others``."""
    taken = {(s.shape, s.color) for s in others}
    while True:
        shape, color = rng.choice(SHAPES), rng.choice(CONTRASTING[background])
        if (shape, color) not in taken:
            break
    row, col = rng.choice(free_cells(others))
    return Shape(shape=shape, color=color, size=rng.choice(SIZES), row=row, col=col)


def random_scene(rng: random.Random) -> Scene:
    """A random background with 1-3 non-overlapping shapes."""
    background = rng.choice(list(BACKGROUNDS))
    shapes: list[Shape] = []
    for _ in range(rng.choice((1, 2, 2, 3, 3))):
        shapes.append(random_shape(rng, background, shapes))
    return Scene(background=background, shapes=tuple(shapes))


def evolve(scene: Scene, rng: random.Random) -> tuple[Scene, dict[str, Any]]:
    """Apply one random edit (move, recolour, resize, add, remove) to a scene.

    Returns:
        The new scene and the edit: ``{"op": ..., "before": Shape | None, "after": Shape | None}``.
    """
    ops = ["move", "recolor", "resize"]
    if len(scene.shapes) < 3:
        ops.append("add")
    if len(scene.shapes) > 1:
        ops.append("remove")
    op = rng.choice(ops)
    shapes = list(scene.shapes)
    if op == "add":
        new = random_shape(rng, scene.background, shapes)
        return replace(scene, shapes=(*shapes, new)), {"op": op, "before": None, "after": new}
    i = rng.randrange(len(shapes))
    old = shapes[i]
    if op == "remove":
        del shapes[i]
        return replace(scene, shapes=tuple(shapes)), {"op": op, "before": old, "after": None}
    if op == "move":
        row, col = rng.choice(free_cells(shapes))
        new = replace(old, row=row, col=col)
    elif op == "recolor":
        taken = {(s.shape, s.color) for s in shapes}
        options = [c for c in CONTRASTING[scene.background] if (old.shape, c) not in taken]
        new = replace(old, color=rng.choice(options))
    else:
        new = replace(old, size=rng.choice([s for s in SIZES if s != old.size]))
    shapes[i] = new
    return replace(scene, shapes=tuple(shapes)), {"op": op, "before": old, "after": new}


def render_scene(scene: Scene, image_size: int, rng: random.Random) -> Image.Image:
    """Draw a scene as an RGB ``image_size`` x ``image_size`` image (small jitter inside cells)."""
    img = Image.new("RGB", (image_size, image_size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    cell = image_size / 3
    for s in scene.shapes:
        r = max(1.0, SIZE_FRACTION[s.size] * cell / 2)
        slack = max(0.0, cell / 2 - r - 0.5)
        cx = (s.col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (s.row + 0.5) * cell + rng.uniform(-slack, slack)
        _draw_shape(draw, s.shape, cx, cy, r, COLORS[s.color])
    return img


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, ...]
) -> None:
    x0, y0 = round(cx - r), round(cy - r)
    x1, y1 = max(x0, round(cx + r) - 1), max(y0, round(cy + r) - 1)
    mx, my = round(cx), round(cy)
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
        draw.polygon([(mx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(mx, y0), (x1, my), (mx, y1), (x0, my)], fill=fill)
    elif shape == "cross":
        t = max(1, round(r / 3))
        draw.rectangle((x0, my - t, x1, my + t - 1), fill=fill)
        draw.rectangle((mx - t, y0, mx + t - 1, y1), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
