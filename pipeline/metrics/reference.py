"""Reference batches the samples are compared against: ADM-style .npz files and image folders.

    ref = load_reference("VIRTUAL_imagenet256_labeled.npz")   # mu/sigma (FID) and arr_0 (P/R, KID)
    ref = load_reference("stats_only.npz")                    # mu/sigma only
    ref = load_reference("images/")                           # a folder of .png/.jpg images

Never unpickles (``allow_pickle=False``); ``arr_0`` is memory-mapped when stored uncompressed
(``np.savez``, as ADM's 2 GB reference batch is), so loading is cheap and rows are read lazily.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch_fidelity.datasets import ImagesPathDataset
from torch_fidelity.utils import glob_samples_paths

from pipeline.metrics.extractors import MetricsError

log = logging.getLogger(__name__)
@dataclass(frozen=True, eq=False)
class Reference:
    """FID statistics and/or images to compare samples against; ``load_reference`` builds one."""

    path: str
    mu: np.ndarray | None = None      # (D,) float64
    sigma: np.ndarray | None = None   # (D, D) float64
    images: Any = None                # (N, H, W, 3) uint8 array-like (memmap when possible) or a Dataset

    @property
    def name(self) -> str:
        return Path(self.path).name

    @property
    def num_images(self) -> int:
        return 0 if self.images is None else len(self.images)

    def cache_key(self) -> str:
        """File name + a hash of path, size and mtime of every file behind the reference (or the
        identity a reference Dataset gives itself through its own ``identity()``)."""
        own = getattr(self.images, "identity", None)
        if callable(own):  # e.g. the eval stage's crops of a caption source (no file per image)
            digest = hashlib.sha256(str(own()).encode()).hexdigest()[:16]
            return f"{re.sub(r'[^A-Za-z0-9._-]', '_', self.name)}-{digest}"
        files = getattr(self.images, "files", None) or [self.path]   # an image folder lists its files
        h = hashlib.sha256()
        for f in files:
            st = os.stat(f)
            h.update(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return f"{re.sub(r'[^A-Za-z0-9._-]', '_', self.name)}-{h.hexdigest()[:16]}"


def load_reference(path: str | Path) -> Reference:
    """Image folder, or .npz with ``mu``+``sigma`` (statistics) and/or ``arr_0`` (uint8 NHWC images).

    Never unpickles (``allow_pickle=False``). ``arr_0`` is memory-mapped when stored uncompressed
    (``np.savez``, as ADM's 2 GB reference batch is), so loading is cheap and rows are read lazily.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        files = glob_samples_paths(str(p), True, "png,jpg,jpeg", verbose=False)
        if not files:
            raise MetricsError(f"reference folder {p} holds no .png/.jpg/.jpeg images")
        return Reference(str(p), images=ImagesPathDataset(files))
    if not p.is_file():
        raise MetricsError(f"reference {p} not found (expected an .npz or an image folder)")
    try:
        npz = np.load(p, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise MetricsError(f"reference {p} is not a readable .npz: {e}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise MetricsError(f"reference {p} is a single array, not an .npz with 'mu'/'sigma' or 'arr_0'")
    with npz:
        keys = set(npz.files)
        mu, sigma = _load_stats(npz, p) if keys & {"mu", "sigma"} else (None, None)
        images = _load_images(npz, p) if "arr_0" in keys else None
    if mu is None and images is None:
        raise MetricsError(f"reference {p} has neither 'mu'+'sigma' (FID statistics) nor 'arr_0' (images); "
                           f"keys: {sorted(keys)}")
    return Reference(str(p), mu=mu, sigma=sigma, images=images)


def _member(npz: np.lib.npyio.NpzFile, path: Path, key: str) -> np.ndarray:
    try:
        return npz[key]
    except ValueError as e:  # numpy's "Object arrays cannot be loaded when allow_pickle=False"
        raise MetricsError(f"reference {path}: key '{key}' is a pickled object array; refusing to load it "
                           f"({e})") from None


def _load_stats(npz: np.lib.npyio.NpzFile, path: Path) -> tuple[np.ndarray, np.ndarray]:
    for key in ("mu", "sigma"):
        if key not in npz.files:
            raise MetricsError(f"reference {path}: missing key '{key}' (FID statistics need both 'mu' and "
                               f"'sigma'); keys: {sorted(npz.files)}")
    mu, sigma = (_member(npz, path, k).astype(np.float64) for k in ("mu", "sigma"))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise MetricsError(f"reference {path}: 'mu' must be (D,) and 'sigma' (D, D); got {mu.shape} and "
                           f"{sigma.shape}")
    return mu, sigma


def _load_images(npz: np.lib.npyio.NpzFile, path: Path) -> np.ndarray:
    images = _npz_memmap(path, "arr_0")
    if images is None:
        log.info("reference %s: 'arr_0' is compressed; loading it into memory", path)
        images = _member(npz, path, "arr_0")
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise MetricsError(f"reference {path}: 'arr_0' must be uint8 (N, H, W, 3) images; got "
                           f"{images.dtype} {images.shape}")
    return images


def _npz_memmap(path: Path, key: str) -> np.ndarray | None:
    """Memory-map an uncompressed .npz member; None when it is compressed (then np.load reads it)."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{key}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # zip local file header: the data follows its name and extra field
        if local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            return None
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject:
        raise MetricsError(f"reference {path}: key '{key}' is a pickled object array; refusing to load it")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
