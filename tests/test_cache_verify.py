"""``haste cache verify`` checks what training opens, shows a bar over bytes and a short summary."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cache.schema import LATENTS, TEACHER
from stages import cache_tools
from stages.cli import main as cli


@pytest.fixture
def cache(demo_cache: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(demo_cache, tmp_path / "c"))


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_summary_by_default_json_on_request(cache: Path, restore_logging) -> None:
    res = invoke("cache", "verify", "--no-models", str(cache))
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines[0] == f"cache {cache}"
    assert lines[-1] == "OK: 2 groups, 12 shards, 96 samples, 1.6 MB checked"
    assert any(line.startswith(f"  {LATENTS}/") and "ok: 6 shards, 48 samples" in line for line in lines)
    assert "  index.json  ok: 1 run(s), each opens as training opens it" in lines
    assert "{" not in res.stdout
    report = json.loads(invoke("cache", "verify", "--no-models", "--json", str(cache)).stdout)
    assert report["ok"] is True and report["index"] == {"runs": 1, "errors": [], "notes": []}
    assert {g["bytes"] for g in report["groups"].values()} == {
        sum(p.stat().st_size for p in (cache / kind).glob("*/shard-*.tar")) for kind in (LATENTS, TEACHER)}


def test_progress_counts_every_shard_byte(cache: Path, monkeypatch) -> None:
    bars = []

    class Bar:
        def __init__(self, total, unit, **kw):
            self.total, self.unit, self.n, self.kw = total, unit, 0, kw
            bars.append(self)

        def update(self, n):
            self.n += n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(cache_tools, "tqdm", Bar)
    cache_tools.verify(cache, with_models=False, progress=True)
    (bar,) = bars
    total = sum(p.stat().st_size for p in cache.glob("*/*/shard-*.tar"))
    assert (bar.unit, bar.total, bar.n, bar.kw["unit_scale"], bar.kw["disable"]) == ("B", total, total, True, False)


def test_edited_shard_count_is_found(cache: Path, restore_logging) -> None:
    """The sha256 of the shard still matches; only its manifest record's count was edited."""
    for kind in (LATENTS, TEACHER):
        edit_json(next((cache / kind).glob("*/manifest.json")),
                  lambda m: m["shards"][1].update(count=7))
    res = invoke("cache", "verify", "--no-models", str(cache))
    assert res.exit_code == 1 and "cache verification FAILED" in res.stderr
    assert "shard-000001.tar: holds 8 samples, the manifest records 7" in res.stdout
    assert "47 samples + 0 skipped inputs, but the source had 48" in res.stdout
    assert res.stdout.strip().splitlines()[-1].startswith("FAILED (4 problem(s)): 2 groups")


def test_index_runs_must_point_to_complete_groups(cache: Path, restore_logging) -> None:
    lat = next((cache / LATENTS).iterdir()).name
    edit_json(cache / "index.json", lambda i: i["runs"].append({"latents": lat, "teacher": "0123456789abcdef"}))
    res = invoke("cache", "verify", "--no-models", str(cache))
    assert res.exit_code == 1
    assert f"index.json run ({lat}, 0123456789abcdef) refers to teacher/0123456789abcdef" in res.stdout
    # a recorded group whose directory is gone is reported, not a crash
    shutil.rmtree(next((cache / TEACHER).iterdir()))
    edit_json(cache / "index.json", lambda i: i["runs"].pop())
    report = json.loads(invoke("cache", "verify", "--no-models", "--json", str(cache)).stdout)
    assert report["ok"] is False
    errors = report["index"]["errors"]
    assert any("index.json records group teacher/" in e and "manifest.json not found" in e for e in errors)
    assert any("cannot be opened for training" in e for e in errors)


def test_complete_group_missing_from_index_is_a_note(cache: Path, restore_logging) -> None:
    lat = next((cache / LATENTS).iterdir()).name
    shutil.copytree(cache / LATENTS / lat, cache / LATENTS / "ffffffffffffffff")
    res = invoke("cache", "verify", "--no-models", str(cache))
    assert res.exit_code == 0
    assert "note: complete group latents/ffffffffffffffff is not recorded in index.json" in res.stdout
