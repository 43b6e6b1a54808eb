"""U-ViT / HASTE text-to-image features (``coco256_features/{train,val}``), read for ``haste import uvit``.

What U-ViT ``scripts/extract_mscoco_feature.py`` (and HASTE ``preprocessing/extract_mscoco_feature.py``,
its copy plus the PNGs) write for image i of ``MSCOCODatabase`` (sorted COCO image ids)::

    {i}.npy          float32 (8, H/8, W/8)  ``encode_moments``: posterior mean ++ logvar (SD KL-f8)
    {i}_{k}.npy      float32 (77, 768)      CLIP ViT-L/14 last_hidden_state of caption k (file order)
    {i}.png          HASTE only: ``save_image`` of the [-1, 1] crop WITHOUT rescaling (SPEC §7.16)
    ../empty_context.npy  float32 (77, 768) the encoding of "" (U-ViT scripts/extract_empty_feature.py)

Our latents store mean ++ std, so logvar becomes std = exp(0.5 · clamp(logvar, -30, 20)), the clamp
of diffusers' ``DiagonalGaussianDistribution`` and of HASTE ``train_t2i.py`` ``sample_posterior``.

``save_image`` maps x in [-1, 1] to clamp(255 x + 0.5, 0, 255): every pixel darker than mid-grey
becomes 0 and the rest is stretched, which no rescaling can undo. ``png_check`` measures the share of
zero channel values on a sample of PNGs: about half of them in such files, a few percent in natural
images (or correctly saved ones).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.inputs.prepared_formats import PreparedFormatError, raise_problems

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0      # diffusers DiagonalGaussianDistribution / HASTE sample_posterior
CLIPPED_ZERO_FRACTION = 0.25              # share of 0-valued channel values above which PNGs are "clipped"
_MOMENTS = re.compile(r"^(\d+)\.npy$")
_CONTEXT = re.compile(r"^(\d+)_(\d+)\.npy$")


@dataclass(frozen=True)
class UViTFeatures:
    root: Path
    counts: tuple[int, ...]        # contexts (captions) per image i; 0 = none written
    empty_context: Path
    resolution: int                # image side (moments are H/8)
    context_shape: tuple[int, int]  # (77, 768)

    @property
    def count(self) -> int:
        return len(self.counts)

    def moments(self, i: int) -> Path:
        return self.root / f"{i}.npy"

    def context(self, i: int, k: int) -> Path:
        return self.root / f"{i}_{k}.npy"

    def png(self, i: int) -> Path:
        return self.root / f"{i}.png"

    def identity(self) -> dict[str, object]:
        h = hashlib.sha256(" ".join(map(str, self.counts)).encode())
        return {"format": "uvit", "count": self.count, "contexts": sum(self.counts),
                "context_counts_sha256": h.hexdigest(), "context_shape": list(self.context_shape)}


def open_uvit(src: str | Path) -> UViTFeatures:
    """List a features folder; one error names every gap (a missing ``{i}.npy`` or ``{i}_{k}.npy``)."""
    root = Path(src)
    if not root.is_dir():
        raise PreparedFormatError(f"U-ViT features folder not found: {root} (expected coco256_features/train or val)")
    moments: set[int] = set()
    contexts: dict[int, set[int]] = {}
    for name in os.listdir(root):
        if m := _MOMENTS.match(name):
            moments.add(int(m.group(1)))
        elif m := _CONTEXT.match(name):
            contexts.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not moments:
        raise PreparedFormatError(f"{root}: no {{i}}.npy moments files (a U-ViT coco256_features split folder)")
    n = max(moments) + 1
    problems = [f"{root}/{i}.npy is missing" for i in range(n) if i not in moments]
    problems += [f"{root}/{i}_{k}.npy is missing (image {i} has captions up to {max(ks)})"
                 for i, ks in sorted(contexts.items()) for k in range(max(ks) + 1) if k not in ks]
    problems += [f"{root}/{i}_*.npy: contexts for image {i}, which has no {i}.npy" for i in contexts if i >= n]
    empty = next((p for p in (root / "empty_context.npy", root.parent / "empty_context.npy") if p.is_file()), None)
    if empty is None:
        problems.append(f"empty_context.npy not found in {root} or {root.parent} (U-ViT extract_empty_feature.py)")
    raise_problems(problems, f"listing {root}")
    shape, dtype = npy_header(root / "0.npy")
    if len(shape) != 3 or shape[0] != 8 or shape[1] != shape[2] or dtype != np.float32:
        raise PreparedFormatError(f"{root}/0.npy: expected float32 moments (8, H/8, W/8), found {dtype} {list(shape)}")
    ctx, cdtype = npy_header(empty)
    if len(ctx) != 2 or cdtype != np.float32:
        raise PreparedFormatError(f"{empty}: expected a float32 (77, 768) context, found {cdtype} {list(ctx)}")
    counts = tuple(len(contexts.get(i, ())) for i in range(n))
    return UViTFeatures(root, counts, empty, int(shape[1]) * 8, (int(ctx[0]), int(ctx[1])))


def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a plain .npy file without reading its data."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
    except FileNotFoundError:
        raise PreparedFormatError(f"{path} is missing") from None
    except (ValueError, OSError) as e:
        raise PreparedFormatError(f"{path}: not a .npy array ({e})") from None
    if fortran or dtype.hasobject:
        raise PreparedFormatError(f"{path}: Fortran-order or object .npy arrays are not accepted")
    return tuple(shape), dtype


def header_problem(path: Path, shape: tuple[int, ...]) -> str | None:
    """Why one file is not a float32 array of ``shape`` (header only), or None."""
    try:
        found, dtype = npy_header(path)
    except PreparedFormatError as e:
        return str(e)
    if tuple(found) != tuple(shape) or dtype != np.float32:
        return f"{path}: expected float32 {list(shape)}, found {dtype} {list(found)}"
    return None


def read_array(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array of ``shape`` (never unpickled); anything else raises naming the file."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise PreparedFormatError(f"{path}: not a plain .npy array ({e})") from None
    if not isinstance(arr, np.ndarray) or arr.shape != tuple(shape) or arr.dtype != np.float32:
        raise PreparedFormatError(f"{path}: expected float32 {list(shape)}")
    return arr


def logvar_to_std(moments: np.ndarray) -> np.ndarray:
    """(..., 2C, h, w) mean ++ logvar -> mean ++ std, std = exp(0.5 · clamp(logvar, -30, 20)); float32."""
    mean, logvar = np.split(moments.astype(np.float32), 2, axis=-3)
    std = np.exp(0.5 * np.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)).astype(np.float32)
    return np.concatenate([mean, std], axis=-3)


def png_check(paths: list[Path]) -> dict[str, object]:
    """Share of 0-valued channel values over ``paths`` and the verdict: clipped by ``save_image`` or not."""
    zeros = total = 0
    for p in paths:
        with Image.open(io.BytesIO(p.read_bytes())) as im:
            arr = np.asarray(im.convert("RGB"))
        zeros += int((arr == 0).sum())
        total += arr.size
    frac = zeros / max(1, total)
    return {"pngs_checked": len(paths), "zero_fraction": round(frac, 4), "clipped": frac > CLIPPED_ZERO_FRACTION,
            "threshold": CLIPPED_ZERO_FRACTION}
