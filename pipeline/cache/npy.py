"""Plain ``.npy`` payloads: written with ``allow_pickle=False``, read back as zero-copy views.

A leaf of the cache contract (re-exported by ``pipeline.cache.schema``): every cached array goes
through these two functions, so a cache can never execute code.
"""

from __future__ import annotations

import io

import numpy as np

from pipeline.cache.codecs_base import CacheFormatError


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes, *, dtype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    """A plain .npy payload as a read-only view of ``data`` (no copy): the loader's batch
    stacking is then the only copy of the ~3.5 MB teacher record. Pickles, object dtypes,
    Fortran order and .npz archives are refused."""
    fp = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
        header = _npy_header(fp, version)
    except ValueError as e:
        raise CacheFormatError(f"{where}: not a plain .npy array ({e})") from None
    found_shape, fortran, found_dtype = header
    if found_dtype.hasobject or fortran:
        raise CacheFormatError(f"{where}: not a plain .npy array (object dtype or Fortran order)")
    if len(shape) == len(found_shape):  # -1 matches any positive length (a text sample's caption count)
        shape = tuple(f if s == -1 and f > 0 else s for s, f in zip(shape, found_shape))
    if found_dtype != np.dtype(dtype) or tuple(found_shape) != tuple(shape):
        raise CacheFormatError(f"{where}: expected {dtype} {tuple(shape)}, found {found_dtype} {tuple(found_shape)}")
    offset = fp.tell()
    count = int(np.prod(found_shape))
    if len(data) - offset != count * found_dtype.itemsize:
        raise CacheFormatError(f"{where}: truncated .npy payload ({len(data) - offset} bytes for {count} items)")
    return np.frombuffer(data, dtype=found_dtype, count=count, offset=offset).reshape(found_shape)


def _npy_header(fp: io.BytesIO, version: tuple[int, int]) -> tuple[tuple[int, ...], bool, np.dtype]:
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fp)
    raise ValueError(f"unsupported .npy version {version}")
