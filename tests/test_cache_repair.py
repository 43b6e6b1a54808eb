"""A rerun repairs what a killed or failed preprocess left: index.json, temp files, full disks.

Each test reproduces the state a kill (or ENOSPC) leaves at one point, then reruns the same
config and checks that the cache is usable and clean, i.e. what the reader and trainer open.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_preprocess_config

from pipeline.cache import shards
from pipeline.cache.reader import open_cache
from pipeline.cache.schema import LATENTS, TEACHER
from stages.preprocess import run

HERE = Path(__file__).resolve().parent


def temp_files(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).rglob(".*") if ".tmp" in p.name)


def copy_cache(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=shutil.copy2)
    return dst


def test_rerun_records_complete_groups_missing_from_index(demo_cache, tmp_path):
    """Killed after both manifests, before index.json was renamed into place (first run)."""
    out = copy_cache(demo_cache, tmp_path / "c")
    (out / "index.json").unlink()
    (out / ".index.json.tmp4242").write_text('{"half": ')
    (next((out / LATENTS).iterdir()) / ".manifest.json.tmp4242").write_text("{")
    (out / ".unrelated.tmp1").write_text("a user's file in the cache root is not ours to delete")
    with pytest.raises(Exception, match="no complete latents group recorded"):
        open_cache(out)
    result = run(tiny_preprocess_config(out))
    assert result["status"] == "repaired"
    assert temp_files(out) == [out / ".unrelated.tmp1"]
    assert json.loads((out / "index.json").read_text())["groups"] == \
        json.loads((demo_cache / "index.json").read_text())["groups"]
    c = open_cache(out)
    assert c.latents.num_samples == 48 and c.teacher is not None
    # and the run after that has nothing left to do
    again = run(tiny_preprocess_config(out))
    assert again["status"] == "up-to-date"


def test_rerun_records_a_second_pair_missing_from_index(demo_cache, tmp_path):
    """A second config (other codec) killed after its manifest: index.json still has only the first pair."""
    out = copy_cache(demo_cache, tmp_path / "c")
    old_index = (out / "index.json").read_text()
    run(tiny_preprocess_config(out, codec="logits-fp16"))
    (out / "index.json").write_text(old_index)
    assert open_cache(out).teacher.spec.codec == "qk-fp16"
    result = run(tiny_preprocess_config(out, codec="logits-fp16"))
    assert result["status"] == "repaired"
    assert open_cache(out).teacher.spec.codec == "logits-fp16"   # the newest pair, as if never killed
    assert len(json.loads((out / "index.json").read_text())["runs"]) == 2


@pytest.mark.slow
def test_kill_inside_the_index_write_is_repaired(demo_cache, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, str(HERE / "_preprocess_killed.py"), str(out), "index"], cwd=HERE.parent,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == -9, proc.stdout + proc.stderr[-3000:]
    assert list(out.glob(".index.json.tmp*")) and not (out / "index.json").exists()
    assert len(list(out.glob("*/*/manifest.json"))) == 2
    result = run(tiny_preprocess_config(out))
    assert result["status"] == "repaired" and temp_files(out) == []
    assert open_cache(out).latents.num_samples == 48


class _FullDisk:
    """A shard file whose writes fail with ENOSPC once ``budget`` bytes are written (close flushes too)."""

    def __init__(self, f, budget: int):
        self.f, self.budget = f, budget

    def write(self, data: bytes) -> int:
        self.budget -= len(data)
        if self.budget < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(data)

    def flush(self) -> None:
        if self.budget < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.f.flush()

    def fileno(self) -> int:
        return self.f.fileno()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.f.close()


@pytest.mark.parametrize("where", ["in a sample", "at the commit"])
def test_full_disk_leaves_no_temp_files_and_rerun_finishes(demo_cache, tmp_path, monkeypatch, where):
    out = tmp_path / "c"
    shard_bytes = json.loads(next((demo_cache / TEACHER).glob("*/manifest.json")).read_text())["shards"][0]["bytes"]
    budget = 20_000 if where == "in a sample" else shard_bytes - 512  # the end-of-archive marker fails
    original = shards.ShardWriter.__init__
    spent = {"n": 0}

    def init(self, path, index):
        original(self, path, index)
        if Path(path).parent.parent.name == TEACHER and spent["n"] == 0:
            spent["n"] = 1  # the first teacher shard hits the full disk
            self._raw = _FullDisk(self._raw, budget)

    monkeypatch.setattr(shards.ShardWriter, "__init__", init)
    with pytest.raises(OSError) as e:
        run(tiny_preprocess_config(out))
    assert e.value.errno == errno.ENOSPC and "teacher" in str(e.value) and "shard-000000.tar" in str(e.value)
    assert temp_files(out) == []
    monkeypatch.setattr(shards.ShardWriter, "__init__", original)
    assert run(tiny_preprocess_config(out))["status"] == "built"
    ref = {p.relative_to(demo_cache): p.read_bytes() for p in demo_cache.glob("*/*/shard-*.tar")}
    assert {p.relative_to(out): p.read_bytes() for p in out.glob("*/*/shard-*.tar")} == ref
