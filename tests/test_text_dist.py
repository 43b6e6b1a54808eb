"""``torchrun --nproc_per_node=2 haste preprocess`` on a captioned source (gloo on CPU): the three
groups, text included, equal one process's, byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_preprocess_config

from stages.preprocess import run

REPO = Path(__file__).resolve().parents[1]
SETS = {"source": "synthetic-captions:12", "resolution": 32, "shard_size": 2, "text_encoder": "random:tiny",
        "text_batch_size": 5, "teacher": "none", "vae": "random:tiny", "batch_size": 2, "num_workers": 0,
        "device": "cpu", "codec": "qk-fp16"}


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.glob("*/*/shard-*.tar")) + sorted(root.glob("*/*/codec/*.npy"))}


@pytest.mark.slow
def test_torchrun_two_ranks_text_equals_one_process(tmp_path):
    one = tmp_path / "one"
    run(tiny_preprocess_config(one, **SETS))
    two = tmp_path / "two"
    args = [x for k, v in {**SETS, "out": two}.items() for x in ("--set", f"{k}={v}")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "stages.cli", "preprocess", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["samples"] == {"latents": 12, "text": 12}
    assert _files(two) == _files(one) and sum(k.startswith("text/") for k in _files(one)) == 7  # 6 shards + the null
    for m in sorted(one.glob("text/*/manifest.json")):
        a, b = json.loads(m.read_text()), json.loads((two / m.relative_to(one)).read_text())
        assert a["shards"] == b["shards"] and a["settings"]["captions"] == b["settings"]["captions"]
