"""A deterministic synthetic class-conditional image dataset, for demos and tests.

Each class has a fixed combination of visual attributes that a tiny diffusion model (and a
nearest-class-mean classifier) can pick up at any resolution:

- shape: disc, square, triangle, ring, cross, diamond (6)
- foreground hue: one of 8 well-separated hues
- background texture: flat, stripes, checkerboard, radial gradient (4)

giving 6 * 8 * 4 = 192 distinct classes (classes >= 192 repeat the attributes of ``c % 192``).
Each image varies by position, scale, a small rotation, colour jitter and pixel noise, drawn from
``np.random.default_rng((seed, index))``, so image ``index`` is the same regardless of how many
others are made or in which order. Geometry is in units of the image side, so a class looks
the same at 32 and at 512 pixels.

Writers produce the two input layouts the preprocess stage reads: an ImageNet-style folder
(``write_image_folder``) and ImageNet-wds tar shards (``write_wds_shards``).
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "ring", "cross", "diamond")
BACKGROUNDS: tuple[str, ...] = ("flat", "stripes", "checker", "radial")
NUM_HUES: int = 8
NUM_DISTINCT_CLASSES: int = len(SHAPES) * NUM_HUES * len(BACKGROUNDS)

# PIL format name and save options per file extension; fixed options keep output bytes stable.
_ENCODERS: dict[str, tuple[str, dict]] = {
    "png": ("PNG", {"compress_level": 1}),
    "jpg": ("JPEG", {"quality": 95}),
    "jpeg": ("JPEG", {"quality": 95}),
    "webp": ("WEBP", {"lossless": True}),
    "bmp": ("BMP", {}),
}


# ----------------------------------------------------------------------------------------------
# Class attributes and rendering


def class_attributes(label: int) -> tuple[int, int, int]:
    """Class -> (shape, hue, background) indices, a bijection on 0..NUM_DISTINCT_CLASSES-1.

    Mixed so that neighbouring classes differ in all three attributes (a plain mixed-radix split
    would give classes 0..5 the same hue and background, making small-K demos too easy to confuse).
    """
    c = label % NUM_DISTINCT_CLASSES
    q = c // len(SHAPES)
    shape = c % len(SHAPES)
    hue = (c + q) % NUM_HUES  # = (7q + shape) % 8, so (shape, hue) pins down q % 8
    background = (q // NUM_HUES + c) % len(BACKGROUNDS)  # c % 4 is known from q % 8 and shape
    return shape, hue, background


def _hue_rgb(hue: float, value: float) -> np.ndarray:
    """Fully saturated colour at ``hue`` in [0, 1) (HSV with s=1) scaled by ``value``; (3,) float."""
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6.0) % 6.0
    return value * (1.0 - np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))


def _shape_sdf(shape: int, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (negative inside) of shape ``shape`` with radius ``r`` at coordinates x, y."""
    name = SHAPES[shape]
    if name == "disc":
        return np.hypot(x, y) - r
    if name == "square":
        return np.maximum(np.abs(x), np.abs(y)) - 0.85 * r
    if name == "triangle":
        # Intersection of three half-planes with normals 120 degrees apart (image y points down,
        # so the flat edge is at the top).
        s3 = np.sqrt(3.0) / 2.0
        return np.maximum.reduce([-y, s3 * x + 0.5 * y, -s3 * x + 0.5 * y]) - 0.5 * r
    if name == "ring":
        return np.abs(np.hypot(x, y) - 0.75 * r) - 0.25 * r
    if name == "cross":
        ax, ay = np.abs(x), np.abs(y)
        bar_h = np.maximum(ax - r, ay - 0.3 * r)
        bar_v = np.maximum(ax - 0.3 * r, ay - r)
        return np.minimum(bar_h, bar_v)
    # diamond: L1 ball, scaled so its area is close to the others'
    return (np.abs(x) + np.abs(y)) / np.sqrt(2.0) - 0.8 * r


