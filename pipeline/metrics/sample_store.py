"""The sample store of `haste eval`: a zarr group that fills chunk by chunk and resumes.

    samples.zarr/                  zarr format 2 (.zgroup/.zarray/.zattrs), no compressor, no filters
      images  uint8  (N, H, W, 3)  chunks (chunk, H, W, 3) (sampled pixels barely compress)
      labels  int64  (N,)          class of each image (text-to-image: the prompt entry it came from)
      seeds   uint32 (N,)          the per-image seed its noise came from
      prompts <U{w}  (N,)          text-to-image only: each image's prompt (fixed width w = the longest
                                   prompt of the set, UTF-32 code points; "" = not written)
      done    uint8  (num_chunks,) chunk size 1: 1 once a chunk's images, labels, seeds (prompts) are written
      attrs["haste"]               what produced the store (checkpoint, sampler, seed, ...)

Format 2 because zarr-python 2 cannot open format 3 (``GroupNotFoundError``) while zarr 3 reads
both; without a compressor every chunk file is the raw C-order bytes (``np.frombuffer`` reads it).
Stores written in format 3 by earlier versions still resume. An existing store is opened only
when its arrays have our dtypes and plain data codecs (numcodecs' pickle codec would run code).

Chunk c holds images [c·chunk, (c+1)·chunk). zarr writes each chunk file atomically, but a chunk
of images is only *complete* when its ``done`` flag is set, which happens after all three data
chunks are on disk; a run killed in between leaves the flag at 0 and the chunk is redone. The
``done`` array has one file per chunk so concurrent ranks never rewrite each other's flags.
"""

from __future__ import annotations

import io
import logging
import math
import os
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.metrics.grid import write_grid

__all__ = ["SampleStore", "SampleStoreError", "export_npz", "npz_matches", "open_store", "write_grid"]

log = logging.getLogger(__name__)


class SampleStoreError(ValueError):
    """The store on disk cannot serve this request; the message names the path and fields."""


# What an array of a store may be: our dtypes, and codecs that only transform bytes. Checked before
# any chunk is read, because a zarr store can name numcodecs' ``pickle`` codec (or any other).
ARRAY_DTYPES = {"images": np.uint8, "labels": np.int64, "seeds": np.uint32, "done": np.uint8}
PROMPTS = "prompts"  # optional array: fixed-width unicode, checked like the others
SAFE_CODECS = frozenset({"bytes", "zstd", "blosc", "gzip", "zlib", "lz4", "bz2", "crc32c", "transpose"})


def _codec_names(arr: Any) -> list[str]:
    meta = arr.metadata
    if meta.zarr_format == 2:
        parts = [meta.compressor, *(meta.filters or ())]
        return [(c.get_config() if hasattr(c, "get_config") else c)["id"] for c in parts if c is not None]
    return [c.to_dict()["name"] for c in meta.codecs]


def _has_array(path: Path, name: str) -> bool:
    return (path / name / ".zarray").is_file() or (path / name / "zarr.json").is_file()


def check_arrays(path: Path, group: Any) -> None:
    """Refuse a store whose arrays are missing, of another dtype, or encoded with a non-data codec."""
    not_ours = "not a sample store written by haste eval (use another output directory)"
    optional = [PROMPTS] if _has_array(path, PROMPTS) else []
    for name in [*ARRAY_DTYPES, *optional]:
        if not _has_array(path, name):
            raise SampleStoreError(f"{path}: no '{name}' array; {not_ours}")
        try:
            arr = group[name]
            bad = [c for c in _codec_names(arr) if c not in SAFE_CODECS]
            dtype_ok = arr.dtype.kind == "U" if name == PROMPTS else arr.dtype == ARRAY_DTYPES[name]
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # metadata zarr itself cannot interpret
            raise SampleStoreError(f"{path}/{name}: unusable metadata ({e}); {not_ours}") from None
        if not dtype_ok or bad:
            want = "fixed-width unicode" if name == PROMPTS else np.dtype(ARRAY_DTYPES[name])
            raise SampleStoreError(f"{path}/{name}: dtype {arr.dtype}, codecs {bad or 'plain'} (expected "
                                   f"{want}, plain codecs only); {not_ours}")


