"""Image inputs: listing an ImageNet-style folder, robust decoding, and the ADM center crop.

This module owns everything between "bytes on disk" and "a uint8 (size, size, 3) RGB array":

- ``list_image_folder(root)``: ``<root>/<class_dir>/.../<image>`` -> sorted classes and
  ``(relative posix path, label)`` pairs: sorted paths, labels from the sorted top-level folder
  names, as edm2's ``dataset_tool.py`` (edm2 drops class folders without images from the
  numbering; we keep them, like torchvision ImageFolder; ImageNet has none).
- ``decode_image(data, size)``: bytes -> RGB -> ADM center crop. Every bad input (empty,
  undecodable, truncated, decompression bomb, unsupported mode) becomes ``SkipImage(reason)``,
  which the preprocess stage lists in its manifest instead of crashing a multi-hour run.
- ``center_crop_adm`` / ``to_rgb``: the two pure pieces, tested against a re-implementation of
  guided-diffusion's ``center_crop_arr``; ``center_crop_uvit`` (captioned sources, SPEC §8) against
  U-ViT's ``center_crop``.

No global PIL state is touched: ``Image.MAX_IMAGE_PIXELS`` and ``ImageFile.LOAD_TRUNCATED_IMAGES``
keep whatever values the process has; the bomb limit is our own ``max_pixels`` argument.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

# PIL raises DecompressionBombError above 2 * Image.MAX_IMAGE_PIXELS (default 89_478_485); we use
# the same number as our default so behaviour matches stock PIL, but as an argument, not a global.
DEFAULT_MAX_PIXELS: int = 178_956_970

# Lower-case; matched case-insensitively because ImageNet's files end in ".JPEG".
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

# Formats PIL may use to open inputs. Restricting them keeps odd plugins (e.g. EPS, which shells out
# to Ghostscript) out of the path. "JPEG" also opens multi-picture (MPO) camera JPEGs. Content
# decides the format, not the extension: ImageNet has a PNG and a CMYK JPEG under ".JPEG" names.
_ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")

# Everything PIL's decoders are known to raise on malformed input. DecompressionBombError is not an
# OSError, struct/zlib/EOF/Index errors leak out of individual plugins on corrupt headers, and some
# plugins raise NotImplementedError for unsupported variants. KeyError/TypeError are deliberately
# absent: from our own code they are bugs, and skipping every image would hide them.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    NotImplementedError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)


class SkipImage(Exception):
    """An input that must be skipped and listed in the manifest; ``str(e)`` is the short reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ----------------------------------------------------------------------------------------------
# Pure image transforms


def center_crop_adm(img: Image.Image, size: int) -> Image.Image:
    """ADM ("center-crop-dhariwal") crop of ``img`` to ``size x size``.

    While the short side is >= 2 * size, halve with BOX (cheap, alias-free downsampling); then
    BICUBIC-resize so the short side is ``size``; then take the central square. Follows
    guided-diffusion ``image_datasets.py`` ``center_crop_arr``
    (https://github.com/openai/guided-diffusion/blob/main/guided_diffusion/image_datasets.py),
    which edm2 ``dataset_tool.py`` copies as ``center-crop-dhariwal``. Halving uses ``resize`` to
    ``x // 2`` rather than ``Image.reduce(2)`` because reduce rounds odd sides up, which would
    not match the reference bit for bit.
    """
    if size < 1:
        raise ValueError(f"crop size must be >= 1, got {size}")
    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    w, h = img.size
    crop_y = (h - size) // 2
    crop_x = (w - size) // 2
    return img.crop((crop_x, crop_y, crop_x + size, crop_y + size))


