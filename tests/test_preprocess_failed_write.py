"""A write that fails on the writer thread must not let the shard's queued commit rename a partial shard.

The writer thread runs a group's ``add`` and ``commit`` calls in order; before the fix, a failed ``add``
(e.g. an encode error) was followed by the already-queued ``commit``, which renamed the short shard
into place and wrote a valid progress record for it, so a rerun took it as done.
"""

from __future__ import annotations

import json

import pytest
from conftest import tiny_preprocess_config

from pipeline.cache import shards
from stages.preprocess import run


@pytest.mark.slow
def test_failed_write_leaves_no_committed_partial_shard(tmp_path, monkeypatch):
    original, count = shards.ShardWriter.add, [0]

    def add(self, key, members):
        if self.path.parent.parent.name == "teacher":
            count[0] += 1
            if count[0] == 10:  # the 2nd sample of shard 1 (shards of 8, batches of 4)
                raise ValueError("encode failed")
        original(self, key, members)

    monkeypatch.setattr(shards.ShardWriter, "add", add)
    out = tmp_path / "c"
    with pytest.raises(ValueError, match="encode failed"):
        run(tiny_preprocess_config(out, source="synthetic:24", batch_size=4, resolution=32))
    # shard 1 is never committed; shard 2 may have been written completely before the error surfaced
    records = {p.name: json.loads(p.read_text())["count"] for p in out.glob("teacher/*/progress/shard-*.json")}
    assert records.get("shard-000000.tar.json") == 8 and "shard-000001.tar.json" not in records
    assert set(records.values()) == {8}
    assert "shard-000001.tar" not in {p.name for p in out.glob("teacher/*/shard-*.tar")}
    monkeypatch.setattr(shards.ShardWriter, "add", original)
    run(tiny_preprocess_config(out, source="synthetic:24", batch_size=4, resolution=32))
    counts = [json.loads(p.read_text())["count"] for p in sorted(out.glob("teacher/*/progress/shard-*.json"))]
    assert counts == [8, 8, 8]
