"""Tests for the cache reader (pipeline/cache/reader.py) and the training stream (pipeline/cache/loader.py).

Every test that changes a cache works on a copy (``cache_copy``); the session ``demo_cache``
(48 samples, 6 shards of 8, both groups) is never modified.
"""

from __future__ import annotations

import builtins
import dataclasses
import io
import itertools
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache import loader as loader_mod
from pipeline.cache import reader as cache_mod
from pipeline.cache.loader import CacheStream, Position, collate, make_loader, seek, slot_shards
from pipeline.cache.reader import (
    CacheMismatchError,
    Requirements,
    check_cache,
    index_shard,
    open_cache,
    sample_order,
    shard_order,
)
from pipeline.cache.schema import LATENTS, TEACHER, CacheFormatError
from pipeline.cache.shards import ShardWriter, iter_samples

NUM_SHARDS, SHARD_SIZE, NUM_SAMPLES = 6, 8, 48


# ----------------------------------------------------------------------------------------------
# Helpers and fixtures
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def cache_copy(demo_cache: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "cache"
    shutil.copytree(demo_cache, dst)
    return dst


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


@pytest.fixture(scope="module")
def ref(demo_cache: Path) -> dict:
    """Independent reference: every sample of both groups read with the streaming tar reader."""
    c = open_cache(demo_cache)
    samples, shard_keys = {}, []
    for s in range(c.num_shards):
        lat = list(iter_samples(c.shard_path(LATENTS, s)))
        tea = list(iter_samples(c.shard_path(TEACHER, s)))
        assert [k for k, _ in lat] == [k for k, _ in tea]
        shard_keys.append([k for k, _ in lat])
        for (key, lm), (_, tm) in zip(lat, tea):
            samples[key] = {"shard": s, "label": int(lm["cls"].decode()), "moments": npy(lm["moments.npy"]),
                            **{ext.removesuffix(".npy"): npy(b) for ext, b in tm.items()}}
    assert len(samples) == NUM_SAMPLES
    return {"samples": samples, "shard_keys": shard_keys}


def take(iterable, n: int) -> list:
    it = iter(iterable)
    out = list(itertools.islice(it, n))
    del it  # shuts DataLoader workers down
    return out


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        assert x["key"] == y["key"]
        for name in x:
            if name != "key":
                assert x[name].dtype == y[name].dtype and torch.equal(x[name], y[name]), name


def flat_keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


def stream(c, **kw) -> CacheStream:
    kw = {"with_teacher": c.teacher is not None, "batch_size": 8, "seed": 0, **kw}
    return CacheStream(c, **kw)


def teacher_shard(root: Path, s: int) -> Path:
    return open_cache(root).shard_path(TEACHER, s)


def latents_shard(root: Path, s: int) -> Path:
    return open_cache(root, need_teacher=False).shard_path(LATENTS, s)


def rewrite_shard(path: Path, index: int, edit) -> None:
    samples = edit(list(iter_samples(path)))
    w = ShardWriter(path, index)
    for key, members in samples:
        w.add(key, members)
    w.commit()


def one_epoch(c, **kw) -> list[dict]:
    s = stream(c, **kw)
    return take(s, NUM_SAMPLES // s.batch_size)


# ----------------------------------------------------------------------------------------------
# open_cache
# ----------------------------------------------------------------------------------------------

def test_open_cache_default_is_newest_indexed_pair(demo_cache: Path) -> None:
    run = json.loads((demo_cache / "index.json").read_text())["runs"][-1]
    c = open_cache(demo_cache)
    assert (c.latents.key, c.teacher.key) == (run["latents"], run["teacher"])
    assert c.num_shards == NUM_SHARDS and c.latents.num_samples == c.teacher.num_samples == NUM_SAMPLES
    assert c.shard_path(TEACHER, 2) == demo_cache / TEACHER / run["teacher"] / "shard-000002.tar"


def test_open_cache_newest_pair_and_explicit_keys(cache_copy: Path) -> None:
    from conftest import tiny_preprocess_config

    from stages.preprocess import run

    first = open_cache(cache_copy)
    run(tiny_preprocess_config(cache_copy, codec="logits-fp16", teacher_layers=(10, 11)))
    newest = open_cache(cache_copy)
    assert newest.latents.key == first.latents.key  # the codec change reused the latents
    assert newest.teacher.key != first.teacher.key
    assert newest.teacher.spec.codec == "logits-fp16" and newest.teacher.spec.layers == (10, 11)

    old = open_cache(cache_copy, teacher=first.teacher.key)
    assert old.teacher.key == first.teacher.key and old.teacher.spec.codec == "qk-fp16"
    both = open_cache(cache_copy, latents=first.latents.key, teacher=first.teacher.key)
    assert (both.latents.key, both.teacher.key) == (first.latents.key, first.teacher.key)
    lat_only = open_cache(cache_copy, latents=first.latents.key, need_teacher=False)
    assert lat_only.teacher is None and lat_only.latents.key == first.latents.key

    # The two codecs decode to the same attention logits for the same keys (fp16 rounding apart).
    b_qk = take(stream(old, shuffle=False), 1)[0]
    b_lg = take(stream(newest, shuffle=False), 1)[0]
    assert b_qk["key"] == b_lg["key"] and set(b_lg) == {"key", "label", "moments", "feat", "logits"}
    torch.testing.assert_close(old.teacher_logits(b_qk)[:, 2:], newest.teacher_logits(b_lg), rtol=2e-3, atol=2e-3)

    # A newer latents-only run (teacher=none) for the same latents must not hide the newest pair.
    index = json.loads((cache_copy / "index.json").read_text())
    index["runs"].append({"latents": first.latents.key, "teacher": None})
    (cache_copy / "index.json").write_text(json.dumps(index))
    assert open_cache(cache_copy).teacher.key == newest.teacher.key
    assert open_cache(cache_copy, need_teacher=False).teacher is None

    # An explicit teacher key selects its run's latents in both phases (need_teacher True and False).
    assert open_cache(cache_copy, teacher=first.teacher.key, need_teacher=False).latents.key == first.latents.key

    with pytest.raises(CacheFormatError, match="0123456789abcdef"):
        open_cache(cache_copy, latents="0123456789abcdef")
    with pytest.raises((CacheFormatError, CacheMismatchError), match="fedcba9876543210"):
        open_cache(cache_copy, teacher="fedcba9876543210")


def test_latents_only_index_needs_teacher_message(cache_copy: Path) -> None:
    lat = open_cache(cache_copy).latents.key
    shutil.rmtree(cache_copy / TEACHER)
    index = json.loads((cache_copy / "index.json").read_text())
    index["runs"] = [{"latents": lat, "teacher": None}]
    (cache_copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(CacheMismatchError, match="no teacher group"):
        open_cache(cache_copy)
    assert open_cache(cache_copy, need_teacher=False).latents.key == lat


def test_newer_latents_only_run_is_not_silently_skipped(cache_copy: Path) -> None:
    """Phase I must not train on an older pair whose latents differ from what Phase II would reopen."""
    c = open_cache(cache_copy)
    other = "00000000000000aa"
    shutil.copytree(cache_copy / LATENTS / c.latents.key, cache_copy / LATENTS / other)
    index = json.loads((cache_copy / "index.json").read_text())
    index["runs"].append({"latents": other, "teacher": None})
    (cache_copy / "index.json").write_text(json.dumps(index))
    with pytest.raises(CacheFormatError, match=f"describes latents group {c.latents.key}"):
        open_cache(cache_copy, need_teacher=False)  # a copied dir whose manifest names another group
    manifest = cache_copy / LATENTS / other / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "key": other}))
    assert open_cache(cache_copy, need_teacher=False).latents.key == other
    with pytest.raises(CacheMismatchError, match=f"no teacher group recorded for latents group {other}"):
        open_cache(cache_copy)
    pinned = open_cache(cache_copy, latents=c.latents.key)
    assert pinned.teacher.key == c.teacher.key
    assert open_cache(cache_copy, teacher=c.teacher.key, need_teacher=False).latents.key == c.latents.key


