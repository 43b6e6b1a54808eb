"""Training batches from a cache: a deterministic, resumable, node- and worker-split stream.

Each DataLoader worker owns reader slot ``rank * num_workers + worker`` and builds whole
batches itself, so with PyTorch's in-order round-robin over workers the rank's j-th batch is
worker ``j % W``'s ``j // W``-th batch. Resuming after ``b`` batches therefore only needs each
worker to skip its own share, which it does by manifest counts (whole shards) plus an offset
into one shard's permutation: no bytes are read to skip.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.cache import Cache, CacheMismatchError, index_shard, read_sample, sample_order, shard_order
from pipeline.schema import LATENTS, TEACHER, CacheFormatError, decode_members


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
    """Infinite stream of collated batches (dict of tensors) for one rank."""

    def __init__(self, cache: Cache, *, with_teacher: bool, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, start_batch: int = 0, shuffle: bool = True):
        if with_teacher and cache.teacher is None:
            raise CacheMismatchError("a teacher stream was asked for but the cache was opened without a teacher")
        num_slots = world_size * max(1, num_workers)
        if num_slots > cache.num_shards:
            raise CacheMismatchError(
                f"the cache has {cache.num_shards} shards but {world_size} rank(s) x {max(1, num_workers)} "
                f"worker(s) = {num_slots} readers; lower data.num_workers or preprocess with a smaller shard_size")
        self.cache, self.with_teacher, self.batch_size, self.seed = cache, with_teacher, batch_size, seed
        self.rank, self.num_workers, self.num_slots = rank, max(1, num_workers), num_slots
        self.start_batch, self.shuffle = start_batch, shuffle
        self.counts = [s.count for s in cache.latents.shards]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        slot = self.rank * self.num_workers + worker
        # Batches j < start_batch with j % W == worker were produced by this worker before.
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
            for s in shards[shard_pos:]:
                order = sample_order(self.seed, epoch, s, self.counts[s], self.shuffle)
                yield from self._read_shard(s, order[offset:])
                offset = 0
            epoch, shard_pos = epoch + 1, 0

    def _read_shard(self, s: int, order: list[int]) -> Iterator[dict]:
        lat_path = self.cache.shard_path(LATENTS, s)
        lat_index = index_shard(lat_path)
        if len(lat_index) != self.counts[s]:
            raise CacheFormatError(f"{lat_path}: {len(lat_index)} samples, manifest says {self.counts[s]}")
        t_path = self.cache.shard_path(TEACHER, s) if self.with_teacher else None
        t_index = index_shard(t_path) if t_path is not None else None
        for i in order:
            key = lat_index[i][0]
            out = decode_members(LATENTS, self.cache.latents.spec, read_sample(lat_path, lat_index[i]),
                                 where=f"{lat_path}:{key}")
            out["key"] = key
            if t_index is not None:
                if i >= len(t_index) or t_index[i][0] != key:
                    raise CacheFormatError(f"{t_path}: sample {i} is not {key!r}; latents and teacher out of step")
                out.update(decode_members(TEACHER, self.cache.teacher.spec, read_sample(t_path, t_index[i]),
                                          where=f"{t_path}:{key}"))
            yield out


def collate(samples: list[dict]) -> dict:
    """Stack arrays into tensors (stored dtypes kept: fp16 stays fp16 until the device)."""
    out: dict = {"key": [s["key"] for s in samples],
                 "label": torch.tensor([s["label"] for s in samples], dtype=torch.long)}
    for name in samples[0]:
        if name not in out:
            out[name] = torch.from_numpy(np.stack([s[name] for s in samples]))
    return out


def make_loader(stream: CacheStream, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """DataLoader over a stream of ready batches (batch_size=None: workers batch themselves)."""
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=False, prefetch_factor=2 if num_workers > 0 else None)