def _background(kind: int, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Background intensity pattern in [0, 1] over grid coordinates u, v in [-1, 1]; (S, S)."""
    name = BACKGROUNDS[kind]
    phase = rng.uniform(0.0, 2.0 * np.pi)
    if name == "flat":
        return np.full(np.broadcast_shapes(u.shape, v.shape), 0.5)
    if name == "stripes":
        return 0.5 + 0.5 * np.sin(u * 4.0 * np.pi + phase)  # 4 periods across the image
    if name == "checker":
        cells = np.floor((u + 1.0) * 3.0) + np.floor((v + 1.0) * 3.0)  # 6x6 cells
        return 0.25 + 0.5 * (cells % 2)
    return np.clip(1.0 - np.hypot(u, v) / np.sqrt(2.0), 0.0, 1.0)  # radial


def synth_image(index: int, num_classes: int, size: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """Synthetic image ``index``: (uint8 (size, size, 3) HWC RGB, label = index % num_classes).

    Deterministic: the same (index, num_classes, size, seed) give identical arrays on every run
    (bit generators are stable across numpy versions; float ops are IEEE double).
    """
    if num_classes < 1 or size < 1 or index < 0 or seed < 0:
        raise ValueError(f"bad arguments: index={index} num_classes={num_classes} size={size} seed={seed}")
    label = index % num_classes
    shape, hue, bg_kind = class_attributes(label)
    rng = np.random.default_rng((seed, index))
    return render(rng, size, shape, hue / NUM_HUES, bg_kind), label


def render(rng: np.random.Generator, size: int, shape: int, fg_hue: float, bg_kind: int,
           bg_hue: float | None = None) -> np.ndarray:
    """One shape of hue ``fg_hue`` (in [0, 1)) on a textured background of hue ``bg_hue`` (default:
    the complementary hue), with position, scale, rotation, colour jitter and noise from ``rng``;
    uint8 (size, size, 3). ``synth_image`` and the captioned synthetic set share it."""
    # Pixel-centre coordinates in [-1, 1], so geometry is resolution-independent.
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0
    v, u = coords[:, None], coords[None, :]  # (S, 1), (1, S): broadcast instead of meshgrid

    # Per-index variation: position, scale, rotation, colour jitter.
    cx, cy = rng.uniform(-0.25, 0.25, size=2)
    radius = rng.uniform(0.35, 0.5)
    angle = rng.uniform(-0.3, 0.3)  # radians, ~ +-17 degrees: shapes stay recognisable
    fg = _hue_rgb((fg_hue + rng.uniform(-0.02, 0.02)) % 1.0, rng.uniform(0.85, 1.0))
    # Background: complementary hue unless given, dark, so foreground contrast is always high.
    bg_hue = fg_hue + 0.5 if bg_hue is None else bg_hue
    bg = _hue_rgb((bg_hue + rng.uniform(-0.03, 0.03)) % 1.0, rng.uniform(0.25, 0.4))

    cos, sin = np.cos(angle), np.sin(angle)
    x = cos * (u - cx) + sin * (v - cy)
    y = -sin * (u - cx) + cos * (v - cy)
    # Anti-aliased coverage: 1 inside, 0 outside, linear ramp over one pixel (2/size in [-1,1]).
    sdf = _shape_sdf(shape, x, y, radius)
    alpha = np.clip(0.5 - sdf * (size / 2.0), 0.0, 1.0)[..., None]

    texture = _background(bg_kind, u, v, rng)[..., None]
    back = bg * (0.4 + 1.2 * texture)
    # Compositing and noise in float32 (in 0..255 units): half the memory traffic of float64,
    # which keeps a 256px image at a few ms.
    alpha32 = alpha.astype(np.float32)
    img = alpha32 * (fg * 255.0).astype(np.float32) + (1.0 - alpha32) * (back * 255.0).astype(np.float32)
    img += rng.standard_normal(size=(size, size, 3), dtype=np.float32) * np.float32(0.03 * 255.0)
    # +0.5 then truncation = round-half-up for the non-negative values left after clipping.
    return (np.clip(img, 0.0, 255.0) + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Encoding and writers


def encode_image(arr: np.ndarray, ext: str) -> bytes:
    """uint8 HWC RGB -> encoded bytes for file extension ``ext`` (png, jpg, jpeg, webp, bmp)."""
    key = ext.lower().lstrip(".")
    if key not in _ENCODERS:
        raise ValueError(f"unsupported image format {ext!r}; expected one of {sorted(_ENCODERS)}")
    fmt, options = _ENCODERS[key]
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format=fmt, **options)
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> bool:
    """Write ``data`` to ``path`` via a temp name + os.replace; return False if already identical."""
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    if path.exists():
        logger.warning("overwriting %s with different content", path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # readers never see a half-written file
    return True


def write_image_folder(
    root: Path, n: int, num_classes: int, size: int, *, seed: int = 0, fmt: str = "png"
) -> list[str]:
    """Write images 0..n-1 as ``root/class_{c:03d}/img_{i:06d}.{fmt}``; return relative paths.

    All ``num_classes`` class directories are created even when n < num_classes, so
    ``images.list_image_folder`` maps them to labels 0..num_classes-1. Idempotent: files that
    already hold identical bytes are left untouched.
    """
    root = Path(root)
    for c in range(num_classes):
        (root / f"class_{c:03d}").mkdir(parents=True, exist_ok=True)
    rel_paths, written = [], 0
    for i in range(n):
        arr, label = synth_image(i, num_classes, size, seed)
        rel = f"class_{label:03d}/img_{i:06d}.{fmt}"
        written += _write_atomic(root / rel, encode_image(arr, fmt))
        rel_paths.append(rel)
    logger.info("synthetic image folder %s: %d images (%d written)", root, n, written)
    return rel_paths


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add one member with fixed metadata (mtime 0, root owner) so shards are byte-stable."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_wds_shards(
    root: Path, n: int, num_classes: int, size: int, *, per_shard: int = 64, seed: int = 0, ext: str = "jpg"
) -> list[Path]:
    """Write images 0..n-1 as ImageNet-wds tar shards ``root/synth-{k:06d}.tar``; return their paths.

    Each sample is ``{i:08d}.{ext}`` (encoded image) plus ``{i:08d}.cls`` (ASCII label), the
    layout of the ImageNet webdataset shards. Uses ``tarfile`` rather than ``wds.TarWriter``
    because the latter stamps the current time into headers; each shard is written to a temp
    name and renamed into place.
    """
    if per_shard < 1:
        raise ValueError(f"per_shard must be >= 1, got {per_shard}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for k, start in enumerate(range(0, n, per_shard)):
        path = root / f"synth-{k:06d}.tar"
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, min(start + per_shard, n)):
                arr, label = synth_image(i, num_classes, size, seed)
                _tar_member(tar, f"{i:08d}.cls", str(label).encode("ascii"))
                _tar_member(tar, f"{i:08d}.{ext}", encode_image(arr, ext))
        os.replace(tmp, path)
        shards.append(path)
    logger.info("synthetic wds shards %s: %d images in %d shards", root, n, len(shards))
    return shards
