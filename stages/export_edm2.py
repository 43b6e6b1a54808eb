"""``haste export edm2``: a latents group as the dataset edm2's ``dataset_tool.py convert`` + ``encode`` write.

    OUT/images/00000/img00000000.png ...   uncompressed PNGs (compress_level=0) of the exact crops preprocess
           dataset.json                    encoded, re-read from the cache's source and re-cropped the same way
    OUT/vae-sd/00000/img-mean-std-00000000.npy ...   float32 (8, H/8, W/8) posterior mean ++ std
           dataset.json, haste-export.json            labels; what was exported (cache key, every sample's key)

The official HASTE/REPA ``CustomDataset`` pairs ``images/`` and ``vae-sd/`` by *position* in two
sorted file listings, and ``convert`` numbers images in sorted source-path order. So sample idx is
the idx-th cache key in sorted source-path order (the image's path under the source folder, its
member name in a wds tar, ``class_XXX/img_N.png`` for ``synthetic:``, its name in an imported
dataset), never cache order: ``images/`` from ``convert`` of the same folder then pairs with this
``vae-sd/`` (when preprocess skipped no input), and so do the ``images/`` written here.

Before finishing, both dataset.json files and both directory listings (walked as CustomDataset
walks them) are checked position by position against each other and against the cache keys and
labels. Files are written atomically; dataset.json and the completion marker last, so a killed
export is finished by the rerun (files already there at their exact size are kept).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.cache.reader import Cache, index_shard, open_cache, read_sample
from pipeline.cache.schema import LATENTS, GroupManifest, decode_members
from pipeline.cache.shards import atomic_write_bytes, atomic_write_json, remove_stale_temps
from pipeline.configs import check
from pipeline.inputs.images import SkipImage
from pipeline.inputs.prepared import find_edm2_parts, open_edm2, open_repae
from pipeline.inputs.prepared_formats import (
    PreparedFormatError,
    edm2_image_name,
    edm2_moments_name,
    labels_json,
    moments_name,
    npy_file,
    write_file,
)
from pipeline.inputs.sources import Source, SourceError, open_source
from stages.preprocess_engine import PreprocessError

log = logging.getLogger(__name__)

EXPORT_MARKER = "haste-export.json"
ORDER = "sorted source path (edm2 dataset_tool.py convert)"


class ExportError(PreprocessError):
    """The export cannot be written or does not pair; the message names the files and what to do."""


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    cache: str                    # cache root
    out: str                      # data dir: writes <out>/images/ and <out>/vae-sd/
    latents: str = ""             # latents group key (default: the newest run's)
    source: str = ""              # the dataset preprocess read, when it moved (default: the manifest's location)
    images: bool = True           # write images/ (needs the source)
    num_workers: int = 4          # processes that read shards, re-crop images and write files

    def __post_init__(self) -> None:
        check(bool(self.cache), "cache", "give the cache root")
        check(bool(self.out), "out", "give the output directory")
        check(self.num_workers >= 0, "num_workers", "must be >= 0")


# ----------------------------------------------------------------------------------------------
# Order: sorted source paths
# ----------------------------------------------------------------------------------------------

def key_stem(key: str, escaped: bool = True) -> str:
    """A sample key back to the source path without its extension.

    Keys of folder and imported sources come from ``sample_key`` ('%' and '.' escaped); wds keys
    are the member names up to the extension as they are (``escaped=False``).
    """
    return re.sub(r"%(25|2E)", lambda m: "%" if m.group(1) == "25" else ".", key) if escaped else key


def export_order(keys: list[str], source_paths: dict[str, str] | None, escaped: bool = True) -> list[str]:
    """``keys`` sorted by their source path (what ``convert`` sorts), exactly.

    A path is stem + "." + extension, so sorting by stem + "." is the same order unless one
    stem + "." begins another stem (``a.png`` vs ``a.b.png``: then the extension decides, and only
    the source knows it). Keys alone decide every other case, so the order never depends on
    whether the source is at hand, and the ambiguous case asks for it.
    """
    stems = {k: key_stem(k, escaped) for k in keys}
    present = set(stems.values())
    clash = next(((s[:i], s) for s in present for i, ch in enumerate(s) if ch == "." and s[:i] in present), None)
    if clash is None:
        return sorted(keys, key=lambda k: stems[k] + ".")
    if source_paths is None:
        raise ExportError(f"source files {clash[0]}.* and {clash[1]}.* sort by their extensions, which the cache "
                          "does not record: pass --source (the dataset preprocess read)")
    return sorted(keys, key=lambda k: source_paths[k])


# ----------------------------------------------------------------------------------------------
# The source, reopened as preprocess saw it
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reopened:
    """The cache's source reopened (``source`` None when unavailable, ``why`` then says why)."""
    source: Source | None
    why: str
    paths: dict[str, str] | None      # key -> path relative to a folder source (for the exact order)


