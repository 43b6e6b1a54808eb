"""The preprocess inner loop: decode in DataLoader workers, run the models, write shards.

Batches never straddle shards, so a shard's bytes depend only on its own inputs (not on the
rank or rerun that wrote it). Writing happens on one background thread while the next batch
is computed; a shard is renamed into place and its progress record written only when complete.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.cache.schema import (
    CODEC_DIR,
    LATENTS,
    TEXT,
    CacheFormatError,
    ShardRecord,
    codec_files,
    encode_codec_params,
    encode_latent_sample,
    encode_teacher_sample,
    get_codec,
    load_npy,
)
from pipeline.cache.shards import ShardWriter, atomic_write_bytes, atomic_write_json, shard_name, shard_ok
from pipeline.cache.text import encode_text_sample
from pipeline.dist import DistInfo
from pipeline.encoders.teacher import Teacher, load_teacher
from pipeline.encoders.vae import encode_moments, load_vae
from pipeline.inputs.images import SkipImage
from pipeline.inputs.sources import Source

log = logging.getLogger(__name__)


class PreprocessError(RuntimeError):
    """The stage cannot (or must not) finish; the message says why and what to do."""


# ----------------------------------------------------------------------------------------------
# The resume journal: one progress record per finished shard
# ----------------------------------------------------------------------------------------------

def progress_path(plan, shard: int) -> Path:
    return plan.dir / "progress" / f"{shard_name(shard)}.json"


def done_record(plan, shard: int, verify: str) -> ShardRecord | None:
    """The shard's record if it was completed earlier and the file still matches it."""
    p = progress_path(plan, shard)
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
        rec = ShardRecord(**{**data, "skipped": tuple(tuple(x) for x in data["skipped"])})
    except (json.JSONDecodeError, TypeError, KeyError):
        return None
    if shard_ok(plan.dir / rec.name, rec, check_hash=verify == "sha256"):
        return rec
    log.warning("%s does not match its progress record (missing, truncated or corrupt): it will be rewritten",
                plan.dir / rec.name)
    return None


# ----------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Loaded:
    shard: int
    key: str
    label: int
    image: np.ndarray | None     # (R, R, 3) uint8, None when skipped
    reason: str = ""


class ItemDataset(Dataset):
    """Map-style view over (shard, item) pairs; decoding + crop run in the worker processes."""

    def __init__(self, source: Source, entries: list[tuple[int, int]], resolution: int, max_pixels: int):
        self.source, self.entries, self.resolution, self.max_pixels = source, entries, resolution, max_pixels

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> Loaded:
        shard, idx = self.entries[i]
        item = self.source.items[idx]
        try:
            return Loaded(shard, item.key, item.label, self.source.load(item, self.resolution, self.max_pixels))
        except SkipImage as e:
            return Loaded(shard, item.key, item.label, None, e.reason)


