"""The text group: every caption's encoding per image, the empty-caption encoding once per group.

Reader API (for text-to-image training, issue 13)::

    cache = open_cache("cache/", need_teacher=False, need_text=True)
    null = cache.text_null()                        # (L, D) stored dtype: the "" encoding (CFG null)
    stream = CacheStream(cache, with_teacher=False, with_text=True, batch_size=64, seed=0, ...)
    for batch in make_loader(stream, num_workers=4):
        # batch["text"]         (sum_i K_i, L, D) float16  all caption encodings of the batch, ragged
        # batch["text_offsets"] (N + 1,) int64             image i owns rows offsets[i]:offsets[i + 1]
        # batch["text_count"]   (N,) int64                 K_i >= 1 (COCO: 5..7, web sets: 1)
        # batch["captions"]     list of N lists of str     the strings that were encoded
        pick = caption_choice(batch["text_count"], generator)       # (N,) one caption per image
        ctx = gather_captions(batch, pick)                          # (N, L, D), still on the host
        ctx = ctx.to(device, non_blocking=True)                     # ~118 KB per image in fp16

Why ragged rows and not a padded (N, Kmax, L, D) tensor: the trainer needs one encoding per image
per step, drawn with its own per-step generator so that a resume is bitwise, which only needs the
counts. Padding to the batch's Kmax (7 for COCO, mean 5.0) would write, move through the worker
queue's shared memory and hold ~40 % zeros per batch; concatenation is the one copy the collate
does anyway. ``gather_captions`` picks on the host, so only N encodings cross to the device
(30 MB for a batch of 256 instead of 150 MB). The null encoding is not repeated in batches: the
trainer swaps it in for dropped captions (``text_null()``, loaded once and sha256-checked).

Stored per image: ``text.npy`` (K, L, D) in the group's dtype (float16 by default; rounding a
float32 encoding to fp16 changes each element by at most 2^-11 relative, so 1 - cos per token
<= 2^-23 ~ 1.2e-7 unless a value overflows fp16, which the writer refuses) and ``captions.json``.
The group file ``codec/empty_caption.npy`` holds the "" encoding, sha256 in the manifest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cache.schema import (
    CODEC_DIR,
    CacheFormatError,
    TextSpec,
    load_npy,
    npy_bytes,
)

NULL_FILE = "empty_caption.npy"  # <group>/codec/: the encoding of "" (U-ViT's empty_context.npy)
# 1 - cos(x, fp16(x)) per token: |fp16(v) - v| <= 2^-11 |v| gives sin(angle) <= 2^-11, so 1 - cos <= ~2^-23
# (fp16 subnormals, |v| < 6e-5, add at most D * 2^-50 to |e|^2: nothing for CLIP's token norms of ~25)
FP16_COS_BOUND = 2.0 ** -23


# ----------------------------------------------------------------------------------------------
# Samples
# ----------------------------------------------------------------------------------------------

def encode_text_sample(spec: TextSpec, encodings: np.ndarray, captions: Sequence[str | None]) -> dict[str, bytes]:
    """One text-group sample: (K, L, D) encodings in the stored dtype and the K caption strings."""
    shape = (len(captions), spec.max_length, spec.dim)
    if len(captions) == 0 or tuple(encodings.shape) != shape:
        raise CacheFormatError(f"text encodings shape {tuple(encodings.shape)} != {shape} (K >= 1 captions)")
    with np.errstate(over="ignore"):  # checked right below, with a message that says what to do
        arr = encodings.astype(spec.dtype, copy=False)
    if not np.isfinite(arr).all():  # fp16 overflow (|v| > 65504) or a broken encoder: never store inf
        raise CacheFormatError(f"text encodings are not finite in {spec.dtype}; use text_dtype float32")
    return {"text.npy": npy_bytes(arr), "captions.json": json.dumps(list(captions)).encode("utf-8")}


def text_bytes(spec: TextSpec, captions: int, caption_chars: int = 60) -> dict[str, int]:
    """Tar bytes of one image with ``captions`` captions of ``caption_chars`` characters each."""
    enc = len(npy_bytes(np.zeros((captions, spec.max_length, spec.dim), spec.dtype)))
    strings = 2 + captions * (caption_chars + 4)
    return {"tar": 1024 + -(-enc // 512) * 512 + -(-strings // 512) * 512, "payload": enc + strings,
            "per_caption": spec.max_length * spec.dim * np.dtype(spec.dtype).itemsize}


# ----------------------------------------------------------------------------------------------
# The group file: the empty-caption encoding
# ----------------------------------------------------------------------------------------------

def null_bytes(spec: TextSpec, encoding: np.ndarray) -> bytes:
    """The checked .npy bytes of the "" encoding (L, D), in the group's dtype."""
    if tuple(encoding.shape) != (spec.max_length, spec.dim):
        raise CacheFormatError(f"empty-caption encoding shape {tuple(encoding.shape)} != "
                               f"{(spec.max_length, spec.dim)}")
    with np.errstate(over="ignore"):
        arr = encoding.astype(spec.dtype, copy=False)
    if not np.isfinite(arr).all():
        raise CacheFormatError(f"the empty-caption encoding is not finite in {spec.dtype}")
    return npy_bytes(arr)


