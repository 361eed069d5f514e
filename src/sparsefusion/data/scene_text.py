"""English for the built-in corpus: captions, text-only passages and interleaved narration.

Small grammars over the scene vocabulary (shapes, colours, sizes, grid positions). Every sentence
is chosen with the caller's ``random.Random``, so text is deterministic per document.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from sparsefusion.data.scene_draw import (
    BACKGROUNDS,
    COLORS,
    CONTRASTING,
    SIZES,
    Scene,
    Shape,
    random_scene,
)

WHERE: dict[str, tuple[str, ...]] = {
    "top left": ("at the top left", "in the top left corner"),
    "top": ("at the top", "near the top"),
    "top right": ("at the top right", "in the top right corner"),
    "left": ("on the left", "on the left side"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "on the right side"),
    "bottom left": ("at the bottom left", "in the bottom left corner"),
    "bottom": ("at the bottom", "near the bottom"),
    "bottom right": ("at the bottom right", "in the bottom right corner"),
}
SIZE_WORDS = {"small": "small", "medium": "of medium size", "large": "large"}
CORNERS = {"circle": 0, "square": 4, "triangle": 3, "diamond": 4, "cross": 12}
NUMBER = {0: "no", 1: "one", 2: "two", 3: "three", 4: "four", 12: "twelve"}
SHAPE_FACTS: dict[str, tuple[str, ...]] = {
    "circle": (
        "A circle is perfectly round and has no corners.",
        "Every point on a circle is the same distance from its center.",
    ),
    "square": (
        "A square has four equal sides and four right angles.",
        "A square is a special kind of rectangle.",
    ),
    "triangle": (
        "A triangle has three sides and three corners.",
        "The angles of a triangle always add up to one hundred and eighty degrees.",
    ),
    "diamond": (
        "A diamond looks like a square turned onto one of its corners.",
        "All four sides of a diamond have the same length.",
    ),
    "cross": (
        "A cross is made of two bars that meet in the middle.",
        "A plus sign is a small cross with arms of equal length.",
    ),
}
COLOR_FACTS = (
    "Mixing red and yellow paint gives orange.",
    "Mixing blue and yellow paint gives green.",
    "Mixing red and blue paint gives purple.",
    "Mixing red and white paint gives pink.",
    "Mixing black and white paint gives gray.",
    "Red, yellow and blue are often called the primary colors.",
    "Orange and purple are secondary colors.",
)
HOW_TO_DRAW = {
    "circle": "draw a round outline and fill it in",
    "square": "draw four straight lines of the same length",
    "triangle": "draw three straight lines that meet at three corners",
    "diamond": "draw a square that stands on one of its corners",
    "cross": "draw two short bars that cross in the middle",
}


def cap(s: str) -> str:
    """Capitalise the first letter."""
    return s[:1].upper() + s[1:]


def article(word: str) -> str:
    """``a`` or ``an`` for the word that follows."""
    return "an" if word[:1] in "aeiou" else "a"


def noun_phrase(s: Shape, rng: random.Random, with_size: bool = True) -> str:
    """``a large red circle`` (or ``an orange square`` without the size)."""
    words = f"{s.size} {s.color} {s.shape}" if with_size else f"{s.color} {s.shape}"
    return f"{article(words)} {words}"


def where(s: Shape, rng: random.Random) -> str:
    """A prepositional phrase for the shape's grid cell (``on the left``)."""
    return rng.choice(WHERE[s.position])


def join(items: list[str]) -> str:
    """``A``, ``A and B``, ``A, B and C``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _listing(scene: Scene, rng: random.Random) -> str:
    return join([f"{noun_phrase(s, rng)} {where(s, rng)}" for s in scene.shapes])


def caption(scene: Scene, rng: random.Random) -> str:
    """A description naming every shape's size, colour, kind and place, and the background."""
    bg, n = scene.background, len(scene.shapes)
    listing = _listing(scene, rng)
    form = rng.randrange(5)
    if form == 0:
        return f"{listing}, on {article(bg)} {bg} background"
    if form == 1:
        return f"{cap(article(bg))} {bg} background with {listing}."
    if form == 2:
        lead = "A single shape" if n == 1 else f"{cap(NUMBER[n])} shapes"
        return f"{lead} on {article(bg)} {bg} background: {listing}."
    if form == 3:
        return f"A picture of {listing}, on {article(bg)} {bg} background."
    parts = [f"There is {noun_phrase(s, rng)} {where(s, rng)}." for s in scene.shapes]
    return " ".join(parts) + f" The background is {bg}."


def _bigger(a: Shape, b: Shape) -> str:
    ia, ib = SIZES.index(a.size), SIZES.index(b.size)
    return "bigger than" if ia > ib else "smaller than" if ia < ib else "the same size as"