def reopen_source(m: GroupManifest, override: str) -> Reopened:
    """Open the source preprocess (or import) read, and check it still lists the same items."""
    src, kind = m.source, m.source.get("kind")
    imported = m.settings.get("imported_from") or {}
    location = override or src.get("location", "")
    try:
        if kind == "edm2":
            parts = find_edm2_parts(override) if override else (imported["images"], imported["moments"])
            source = open_edm2(*parts).source
        elif kind == "repae":
            root = override or str(Path(imported["images"]).parent)
            source = open_repae(root, Path(imported["moments"]).stem).source
        else:
            source = open_source(location, synthetic_classes=max(1, int(src.get("num_classes", 1))),
                                 synthetic_seed=int(src.get("seed", 0)))
    except (SourceError, PreparedFormatError, OSError, KeyError, ValueError) as e:
        why = f"source {location or '(not recorded)'} is not available ({e})"
        if override:
            raise ExportError(why) from None
        return Reopened(None, why, None)
    ident = source.identity()
    if (ident["listing_sha256"], ident["count"]) != (src.get("listing_sha256"), src.get("count")):
        why = (f"source {location} lists other images than preprocess read ({ident['count']} items, listing "
               f"sha256 {ident['listing_sha256'][:12]}... vs {src.get('count')}, {str(src.get('listing_sha256'))[:12]}...)")
        if override:
            raise ExportError(why)
        return Reopened(None, why, None)
    paths = None
    if source.kind == "folder":  # items' paths are <location as given>/<relative path>
        paths = {it.key: Path(it.path).relative_to(location).as_posix() for it in source.items}
    return Reopened(source, "", paths)


def how_to_make_images(cfg: ExportConfig, m: GroupManifest, why: str) -> str:
    """The exact way to get a matching images/ when this export could not write it."""
    res = m.spec.size * 8
    text = (f"images/ not written: {why}. HASTE/REPA pair images/ and vae-sd/ by sorted position, so images/ must "
            f"hold exactly these {m.num_samples} samples in this order. Write it with: haste export edm2 "
            f"{cfg.cache} {cfg.out} --source PATH (PATH: the dataset preprocess read; its listing is checked)")
    if m.source.get("kind") == "folder" and not m.skipped:
        text += (f"; or with edm2: python dataset_tool.py convert --source={m.source.get('location')} "
                 f"--dest={Path(cfg.out) / 'images'} --transform=center-crop-dhariwal --resolution={res}x{res} "
                 "(same order and crop; it ignores EXIF orientation and clips 16-bit PNGs, so those pixels differ)")
    elif m.skipped:
        text += (f"; not with edm2's convert: it would include the {len(m.skipped)} input(s) preprocess skipped "
                 "and shift every later pair")
    return text


# ----------------------------------------------------------------------------------------------
# Writing: one job per cache shard, in DataLoader workers
# ----------------------------------------------------------------------------------------------

