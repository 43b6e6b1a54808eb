"""Shard files: deterministic atomic tar writing, verification, streaming reads, JSON I/O.

A shard is written under a temporary name and renamed only when complete, so a killed run
never leaves a tar that looks finished. Tar headers are fixed (mtime 0, uid 0, mode 0444) so
the same inputs give byte-identical shards, whichever rank or rerun wrote them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from webdataset.tariterators import base_plus_ext

from pipeline.cache.schema import CacheFormatError, ShardRecord, unsafe_key_reason


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a failed write (disk full, interrupt) leaves the old file and no temp file
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temps(directory: Path, name: str = "*") -> list[Path]:
    """Delete the ``.<name>.tmp<pid>`` files a killed run left in ``directory`` (not recursive);
    ``name`` narrows it to one file's temps (a cache root may be a folder shared with other files)."""
    stale = sorted(p for p in Path(directory).glob(f".{name}.tmp*") if p.is_file())
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


class ShardWriter:
    """Write one shard as ``.<name>.tmp<pid>``; ``commit()`` renames it and returns its record.

    Tar blocks are written directly (ustar/GNU headers from ``tarfile.TarInfo.tobuf``, payload,
    zero padding to 512): tarfile's stream mode re-slices its buffer per 10 KiB record, which is
    quadratic in the member size and made 1.5 MB q/k members the stage's bottleneck.
    """

    def __init__(self, path: Path, index: int):
        self.path, self.index = Path(path), index
        self.tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        for stale in self.path.parent.glob(f".{self.path.name}.tmp*"):  # left by a killed run
            stale.unlink(missing_ok=True)
        self._raw = open(self.tmp, "wb")
        self._sha, self._nbytes = hashlib.sha256(), 0
        self.keys: list[str] = []

    def _write(self, data: bytes) -> None:
        self._sha.update(data)
        self._nbytes += len(data)
        try:
            self._raw.write(data)
        except OSError as e:
            raise _named(e, self.path) from None

    def add(self, key: str, members: dict[str, bytes]) -> None:
        if (why := unsafe_key_reason(key)) is not None:  # sources refuse such keys; this is the last line
            raise CacheFormatError(f"refusing sample key {key!r} in {self.path}: {why}")
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._write(info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
            self._write(data)
            self._write(b"\0" * (-len(data) % tarfile.BLOCKSIZE))
        self.keys.append(key)

    def commit(self, skipped: tuple[tuple[str, str], ...] = ()) -> ShardRecord:
        try:
            self._write(b"\0" * (2 * tarfile.BLOCKSIZE))  # end-of-archive marker
            self._raw.flush()
            os.fsync(self._raw.fileno())
            self._raw.close()
            os.replace(self.tmp, self.path)
        except BaseException as e:  # disk full at the end: the caller has already let go of this writer
            self.abort()
            if isinstance(e, OSError):
                raise _named(e, self.path) from None
            raise
        return ShardRecord(index=self.index, name=self.path.name, count=len(self.keys), bytes=self._nbytes,
                           sha256=self._sha.hexdigest(), first_key=self.keys[0] if self.keys else None,
                           last_key=self.keys[-1] if self.keys else None, skipped=skipped)

    def abort(self) -> None:
        """Drop the partial file; never raises (it runs while another error propagates, and every
        other writer must still be aborted after it). Closing flushes buffered bytes, which fails
        again on a full disk: that error is the one already propagating, so it is dropped here."""
        try:
            self._raw.close()
        except OSError:
            pass
        finally:
            try:
                self.tmp.unlink(missing_ok=True)
            except OSError:
                pass


def _named(e: OSError, path: Path) -> OSError:
    """A write error (ENOSPC carries no file name) naming the shard it was writing."""
    return e if e.filename is not None else OSError(e.errno, e.strerror or str(e), str(path))


def file_sha256(path: Path, progress: Callable[[int], object] | None = None) -> str:
    """sha256 of a file read in 4 MiB chunks; ``progress(n)`` is called with each chunk's size."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return h.hexdigest()


def shard_ok(path: Path, record: ShardRecord, check_hash: bool = True) -> bool:
    """True when the file on disk is the one the record describes (size, and sha256 if asked)."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size != record.bytes:
        return False
    return not check_hash or file_sha256(path) == record.sha256


def iter_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream (key, {ext: bytes}) from one tar in file order, with webdataset's key rule.

    Raises ``CacheFormatError`` naming the file when it is missing, truncated or corrupt.
    """
    key: str | None = None
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r|") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                parsed = base_plus_ext(m.name)
                if parsed is None or parsed[0] is None:
                    raise CacheFormatError(f"{path}: unexpected member name {m.name!r}")
                k, ext = parsed
                if k != key and key is not None:
                    yield key, members
                    members = {}
                key = k
                if ext in members:
                    raise CacheFormatError(f"{path}: duplicate member {m.name!r}")
                members[ext] = tf.extractfile(m).read()
    except FileNotFoundError:
        raise CacheFormatError(f"shard missing: {path}") from None
    except (tarfile.TarError, EOFError, OSError) as e:
        raise CacheFormatError(f"shard corrupt or truncated: {path} ({e})") from None
    if key is not None:
        yield key, members