def _scene_passage(rng: random.Random) -> list[str]:
    scene = random_scene(rng)
    bg = scene.background
    out = [rng.choice((f"Picture a plain {bg} canvas.", f"Imagine {article(bg)} {bg} background."))]
    for s in scene.shapes:
        form = rng.randrange(3)
        if form == 0:
            out.append(f"{cap(where(s, rng))}, there is {noun_phrase(s, rng)}.")
        elif form == 1:
            out.append(f"{cap(noun_phrase(s, rng))} sits {where(s, rng)}.")
        else:
            out.append(f"You can see {noun_phrase(s, rng)} {where(s, rng)}.")
    if len(scene.shapes) >= 2:
        a, b = scene.shapes[0], scene.shapes[1]
        out.append(f"The {a.color} {a.shape} is {_bigger(a, b)} the {b.color} {b.shape}.")
    n = len(scene.shapes)
    out.append("Nothing else is in the picture." if n == 1 else f"There are {NUMBER[n]} shapes.")
    return out


def _facts_passage(rng: random.Random) -> list[str]:
    pool = [f for facts in SHAPE_FACTS.values() for f in facts] + list(COLOR_FACTS)
    bg = rng.choice(list(BACKGROUNDS))
    good = rng.choice(CONTRASTING[bg])
    pool.append(
        f"{cap(article(good))} {good} shape is easy to see on {article(bg)} {bg} background."
    )
    bad = [c for c in COLORS if c not in CONTRASTING[bg]]
    if bad:
        c = rng.choice(bad)
        pool.append(f"{cap(article(c))} {c} shape is hard to see on {article(bg)} {bg} background.")
    facts = rng.sample(pool, rng.randint(2, 4))
    if rng.random() < 0.4:
        facts.insert(0, "Here are a few facts about shapes and colors.")
    return facts


def _compare_passage(rng: random.Random) -> list[str]:
    a, b = random_scene(rng).shapes[0], random_scene(rng).shapes[0]
    if (a.shape, a.color) == (b.shape, b.color):
        return _facts_passage(rng)
    out = [f"Look at {noun_phrase(a, rng)} and {noun_phrase(b, rng)}."]
    out.append(f"The {a.color} {a.shape} is {_bigger(a, b)} the {b.color} {b.shape}.")
    if a.shape != b.shape:
        ca, cb = CORNERS[a.shape], CORNERS[b.shape]
        rest = "none" if cb == 0 else NUMBER[cb]
        out.append(f"The {a.shape} has {NUMBER[ca]} corners, while the {b.shape} has {rest}.")
    else:
        out.append(f"Both of them are {a.shape}s, but they have different colors.")
    return out


def _drawing_passage(rng: random.Random) -> list[str]:
    scene = random_scene(rng)
    s = scene.shapes[0]
    return [
        f"To draw {noun_phrase(s, rng)} {where(s, rng)}, start with a plain {scene.background} "
        f"background.",
        f"Pick up the {s.color} paint and move to the {s.position} of the page.",
        f"Then {HOW_TO_DRAW[s.shape]}.",
        f"The {s.shape} should be {SIZE_WORDS[s.size]}.",
    ]


PASSAGES: tuple[Callable[[random.Random], list[str]], ...] = (
    _scene_passage,
    _facts_passage,
    _compare_passage,
    _drawing_passage,
)


def passage(rng: random.Random) -> str:
    """A text-only passage of a few sentences from one or two small grammars."""
    grammars = rng.sample(PASSAGES, 2 if rng.random() < 0.35 else 1)
    return " ".join(sentence for grammar in grammars for sentence in grammar(rng))


def interleaved_intro(scene: Scene, rng: random.Random) -> str:
    """Text before the first image of an interleaved document."""
    bg, listing = scene.background, _listing(scene, rng)
    return rng.choice(
        (
            f"First, we see {listing} on {article(bg)} {bg} background.",
            f"At the start, there is {listing}, on {article(bg)} {bg} background.",
            f"Here is {article(bg)} {bg} scene with {listing}.",
        )
    )


def interleaved_step(edit: dict[str, Any], step: int, num_steps: int, rng: random.Random) -> str:
    """Narrate one scene edit (from ``scene_draw.evolve``) before the image that shows it."""
    if step == num_steps - 1 and num_steps > 1:
        lead = "Finally,"
    else:
        lead = rng.choice(("Then", "Next,", "After that,"))
    op, before, after = edit["op"], edit["before"], edit["after"]
    if op == "add":
        clause = f"{noun_phrase(after, rng)} appears {where(after, rng)}"
    elif op == "remove":
        clause = f"the {before.color} {before.shape} disappears"
    elif op == "move":
        clause = f"the {before.color} {before.shape} moves to the {after.position}"
    elif op == "recolor":
        clause = f"the {before.color} {before.shape} turns {after.color}"
    else:
        grow = SIZES.index(after.size) > SIZES.index(before.size)
        verb = "grows and becomes" if grow else "shrinks and becomes"
        clause = f"the {before.color} {before.shape} {verb} {after.size}"
    return f"{lead} {clause}."


def interleaved_outro(scene: Scene, rng: random.Random) -> str:
    """Closing sentence after the last image."""
    n, bg = len(scene.shapes), scene.background
    if rng.random() < 0.5:
        shapes = "one shape" if n == 1 else f"{NUMBER[n]} shapes"
        verb = "is" if n == 1 else "are"
        return f"In the end, there {verb} {shapes} on the {bg} background."
    return f"Now the picture shows {_listing(scene, rng)}."
