"""Other codebases' preprocessed datasets: read edm2/REPA/HASTE and REPA-E layouts, write edm2's.

edm2 / REPA / HASTE (SPEC §4; edm2 ``dataset_tool.py convert`` then ``encode``). Each part is a
folder or a zip with the same members (edm2 writes zips with ``ZIP_STORED``)::

    images/  00000/img00000000.png ...   uncompressed center-cropped PNGs
             dataset.json                {"labels": [["00000/img00000000.png", 3], ...]}
    vae-sd/  00000/img-mean-std-00000000.npy   float32 (8, H/8, W/8) = posterior mean ++ std
             dataset.json                {"labels": [["00000/img-mean-std-00000000.npy", 3], ...]}

REPA-E (End2End-Diffusion/REPA-E ``preprocessing.py``, ``cache_latents.py``, ``dataset.py``;
SPEC does not describe it, this is our reading of that code). One HDF5 dataset per item, nested
groups from the ``/`` in its name, and a JSON key list next to each file::

    images.h5        "00000/img00000000.png" -> the PNG bytes as a fixed-length bytes scalar (S<n>)
                     "dataset.json"          -> the edm2 label JSON as bytes (S<n>)
    images_h5.json   JSON list of the names in images.h5 (h5py ``visititems``: groups included)
    <name>.h5        "00000/img-mean-std-00000000.npy" -> float32 array (8, h, w) (an array, not
                     .npy bytes); "dataset.json" keyed by these names
    <name>_h5.json   JSON list of the moment names and "dataset.json"

Assumptions, checked with a clear error when they fail: names in the key list with an image
(resp. ``.npy``) extension are the items; labels come from the ``dataset.json`` inside each file;
the latents are SD-VAE (f8d4) moments, 8 channels. REPA-E's own f16d32 VAEs (64 channels at H/16)
do not fit the cache's latent spec and are refused by the shape check.

Pairing (``pipeline.inputs.prepared``) is by name, never by sorted position (the official
loaders zip two sorted listings, STYLE §9): image ``D/imgN.png`` <-> moments
``D/img-mean-std-N.npy``, the rename both edm2's ``encode`` and REPA-E's ``cache_latents.py`` apply.

This module holds the format primitives: stores (folder | zip | HDF5, handles opened lazily once
per process, so a DataLoader worker never uses a handle its parent opened before forking),
dataset.json and key lists, moments headers and arrays, and edm2's output names.
"""

from __future__ import annotations

import io
import json
import os
import stat
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipeline.inputs.images import IMAGE_EXTENSIONS

LABELS_JSON = "dataset.json"
MOMENT_CHANNELS = 8            # SD-VAE: 4 latent channels, mean ++ std
MAX_LISTED = 8                 # problems named in one error message
# One item (an image, a moments array, a dataset.json) is read whole into memory: refuse more than
# this rather than follow a link to /dev/zero or a zip/HDF5 entry that claims gigabytes.
MAX_ITEM_BYTES = 1 << 30


class PreparedFormatError(ValueError):
    """A foreign dataset is missing, malformed or inconsistent; the message names the files."""


# ----------------------------------------------------------------------------------------------
# Stores: folder | zip | HDF5, opened lazily once per process
# ----------------------------------------------------------------------------------------------

