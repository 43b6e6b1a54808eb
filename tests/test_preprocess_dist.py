"""``torchrun --nproc_per_node=2 haste preprocess`` (gloo on CPU) builds the same cache as one process."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_preprocess_config

REPO = Path(__file__).resolve().parents[1]


def _sets(out: Path) -> list[str]:
    cfg = tiny_preprocess_config(out)
    args = []
    for k in ("source", "synthetic_classes", "out", "resolution", "shard_size", "vae", "teacher", "batch_size",
              "num_workers", "device", "codec"):
        args += ["--set", f"{k}={getattr(cfg, k)}"]
    return args


def _shards(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.glob("*/*/shard-*.tar"))}


def _records(root: Path) -> dict[str, list]:
    return {str(m.parent.relative_to(root)): json.loads(m.read_text())["shards"]
            for m in sorted(root.glob("*/*/manifest.json"))}


def _torchrun_preprocess(out: Path) -> subprocess.CompletedProcess:
    """`haste preprocess` under a 2-rank gloo torchrun; asserts it succeeded."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "stages.cli", "preprocess", *_sets(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_torchrun_two_ranks_equals_one_process(demo_cache, tmp_path):
    out = tmp_path / "dist"
    proc = _torchrun_preprocess(out)
    # each rank wrote its half of the 6 shards (round robin), and rank 0 alone printed the summary
    assert "rank 0: 3 shard(s) to write (6 in total are missing)" in proc.stderr
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["status"] == "built" and result["samples"] == {"latents": 48, "teacher": 48}

    # the same group directories, byte-identical shards and identical shard records
    assert sorted(p.relative_to(out) for p in out.glob("*/*")) == \
        sorted(p.relative_to(demo_cache) for p in demo_cache.glob("*/*"))
    assert _shards(out) == _shards(demo_cache) and len(_shards(out)) == 12
    assert _records(out) == _records(demo_cache)
    for kind in ("latents", "teacher"):
        a = json.loads(next((out / kind).glob("*/manifest.json")).read_text())
        b = json.loads(next((demo_cache / kind).glob("*/manifest.json")).read_text())
        for field in ("identity", "source", "models", "spec", "fields", "bytes_per_sample", "classes", "skipped"):
            assert a[field] == b[field], (kind, field)
    assert not [p for p in out.rglob(".*")], "temp or probe files left behind"
    idx = json.loads((out / "index.json").read_text())
    assert len(idx["runs"]) == 1 and len(idx["groups"]) == 2


@pytest.mark.slow
def test_torchrun_resume_splits_verification(demo_cache, tmp_path):
    """Resuming under torchrun, each rank sha256-checks only its share of the finished shards (a
    resumed ImageNet teacher group is TBs: N ranks must not each read all of it), and the rebuilt
    cache still equals the single-process one."""
    import shutil

    out = tmp_path / "resume"
    shutil.copytree(demo_cache, out)
    for m in out.glob("*/*/manifest.json"):
        m.unlink()
    (out / "index.json").unlink()
    (next((out / "teacher").glob("*")) / "shard-000004.tar").unlink()
    proc = _torchrun_preprocess(out)
    assert "rank 0: checked 3 of 6 earlier shard(s)" in proc.stderr
    assert "rank 0: 1 shard(s) to write (1 in total are missing)" in proc.stderr
    assert _shards(out) == _shards(demo_cache) and _records(out) == _records(demo_cache)