def png_file(img: np.ndarray) -> bytes:
    """Uncompressed PNG bytes, as edm2's convert writes them (compress_level=0, optimize=False)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="png", compress_level=0, optimize=False)
    return buf.getvalue()


def _put(root: Path, name: str, make: Callable[[], bytes], size: int | None) -> None:
    """Write ``root/name`` unless a file of the known exact size is already there (a resumed export)."""
    path = root / name
    if size is not None and path.is_file() and path.stat().st_size == size:
        return
    write_file(root, name, make())


class _ShardJobs(Dataset):
    """Item i: write every sample of cache shard ``shards[i]``; returns [(idx, key, label), ...]."""

    def __init__(self, cache: Cache, shards: list[int], index_of: dict[str, int], source: Source | None,
                 out: Path, max_pixels: int):
        self.cache, self.shards, self.index_of, self.source = cache, shards, index_of, source
        self.out, self.max_pixels = out, max_pixels
        self.items = {it.key: it for it in source.items} if source is not None else {}
        res = cache.latents.spec.size * 8
        # every sample has the same file sizes: fp32 (8, h, w) moments, an uncompressed res x res PNG
        self.sizes = (len(npy_file(np.zeros((8, res // 8, res // 8), np.float32))),
                      len(png_file(np.zeros((res, res, 3), np.uint8))))

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, i: int) -> list[tuple[int, str, int]]:
        m, res = self.cache.latents, self.cache.latents.spec.size * 8
        path, done = self.cache.shard_path(LATENTS, self.shards[i]), []
        for entry in index_shard(path):
            key, idx = entry[0], self.index_of[entry[0]]
            sample = decode_members(LATENTS, m.spec, read_sample(path, entry), where=f"{path}:{key}")
            moments = sample["moments"]
            _put(self.out / "vae-sd", edm2_moments_name(idx), lambda a=moments: npy_file(a.astype(np.float32)),
                 self.sizes[0])
            if self.source is not None:
                _put(self.out / "images", edm2_image_name(idx), lambda k=key: png_file(self._crop(k, res)),
                     self.sizes[1])
            done.append((idx, key, int(sample["label"])))
        return done

    def _crop(self, key: str, res: int) -> np.ndarray:
        assert self.source is not None
        try:
            return self.source.load(self.items[key], res, self.max_pixels)  # what preprocess encoded
        except SkipImage as e:
            raise ExportError(f"{self.items[key].path or key}: cannot re-read the image preprocess encoded "
                              f"({e.reason}); the source changed since") from None


def _as_is(x):
    return x


def write_files(cfg: ExportConfig, cache: Cache, order: list[str], source: Source | None) -> list[int]:
    """Every moments file (and image when ``source``); returns the cache label of each idx."""
    m, out = cache.latents, Path(cfg.out)
    index_of = {k: i for i, k in enumerate(order)}
    max_pixels = int(m.identity.get("transform", {}).get("max_pixels", 0)) or None
    if source is not None and max_pixels is None:
        raise ExportError(f"latents group {m.key}: its manifest records no transform.max_pixels")
    jobs = _ShardJobs(cache, list(range(len(m.shards))), index_of, source, out, max_pixels or 0)
    loader = DataLoader(jobs, batch_size=None, collate_fn=_as_is, num_workers=min(cfg.num_workers, len(jobs)))
    labels = [-1] * len(order)
    what = "images + vae-sd" if source is not None else "vae-sd"
    with tqdm(total=m.num_samples, unit="img", desc=f"export {what}", dynamic_ncols=True) as bar:
        for done in loader:
            for idx, _, label in done:
                labels[idx] = label
            bar.update(len(done))
    return labels


# ----------------------------------------------------------------------------------------------
# The pairing check: what CustomDataset will see
# ----------------------------------------------------------------------------------------------

def _listing(root: Path, exts: set[str]) -> list[str]:
    """CustomDataset's file list: every file under ``root`` with one of ``exts``, relative, sorted."""
    found = [os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files]
    return sorted(f.replace(os.sep, "/") for f in found if os.path.splitext(f)[1].lower() in exts)


def check_pairing(out: Path, order: list[str], labels: list[int], with_images: bool) -> None:
    """Both dataset.json files and both sorted listings agree position by position, with the cache keys."""
    from PIL import Image

    Image.init()
    exts = set(Image.EXTENSION) | {".npy"}
    problems: list[str] = []
    mom = json.loads((out / "vae-sd" / "dataset.json").read_text())["labels"]
    files = _listing(out / "vae-sd", exts)
    img, img_files = (json.loads((out / "images" / "dataset.json").read_text())["labels"],
                      _listing(out / "images", exts)) if with_images else (None, None)
    for what, n in [("vae-sd/dataset.json", len(mom)), ("vae-sd/ files", len(files))] + (
            [("images/dataset.json", len(img)), ("images/ files", len(img_files))] if with_images else []):
        if n != len(order):
            problems.append(f"{what} lists {n} entries, the cache {len(order)}")
    problems += [f"sample {i} (key {order[i]}) was not written" for i, lab in enumerate(labels) if lab < 0][:8]
    for i, key in enumerate(order[:min(len(mom), len(files))]):
        want = [edm2_moments_name(i), labels[i]]
        if mom[i] != want or files[i] != want[0]:
            problems.append(f"sample {i} (key {key}): vae-sd has {files[i]} / {mom[i]}, expected {want}")
        if with_images and i < min(len(img), len(img_files)):
            if img[i] != [edm2_image_name(i), labels[i]] or img_files[i] != img[i][0] \
                    or moments_name(img_files[i]) != files[i]:
                problems.append(f"sample {i} (key {key}): images/ has {img_files[i]} / {img[i]}, vae-sd {files[i]}")
        if len(problems) >= 8:
            break
    if problems:
        raise ExportError(f"{out}: images/ and vae-sd/ do not pair: " + "; ".join(problems[:8]))


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------

