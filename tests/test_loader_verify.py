"""The training loader checks each shard's sha256 against its manifest before using it.

Payload bytes edited after preprocessing keep a shard's size and tar structure, so only the
hash can tell; the loader hashes each file version once per reader process (``verify_shard``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from trainutil import tiny_cfg

from pipeline.cache import loader as loader_mod
from pipeline.cache.loader import CacheStream, make_loader
from pipeline.cache.reader import index_shard, open_cache
from pipeline.cache.schema import LATENTS, TEACHER, CacheFormatError


def tamper_payload(path: Path) -> None:
    """Flip one byte inside a sample's array data (past the .npy header): same size, valid tar."""
    key, members = index_shard(path)[3]
    ext = "moments.npy" if "moments.npy" in members else "feat.npy"
    offset, size = members[ext]
    data = bytearray(path.read_bytes())
    data[offset + size - 7] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.fixture
def tampered(demo_cache: Path, tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "cache"
    shutil.copytree(demo_cache, out)
    c = open_cache(out)
    victim = c.shard_path(LATENTS, 2)
    tamper_payload(victim)
    return out, victim


def first_epoch(stream: CacheStream, num_workers: int = 0) -> list[dict]:
    it = iter(make_loader(stream, num_workers))
    return [next(it) for _ in range(48 // stream.batch_size)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_edited_payload_is_refused_naming_the_shard(tampered, num_workers) -> None:
    out, victim = tampered
    c = open_cache(out)
    # the edit is invisible to everything but the hash: the shard still indexes and decodes
    assert len(index_shard(victim)) == 8
    stream = CacheStream(c, with_teacher=True, batch_size=8, seed=0, num_workers=num_workers)
    with pytest.raises(Exception, match=r"shard corrupt or edited: .*shard-000002.tar \(its sha256 differs") as e:
        first_epoch(stream, num_workers)
    assert str(victim) in str(e.value) and "manifest.json and re-run `haste preprocess`" in str(e.value)
    # verify=False (data.verify_shards: false) reads the edited bytes: a documented opt-out
    batches = first_epoch(CacheStream(c, with_teacher=True, batch_size=8, seed=0, verify=False))
    assert sum(len(b["key"]) for b in batches) == 48


def test_each_shard_is_hashed_once_per_process(demo_cache: Path, monkeypatch) -> None:
    hashed: list[str] = []
    original = loader_mod.file_sha256

    def counting(path):
        hashed.append(Path(path).relative_to(demo_cache).parts[0])
        return original(path)

    monkeypatch.setattr(loader_mod, "file_sha256", counting)
    monkeypatch.setattr(loader_mod, "_verified", set())
    stream = CacheStream(open_cache(demo_cache), with_teacher=True, batch_size=8, seed=0)
    it = iter(make_loader(stream, 0))
    for _ in range(3 * 6):  # three epochs
        next(it)
    assert sorted(hashed) == [LATENTS] * 6 + [TEACHER] * 6


def test_phase_two_hashes_only_latents(demo_cache: Path, monkeypatch) -> None:
    hashed: list[str] = []
    monkeypatch.setattr(loader_mod, "file_sha256", lambda p: hashed.append(str(p)) or "0")
    monkeypatch.setattr(loader_mod, "_verified", set())
    stream = CacheStream(open_cache(demo_cache, need_teacher=False), with_teacher=False, batch_size=8, seed=0)
    with pytest.raises(CacheFormatError):
        next(iter(make_loader(stream, 0)))
    assert hashed and all(f"/{LATENTS}/" in p for p in hashed)


def test_train_refuses_an_edited_shard(tampered, tmp_path) -> None:
    from trainer.loop import train

    out, victim = tampered
    with pytest.raises(CacheFormatError, match="shard corrupt or edited") as e:
        train(tiny_cfg(out, tmp_path / "run", {"total_steps": 12}))
    assert str(victim) in str(e.value)