def test_teacher_deleted_latents_only_still_works(cache_copy: Path, ref: dict) -> None:
    t_key = open_cache(cache_copy).teacher.key
    shutil.rmtree(cache_copy / TEACHER)

    c = open_cache(cache_copy, need_teacher=False)
    assert c.teacher is None
    batches = one_epoch(c)
    assert all(set(b) == {"key", "label", "moments"} for b in batches)
    assert sorted(flat_keys(batches)) == sorted(ref["samples"])
    with pytest.raises(CacheMismatchError, match="teacher"):
        CacheStream(c, with_teacher=True, batch_size=8, seed=0)

    with pytest.raises(CacheMismatchError) as e:
        open_cache(cache_copy)
    msg = str(e.value)
    assert str(cache_copy / TEACHER / t_key) in msg and "haste preprocess" in msg


def test_cache_not_found(tmp_path: Path) -> None:
    with pytest.raises(CacheFormatError, match=str(tmp_path / "nope")):
        open_cache(tmp_path / "nope")
    with pytest.raises(CacheFormatError, match="index.json"):
        open_cache(tmp_path)


# ----------------------------------------------------------------------------------------------
# check_cache
# ----------------------------------------------------------------------------------------------

FITS = Requirements(latent_size=8, latent_channels=4, num_classes=4, teacher_layers=(8, 9, 10, 11),
                    teacher_heads=tuple(range(12)), num_tokens=16, feat_dim=96, need_features=True,
                    need_attention=True)