class Store:
    """Named byte blobs / arrays of one part of a foreign dataset.

    The handle (zip, HDF5) is opened on first use in each process and dropped when pickled, so a
    forked or spawned DataLoader worker opens its own instead of sharing its parent's.
    """

    kind = ""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._pid, self._handle = -1, None

    def _open(self):
        return None

    def handle(self):
        if self._pid != os.getpid():  # first use in this process (or a forked child): open our own
            self._handle, self._pid = self._open(), os.getpid()
        return self._handle

    def close(self) -> None:
        """Close this process's handle (done before the stage forks workers that read again)."""
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._pid, self._handle = -1, None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pid": -1, "_handle": None}

    def read(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()

    def open(self, name: str) -> BinaryIO:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def where(self, name: str) -> str:
        return f"{self.path}/{name}" if self.kind == "folder" else f"{self.path}:{name}"


def _too_big(where: str, size: int) -> None:
    if size > MAX_ITEM_BYTES:
        raise PreparedFormatError(f"{where}: {size} bytes, more than the {MAX_ITEM_BYTES} one item may hold")


class FolderStore(Store):
    kind = "folder"

    def open(self, name: str) -> BinaryIO:
        st = os.stat(self.path / name)  # follows links: what would be read
        if not stat.S_ISREG(st.st_mode):  # a FIFO would hang, /dev/zero never ends
            raise PreparedFormatError(f"{self.where(name)}: not a regular file")
        _too_big(self.where(name), st.st_size)
        return open(self.path / name, "rb")

    def exists(self, name: str) -> bool:
        return (self.path / name).is_file()


class ZipStore(Store):
    kind = "zip"

    def _open(self):
        return zipfile.ZipFile(self.path)

    def open(self, name: str) -> BinaryIO:
        try:
            info = self.handle().getinfo(name)
        except KeyError:
            raise FileNotFoundError(f"{self.where(name)} not found") from None
        _too_big(self.where(name), info.file_size)  # zipfile reads no more than the declared size
        return self.handle().open(info)

    def exists(self, name: str) -> bool:
        return name in self.handle().NameToInfo


class H5Store(Store):
    """An HDF5 file with one dataset per item (REPA-E). ``read`` gives bytes, ``array`` arrays."""

    kind = "h5"

    def _open(self):
        import h5py

        return h5py.File(self.path, "r")

    def _dataset(self, name: str):
        import h5py

        link = self.handle().get(name, getlink=True)
        if isinstance(link, h5py.ExternalLink):  # would open another file the dataset's author chose
            raise PreparedFormatError(f"{self.where(name)}: an external link; refused")
        obj = self.handle().get(name)
        if not isinstance(obj, h5py.Dataset):
            raise FileNotFoundError(f"{self.where(name)} not found (no such dataset)")
        if obj.external or obj.is_virtual:  # raw data in other files (any path on this machine)
            raise PreparedFormatError(f"{self.where(name)}: stored in external files; refused")
        _too_big(self.where(name), obj.size * obj.dtype.itemsize)
        return obj

    def read(self, name: str) -> bytes:
        value = self._dataset(name)[()]
        return value if isinstance(value, bytes) else np.ascontiguousarray(value).tobytes()

    def array(self, name: str) -> np.ndarray:
        return np.asarray(self._dataset(name)[()])

    def header(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        ds = self._dataset(name)
        return tuple(ds.shape), ds.dtype

    def exists(self, name: str) -> bool:
        import h5py

        return isinstance(self.handle().get(name), h5py.Dataset)


def open_store(path: str | Path) -> Store:
    p = Path(path)
    if p.is_dir():
        return FolderStore(p)
    if p.is_file() and zipfile.is_zipfile(p):
        return ZipStore(p)
    if p.is_file() and p.suffix in (".h5", ".hdf5"):
        return H5Store(p)
    raise PreparedFormatError(f"{p} not found (expected a folder, a .zip or an .h5 file)")


# ----------------------------------------------------------------------------------------------
# Labels, key lists, moments
# ----------------------------------------------------------------------------------------------

def read_labels(store: Store) -> dict[str, int]:
    """``dataset.json`` of a store -> {name: label}; missing, unlabeled or malformed files raise."""
    where = store.where(LABELS_JSON)
    if not store.exists(LABELS_JSON):
        raise PreparedFormatError(f"{where} not found: an edm2-style dataset lists its files and labels there")
    try:
        labels = json.loads(store.read(LABELS_JSON).decode("utf-8")).get("labels")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, RecursionError) as e:
        raise PreparedFormatError(f"{where} is not a JSON object with 'labels' ({e})") from None
    if labels is None:
        raise PreparedFormatError(f"{where} has no labels (\"labels\": null); the cache stores a class per sample")
    out: dict[str, int] = {}
    for entry in labels:
        ok = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
        if not ok or isinstance(entry[1], bool) or not isinstance(entry[1], int) or entry[1] < 0:
            raise PreparedFormatError(f"{where}: entry {entry!r} is not [name, class index]")
        if entry[0] in out:
            raise PreparedFormatError(f"{where}: {entry[0]!r} is listed twice")
        if entry[0].startswith("/") or ".." in entry[0].split("/") or "\\" in entry[0]:
            raise PreparedFormatError(f"{where}: {entry[0]!r} is not a relative path inside the dataset")
        out[entry[0]] = entry[1]
    return out


def read_key_list(path: Path) -> list[str]:
    """A REPA-E ``<name>_h5.json``: the JSON list of names in the matching .h5 file."""
    if not path.is_file():
        raise PreparedFormatError(f"{path} not found: REPA-E writes the key list of {path.name[:-8]}.h5 there")
    try:
        keys = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise PreparedFormatError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise PreparedFormatError(f"{path} must be a JSON list of names")
    return keys


def moments_name(image_name: str) -> str:
    """``D/imgN.png`` -> ``D/img-mean-std-N.npy`` (edm2 ``encode``, REPA-E ``cache_latents.py``)."""
    folder, _, base = image_name.rpartition("/")
    stem = base.rsplit(".", 1)[0]
    stem = "img-mean-std-" + (stem[3:] if stem.startswith("img") else stem)
    return f"{folder}/{stem}.npy" if folder else f"{stem}.npy"


def expected_moments_shape(resolution: int) -> tuple[int, int, int]:
    return (MOMENT_CHANNELS, resolution // 8, resolution // 8)


def moments_header(store: Store, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one moments item without reading its data."""
    if isinstance(store, H5Store):
        return store.header(name)
    try:
        with store.open(name) as fp:
            version = np.lib.format.read_magic(fp)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(fp)
    except ValueError as e:
        raise PreparedFormatError(f"{store.where(name)}: not a .npy array ({e})") from None
    if fortran or dtype.hasobject:
        raise PreparedFormatError(f"{store.where(name)}: Fortran-order or object .npy arrays are not accepted")
    return tuple(shape), dtype


def moments_problem(where: str, shape: tuple[int, ...], dtype: np.dtype, resolution: int) -> str | None:
    expect = expected_moments_shape(resolution)
    if tuple(shape) != expect or np.dtype(dtype) != np.float32:
        return (f"{where}: moments must be float32 {list(expect)} ([8, H/8, W/8] for {resolution}x{resolution} "
                f"images), found {np.dtype(dtype)} {list(shape)}")
    return None


def read_moments(store: Store, name: str, resolution: int) -> np.ndarray:
    """float32 (8, h, w) moments of one item; wrong shape or dtype raises naming the item."""
    if isinstance(store, H5Store):
        arr = store.array(name)
    else:
        try:
            arr = np.load(io.BytesIO(store.read(name)), allow_pickle=False)
        except ValueError as e:
            raise PreparedFormatError(f"{store.where(name)}: not a plain .npy array ({e})") from None
        if not isinstance(arr, np.ndarray):  # an .npz archive
            raise PreparedFormatError(f"{store.where(name)}: not a plain .npy array (an .npz archive)")
    problem = moments_problem(store.where(name), arr.shape, arr.dtype, resolution)
    if problem:
        raise PreparedFormatError(problem)
    return arr


def raise_problems(problems: list[str], doing: str) -> None:
    """One error naming the first MAX_LISTED problems and how many more there are."""
    if problems:
        more = f"; ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise PreparedFormatError(f"{len(problems)} problem(s) {doing}: " + "; ".join(problems[:MAX_LISTED]) + more)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def check_moments_item(store: Store, name: str, resolution: int) -> str | None:
    """Why one moments item is unusable (missing, not .npy, wrong shape/dtype), or None; header only."""
    try:
        shape, dtype = moments_header(store, name)
    except FileNotFoundError:
        return f"{store.where(name)} is missing"
    except PreparedFormatError as e:
        return str(e)
    return moments_problem(store.where(name), shape, dtype, resolution)


# ----------------------------------------------------------------------------------------------
# Writing edm2's layout
# ----------------------------------------------------------------------------------------------

def edm2_moments_name(index: int) -> str:
    """Exactly edm2 ``encode``'s member name: ``{idx[:5]}/img-mean-std-{idx:08d}.npy``."""
    s = f"{index:08d}"
    return f"{s[:5]}/img-mean-std-{s}.npy"


def edm2_image_name(index: int) -> str:
    """Exactly edm2 ``convert``'s member name: ``{idx[:5]}/img{idx:08d}.png``."""
    s = f"{index:08d}"
    return f"{s[:5]}/img{s}.png"


def npy_file(arr: np.ndarray) -> bytes:
    """``np.save`` bytes of a C-ordered array, as edm2 writes them (header v1.0)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def labels_json(labels: list[tuple[str, int]]) -> bytes:
    return json.dumps({"labels": [[name, int(label)] for name, label in labels]}).encode()


def write_file(root: Path, name: str, data: bytes) -> None:
    """Write ``root/name`` under a temporary name and rename: a killed export leaves no partial file.

    No fsync per file (millions of them); the export syncs once before its completion marker.
    """
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
