"""Captioned image datasets for text-to-image: MS-COCO, caption folders, img2dataset tars, synthetic.

``open_input(spec)`` opens any preprocess source: the captioned layouts below, else a class-labelled
one through ``pipeline.inputs.sources.open_source``. A captioned source is a ``Source`` whose items
also carry every usable caption, in the dataset's order:

    coco:<root>/train2014          MS-COCO 2014/2017 as downloaded: <split>/*.jpg + the sibling
                                   <root>/annotations/captions_<split>.json; every caption of an image
                                   in the annotation file's order; key = the image id; items sorted by
                                   id (U-ViT's ``MSCOCODatabase`` order, so U-ViT feature i = item i)
    captions:<dir>                 images with a .txt beside each (one caption a line), recursive;
                                   key = relative path without extension
    captions:<tars>                img2dataset WebDataset shards: .jpg/.png/.webp + .txt (one caption a
                                   line) or .json ("caption" / "captions"); key = the wds key
    synthetic-captions:<n>         ``pipeline.inputs.synth_captions``

Unprefixed paths are recognised too (a split folder with the COCO annotations beside it, a folder
whose images have .txt files, tars with captions and no .cls); the manifest records the prefixed
form. Bad captions (empty, not UTF-8, not a string) are dropped with one log line each and listed;
an image left without any caption (or missing from the annotations) is kept in the listing and
skipped at load time like an undecodable image, so every group skips it and the manifest counts it.
Images are cropped with U-ViT's center crop (SPEC §8) unless ``crop`` says otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from webdataset.tariterators import base_plus_ext

from pipeline.cache.schema import sample_key, unsafe_key_reason
from pipeline.inputs.images import (
    APPLIES_EXIF,
    CROPS,
    IMAGE_EXTENSIONS,
    SkipImage,
    decode_image,
    display_path,
    is_image_file,
    scan_image_tree,
)
from pipeline.inputs.sources import (
    DEFAULT_MAX_FILE_BYTES,
    Item,
    Rejected,
    Source,
    SourceError,
    open_source,
    read_input,
    scan_tar,
    tar_paths,
)
from pipeline.inputs.synth_captions import render_item, synthetic_listing

log = logging.getLogger(__name__)

UVIT_CROP, ADM_CROP = "center-crop-uvit", "center-crop-dhariwal"
CAPTION_EXTS = ("txt", "json")


@dataclass(frozen=True)
class CaptionedSource(Source):
    """A ``Source`` whose item i has the captions ``captions[i]`` (empty: skipped, ``uncaptioned[key]`` says why)."""

    captions: tuple[tuple[str, ...], ...] = ()
    uncaptioned: dict[str, str] = field(default_factory=dict, compare=False)
    dropped: tuple[tuple[str, str], ...] = ()   # (key#line, reason) of captions dropped at listing
    crop: str = UVIT_CROP
    details: dict = field(default_factory=dict, compare=False)  # e.g. the synthetic set's held-out combinations

    def identity(self) -> dict[str, object]:
        """The base identity plus which images have no caption (they are skipped, so they change every
        group's contents). The captions themselves key only the text group (``captions_sha256``)."""
        out = super().identity()
        h = hashlib.sha256(json.dumps(sorted(self.uncaptioned.items())).encode())
        out["uncaptioned_sha256"] = h.hexdigest()
        if self.kind == "synthetic-captions":
            out["seed"] = self.synthetic_seed
        return out

    def captions_sha256(self) -> str:
        h = hashlib.sha256()
        for it, caps in zip(self.items, self.captions):
            h.update(json.dumps([it.key, list(caps)]).encode() + b"\n")
        return h.hexdigest()

    @property
    def transform(self) -> dict[str, object]:
        return {"crop": self.crop, "exif_orientation": "applied" if APPLIES_EXIF[self.crop] else "ignored"}

    def load(self, item: Item, resolution: int, max_pixels: int) -> np.ndarray:
        why = self.uncaptioned.get(item.key)
        if why is not None:
            raise SkipImage(why)
        if self.kind == "synthetic-captions":  # rendered at the target size: no crop runs
            return render_item(item, resolution, self.synthetic_seed)
        data = read_input(item.path, item.offset, item.size, self.max_file_bytes)  # regular files only, capped
        return decode_image(data, resolution, name=item.key, max_pixels=max_pixels, crop=self.crop,
                            apply_exif=APPLIES_EXIF[self.crop])


# ----------------------------------------------------------------------------------------------
# Opening any source
# ----------------------------------------------------------------------------------------------

def open_input(spec: str, *, synthetic_classes: int = 8, synthetic_seed: int = 0, crop: str = "auto",
               max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Source:
    """A captioned source when ``spec`` names one (prefix or layout), else ``open_source(spec)``."""
    if crop not in ("auto", *CROPS):
        raise SourceError(f"crop {crop!r}: expected auto or one of {list(CROPS)}")
    src = _open_captioned(spec, synthetic_seed)
    if src is None:
        if crop == UVIT_CROP:
            raise SourceError(f"crop {UVIT_CROP} is for captioned sources; {spec!r} is a class-labelled one")
        return open_source(spec, synthetic_classes=synthetic_classes, synthetic_seed=synthetic_seed,
                           max_file_bytes=max_file_bytes)
    changes = {"crop": crop} if crop != "auto" and crop != src.crop else {}
    if max_file_bytes != src.max_file_bytes:
        changes["max_file_bytes"] = max_file_bytes
    return dataclasses.replace(src, **changes) if changes else src


def _open_captioned(spec: str, seed: int) -> CaptionedSource | None:
    if spec.startswith("synthetic-captions:"):
        items, caps, details = synthetic_listing(spec, seed)
        return CaptionedSource("synthetic-captions", spec, (), items, seed, captions=caps, details=details)
    prefix, _, rest = spec.partition(":")
    if prefix == "coco":
        return open_coco(rest)
    if prefix == "captions":
        tars = tar_paths(rest)
        return _wds_captions(rest, tars) if tars else open_caption_folder(rest)
    if spec.startswith("synthetic:"):
        return None
    tars = tar_paths(spec)
    if tars:
        return _wds_captions(spec, tars) if _tars_have_captions(tars[0]) else None
    root = Path(spec)
    if root.is_dir() and coco_annotations(root).is_file():
        return open_coco(spec)
    if root.is_dir() and _has_caption_files(root):
        return open_caption_folder(spec)
    return None


# ----------------------------------------------------------------------------------------------
# Caption text: one line each, UTF-8, non-empty
# ----------------------------------------------------------------------------------------------

def parse_caption_lines(data: bytes, where: str) -> tuple[list[str], list[tuple[str, str]]]:
    """A caption file's bytes -> (captions in order, [(where#line, reason)] of dropped lines).
    One caption a line; a trailing newline ends the last line rather than adding an empty one."""
    caps, dropped = [], []
    for i, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").splitlines()):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            dropped.append((f"{where}#{i}", "caption is not UTF-8"))
            continue
        (caps.append(text) if text.strip() else dropped.append((f"{where}#{i}", "empty caption")))
    return caps, dropped


def check_caption(value: object, where: str) -> tuple[str | None, tuple[str, str] | None]:
    """A caption from JSON: (caption, None) or (None, (where, reason))."""
    if not isinstance(value, str):
        return None, (where, f"caption is not a string ({type(value).__name__})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from a JSON "\\ud800" escape
        return None, (where, "caption is not UTF-8")
    return (value, None) if value.strip() else (None, (where, "empty caption"))


def _assemble(kind: str, location: str, rows: list[tuple[Item, list[str], str]],
              dropped: list[tuple[str, str]], **extra) -> CaptionedSource:
    """rows: (item, its usable captions, why it has none). Dropped captions are logged by the stage
    (rank 0 only, one line each), not here: every rank opens the source."""
    seen: dict[str, str] = {}
    for it, _, _ in rows:
        if it.key in seen:
            raise SourceError(f"{location}: {seen[it.key]!r} and {it.path!r} map to the same sample key {it.key!r} "
                              "(keys drop the extension); rename one of them")
        seen[it.key] = it.path
    if not rows:
        raise SourceError(f"no images found in {location}")
    uncaptioned = {it.key: why for it, caps, why in rows if not caps}
    if len(uncaptioned) == len(rows):
        raise SourceError(f"{location}: none of the {len(rows)} images has a usable caption "
                          f"(e.g. {rows[0][0].key}: {rows[0][2]})")
    return CaptionedSource(kind, location, (), tuple(it for it, _, _ in rows),
                           captions=tuple(tuple(caps) for _, caps, _ in rows), uncaptioned=uncaptioned,
                           dropped=tuple(dropped), **extra)


# ----------------------------------------------------------------------------------------------
# MS-COCO
# ----------------------------------------------------------------------------------------------

def coco_annotations(split_dir: Path) -> Path:
    """<root>/train2014 -> <root>/annotations/captions_train2014.json (COCO's download layout)."""
    split_dir = Path(split_dir)
    return split_dir.resolve().parent / "annotations" / f"captions_{split_dir.resolve().name}.json"


def open_coco(spec: str) -> CaptionedSource:
    split = Path(spec)
    ann = coco_annotations(split)
    if not split.is_dir():
        raise SourceError(f"COCO image folder not found: {split} (expected <root>/train2014 or val2014 of .jpg files)")
    if not ann.is_file():
        raise SourceError(f"COCO captions not found: {ann} (COCO layout: <root>/{split.resolve().name}/*.jpg and "
                          f"<root>/annotations/captions_{split.resolve().name}.json)")
    try:
        data = json.loads(ann.read_bytes().decode("utf-8"))
        images = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
        anns = data["annotations"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise SourceError(f"{ann} is not a COCO captions file ({type(e).__name__}: {e})") from None
    caps: dict[int, list[str]] = {i: [] for i in images}
    dropped: list[tuple[str, str]] = []
    orphans = 0
    for a in anns:  # every caption of an image, in the file's order (pycocotools getAnnIds/loadAnns)
        img = a.get("image_id") if isinstance(a, dict) else None
        if img not in caps:
            orphans += 1
            continue
        text, problem = check_caption(a.get("caption"), f"{img}#ann{a.get('id')}")
        (caps[img].append(text) if problem is None else dropped.append(problem))
    if orphans:
        log.info("%s: %d caption(s) name image ids that are not in its images list; ignored", ann, orphans)
    rows = [(Item(key=str(i), label=0, path=str(split.resolve() / images[i])), caps[i],
             "no caption (missing annotation)" if not caps[i] else "") for i in sorted(images)]
    return _assemble("coco", f"coco:{split.resolve()}", rows, dropped, details={"annotations": str(ann)})


# ----------------------------------------------------------------------------------------------
# A folder of images with .txt captions
# ----------------------------------------------------------------------------------------------

def _has_caption_files(root: Path) -> bool:
    """True when the first image found (top-down) has a .txt beside it."""
    for _dirpath, dirnames, filenames in os.walk(root):  # no links followed: a cheap sniff of the layout
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names = set(filenames)
        for f in sorted(filenames):
            if is_image_file(f):
                return f"{f.rsplit('.', 1)[0]}.txt" in names
    return False


def open_caption_folder(spec: str) -> CaptionedSource:
    root = Path(spec)
    if not root.is_dir():
        raise SourceError(f"caption folder not found: {spec} (expected images with a .txt caption file beside each)")
    rows, dropped = [], []
    found, left_out = scan_image_tree(root)  # links followed once each, no loops, UTF-8 names only
    files = sorted(f.relative_to(root).as_posix() for f in found)
    for rel in files:
        txt = root / f"{rel.rsplit('.', 1)[0]}.txt"
        key = sample_key(rel)
        try:
            caps, bad = parse_caption_lines(txt.read_bytes(), key)
        except FileNotFoundError:
            caps, bad = [], []
        except OSError as e:
            caps, bad = [], [(key, f"caption file unreadable: {e.strerror or e}")]
        dropped += bad
        why = "no caption (.txt missing)" if not txt.is_file() else "no usable caption in its .txt"
        rows.append((Item(key=key, label=0, path=str(root.resolve() / rel)), caps, why))
    return _assemble("captions-folder", f"captions:{root.resolve()}", rows, dropped,
                     rejected=tuple(Rejected(path, why) for path, why in left_out))


# ----------------------------------------------------------------------------------------------
# img2dataset WebDataset tars
# ----------------------------------------------------------------------------------------------

def _tars_have_captions(tar: Path, probe: int = 64) -> bool:
    """The first ``probe`` members of a shard: captions (.txt/.json) and no .cls label."""
    exts = set()
    try:
        with tarfile.open(tar, "r:") as tf:
            for i, m in enumerate(tf):
                parsed = base_plus_ext(m.name) if m.isfile() else None
                if parsed and parsed[0] is not None:
                    exts.add(parsed[1].lower())
                if i >= probe:
                    break
    except (tarfile.TarError, EOFError) as e:  # a tar cut short: judge by what was read (the listing counts the loss)
        if not exts:
            raise SourceError(f"cannot read tar shard {tar}: {e}") from None
    return "cls" not in exts and bool(exts & set(CAPTION_EXTS))


def _json_captions(data: bytes, where: str) -> tuple[list[str], list[tuple[str, str]]]:
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return [], [(where, "caption .json is not UTF-8 JSON")]
    value = meta.get("caption", meta.get("captions")) if isinstance(meta, dict) else None
    caps, dropped = [], []
    for i, v in enumerate(value if isinstance(value, list) else [value]):
        text, problem = check_caption(v, f"{where}#{i}")
        (caps.append(text) if problem is None else dropped.append(problem))
    return caps, dropped


def _wds_captions(spec: str, tars: list[Path]) -> CaptionedSource:
    """Index the shards (headers, plus the small caption members) once; images are read by offset later.
    A tar cut short keeps its complete samples; what follows the cut is counted as lost."""
    rows, dropped, rejected = [], [], []
    for tar in tars:
        members, cut = scan_tar(tar)
        images: dict[str, tarfile.TarInfo] = {}
        texts: dict[str, dict[str, bytes]] = {}
        with open(tar, "rb") as raw:
            for m in members:
                parsed = base_plus_ext(m.name) if m.isfile() else None
                if parsed is None or parsed[0] is None:
                    continue
                key, ext = parsed[0], parsed[1].lower()
                if ext in CAPTION_EXTS:
                    raw.seek(m.offset_data)
                    texts.setdefault(key, {})[ext] = raw.read(m.size)
                elif "." + ext in IMAGE_EXTENSIONS:
                    images[key] = m
        if cut is not None:
            rejected.append(Rejected(display_path(tar), f"tar cut short ({cut}): {len(images)} samples kept, the "
                                                        "samples after the cut are lost (at least 1)", 1))
        for key, m in images.items():
            if (why := unsafe_key_reason(key)) is not None:  # "../x" would leave our shards when extracted
                rejected.append(Rejected(f"{display_path(tar)}:{display_path(key)}",
                                         f"unusable as a sample key: {why}"))
                continue
            t = texts.get(key, {})
            caps, bad = (parse_caption_lines(t["txt"], key) if "txt" in t else
                         _json_captions(t["json"], key) if "json" in t else ([], []))
            dropped += bad
            why = "no caption (.txt/.json missing)" if not t else "no usable caption"
            rows.append((Item(key=key, label=0, path=str(tar.resolve()), offset=m.offset_data, size=m.size), caps, why))
    return _assemble("captions-wds", f"captions:{spec}", rows, dropped, rejected=tuple(rejected))
