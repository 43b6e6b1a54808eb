"""Training batches from a cache: a deterministic, resumable, node- and worker-split stream.

Reader slot ``rank * W + w`` (W = num_workers) builds whole batches itself, so with PyTorch's
in-order round-robin over workers the rank's j-th batch is slot ``w = j % W``'s ``j // W``-th
batch. Resuming after ``b`` batches therefore only needs each slot to skip its own share, which
it does by manifest counts (whole shards) plus an offset into one shard's permutation: no bytes
are read to skip. A resumed DataLoader asks its worker 0 first, so DataLoader worker ``i`` plays
slot ``w = (i + b) % W``; the rank's batches then continue exactly where they stopped.

With ``verify`` (the default; ``data.verify_shards`` in training) a reader hashes the whole shard
file the first time it opens it and compares the manifest's sha256 before using a byte of it: the
loader runs far ahead of the step, so this costs the step nothing unless the loader is the bottleneck.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.cache.reader import (
    Cache,
    CacheMismatchError,
    index_shard,
    read_sample,
    sample_order,
    shard_order,
)
from pipeline.cache.schema import LATENTS, TEACHER, TEXT, CacheFormatError, ShardRecord, decode_members
from pipeline.cache.shards import file_sha256
from pipeline.cache.text import collate_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Position:
    """Where a slot's stream is: epoch, index into that epoch's slot shard list, sample offset."""

    epoch: int
    shard_pos: int
    offset: int


def slot_shards(seed: int, epoch: int, num_shards: int, slot: int, num_slots: int) -> list[int]:
    """Shards of one reader slot in one epoch (node split then worker split, open_clip style)."""
    return shard_order(seed, epoch, num_shards)[slot::num_slots]


def seek(counts: list[int], seed: int, slot: int, num_slots: int, skip: int) -> Position:
    """Position after skipping ``skip`` samples of a slot's infinite stream, from counts alone."""
    epoch = 0
    while True:
        shards = slot_shards(seed, epoch, len(counts), slot, num_slots)
        total = sum(counts[s] for s in shards)
        if total == 0:
            raise CacheMismatchError(f"reader slot {slot} gets no samples; use fewer workers/ranks or more shards")
        if skip < total:
            for pos, s in enumerate(shards):
                if skip < counts[s]:
                    return Position(epoch, pos, skip)
                skip -= counts[s]
        skip -= total
        epoch += 1