def _export_state(out: Path, marker: dict) -> dict | None:
    """The marker of an earlier export of this group into ``out`` (None: nothing there); refuse foreign dirs."""
    path = out / "vae-sd" / EXPORT_MARKER
    if not path.is_file():
        for part in ("vae-sd", "images"):
            if (out / part).exists() and any((out / part).iterdir()):
                raise ExportError(f"{out / part} exists and is not an export of this cache; choose an empty directory")
        return None
    try:
        old = json.loads(path.read_text())
    except (ValueError, RecursionError):
        old = None
    if not isinstance(old, dict):
        raise ExportError(f"{path} is not an export marker (unreadable JSON); remove {out} or choose another "
                          "directory")
    if (old.get("cache"), old.get("latents")) != (marker["cache"], marker["latents"]):
        raise ExportError(f"{out} holds an export of latents group {old.get('latents')} of {old.get('cache')}; "
                          "choose another directory")
    return old


def _discard(out: Path, reason: str) -> None:
    """Remove an earlier export of this same group whose numbering differs (it would pair wrongly)."""
    log.warning("%s: %s; removing it and exporting again", out, reason)
    for part in ("vae-sd", "images"):
        if (out / part).is_dir():
            shutil.rmtree(out / part)


def run_export(cfg: ExportConfig) -> dict:
    """Write ``<out>/vae-sd/`` (+ ``<out>/images/`` when the source is available), paired by sorted position."""
    cache = open_cache(cfg.cache, latents=cfg.latents or None, need_teacher=False)
    m, out = cache.latents, Path(cfg.out)
    if m.spec.channels != 4:
        raise ExportError(f"latents group {m.key} has {m.spec.channels} latent channels; edm2's vae-sd holds 8 "
                          "moment channels (4 latent channels)")
    keys = [e[0] for s in range(len(m.shards)) for e in index_shard(cache.shard_path(LATENTS, s))]
    rec = reopen_source(m, cfg.source) if cfg.images or cfg.source else Reopened(None, "--no-images", None)
    order = export_order(keys, rec.paths, escaped=m.source.get("kind") != "wds")
    marker = {"format": "edm2", "cache": str(Path(cfg.cache).resolve()), "latents": m.key, "order": ORDER,
              "num_samples": len(order), "vae": m.identity.get("vae"), "scale": m.spec.scale, "bias": m.spec.bias}
    old = _export_state(out, marker)
    if old is not None and old.get("order") != ORDER:  # an export in cache order (before this numbering)
        _discard(out, "it holds an export numbered in cache order")
        old = None
    with_images = rec.source is not None
    if old is not None and old.get("complete") and (old.get("images") or not with_images) \
            and (out / "vae-sd" / "dataset.json").is_file():
        log.info("export is complete, nothing to do: %s", out)
        return {"status": "up-to-date", "out": str(out), "samples": len(order), "images": bool(old.get("images"))}
    hint = None if with_images else how_to_make_images(cfg, m, rec.why)
    for part in ("vae-sd", "images") if with_images else ("vae-sd",):
        (out / part).mkdir(parents=True, exist_ok=True)
        for stale in [s for folder in [out / part, *(out / part).glob("[0-9]*")] for s in remove_stale_temps(folder)]:
            log.info("removed %s left by an interrupted export", stale)
    atomic_write_json(out / "vae-sd" / EXPORT_MARKER, {**marker, "complete": False, "images": False})
    labels = write_files(cfg, cache, order, rec.source)
    names = [(edm2_moments_name(i), lab) for i, lab in enumerate(labels)]
    if with_images:
        atomic_write_bytes(out / "images" / "dataset.json", labels_json([(edm2_image_name(i), lab)
                                                                        for i, lab in enumerate(labels)]))
    atomic_write_bytes(out / "vae-sd" / "dataset.json", labels_json(names))
    check_pairing(out, order, labels, with_images)
    os.sync()  # every file is on disk before the completion marker (per-file writes skip fsync)
    samples = [[edm2_image_name(i), edm2_moments_name(i), key, labels[i]] for i, key in enumerate(order)]
    atomic_write_json(out / "vae-sd" / EXPORT_MARKER, {**marker, "complete": True, "images": with_images,
                                                       "samples": samples})
    if hint:
        log.warning("%s", hint)
    return {"status": "built", "out": str(out), "samples": len(order), "images": with_images,
            **({"images_hint": hint} if hint else {})}