def center_crop_uvit(img: Image.Image, size: int) -> Image.Image:
    """U-ViT ("center-crop-uvit", SPEC §8) crop of ``img`` to ``size x size``: the central square
    (side = short side), then one LANCZOS resize. Follows U-ViT ``datasets.py`` ``center_crop``
    (https://github.com/baofff/U-ViT/blob/main/datasets.py), which slices the array
    ``[(h - c) // 2 : (h + c) // 2]``; the same box here, so the pixels are identical.
    """
    if size < 1:
        raise ValueError(f"crop size must be >= 1, got {size}")
    w, h = img.size
    c = min(w, h)
    box = ((w - c) // 2, (h - c) // 2, (w + c) // 2, (h + c) // 2)
    return img.crop(box).resize((size, size), resample=Image.LANCZOS)


# Crop name (as recorded in the manifest's transform) -> function. U-ViT's loader ignores EXIF
# orientation (``Image.open(...).convert("RGB")``); we keep that for its crop, so the pixels match.
CROPS = {"center-crop-dhariwal": center_crop_adm, "center-crop-uvit": center_crop_uvit}
APPLIES_EXIF = {"center-crop-dhariwal": True, "center-crop-uvit": False}


def _high_bit_grey_to_l(img: Image.Image) -> Image.Image:
    """16-bit ('I;16*', 'I') greyscale -> 'L' by scaling 0..65535 to 0..255.

    PIL's own ``convert`` clips these modes at 255, which turns a mid-grey 16-bit PNG white.
    'I' (int32) is what older Pillow returns for 16-bit PNGs and what 16-bit TIFFs give, so it is
    read as 16-bit data too; values outside 0..65535 are clipped first.
    """
    arr = np.asarray(img).astype(np.float64)
    arr = np.clip(arr, 0, 65535)
    return Image.fromarray(np.rint(arr / 257.0).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image, *, apply_exif: bool = True) -> Image.Image:
    """Any PIL mode -> 8-bit 'RGB', after applying the EXIF orientation.

    - EXIF orientation: applied (``ImageOps.exif_transpose``) so a rotated phone photo is seen
      upright. guided-diffusion and edm2 do *not* do this; pass ``apply_exif=False`` to reproduce
      their pixels exactly (ImageNet has only a handful of such files).
    - Alpha ('LA', 'PA', 'RGBA', 'P' with transparency): dropped, not composited, exactly like
      ``.convert("RGB")`` in guided-diffusion and edm2, so our crops match theirs.
    - 'I;16*' / 'I': scaled to 8 bit (divide by 257), see ``_high_bit_grey_to_l``.
    - 'F': follows PIL (values taken as 0..255 and clipped); there is no standard range to scale.
    - 'CMYK', 'L', '1', 'P', 'YCbCr', ...: PIL's ``convert("RGB")``. Modes PIL cannot convert
      (e.g. 'LAB') raise ``ValueError``, which ``decode_image`` turns into ``SkipImage``.
    """
    if apply_exif:
        img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16") or img.mode == "I":
        img = _high_bit_grey_to_l(img)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


# ----------------------------------------------------------------------------------------------
# Decoding with skip reasons


def _check_pixel_budget(width: int, height: int, max_pixels: int) -> None:
    """Raise SkipImage for empty or too-large canvases, using header sizes only (no pixels)."""
    if width < 1 or height < 1:
        raise SkipImage(f"empty image ({width}x{height})")
    if width * height > max_pixels:
        raise SkipImage(f"decompression bomb: {width}x{height} > {max_pixels} pixels")


def _check_upscale_budget(width: int, height: int, size: int, max_pixels: int) -> None:
    """Refuse extreme aspect ratios whose short-side upscale would allocate a huge intermediate.

    A 10000x1 image scaled so its short side is 256 becomes 2,560,000x256 before the crop; the
    reference code would try it, we skip it with a reason instead of exhausting memory.
    """
    w, h = width, height
    while min(w, h) >= 2 * size:
        w, h = w // 2, h // 2
    scale = size / min(w, h)
    if round(w * scale) * round(h * scale) > max_pixels:
        raise SkipImage(f"extreme aspect ratio: {width}x{height}")


def _decode_error_reason(exc: BaseException) -> str:
    """A short, stable reason for a decoder exception (goes into the manifest)."""
    if isinstance(exc, Image.DecompressionBombError):
        # PIL's own message is a long sentence; the manifest wants a short, greppable reason.
        return "decompression bomb: over PIL's 2 * Image.MAX_IMAGE_PIXELS"
    if isinstance(exc, UnidentifiedImageError):
        return "cannot identify image"
    message = str(exc)
    if "truncated" in message.lower():
        return f"truncated image: {message}"
    return f"decode error: {type(exc).__name__}: {message}"


def _open_and_crop(data: bytes, size: int, max_pixels: int, apply_exif: bool,
                   crop: str = "center-crop-dhariwal") -> np.ndarray:
    """The happy path of ``decode_image``; PIL exceptions propagate to the caller."""
    with warnings.catch_warnings():
        # PIL warns between MAX_IMAGE_PIXELS and 2x; our own max_pixels check replaces that. The
        # filter is local to this block (note: warnings filters are process-wide while it runs).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data), formats=_ALLOWED_FORMATS) as img:
            _check_pixel_budget(img.width, img.height, max_pixels)
            # load() forces the full decode so a truncated file fails here rather than yielding a
            # partly grey image (LOAD_TRUNCATED_IMAGES stays False).
            img.load()
            rgb = to_rgb(img, apply_exif=apply_exif)
            if crop == "center-crop-dhariwal":  # U-ViT's crop resizes the square: no large intermediate
                _check_upscale_budget(rgb.width, rgb.height, size, max_pixels)
            out = np.asarray(CROPS[crop](rgb, size), dtype=np.uint8)
    if out.shape != (size, size, 3):
        raise SkipImage(f"unexpected output shape {out.shape}")
    return out


def decode_image(
    data: bytes,
    size: int,
    *,
    name: str = "",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    apply_exif: bool = True,
    crop: str = "center-crop-dhariwal",
) -> np.ndarray:
    """Encoded image bytes -> uint8 (size, size, 3) HWC RGB, center-cropped by ``crop`` (ADM's default,
    or ``center-crop-uvit``; a key of ``CROPS``).

    Raises ``SkipImage`` (with a short reason) for empty, undecodable, truncated, oversized
    (``width * height > max_pixels``, checked from the header before any pixel is decoded) or
    otherwise unusable inputs; no PIL exception escapes. ``name`` only labels the debug log line.
    PIL's hard limit (2 * ``Image.MAX_IMAGE_PIXELS``) still applies when ``max_pixels`` is larger.
    """
    if size < 1:
        raise ValueError(f"crop size must be >= 1, got {size}")
    if not data:
        raise SkipImage("empty file")
    try:
        return _open_and_crop(data, size, max_pixels, apply_exif, crop)
    except SkipImage as exc:
        logger.debug("skip %s: %s", name or "<bytes>", exc.reason)
        raise
    except _DECODE_ERRORS as exc:
        reason = _decode_error_reason(exc)
        logger.debug("skip %s: %s", name or "<bytes>", reason)
        raise SkipImage(reason) from exc


# ----------------------------------------------------------------------------------------------
# Listing an ImageNet-style folder


def is_image_file(name: str) -> bool:
    """True for non-hidden file names with one of IMAGE_EXTENSIONS (case-insensitive)."""
    # Hidden files are skipped: macOS "._x.JPEG" AppleDouble files carry image extensions but
    # are not images.
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def display_path(path: str | Path) -> str:
    """A path as one printable line: itself when valid UTF-8, else the repr of its raw bytes."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return repr(os.fsencode(text))


def _inside(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or below it (both real paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class _Walk:
    """One listing's directory walk. Directory symlinks are followed, each real directory once: a
    link to the root, to a folder above it or above the class folder (a loop), to a folder already
    listed, or into another class's folder is not followed, so every file is listed at most once
    and only under the class folder that holds it."""

    def __init__(self, root: Path):
        self.root_real = os.path.realpath(root)
        self.visited: set[str] = {self.root_real}
        self.rejected: list[tuple[str, str]] = []   # (path, reason): inputs counted as skipped

    def class_files(self, class_dir: Path) -> list[Path]:
        class_real = os.path.realpath(class_dir)
        if _inside(self.root_real, class_real) or class_real in self.visited:
            logger.warning("class folder %s is a link to the dataset root, a folder above it or another class "
                           "folder: not followed (the class gets no images)", display_path(class_dir))
            return []
        self.visited.add(class_real)
        found: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True, onerror=self._unreadable):
            dirnames[:] = [d for d in sorted(dirnames) if self._follow(Path(dirpath) / d, class_real)]
            found.extend(Path(dirpath) / f for f in filenames if is_image_file(f) and self._utf8(Path(dirpath) / f))
        return found

    def _follow(self, path: Path, class_real: str) -> bool:
        if path.name.startswith("."):
            return False
        real = os.path.realpath(path)
        loop = _inside(self.root_real, real) or _inside(class_real, real)
        if loop or real in self.visited or (_inside(real, self.root_real) and not _inside(real, class_real)):
            logger.warning("not following %s -> %s: %s", display_path(path), display_path(real),
                           "a loop" if loop else "already listed, or inside another class folder")
            return False
        self.visited.add(real)
        return True

    def _utf8(self, path: Path) -> bool:
        # keys, manifests and tar member names are UTF-8 text: such a file cannot be cached under its name
        if display_path(path) == os.fspath(path):
            return True
        self.rejected.append((display_path(path), "file name is not valid UTF-8 (rename it)"))
        return False

    def _unreadable(self, e: OSError) -> None:
        self.rejected.append((display_path(e.filename), f"unreadable directory: {e.strerror or e}"))


def scan_image_tree(root: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """Every image file below ``root`` (any depth, sorted walk; no class folders), with the same
    rules as a class folder of ``scan_image_folder``: directory symlinks followed once each, loops
    and hidden folders not, non-UTF-8 names left out. Returns (files, [(path, reason)] left out)."""
    walk = _Walk(root)
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=walk._unreadable):
        dirnames[:] = [d for d in sorted(dirnames) if walk._follow(Path(dirpath) / d, walk.root_real)]
        found.extend(Path(dirpath) / f for f in filenames if is_image_file(f) and walk._utf8(Path(dirpath) / f))
    return found, walk.rejected


def scan_image_folder(root: Path) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, str]]]:
    """``list_image_folder`` plus the inputs it had to leave out, as (path, reason) pairs: files
    whose names are not UTF-8, directories it could not read. Raises like ``list_image_folder``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {display_path(root)!r} does not exist or is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {str(root)!r} has no class subdirectories (<root>/<class>/<image>)")
    bad = [c for c in classes if display_path(c) != c]
    if bad:  # a class cannot be dropped without renumbering every later class
        raise ValueError(f"class folder name {display_path(root / bad[0])} is not valid UTF-8: rename it "
                         "(class names are recorded in the cache manifest)")
    walk = _Walk(root)
    items: list[tuple[str, int]] = []
    for label, cls in enumerate(classes):
        files = walk.class_files(root / cls)
        if not files:
            # Kept in `classes` so labels stay stable, but almost certainly a data problem.
            logger.warning("class directory %s has no images", root / cls)
        items.extend((p.relative_to(root).as_posix(), label) for p in files)
    if not items:
        raise ValueError(
            f"image folder {str(root)!r} has {len(classes)} class directories but no images "
            f"with extensions {IMAGE_EXTENSIONS}"
        )
    items.sort()
    return classes, items, walk.rejected


def list_image_folder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """List ``<root>/<class_dir>/.../<image>`` as ``(classes, [(relative posix path, label)])``.

    ``classes`` are the sorted non-hidden subdirectory names of ``root`` and ``label`` is the
    index into it (ImageNet synsets -> 0..999, as in edm2 and torchvision ImageFolder). Items
    are sorted by relative path; files directly under ``root`` are ignored. Directory symlinks
    are followed, each real directory once (see ``_Walk``); files whose names are not UTF-8 are
    left out (``scan_image_folder`` returns them). Raises FileNotFoundError if ``root`` is not a
    directory, ValueError if it has no class directories or no images.
    """
    classes, items, _ = scan_image_folder(root)
    return classes, items