def test_check_cache_fitting_config_passes(demo_cache: Path) -> None:
    c = open_cache(demo_cache)
    check_cache(c, FITS)
    check_cache(c, dataclasses.replace(FITS, num_classes=1000))  # a model with more classes is fine
    check_cache(c, Requirements())
    check_cache(open_cache(demo_cache, need_teacher=False),
                Requirements(latent_size=8, latent_channels=4, num_classes=4))


@pytest.mark.parametrize("change, words", [
    ({"latent_size": 16}, "latent size"),
    ({"latent_channels": 8}, "latent channels"),
    ({"num_classes": 2}, "num_classes"),
    ({"teacher_layers": (7, 8)}, "teacher layers [7]"),
    ({"teacher_heads": (0, 12)}, "teacher heads [12]"),
    ({"teacher_heads": (-1,)}, "teacher heads [-1]"),
    ({"num_tokens": 256}, "patch tokens"),
    ({"feat_dim": 768}, "feature dim"),
])
def test_check_cache_mismatch_names_field(demo_cache: Path, change: dict, words: str) -> None:
    c = open_cache(demo_cache)
    with pytest.raises(CacheMismatchError) as e:
        check_cache(c, dataclasses.replace(FITS, **change))
    assert words in str(e.value) and str(demo_cache) in str(e.value)


def test_check_cache_codec_none_and_no_teacher(demo_cache: Path) -> None:
    c = open_cache(demo_cache)
    spec = dataclasses.replace(c.teacher.spec, codec="none")
    no_attn = dataclasses.replace(c, teacher=dataclasses.replace(c.teacher, spec=spec))
    with pytest.raises(CacheMismatchError, match="codec none"):
        check_cache(no_attn, FITS)
    check_cache(no_attn, dataclasses.replace(FITS, need_attention=False))  # REPA-only is fine

    lat_only = open_cache(demo_cache, need_teacher=False)
    for req in (FITS, Requirements(need_features=True), Requirements(need_attention=True)):
        with pytest.raises(CacheMismatchError, match="teacher group"):
            check_cache(lat_only, req)


def test_check_cache_lists_every_problem(demo_cache: Path) -> None:
    with pytest.raises(CacheMismatchError) as e:
        check_cache(open_cache(demo_cache), dataclasses.replace(FITS, latent_size=16, num_tokens=4, feat_dim=1))
    assert all(w in str(e.value) for w in ("latent size", "patch tokens", "feature dim"))


# ----------------------------------------------------------------------------------------------
# Lockstep reading and bad shards
# ----------------------------------------------------------------------------------------------

def test_lockstep_batches_match_reference(demo_cache: Path, ref: dict) -> None:
    c = open_cache(demo_cache)
    batches = one_epoch(c, batch_size=8, seed=3)
    assert sorted(flat_keys(batches)) == sorted(ref["samples"])
    for b in batches:
        assert set(b) == {"key", "label", "moments", "feat", "q", "k"}
        for i, key in enumerate(b["key"]):
            r = ref["samples"][key]
            assert int(b["label"][i]) == r["label"]
            for name in ("moments", "feat", "q", "k"):
                np.testing.assert_array_equal(b[name][i].numpy(), r[name], err_msg=f"{key} {name}")


@pytest.mark.parametrize("edit", ["swap", "rename", "drop"])
def test_teacher_out_of_step_names_shard(cache_copy: Path, edit: str) -> None:
    path = teacher_shard(cache_copy, 2)

    def tamper(samples):
        if edit == "swap":
            samples[3], samples[4] = samples[4], samples[3]
        elif edit == "rename":
            samples[5] = ("class_000/not_a_real_key", samples[5][1])
        else:
            del samples[6]
        return samples

    rewrite_shard(path, 2, tamper)
    with pytest.raises(CacheFormatError) as e:
        one_epoch(open_cache(cache_copy))
    assert str(path) in str(e.value)