def null_path(group_dir: Path) -> Path:
    return Path(group_dir) / CODEC_DIR / NULL_FILE


def null_record(group_dir: Path, spec: TextSpec) -> dict[str, dict[str, Any]]:
    """The manifest's ``codec_files`` entry of a text group (the file parsed as a plain .npy first)."""
    path = null_path(group_dir)
    data = _read(path)
    load_npy(data, dtype=spec.dtype, shape=(spec.max_length, spec.dim), where=str(path))
    return {NULL_FILE: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "dtype": spec.dtype,
                        "shape": [spec.max_length, spec.dim]}}


def null_errors(group_dir: Path, records: dict[str, Any]) -> list[str]:
    """Why the group's empty-caption file does not match its manifest record (empty when it does)."""
    path, rec = null_path(group_dir), records.get(NULL_FILE)
    if rec is None:
        return [f"{Path(group_dir) / 'manifest.json'}: no record of {CODEC_DIR}/{NULL_FILE}"]
    if not path.is_file():
        return [f"{path}: missing"]
    if hashlib.sha256(path.read_bytes()).hexdigest() != rec["sha256"]:
        return [f"{path}: sha256 differs from the manifest (corrupt or replaced)"]
    return []


def load_null(group_dir: Path, spec: TextSpec, records: dict[str, Any]) -> np.ndarray:
    """The "" encoding (L, D) in the stored dtype, sha256-checked against the manifest, never unpickled."""
    errors = null_errors(group_dir, records)
    if errors:
        raise CacheFormatError(errors[0] + "; re-run `haste preprocess` to rebuild the text group")
    path = null_path(group_dir)
    return load_npy(_read(path), dtype=spec.dtype, shape=(spec.max_length, spec.dim), where=str(path)).copy()


@lru_cache(maxsize=8)
def cached_null(group_dir: str, spec: TextSpec, sha256: str) -> torch.Tensor:
    """``load_null`` once per process (keyed by the recorded hash, so a rebuilt group is read again)."""
    return torch.from_numpy(load_null(Path(group_dir), spec, {NULL_FILE: {"sha256": sha256}}))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CacheFormatError(f"{path} missing (the text group is incomplete; re-run `haste preprocess`)") from None
    except OSError as e:
        raise CacheFormatError(f"{path} unreadable ({e})") from None


# ----------------------------------------------------------------------------------------------
# Batches: ragged rows, one pick per image
# ----------------------------------------------------------------------------------------------

def collate_text(samples: list[dict]) -> dict[str, Any]:
    """The text part of a batch: ``text`` (sum K, L, D), ``text_offsets`` (N + 1,), ``text_count`` (N,),
    ``captions`` (list of lists); stored dtype kept (fp16 stays fp16 until the device)."""
    counts = np.array([len(s["text"]) for s in samples], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return {"text": torch.from_numpy(np.concatenate([s["text"] for s in samples])),
            "text_offsets": torch.from_numpy(offsets), "text_count": torch.from_numpy(counts),
            "captions": [s["captions"] for s in samples]}


def caption_choice(count: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(N,) int64: a uniform caption index in [0, count_i) per image, from ``generator`` only (what
    U-ViT/HASTE draw with ``random.randint`` per item load, made reproducible)."""
    u = torch.rand(count.shape, generator=generator, dtype=torch.float64, device=count.device)
    return torch.minimum((u * count).long(), count - 1)


def gather_captions(batch: dict[str, Any], pick: torch.Tensor) -> torch.Tensor:
    """(N, L, D): image i's ``pick[i]``-th caption encoding (rows of ``batch["text"]``)."""
    count, offsets = batch["text_count"], batch["text_offsets"]
    if bool(((pick < 0) | (pick >= count)).any()):
        raise IndexError(f"caption index out of range: pick {pick.tolist()} for counts {count.tolist()}")
    return batch["text"][offsets[:-1] + pick.to(offsets.device)]