def shard_batches(entries: list[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Index batches over ``entries`` that never cross a shard boundary."""
    batches: list[list[int]] = []
    for i, (shard, _) in enumerate(entries):
        if not batches or len(batches[-1]) == batch_size or entries[batches[-1][0]][0] != shard:
            batches.append([])
        batches[-1].append(i)
    return batches


def _collate(batch: list[Loaded]) -> list[Loaded]:
    return batch


class _ShardSink:
    """One group's open shard writers. Its calls run on the group's own writer thread, in order,
    so per-sample encoding, hashing and disk writes overlap the next batch's model compute."""

    def __init__(self, plan, encode):
        self.plan, self.encode = plan, encode
        self.writers: dict[int, ShardWriter] = {}
        self.skipped: dict[int, list[tuple[str, str]]] = {}
        self.failed: set[int] = set()

    def add(self, shard: int, keys: list[str], arrays: tuple[np.ndarray, ...], skipped: list[tuple[str, str]]) -> None:
        w = self.writers.get(shard) or self.writers.setdefault(
            shard, ShardWriter(self.plan.dir / shard_name(shard), shard))
        try:
            for i, key in enumerate(keys):
                w.add(key, self.encode(*(a[i] for a in arrays)))
        except BaseException:
            self.failed.add(shard)  # the commit queued behind this write must not rename a partial shard
            raise
        self.skipped.setdefault(shard, []).extend(skipped)

    def commit(self, shard: int) -> None:
        if shard in self.failed:  # the add's error reaches the caller through its future; abort() drops the file
            return
        w = self.writers.pop(shard, None) or ShardWriter(self.plan.dir / shard_name(shard), shard)
        rec = w.commit(tuple(self.skipped.pop(shard, [])))
        atomic_write_json(self.plan.dir / "progress" / f"{shard_name(shard)}.json", rec.__dict__)

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()


def shard_sink(plan) -> _ShardSink:
    """One group's shard writers + progress records (preprocess, and `haste import` for imported latents)."""
    spec = plan.spec
    if plan.kind == LATENTS:
        return _ShardSink(plan, lambda label, m: encode_latent_sample(spec, int(label), m))
    if plan.kind == TEXT:  # per image: (K, L, D) encodings and the K captions (stages.preprocess_text)
        return _ShardSink(plan, lambda enc, captions: encode_text_sample(spec, enc, captions))
    inputs = get_codec(spec.codec).inputs  # the arrays after the features, in the order _compute gives them
    return _ShardSink(plan, lambda f, *arrays: encode_teacher_sample(spec, f, **dict(zip(inputs, arrays))))


def encode_shards(cfg, d: DistInfo, source: Source, plans: list, num_shards: int) -> None:
    """Write this rank's share of the shards that some pending group still lacks."""
    # Each rank verifies (sha256 by default) only its share of the earlier shards, then all ranks
    # share the verdicts: a resumed N-rank run reads the finished part of the cache once, not N times.
    mine = range(d.rank, num_shards, d.world_size)
    checked = {p.kind: [s for s in mine if done_record(p, s, cfg.resume_verify) is None] for p in plans}
    earlier = [s for s in range(num_shards) if any(progress_path(p, s).is_file() for p in plans)]
    if earlier:  # a resumed run; a fresh one has nothing to check and says nothing about it
        log.info("rank %d: checked %d of %d earlier shard(s)", d.rank, len(set(earlier) & set(mine)), len(earlier))
    need = _union_over_ranks(checked, d)  # a collective: every rank sees the same `need` before any writes
    todo = sorted(set().union(*need.values()))[d.rank::d.world_size]
    if not todo:
        return
    log.info("rank %d: %d shard(s) to write (%d in total are missing)", d.rank, len(todo), len(set().union(*need.values())))
    models = _load_models(cfg, d, plans)
    sinks = {p.kind: shard_sink(p) for p in plans}
    specs = {p.kind: p.spec for p in plans}
    entries = [(s, i) for s in todo for i in range(s * cfg.shard_size, min((s + 1) * cfg.shard_size, len(source.items)))]
    loader = DataLoader(ItemDataset(source, entries, cfg.resolution, cfg.max_pixels),
                        batch_sampler=shard_batches(entries, cfg.batch_size), num_workers=cfg.num_workers,
                        collate_fn=_collate, persistent_workers=False)
    last_of = {sh: i for i, (sh, _) in enumerate(entries)}  # position of each shard's last item
    pending: list[Future] = []
    pos = 0
    pools = {kind: ThreadPoolExecutor(max_workers=1) for kind in sinks}
    with tqdm(total=len(entries), unit="img", disable=not d.is_main, desc="preprocess") as bar:
        try:
            for batch in loader:
                shard = batch[0].shard
                work = _compute(cfg, models, batch, need, specs, shard)
                for kind, (keys, arrays, skipped) in work.items():
                    pending.append(pools[kind].submit(sinks[kind].add, shard, keys, arrays, skipped))
                pos += len(batch)
                if pos - 1 == last_of[shard]:
                    for kind in work:
                        pending.append(pools[kind].submit(sinks[kind].commit, shard))
                pending = _drain(pending, keep=4 * len(pools))
                if pos < len(entries):
                    bar.update(len(batch))
                else:  # the last step: close() draws the 100% line once the writes are done; an update
                    bar.n = pos  # here would draw it too, which a log (where \r is no erase) shows twice
            _drain(pending, keep=0)
        except BaseException:
            for f in pending:
                f.cancel()
            for pool in pools.values():
                pool.shutdown(wait=True)
            for sink in sinks.values():
                sink.abort()
            raise
        finally:
            for pool in pools.values():
                pool.shutdown(wait=True)


def _union_over_ranks(local: dict[str, list[int]], d: DistInfo) -> dict[str, list[int]]:
    if not d.distributed:
        return local
    parts: list = [None] * d.world_size
    torch.distributed.all_gather_object(parts, local)
    return {kind: sorted(s for part in parts for s in part[kind]) for kind in local}


def _drain(futures: list[Future], keep: int) -> list[Future]:
    """Wait until at most ``keep`` writes are in flight, re-raising any writer error."""
    while len(futures) > keep:
        futures.pop(0).result()
    return futures


def _load_models(cfg, d: DistInfo, plans: list) -> dict:
    models, identities = {}, {}
    kinds = {p.kind for p in plans}
    if LATENTS in kinds:
        models["vae"], identities["vae"] = load_vae(cfg.vae, seed=cfg.seed, device=d.device)
        identities["vae"].update(precision=cfg.vae_precision, stored_dtype=cfg.latent_dtype)
    if kinds - {LATENTS}:
        models["teacher"], identities["teacher"] = load_teacher(
            cfg.teacher, arch=cfg.teacher_arch, layers=cfg.teacher_layers, resolution=cfg.resolution,
            seed=cfg.seed, device=d.device, capture=get_codec(cfg.codec).inputs)
        identities["teacher"].update(precision=cfg.teacher_precision, feat_dtype=cfg.feat_dtype, codec=cfg.codec)
    for p in plans:
        keep = {k: v for k, v in identities.items() if (k == "vae") == (p.kind == LATENTS)}
        path = p.dir / "progress" / "models.json"
        if d.is_main or not path.exists():
            atomic_write_json(path, json.loads(json.dumps(keep)))
        if p.kind != LATENTS:
            write_codec_files(p, models["teacher"], d)
    return models


def write_codec_files(plan, teacher: Teacher, d: DistInfo) -> None:
    """The group-level arrays of the plan's codec (tokens-*: the q/k projections, stream-*: the
    blocks from the first aligned one on), renamed into
    ``<group>/codec/`` before this rank writes any shard; the manifest records their sha256.

    Every rank that writes shards makes sure they exist. A file already there (an interrupted
    run, another rank) is kept, never replaced: shards may have been encoded against it. It must
    equal what this run would write up to fp32 rounding (a different LAPACK may round the fixed
    basis differently), else the group is refused rather than silently mixed.
    """
    spec = plan.spec
    expected = codec_files(spec)
    if not expected:
        return
    files = encode_codec_params(spec, getattr(teacher, get_codec(spec.codec).teacher_arrays)())
    (plan.dir / CODEC_DIR).mkdir(exist_ok=True)
    for name, (dtype, shape) in expected.items():
        path = plan.dir / CODEC_DIR / name
        if path.exists():
            _check_same(path, files[name], dtype, tuple(shape), plan.dir)
        else:
            atomic_write_bytes(path, files[name])


def _check_same(path, data: bytes, dtype: str, shape: tuple[int, ...], gdir) -> None:
    new = load_npy(data, dtype=dtype, shape=shape, where="new")
    try:
        old = load_npy(path.read_bytes(), dtype=dtype, shape=shape, where=str(path))
        same = np.allclose(old, new, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(new).max())))
    except (CacheFormatError, OSError) as e:
        raise PreprocessError(f"{path} is unreadable ({e}); delete {gdir} and re-run `haste preprocess`") from None
    if not same:
        raise PreprocessError(f"{path} differs from this teacher's arrays (another teacher or code version, or "
                              f"damaged), and earlier shards were encoded against it: delete {gdir} and re-run "
                              "`haste preprocess`")