def test_shard_rewritten_in_place_is_reindexed(cache_copy: Path) -> None:
    """The shard index cache must not serve stale offsets after a shard file was replaced."""
    c = open_cache(cache_copy)
    one_epoch(c)  # indexes every shard
    path = c.shard_path(TEACHER, 1)

    def tamper(samples):
        samples[0], samples[7] = samples[7], samples[0]
        return samples

    rewrite_shard(path, 1, tamper)
    with pytest.raises(CacheFormatError, match=str(path)):
        one_epoch(open_cache(cache_copy))


@pytest.mark.parametrize("verify", [True, False])  # found by the sha256 check, else by the tar index
@pytest.mark.parametrize("kind", [LATENTS, TEACHER])
@pytest.mark.parametrize("keep", ["half", "first_member", "header_only", "empty", "garbled_header"])
def test_truncated_shard_names_path(cache_copy: Path, kind: str, keep: str, verify: bool) -> None:
    c = open_cache(cache_copy)
    path = c.shard_path(kind, 4)
    data = path.read_bytes()
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    if keep == "garbled_header":  # a header in the middle overwritten: tarfile would just stop there
        at = members[5].offset
        path.write_bytes(data[:at] + b"\x7fjunk" * 64 + data[at + 512:])
    else:
        cut = {"half": len(data) // 2, "first_member": 512 + members[0].size // 2, "header_only": 512,
               "empty": 0}[keep]
        path.write_bytes(data[:cut])
    with pytest.raises(CacheFormatError) as e:
        one_epoch(c, with_teacher=True, verify=verify)
    msg = str(e.value)
    assert str(path) in msg
    words = msg.replace(str(path.parents[2]), "")  # the tmp dir name contains "truncated" itself
    assert "truncated" in words or "corrupt" in words


def test_teacher_manifest_with_other_shard_count_is_refused(cache_copy: Path) -> None:
    t_dir = open_cache(cache_copy).shard_path(TEACHER, 0).parent
    m = json.loads((t_dir / "manifest.json").read_text())
    m["shards"] = m["shards"][:-1]
    (t_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheMismatchError, match="shards"):
        open_cache(cache_copy)
    open_cache(cache_copy, need_teacher=False)  # the latents group alone is fine


@pytest.mark.parametrize("kind", [LATENTS, TEACHER])
def test_missing_shard_names_path(cache_copy: Path, kind: str) -> None:
    c = open_cache(cache_copy)
    path = c.shard_path(kind, 3)
    path.unlink()
    with pytest.raises(CacheFormatError) as e:
        one_epoch(c, with_teacher=True)
    assert str(path) in str(e.value) and "missing" in str(e.value).replace(str(path), "")


def test_shard_deleted_after_indexing_names_path(cache_copy: Path) -> None:
    c = open_cache(cache_copy)
    path = c.shard_path(LATENTS, 0)
    index_shard(path)
    path.unlink()
    with pytest.raises(CacheFormatError, match=str(path)):
        one_epoch(c)


# ----------------------------------------------------------------------------------------------
# Node / worker split and order
# ----------------------------------------------------------------------------------------------

