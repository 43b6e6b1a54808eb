"""Fixed cached samples read by offset: the termination probe's set, and a text model's preview captions.

The probe set is ``samples`` dataset indices drawn without replacement from a generator seeded by
(seed, a stream tag of its own), sorted: it depends on the seed and the cache's shard counts
only, so it is the same on every rank, after every resume and for ``haste train --probe-only``.
Rank r takes ``set[r::world]``. Members are read by offset through their own file handles
(``pipeline.cache.reader``), never through the training stream, whose position is untouched.
A text model's probe samples also carry their captions (the text group). The previews of a text
model read the captions of fixed samples the same way (``preview_samples``): by key, or the first
ones in dataset order.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate

import numpy as np
import torch

from pipeline.cache.loader import collate
from pipeline.cache.reader import Cache, CacheMismatchError, index_shard, read_sample
from pipeline.cache.schema import LATENTS, TEACHER, TEXT, CacheFormatError, decode_members

_STREAM = 0x9E0BE  # separates the probe set's draw from every other use of the seed


@dataclass(frozen=True)
class ProbeSample:
    index: int    # position in the whole dataset (shard order, then file order): names its RNG stream
    shard: int
    offset: int   # sample position inside the shard's tar


def probe_set(counts: Sequence[int], n: int, seed: int) -> list[ProbeSample]:
    """``n`` distinct samples of a cache with these per-shard counts, sorted by dataset index."""
    total = int(sum(counts))
    if n > total:
        raise CacheMismatchError(f"align.stop.samples={n} but the cache holds only {total} samples; "
                                 "lower align.stop.samples")
    picked = np.sort(np.random.default_rng([seed, _STREAM]).choice(total, size=n, replace=False))
    return samples_at(counts, picked.tolist())


def samples_at(counts: Sequence[int], indices: Sequence[int]) -> list[ProbeSample]:
    """The samples at these dataset indices (shard order, then file order)."""
    starts = list(accumulate(counts, initial=0))
    out = []
    for i in indices:
        s = bisect.bisect_right(starts, i) - 1
        out.append(ProbeSample(index=i, shard=s, offset=i - starts[s]))
    return out


def preview_samples(cache: Cache, keys: Sequence[str], count: int) -> list[ProbeSample]:
    """The samples named by ``keys`` (in that order), or without keys the first ``count`` of the cache."""
    counts = [s.count for s in cache.latents.shards]
    if not keys:
        return samples_at(counts, range(min(count, sum(counts))))
    starts, where = list(accumulate(counts, initial=0)), {}
    for s in range(len(counts)):  # shard indexes only, until every key is found
        if set(keys) <= set(where):
            break
        where.update((k, starts[s] + j) for j, (k, _) in enumerate(index_shard(cache.shard_path(LATENTS, s))))
    missing = [k for k in keys if k not in where]
    if missing:
        raise CacheMismatchError(f"config field 'sample_keys': {missing[:3]} not in the cache's latents group "
                                 f"{cache.latents.key} (keys are as `haste cache info` lists them)")
    return samples_at(counts, [where[k] for k in keys])


def rank_share(samples: Sequence[ProbeSample], rank: int, world: int) -> list[ProbeSample]:
    return list(samples[rank::world])


def read_batches(cache: Cache, samples: Sequence[ProbeSample], batch_size: int) -> Iterator[dict]:
    """Collated batches (as the training loader's: moments, label, teacher members, + the text group's
    captions when the cache was opened with it) of these samples."""
    if cache.teacher is None:
        raise CacheMismatchError("the probe needs the teacher targets, but the cache was opened without them")
    kinds = (LATENTS, TEACHER, TEXT) if cache.text is not None else (LATENTS, TEACHER)
    for i in range(0, len(samples), batch_size):
        yield collate([read_members(cache, s, kinds) for s in samples[i:i + batch_size]])


def read_members(cache: Cache, s: ProbeSample, kinds: Sequence[str]) -> dict:
    """One sample's decoded members of the groups ``kinds`` (checked to hold the same key), plus "key"."""
    manifests = {LATENTS: cache.latents, TEACHER: cache.teacher, TEXT: cache.text}
    out: dict = {}
    for kind, manifest in ((k, manifests[k]) for k in kinds):
        path = cache.shard_path(kind, s.shard)
        index = index_shard(path)
        if len(index) != manifest.shards[s.shard].count:
            raise CacheFormatError(f"{path}: {len(index)} samples, manifest says {manifest.shards[s.shard].count} "
                                   "(truncated or replaced shard; re-run `haste preprocess`)")
        key = index[s.offset][0]
        if out and out["key"] != key:
            raise CacheFormatError(f"{path}: sample {s.offset} is {key!r} but the {kinds[0]} shard has {out['key']!r}")
        out.update(decode_members(kind, manifest.spec, read_sample(path, index[s.offset]), where=f"{path}:{key}"))
        out["key"] = key
    return out


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    """CPU generator of one probe sample at one probe: its posterior draw and noises at every t.

    Seeded by (seed, probe step, dataset index) only, never the training RNG: a probe changes no
    training randomness, and its inputs do not depend on the world size or on the probe batch size.
    """
    digest = hashlib.sha256(f"{seed}/probe/{step}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