class SampleStore:
    def __init__(self, path: Path, group: Any):
        self.path, self.group = Path(path), group
        check_arrays(self.path, group)  # before any chunk is decoded
        self.images, self.labels = group["images"], group["labels"]
        self.seeds, self.done = group["seeds"], group["done"]
        self.prompts = group[PROMPTS] if _has_array(self.path, PROMPTS) else None  # text-to-image stores

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.group.attrs["haste"])

    @property
    def num_samples(self) -> int:
        return int(self.images.shape[0])

    @property
    def chunk(self) -> int:
        return int(self.images.chunks[0])

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_samples / self.chunk)

    def chunk_range(self, c: int) -> range:
        return range(c * self.chunk, min((c + 1) * self.chunk, self.num_samples))

    def completed(self) -> np.ndarray:
        return np.asarray(self.done[:], dtype=bool)

    def pending(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """This rank's share of the incomplete chunks: every world_size-th of them, so a resume is balanced."""
        done = self.completed()
        return [c for c in range(self.num_chunks) if not done[c]][rank::world_size]

    def is_complete(self) -> bool:
        return bool(self.completed().all())

    def _unlabeled(self) -> np.ndarray:
        """Rows whose label (or prompt) reads as the fill value: never written, or lost in a crash."""
        missing = np.asarray(self.labels[:]) < 0
        if self.prompts is not None:
            missing |= np.asarray(self.prompts[:]) == ""
        return missing

    def reopen_unlabeled(self) -> None:
        """A done chunk whose labels (prompts) read as the fill value lost data in a crash: sample it again."""
        missing, done = self._unlabeled(), self.completed()
        for c in np.flatnonzero(done):
            rows = self.chunk_range(int(c))
            if missing[rows.start:rows.stop].any():
                log.warning("%s: chunk %d is flagged done but its labels are missing; it will be sampled again",
                            self.path, c)
                self.done[int(c)] = 0

    def check_complete(self) -> None:
        """Every flag set and every label (prompt) written (fill values -1, ""): else name the chunks."""
        missing = np.flatnonzero(~self.completed())
        unlabeled = np.flatnonzero(self._unlabeled())
        if len(missing) or len(unlabeled):
            raise SampleStoreError(f"{self.path}: chunks {missing[:8].tolist()} not done, images "
                                   f"{unlabeled[:8].tolist()} without labels; rerun the same command to finish")

    def write_chunk(self, c: int, images: np.ndarray, labels: np.ndarray, seeds: np.ndarray,
                    prompts: list[str] | None = None) -> None:
        rows = self.chunk_range(c)
        if images.shape != (len(rows), *self.images.shape[1:]) or images.dtype != np.uint8:
            raise SampleStoreError(f"chunk {c} needs uint8 images {(len(rows), *self.images.shape[1:])}, "
                                   f"got {images.dtype} {images.shape}")
        if (prompts is None) != (self.prompts is None) or (prompts is not None and len(prompts) != len(rows)):
            raise SampleStoreError(f"chunk {c}: the store {'holds' if self.prompts is not None else 'has no'} "
                                   f"prompts; got {'none' if prompts is None else len(prompts)}")
        sl = slice(rows.start, rows.stop)
        self.images[sl] = images
        self.labels[sl] = labels
        self.seeds[sl] = seeds
        if prompts is not None:
            width = self.prompts.dtype.itemsize // 4
            if any(len(p) > width or not p for p in prompts):  # numpy would cut a longer one silently
                raise SampleStoreError(f"chunk {c}: prompts must be 1 to {width} characters (the store's width)")
            self.prompts[sl] = np.asarray(prompts, dtype=self.prompts.dtype)
        os.sync()  # zarr renames but never fsyncs: after a node crash a flag must not outlive its data
        self.done[c] = 1  # last: marks the chunk complete

    def iter_chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for c in range(self.num_chunks):
            rows = self.chunk_range(c)
            yield self.images[rows.start:rows.stop], self.labels[rows.start:rows.stop]


def meta_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def open_store(path: str | Path, *, num_samples: int, chunk: int, shape: tuple[int, int, int],  # chunk: new stores
               meta: dict[str, Any], create: bool = True, clean: bool = False,
               prompt_width: int | None = None) -> SampleStore:
    """Open (or create) the store at ``path``; an existing store must have been made with ``meta``.

    ``meta`` is plain JSON data describing everything that determines the pixels (checkpoint,
    sampler settings, seed, label mode, prompts, ...). A store from other settings is refused, naming
    the fields, rather than silently mixing two sample sets in one FID. ``prompt_width`` (text-to-image:
    the longest prompt, in code points) adds the ``prompts`` array to a new store.
    """
    import zarr

    path = Path(path)
    # The chunk size is the store's own layout, not a setting: a resume keeps it whatever the batch size.
    meta = {**meta, "num_samples": num_samples, "shape": list(shape)}
    exists = (path / ".zgroup").is_file() or (path / "zarr.json").is_file()  # format 2 (ours) or 3 (earlier)
    group = _open_existing(path) if exists else None
    old = dict(group.attrs.get("haste", {})) if group is not None else {}
    if old:  # (a group without our attrs is a creation that was killed: made again below)
        diff = meta_diff(old, meta)
        if diff:
            lines = "\n".join(f"  {k}: store has {a!r}, this run wants {b!r}" for k, (a, b) in diff.items())
            raise SampleStoreError(f"sample store {path} was made with other settings:\n{lines}\n"
                                   "Use another output directory, or restore these values.")
        store = SampleStore(path, group)
        if (prompt_width is not None) != (store.prompts is not None):
            raise SampleStoreError(f"sample store {path} {'has no' if store.prompts is None else 'has'} prompts; "
                                   "this run is " + ("text" if prompt_width is not None else "class") +
                                   "-conditional. Use another output directory.")
        if (path / "zarr.json").is_file():
            log.info("%s is zarr format 3 (written by an earlier version): zarr-python >= 3 reads it, zarr 2 "
                     "cannot; delete it to have it written again in format 2", path)
        if clean:  # one process only (rank 0, before the others open): another rank's temp file may be in flight
            _remove_partials(path)
            store.reopen_unlabeled()
        return store
    if not create:
        raise SampleStoreError(f"no sample store at {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if exists:  # a creation that was killed before its attrs: start over in format 2
        shutil.rmtree(path)
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    n_chunks = math.ceil(num_samples / chunk)
    plain = dict(compressors=None, filters=None)  # raw chunk bytes: any zarr (or numpy) reads them
    group.create_array("images", shape=(num_samples, *shape), chunks=(chunk, *shape), dtype="uint8",
                       fill_value=0, **plain)
    group.create_array("labels", shape=(num_samples,), chunks=(chunk,), dtype="int64", fill_value=-1, **plain)
    group.create_array("seeds", shape=(num_samples,), chunks=(chunk,), dtype="uint32", fill_value=0, **plain)
    if prompt_width is not None:  # fixed-width unicode: raw UTF-32 chunk bytes, no object codec
        group.create_array(PROMPTS, shape=(num_samples,), chunks=(chunk,), dtype=f"<U{max(1, prompt_width)}",
                           fill_value="", **plain)
    group.create_array("done", shape=(n_chunks,), chunks=(1,), dtype="uint8", fill_value=0, **plain)
    group.attrs["haste"] = meta  # written last: a store without it is not ours (and is rewritten)
    return SampleStore(path, group)


def _open_existing(path: Path) -> Any:
    """The zarr group at ``path`` (metadata is JSON: opening reads no chunk), or one clear error."""
    import zarr

    try:
        return zarr.open_group(str(path), mode="r+")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SampleStoreError(f"{path}: unreadable zarr metadata ({type(e).__name__}: {e}); remove it or use "
                               "another output directory") from None


def _remove_partials(path: Path) -> None:
    """zarr's temp files (``*.partial``) from a killed write; they never count, but take space."""
    for p in path.rglob("*.partial"):
        p.unlink(missing_ok=True)


def export_npz(store: SampleStore, out: Path) -> Path:
    """The ADM evaluator's sample batch: ``arr_0`` uint8 (N, H, W, 3), ``arr_1`` int64 labels, or for a
    text-to-image store the prompts (fixed-width unicode ``<U{w}``: ``np.load`` reads it with
    ``allow_pickle=False``; ADM's evaluator reads ``arr_0`` only).

    Streamed chunk by chunk into an uncompressed zip (what ``np.savez`` writes), so 50K images
    (9.8 GB) never sit in memory; written to a temp name and renamed. The zip members carry a
    fixed timestamp and permissions (``zip_member``), so the same store always gives the same bytes.
    """
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shape = (store.num_samples, *store.images.shape[1:])
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open(zip_member("arr_0.npy"), "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
                for images, _ in store.iter_chunks():
                    f.write(np.ascontiguousarray(images).tobytes())
            buf = io.BytesIO()
            second = np.asarray(store.prompts[:]) if store.prompts is not None else \
                np.asarray(store.labels[:], dtype=np.int64)
            np.save(buf, second, allow_pickle=False)
            zf.writestr(zip_member("arr_1.npy"), buf.getvalue())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip header can hold


def zip_member(name: str) -> zipfile.ZipInfo:
    """A stored zip member with a fixed time and mode (``ZipFile.open(str)`` stamps the wall clock)."""
    info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


def npz_matches(store: SampleStore, path: Path) -> bool:
    """Whether ``path`` is an export of this store's shape (the array headers only; no data is read)."""
    try:
        with zipfile.ZipFile(path) as zf:
            shape, dtype = _npy_header(zf, "arr_0.npy")
            shape1, dtype1 = _npy_header(zf, "arr_1.npy")
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return False
    second = store.prompts.dtype if store.prompts is not None else np.dtype(np.int64)
    return shape == (store.num_samples, *store.images.shape[1:]) and dtype == np.uint8 and \
        shape1 == (store.num_samples,) and dtype1 == second


def _npy_header(zf: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype]:
    with zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return shape, dtype