class CacheStream(IterableDataset):
    """Infinite stream of collated batches (dict of tensors) for one rank; ``with_text`` adds the text
    group's ragged caption encodings (``pipeline.cache.text.collate_text``)."""

    def __init__(self, cache: Cache, *, with_teacher: bool, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, start_batch: int = 0, shuffle: bool = True,
                 verify: bool = True, with_text: bool = False):
        if with_teacher and cache.teacher is None:
            raise CacheMismatchError("a teacher stream was asked for but the cache was opened without a teacher")
        if with_text and cache.text is None:
            raise CacheMismatchError("a text stream was asked for but the cache was opened without need_text=True")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size <= 0 or start_batch < 0:
            raise ValueError(f"batch_size must be > 0 and start_batch >= 0 (got {batch_size}, {start_batch})")
        num_slots = world_size * max(1, num_workers)
        if num_slots > cache.num_shards:
            raise CacheMismatchError(
                f"the cache has {cache.num_shards} shards but {world_size} rank(s) x {max(1, num_workers)} "
                f"worker(s) = {num_slots} readers; lower data.num_workers or preprocess with a smaller shard_size")
        self.cache, self.with_teacher, self.batch_size, self.seed = cache, with_teacher, batch_size, seed
        self.with_text = with_text
        self.rank, self.num_workers, self.num_slots = rank, max(1, num_workers), num_slots
        self.start_batch, self.shuffle, self.verify = start_batch, shuffle, verify
        self.counts = [s.count for s in cache.latents.shards]
        if rank == 0:
            log.info("data checks: %s; every shard's sample count and every sample's fields, dtypes and shapes are "
                     "checked as read; values are recomputed only by `haste cache verify`",
                     "each shard's sha256 is checked against its manifest when a reader first opens it" if verify
                     else "shard sha256 NOT checked (verify_shards off)")

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers = info.num_workers if info is not None else 1
        if workers != self.num_workers:
            raise ValueError(f"CacheStream was built for num_workers={self.num_workers} but is read by {workers} "
                             "worker(s); pass the same num_workers to make_loader")
        # DataLoader worker i yields the rank's batches start_batch + i, start_batch + i + W, ...
        worker = ((info.id if info is not None else 0) + self.start_batch) % self.num_workers
        slot = self.rank * self.num_workers + worker
        # Batches j < start_batch with j % W == worker were produced by this slot before.
        done = max(0, -(-(self.start_batch - worker) // self.num_workers))
        pos = seek(self.counts, self.seed, slot, self.num_slots, done * self.batch_size)
        buf: list[dict] = []
        for sample in self._samples(slot, pos):
            buf.append(sample)
            if len(buf) == self.batch_size:
                yield collate(buf)
                buf = []

    def _samples(self, slot: int, pos: Position) -> Iterator[dict]:
        epoch, shard_pos, offset = pos.epoch, pos.shard_pos, pos.offset
        while True:
            shards = slot_shards(self.seed, epoch, len(self.counts), slot, self.num_slots)
            if not any(self.counts[s] for s in shards):
                raise CacheMismatchError(f"reader slot {slot} gets no samples in epoch {epoch}; "
                                         "use fewer workers/ranks or more shards")
            for s in shards[shard_pos:]:
                order = sample_order(self.seed, epoch, s, self.counts[s], self.shuffle)
                yield from self._read_shard(s, order[offset:])
                offset = 0
            epoch, shard_pos = epoch + 1, 0

    def _read_shard(self, s: int, order: list[int]) -> Iterator[dict]:
        lat_path = self.cache.shard_path(LATENTS, s)
        groups = {TEACHER: self.cache.teacher, TEXT: self.cache.text}
        extra = [k for k, on in ((TEACHER, self.with_teacher), (TEXT, self.with_text)) if on]
        if self.verify:
            verify_shard(lat_path, self.cache.latents.shards[s])
            for k in extra:
                verify_shard(self.cache.shard_path(k, s), groups[k].shards[s])
        lat_index = _checked_index(lat_path, self.counts[s])
        paths = {k: self.cache.shard_path(k, s) for k in extra}
        indexes = {k: _checked_index(paths[k], self.counts[s]) for k in extra}
        for k in extra:
            for i, (a, b) in enumerate(zip(lat_index, indexes[k])):
                if a[0] != b[0]:
                    raise CacheFormatError(f"{paths[k]}: sample {i} is {b[0]!r} but {lat_path} has {a[0]!r}; "
                                           f"latents and {k} shards are out of step (re-run `haste preprocess`)")
        with ExitStack() as stack:
            lf = stack.enter_context(_open_shard(lat_path))
            handles = {k: stack.enter_context(_open_shard(paths[k])) for k in extra}
            for i in order:
                key = lat_index[i][0]
                out = decode_members(LATENTS, self.cache.latents.spec, read_sample(lat_path, lat_index[i], lf),
                                     where=f"{lat_path}:{key}")
                out["key"] = key
                for k in extra:
                    out.update(decode_members(k, groups[k].spec, read_sample(paths[k], indexes[k][i], handles[k]),
                                              where=f"{paths[k]}:{key}"))
                yield out


_verified: set[tuple[str, int, int, int]] = set()  # file versions this process has hashed


def verify_shard(path: Path, record: ShardRecord) -> None:
    """Raise ``CacheFormatError`` naming the shard unless its bytes hash to the manifest's sha256;
    each file version (path, inode, size, mtime) is hashed once per process."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CacheFormatError(f"shard missing: {path}") from None
    except OSError as e:
        raise CacheFormatError(f"shard unreadable: {path} ({e})") from None
    version = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if version in _verified:
        return
    if st.st_size < record.bytes:
        problem = f"shard truncated: {path} ({st.st_size} of the {record.bytes} bytes its manifest records)"
    elif st.st_size > record.bytes:
        problem = f"shard corrupt or replaced: {path} ({st.st_size} bytes, its manifest records {record.bytes})"
    else:
        try:
            same = file_sha256(path) == record.sha256
        except OSError as e:
            raise CacheFormatError(f"shard unreadable: {path} ({e})") from None
        problem = None if same else (f"shard corrupt or edited: {path} (its sha256 differs from its manifest "
                                     "record: the bytes changed after preprocessing)")
    if problem:
        raise CacheFormatError(f"{problem}. To repair it, delete {Path(path).parent / 'manifest.json'} and re-run "
                               "`haste preprocess` with the same config: it re-checks every shard and rewrites "
                               "those that differ")
    _verified.add(version)


def _checked_index(path: Path, count: int):
    index = index_shard(path)
    if len(index) != count:
        raise CacheFormatError(f"{path}: {len(index)} samples, manifest says {count} "
                               "(truncated or replaced shard; re-run `haste preprocess`)")
    return index


def _open_shard(path: Path):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise CacheFormatError(f"shard missing: {path}") from None
    except OSError as e:
        raise CacheFormatError(f"shard unreadable: {path} ({e})") from None


def collate(samples: list[dict]) -> dict:
    """Stack arrays into tensors (stored dtypes kept: fp16 stays fp16 until the device)."""
    out: dict = {"key": [s["key"] for s in samples],
                 "label": torch.tensor([s["label"] for s in samples], dtype=torch.long)}
    if "text" in samples[0]:  # ragged: K captions per image
        out.update(collate_text(samples))
    for name in samples[0]:
        if name not in out:
            out[name] = torch.from_numpy(np.stack([s[name] for s in samples]))
    return out


def make_loader(stream: CacheStream, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """DataLoader over a stream of ready batches (batch_size=None: workers batch themselves)."""
    if max(1, num_workers) != stream.num_workers:
        raise ValueError(f"make_loader(num_workers={num_workers}) but the stream was built for "
                         f"num_workers={stream.num_workers}; both must match for the node/worker split")
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=False, prefetch_factor=2 if num_workers > 0 else None)
