"""``synthetic-captions:<n>``: synthetic images with compositional captions, some combinations held out.

Image i shows one shape of a named colour on a textured background of another named colour, with
the jitter of ``pipeline.inputs.synth`` (position, scale, rotation, hue, noise), and has 1 to 3
captions (``1 + i % 3``, so batches mix counts as COCO's do):

    "a yellow square on a blue striped background"
    "yellow square, blue striped background"
    "a blue striped background with a yellow square"

6 shapes x 8 colours x 4 textures x 7 background colours = 1,344 combinations. One colour per
shape never appears on that shape in the data (``held_out_pairs``: 6 of the 48 shape-colour pairs,
168 combinations), while every colour and every shape does appear; a model that follows captions
rather than memorising images draws "a red square" correctly without having seen one. The pairs
depend on the seed, are recorded in the text group's manifest (``settings.source_details``), and
``prompts(held_out=True)`` lists captions to sample for the demo.
"""

from __future__ import annotations

from itertools import product

import numpy as np

from pipeline.inputs.sources import Item, SourceError
from pipeline.inputs.synth import BACKGROUNDS, SHAPES, render

COLOURS: tuple[tuple[str, float], ...] = (  # name, hue in [0, 1)
    ("red", 0.0), ("orange", 30 / 360), ("yellow", 60 / 360), ("green", 120 / 360),
    ("cyan", 180 / 360), ("blue", 235 / 360), ("purple", 275 / 360), ("pink", 320 / 360))
SHAPE_WORDS = {"disc": "circle", "square": "square", "triangle": "triangle", "ring": "ring", "cross": "cross",
               "diamond": "diamond"}
TEXTURE_WORDS = {"flat": "plain", "stripes": "striped", "checker": "checkered", "radial": "radial"}
TEMPLATES = ("{a_fg} {fg} {shape} on {a_bg} {bg} {tex} background", "{fg} {shape}, {bg} {tex} background",
             "{a_bg} {bg} {tex} background with {a_fg} {fg} {shape}")

Combo = tuple[int, int, int, int]  # (shape, colour, texture, background colour) indices


def held_out_pairs(seed: int = 0) -> list[tuple[int, int]]:
    """(shape, colour) pairs never drawn: shape s loses colour (3 s + seed) mod 8 (distinct per shape)."""
    return [(s, (3 * s + seed) % len(COLOURS)) for s in range(len(SHAPES))]


def combinations(seed: int = 0, held_out: bool = False) -> list[Combo]:
    """The training combinations (or, ``held_out=True``, the held-out ones), in a fixed order."""
    held = set(held_out_pairs(seed))
    return [c for c in product(range(len(SHAPES)), range(len(COLOURS)), range(len(BACKGROUNDS)), range(len(COLOURS)))
            if c[1] != c[3] and ((c[0], c[1]) in held) == held_out]


def caption(combo: Combo, template: int = 0) -> str:
    s, c, t, b = combo
    fg, bg = COLOURS[c][0], COLOURS[b][0]
    return TEMPLATES[template].format(fg=fg, shape=SHAPE_WORDS[SHAPES[s]], bg=bg, tex=TEXTURE_WORDS[BACKGROUNDS[t]],
                                      a_fg="an" if fg[0] in "aeiou" else "a", a_bg="an" if bg[0] in "aeiou" else "a")


def prompts(seed: int = 0, held_out: bool = True) -> list[str]:
    """One caption per combination (first template): held-out ones to test composition, or seen ones."""
    return [caption(c) for c in combinations(seed, held_out)]


def _draw(index: int, seed: int, allowed: list[Combo]) -> tuple[Combo, np.random.Generator]:
    rng = np.random.default_rng((seed, index))
    return allowed[int(rng.integers(len(allowed)))], rng


def synthetic_captions(index: int, seed: int = 0, allowed: list[Combo] | None = None) -> list[str]:
    combo, _ = _draw(index, seed, allowed or combinations(seed))
    return [caption(combo, k) for k in range(1 + index % 3)]


def render_item(item: Item, resolution: int, seed: int) -> np.ndarray:
    """uint8 (R, R, 3) of image ``img_<index>``: its combination drawn first, then ``synth.render``."""
    index = int(item.key.rsplit("_", 1)[1])
    (s, c, t, b), rng = _draw(index, seed, _allowed(seed))
    return render(rng, resolution, s, COLOURS[c][1], t, COLOURS[b][1])


_ALLOWED: dict[int, list[Combo]] = {}


def _allowed(seed: int) -> list[Combo]:
    if seed not in _ALLOWED:
        _ALLOWED[seed] = combinations(seed)
    return _ALLOWED[seed]


def synthetic_listing(spec: str, seed: int = 0) -> tuple[tuple[Item, ...], tuple[tuple[str, ...], ...], dict]:
    """Items ``img_<i>`` (label 0), their captions, and the details the manifest records, of
    ``synthetic-captions:<n>`` (``pipeline.inputs.captions`` makes the source)."""
    try:
        n = int(spec.split(":", 1)[1])
    except ValueError:
        raise SourceError(f"source {spec!r}: expected synthetic-captions:<count>") from None
    if n <= 0:
        raise SourceError(f"source {spec!r}: count must be positive")
    allowed = _allowed(seed)
    items = tuple(Item(key=f"img_{i:06d}", label=0) for i in range(n))
    caps = tuple(tuple(synthetic_captions(i, seed, allowed)) for i in range(n))
    held = [{"shape": SHAPE_WORDS[SHAPES[s]], "colour": COLOURS[c][0]} for s, c in held_out_pairs(seed)]
    details = {"held_out_pairs": held, "held_out_combinations": len(combinations(seed, held_out=True)),
               "train_combinations": len(allowed), "templates": list(TEMPLATES),
               "rule": "shape s never has colour (3 s + seed) mod 8; prompts(seed, held_out=True) lists them"}
    return items, caps, details