def test_split_two_ranks_two_workers_covers_epoch_once(demo_cache: Path, ref: dict) -> None:
    c = open_cache(demo_cache)
    counts = [s.count for s in c.latents.shards]
    world, workers, bs, seed = 2, 2, 4, 5
    seen: dict[int, list[str]] = {}
    for rank in range(world):
        s = CacheStream(c, with_teacher=True, batch_size=bs, seed=seed, rank=rank, world_size=world,
                        num_workers=workers)
        per_worker = [sum(counts[i] for i in slot_shards(seed, 0, len(counts), rank * workers + w, world * workers))
                      // bs for w in range(workers)]
        got = take(make_loader(s, workers), workers * max(per_worker))
        for w in range(workers):
            mine = got[w::workers][:per_worker[w]]
            slot = rank * workers + w
            seen[slot] = flat_keys(mine)
            shards = slot_shards(seed, 0, len(counts), slot, world * workers)
            assert {ref["samples"][k]["shard"] for k in seen[slot]} == set(shards)
            for b in mine:
                for i, key in enumerate(b["key"]):
                    np.testing.assert_array_equal(b["feat"][i].numpy(), ref["samples"][key]["feat"])
    all_keys = [k for keys in seen.values() for k in keys]
    assert len(all_keys) == NUM_SAMPLES and set(all_keys) == set(ref["samples"])


def test_stream_order_follows_documented_permutations(demo_cache: Path, ref: dict) -> None:
    """Slot shards = shard_order[slot::slots]; samples inside a shard follow sample_order."""
    c = open_cache(demo_cache, need_teacher=False)
    counts = [s.count for s in c.latents.shards]
    seed, slot, slots = 7, 1, 3
    expect = []
    for epoch in range(3):
        for s in slot_shards(seed, epoch, NUM_SHARDS, slot, slots):
            expect += [ref["shard_keys"][s][i] for i in sample_order(seed, epoch, s, counts[s])]
    st = CacheStream(c, with_teacher=False, batch_size=4, seed=seed, rank=1, world_size=3)
    assert flat_keys(take(st, len(expect) // 4)) == expect
    plain = CacheStream(c, with_teacher=False, batch_size=4, seed=seed, shuffle=False)
    first = shard_order(seed, 0, NUM_SHARDS)[0]
    assert flat_keys(take(plain, 2)) == ref["shard_keys"][first]


def test_order_deterministic_per_seed_and_epoch(demo_cache: Path) -> None:
    c = open_cache(demo_cache, need_teacher=False)
    per_epoch = NUM_SAMPLES // 4

    def two_epochs(seed):
        keys = flat_keys(take(CacheStream(c, with_teacher=False, batch_size=4, seed=seed), 2 * per_epoch))
        return keys[:NUM_SAMPLES], keys[NUM_SAMPLES:]

    e0, e1 = two_epochs(0)
    assert (e0, e1) == two_epochs(0)
    assert sorted(e0) == sorted(e1) and len(set(e0)) == NUM_SAMPLES
    assert e0 != e1
    assert two_epochs(1)[0] != e0
    assert shard_order(0, 0, NUM_SHARDS) == shard_order(0, 0, NUM_SHARDS) != shard_order(0, 1, NUM_SHARDS)


def test_too_many_readers(demo_cache: Path) -> None:
    c = open_cache(demo_cache)
    for world, workers in ((2, 4), (7, 0), (1, 7)):
        with pytest.raises(CacheMismatchError, match="6 shards"):
            CacheStream(c, with_teacher=True, batch_size=4, seed=0, world_size=world, num_workers=workers)
    CacheStream(c, with_teacher=True, batch_size=4, seed=0, world_size=3, num_workers=2)  # 6 readers fit
    with pytest.raises(ValueError, match="rank"):
        CacheStream(c, with_teacher=True, batch_size=4, seed=0, rank=2, world_size=2)


def test_loader_workers_must_match_stream(demo_cache: Path) -> None:
    c = open_cache(demo_cache, need_teacher=False)
    s = CacheStream(c, with_teacher=False, batch_size=4, seed=0, num_workers=2)
    with pytest.raises(ValueError, match="num_workers"):
        make_loader(s, 3)
    with pytest.raises(ValueError, match="num_workers"):
        take(s, 1)  # iterated in-process, worker 1's slot would silently never be read
    make_loader(CacheStream(c, with_teacher=False, batch_size=4, seed=0), 0)


# ----------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------

def test_resume_in_process_equals_uninterrupted(demo_cache: Path) -> None:
    c = open_cache(demo_cache)
    kw = dict(with_teacher=True, batch_size=5, seed=11)  # 5 does not divide 8 or 48: batches straddle
    total = 22                                           # shards and epochs (48 / 5 = 9.6 per epoch)
    full = take(CacheStream(c, **kw), total)
    for start in (0, 1, 3, 7, 9, 10, 19):
        assert_batches_equal(take(CacheStream(c, start_batch=start, **kw), total - start), full[start:])
    # A second rank of a 2-rank run resumes the same way.
    kw2 = dict(kw, rank=1, world_size=2)
    full2 = take(CacheStream(c, **kw2), 12)
    for start in (3, 5, 10):
        assert_batches_equal(take(CacheStream(c, start_batch=start, **kw2), 12 - start), full2[start:])


def test_resume_through_dataloader_workers(demo_cache: Path) -> None:
    c = open_cache(demo_cache)
    kw = dict(with_teacher=True, batch_size=5, seed=2, num_workers=2)  # 24 samples per slot-epoch
    total = 13
    full = take(make_loader(CacheStream(c, **kw), 2), total)
    for start in (1, 3, 7, 10):
        got = take(make_loader(CacheStream(c, start_batch=start, **kw), 2), total - start)
        assert_batches_equal(got, full[start:])


def _walk(counts: list[int], seed: int, slot: int, slots: int, epochs: int) -> list[Position]:
    out = []
    for epoch in range(epochs):
        for pos, s in enumerate(slot_shards(seed, epoch, len(counts), slot, slots)):
            out += [Position(epoch, pos, off) for off in range(counts[s])]
    return out


@pytest.mark.parametrize("counts, slots", [([8] * 6, 1), ([8] * 6, 4), ([3, 0, 5, 8, 1, 7], 2),
                                           ([2, 9, 4], 3), ([5], 1)])
def test_seek_matches_brute_force(counts: list[int], slots: int) -> None:
    for seed in (0, 3):
        for slot in range(slots):
            ref_pos = _walk(counts, seed, slot, slots, epochs=4)
            for skip, expect in enumerate(ref_pos):
                assert seek(counts, seed, slot, slots, skip) == expect, (seed, slot, skip)


def test_seek_empty_slot_raises() -> None:
    with pytest.raises(CacheMismatchError, match="no samples"):
        seek([0, 0, 0], 0, 0, 1, 0)
    with pytest.raises(CacheMismatchError, match="no samples"):
        for slot in range(3):
            seek([0, 0, 5], 0, slot, 3, 0)


# ----------------------------------------------------------------------------------------------
# Latents-only streams never touch teacher bytes
# ----------------------------------------------------------------------------------------------

def test_latents_only_stream_never_opens_teacher(demo_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []

    def spy(fn):
        def wrapped(path, *a, **k):
            opened.append(str(path))
            return fn(path, *a, **k)
        return wrapped

    monkeypatch.setattr(builtins, "open", spy(builtins.open))
    monkeypatch.setattr(tarfile, "bltn_open", spy(tarfile.bltn_open))
    monkeypatch.setattr(loader_mod, "index_shard", spy(loader_mod.index_shard))
    monkeypatch.setattr(loader_mod, "read_sample", spy(loader_mod.read_sample))
    monkeypatch.setattr(cache_mod, "index_shard", spy(cache_mod.index_shard))

    for need_teacher in (True, False):
        c = open_cache(demo_cache, need_teacher=need_teacher)
        batches = take(CacheStream(c, with_teacher=False, batch_size=8, seed=4), 7)  # > 1 epoch
        assert all(set(b) == {"key", "label", "moments"} for b in batches)
    shard_reads = [p for p in opened if p.endswith(".tar")]
    assert any(f"/{LATENTS}/" in p for p in shard_reads)
    assert not [p for p in shard_reads if f"/{TEACHER}/" in p]


# ----------------------------------------------------------------------------------------------
# collate and teacher logits
# ----------------------------------------------------------------------------------------------

def test_collate_keeps_stored_dtypes() -> None:
    samples = [{"key": f"k{i}", "label": i, "moments": np.full((8, 2, 2), i, np.float16),
                "feat": np.zeros((4, 3), np.float32)} for i in range(3)]
    b = collate(samples)
    assert b["key"] == ["k0", "k1", "k2"]
    assert b["label"].dtype == torch.int64 and b["label"].tolist() == [0, 1, 2]
    assert b["moments"].dtype == torch.float16 and b["moments"].shape == (3, 8, 2, 2)
    assert b["feat"].dtype == torch.float32 and b["moments"][2].eq(2).all()


def test_stream_batch_dtypes_and_teacher_logits(demo_cache: Path) -> None:
    c = open_cache(demo_cache)
    b = take(stream(c, batch_size=6), 1)[0]
    ts = c.teacher.spec
    assert isinstance(b["key"], list) and len(b["key"]) == 6
    assert b["label"].dtype == torch.int64
    assert b["moments"].dtype == torch.float16 and b["moments"].shape == (6, 8, 8, 8)
    assert b["feat"].dtype == torch.float16 and b["feat"].shape == (6, ts.num_tokens, ts.embed_dim)
    assert b["q"].dtype == b["k"].dtype == torch.float16
    logits = c.teacher_logits({"q": b["q"], "k": b["k"]})
    assert logits.dtype == torch.float32
    assert logits.shape == (6, len(ts.layers), ts.num_heads, ts.num_tokens, ts.num_tokens)
    q, k = b["q"].double(), b["k"].double()
    expect = ts.scale * (q @ k.transpose(-1, -2))
    torch.testing.assert_close(logits.double(), expect, rtol=1e-5, atol=1e-5)