@torch.no_grad()
def _compute(cfg, models: dict, batch: list[Loaded], need: dict[str, list[int]], specs: dict, shard: int) -> dict:
    """Run the models this shard needs: {kind: (keys, arrays in stored dtypes, skipped)} to write.

    Casting to the stored dtypes happens on the device (same IEEE rounding as numpy), which
    halves the device-to-host copy and leaves the writer threads only serialisation.
    """
    ok = [b for b in batch if b.image is not None]
    skipped = [(b.key, b.reason) for b in batch if b.image is None]
    for key, reason in skipped:
        log.warning("skipping input %s: %s", key, reason)
    keys = [b.key for b in ok]
    images = torch.from_numpy(np.stack([b.image for b in ok])).permute(0, 3, 1, 2) if ok else None
    out: dict[str, tuple[list, tuple, list]] = {}
    if shard in need.get(LATENTS, []):
        arrays: tuple = ()
        if images is not None:
            moments = encode_moments(models["vae"], images, cfg.vae_precision)
            arrays = (np.array([b.label for b in ok]), _host(moments, specs[LATENTS].dtype))
        out[LATENTS] = (keys, arrays, skipped)
    for kind in [k for k in need if k != LATENTS and shard in need[k]]:
        arrays = ()
        if images is not None:
            spec = specs[kind]
            t = models["teacher"](images, cfg.teacher_precision)
            codec = get_codec(spec.codec)
            # the codec's inputs cast (or, tokens-int8, packed) on the device: only stored bytes cross
            arrays = (_host(t.feat, spec.feat_dtype), *(codec.on_device(getattr(t, n)).cpu().numpy()
                                                         for n in codec.inputs))
        out[kind] = (keys, arrays, skipped)
    return out


def _host(x: torch.Tensor, dtype: str) -> np.ndarray:
    return x.to(getattr(torch, dtype)).cpu().numpy()
