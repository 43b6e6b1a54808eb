"""Contact sheets of samples (``grid.png``), optionally captioned with their prompts.

Without captions the sheet is the images in row-major order, nothing else (as before). With
captions (text-to-image) each row gets a caption band above it: one label across the row when
every image of the row has the same prompt (so a prompt file that repeats each prompt ``cols``
times gives one labelled row per prompt), else each image's own prompt above it. Text is drawn
with Pillow's default font (no font file needed), wrapped to the cell width and cut to a few lines.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MAX_LINES = 3


def write_grid(images: np.ndarray, path: Path, cols: int | None = None,
               captions: Sequence[str] | None = None) -> Path:
    """A PNG contact sheet of uint8 (N, H, W, 3) images, row-major; ``captions`` (N) label the rows/cells."""
    from PIL import Image

    n, h, w, _ = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    if captions is not None and len(captions) != n:
        raise ValueError(f"{len(captions)} captions for {n} images")
    band = _band_height(h) if captions is not None else 0
    grid = np.full((rows * (h + band), cols * w, 3), 255 if band else 0, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        top = r * (h + band) + band
        grid[top:top + h, c * w:(c + 1) * w] = img
    sheet = Image.fromarray(grid)
    if captions is not None:
        _draw_captions(sheet, list(captions), cols, rows, w, h, band)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    sheet.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def _font_size(h: int) -> int:
    return max(8, min(14, h // 12))


def _band_height(h: int) -> int:
    return MAX_LINES * (_font_size(h) + 2) + 4


def _draw_captions(sheet, captions: list[str], cols: int, rows: int, w: int, h: int, band: int) -> None:
    from PIL import ImageDraw, ImageFont

    size = _font_size(h)
    font = ImageFont.load_default(size=size)
    draw = ImageDraw.Draw(sheet)
    for r in range(rows):
        row = captions[r * cols:(r + 1) * cols]
        y = r * (h + band) + 2
        if len(set(row)) == 1 and len(row) > 1:  # one prompt for the whole row: label the row once
            _text(draw, font, row[0], 4, y, len(row) * w - 8, size)
        else:
            for c, text in enumerate(row):
                _text(draw, font, text, c * w + 2, y, w - 4, size)


def _text(draw, font, text: str, x: int, y: int, width: int, size: int) -> None:
    """``text`` wrapped to ``width`` pixels (by an average glyph width), at most MAX_LINES lines."""
    chars = max(4, int(width / (0.55 * size)))
    lines = textwrap.wrap(" ".join(text.split()), width=chars) or [""]
    if len(lines) > MAX_LINES:
        lines = lines[:MAX_LINES]
        lines[-1] = lines[-1][:max(1, chars - 1)].rstrip() + "…"
    for k, line in enumerate(lines):
        draw.text((x, y + k * (size + 2)), line, fill=(0, 0, 0), font=font)
