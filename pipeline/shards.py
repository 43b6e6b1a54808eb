"""Shard files: deterministic atomic tar writing, verification, streaming reads, JSON I/O.

A shard is written under a temporary name and renamed only when complete, so a killed run
never leaves a tar that looks finished. Tar headers are fixed (mtime 0, uid 0, mode 0444) so
the same inputs give byte-identical shards, whichever rank or rerun wrote them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from webdataset.tariterators import base_plus_ext

from pipeline.schema import CacheFormatError, ShardRecord


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


class _HashingFile(io.RawIOBase):
    """File wrapper that hashes and counts everything written through it."""

    def __init__(self, f: io.BufferedWriter):
        self.f, self.sha, self.nbytes = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        self.sha.update(b)
        self.nbytes += len(b)
        return self.f.write(b)


class ShardWriter:
    """Write one shard as ``.<name>.tmp<pid>``; ``commit()`` renames it and returns its record."""

    def __init__(self, path: Path, index: int):
        self.path, self.index = Path(path), index
        self.tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        for stale in self.path.parent.glob(f".{self.path.name}.tmp*"):  # left by a killed run
            stale.unlink(missing_ok=True)
        self._raw = open(self.tmp, "wb")
        self._hf = _HashingFile(self._raw)
        self._tar = tarfile.open(fileobj=self._hf, mode="w|", format=tarfile.GNU_FORMAT)
        self.keys: list[str] = []

    def add(self, key: str, members: dict[str, bytes]) -> None:
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.keys.append(key)

    def commit(self, skipped: tuple[tuple[str, str], ...] = ()) -> ShardRecord:
        self._tar.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        os.replace(self.tmp, self.path)
        return ShardRecord(index=self.index, name=self.path.name, count=len(self.keys), bytes=self._hf.nbytes,
                           sha256=self._hf.sha.hexdigest(), first_key=self.keys[0] if self.keys else None,
                           last_key=self.keys[-1] if self.keys else None, skipped=skipped)

    def abort(self) -> None:
        """Drop the partial file; never raises (it runs while another error propagates)."""
        try:
            try:  # close tarfile's stream first, or its __del__ later writes into the closed file
                self._tar.close()
            except Exception:  # noqa: BLE001 (best effort: the file is deleted anyway)
                pass
            self._raw.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
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
