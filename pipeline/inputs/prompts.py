"""Prompts for text-to-image evaluation: a caption source or a text file, in a fixed, documented order.

    source = open_prompts("coco:/data/coco/val2014")        # MS-COCO val2014: one entry per image
    source = open_prompts("file:prompts.txt")               # one prompt per line
    strings, entries = select_prompts(source, seed=0, indices=range(30_000), caption="random")

Entries are the images of a captioned source (``pipeline.inputs.captions``: COCO in sorted image-id
order, which is U-ViT's ``MSCOCODatabase`` order and so HASTE ``generate_t2i.py``'s loader order;
caption folders and tars in their listing order; ``synthetic-captions:<n>`` by index), images
without a usable caption left out, or the non-empty lines of a UTF-8 text file (``file:<path>``,
or a path ending in ``.txt``). Sample i is prompted by entry ``i mod E`` (the first N entries when
N <= E; a short prompt file repeats), with one caption of that entry:

* ``random`` (default): caption ``k`` drawn uniformly from the entry's K captions by
  ``np.random.default_rng([seed, i, 2])``, a stream of (seed, i) only, as ``image_seeds`` and the
  class labels are. HASTE's ``generate_t2i.py`` also takes a uniformly random caption per image
  (``random.randint`` in ``MSCOCOFeatureDataset.__getitem__``), from Python's global RNG in each
  DataLoader worker, so its choice depends on the worker and process count; ours does not.
* ``first``: the entry's first caption (COCO: the first annotation of the image in the file).

Listing a COCO split reads only its annotation file: no image is decoded here.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.inputs.captions import CaptionedSource, open_input, parse_caption_lines
from pipeline.inputs.sources import SourceError

log = logging.getLogger(__name__)

CaptionMode = Literal["random", "first"]
CAPTION_STREAM = 2  # SeedSequence key of the caption draw (trainer.generate: 1 = class labels)


@dataclass(frozen=True)
class PromptSource:
    """Entries in order: ``captions[e]`` are entry e's candidate captions, ``keys[e]`` names it."""

    spec: str                                  # as given (the COCO/caption spec, or file:<path>)
    kind: str                                  # "file", "coco", "captions-folder", "captions-wds", ...
    keys: tuple[str, ...]                      # COCO: the image id; a file: "line <n>" (1-based)
    captions: tuple[tuple[str, ...], ...]

    def __len__(self) -> int:
        return len(self.captions)

    def sha256(self) -> str:
        """Identity of the entries (keys and every caption, in order)."""
        h = hashlib.sha256()
        for key, caps in zip(self.keys, self.captions):
            h.update(json.dumps([key, list(caps)]).encode() + b"\n")
        return h.hexdigest()


def open_prompts(spec: str) -> PromptSource:
    """A prompt file (``file:<path>`` or ``*.txt``) or any captioned source spec; one SourceError otherwise."""
    if spec.startswith("file:") or (spec.endswith(".txt") and Path(spec).is_file()):
        return prompt_file(spec.removeprefix("file:"))
    src = open_input(spec)
    if not isinstance(src, CaptionedSource):
        raise SourceError(f"prompts {spec!r} is not a caption source (coco:<root>/val2014, captions:<dir or tars>, "
                          "synthetic-captions:<n>) or a prompt file (file:<path>, one prompt per line)")
    rows = [(it.key, caps) for it, caps in zip(src.items, src.captions) if caps]
    if len(rows) < len(src.items):
        log.info("prompts %s: %d image(s) without a usable caption left out", spec, len(src.items) - len(rows))
    return PromptSource(spec, src.kind, tuple(k for k, _ in rows), tuple(tuple(c) for _, c in rows))


def prompt_file(path: str | Path) -> PromptSource:
    """One prompt per line (UTF-8; a BOM and the line ends are dropped); empty lines are skipped, logged."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SourceError(f"prompt file {path}: {e.strerror or e}") from None
    keys, caps = [], []
    for i, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").splitlines()):
        lines, dropped = parse_caption_lines(raw, f"{path}")
        if dropped:
            log.info("prompt file %s line %d skipped: %s", path, i + 1, dropped[0][1])
        if lines:
            keys.append(f"line {i + 1}")
            caps.append((lines[0],))
    if not caps:
        raise SourceError(f"prompt file {path} has no prompt (expected UTF-8 text, one prompt per line)")
    return PromptSource(f"file:{path}", "file", tuple(keys), tuple(caps))


def select_prompts(source: PromptSource, seed: int, indices: Sequence[int],
                   caption: CaptionMode = "random") -> tuple[list[str], np.ndarray]:
    """(prompt of each sample, int64 entry it came from): entry ``i mod E``, its caption per ``caption``."""
    if caption not in ("random", "first"):
        raise ValueError(f"caption must be 'random' or 'first', got {caption!r}")
    n = len(source)
    entries = np.asarray([int(i) % n for i in indices], dtype=np.int64)
    strings = []
    for i, e in zip(indices, entries):
        caps = source.captions[e]
        k = 0 if caption == "first" or len(caps) == 1 else \
            int(np.random.default_rng([seed, int(i), CAPTION_STREAM]).integers(len(caps)))
        strings.append(caps[k])
    return strings, entries


def prompts_sha256(prompts: Sequence[str]) -> str:
    """Identity of an ordered list of prompt strings (what a sample store was made from)."""
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode("utf-8")).hexdigest()
