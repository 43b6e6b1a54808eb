"""The eval stage under bad inputs, kills and other readers: one-line errors before any sampling,
temp files a killed run left, byte-identical npz rewrites, the zarr 2 format, one summary line.

A random-init SiT saved as an EMA export (no training) and the ``random:tiny`` VAE stand in for a
trained run; sampling uses 2 ODE steps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import stages.evaluate as evaluate
from pipeline.metrics.sample_store import SampleStoreError, export_npz, open_store
from stages.cli import main as cli
from trainer.models.sit import ModelConfig, SiT

SAMPLER = ["sampler.mode=ode", "sampler.num_steps=2"]


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An EMA export of a random-init tiny SiT (8x8x4 latents -> 64 px with random:tiny)."""
    cfg = ModelConfig(depth=2, hidden_size=48, num_heads=4, patch_size=2, input_size=8, num_classes=4, z_dim=0)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoints" / "ema-0000007.pt"
    path.parent.mkdir()
    torch.save({"ema": SiT(cfg).state_dict(), "steps": 7, "model_config": dataclasses.asdict(cfg), "latents": None},
               path)
    return path


def cli_args(export: Path, out: Path, *extra: str) -> list[str]:
    sets = [f"checkpoint={export}", f"out={out}", "num_samples=4", "batch_size=4", "chunk_size=2", "device=cpu",
            "vae=random:tiny", "grid_count=4", *SAMPLER, *extra]
    return ["eval", *[a for s in sets for a in ("--set", s)]]


def run_cfg(export: Path, out: Path, *extra: str):
    return evaluate.load_eval_config(None, tuple(cli_args(export, out, "compute=false", *extra)[2::2]))


def error_line(result) -> str:
    """The single 'Error: ...' line of a failed CLI run (no traceback, nothing else)."""
    assert result.exit_code == 1 and not isinstance(result.exception, (KeyError, TypeError, AttributeError)), \
        result.exception
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


# ----------------------------------------------------------------------------------------------
# Errors: one line, before any work


@pytest.mark.parametrize("content", [b"hello, not a checkpoint", b""])
def test_a_non_checkpoint_file_is_one_line_naming_it(export: Path, tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "notes.pt"
    bad.write_bytes(content)
    line = error_line(CliRunner().invoke(cli, cli_args(bad, tmp_path / "e", "compute=false")))
    assert str(bad) in line and "expected an EMA export" in line


def test_an_unreadable_sidecar_is_named(tmp_path: Path) -> None:
    ckpt = tmp_path / "step-0000001.pt"
    torch.save({"train_state": {}, "ema": {}}, ckpt)
    ckpt.with_suffix(".json").write_text('{"not": "a sidecar"}')
    line = error_line(CliRunner().invoke(cli, cli_args(ckpt, tmp_path / "e", "compute=false")))
    assert "step-0000001.json" in line and "config.model" in line


@pytest.mark.parametrize("metrics, needle", [
    (["metrics.metrics=[fid]", "metrics.reference=/nowhere/ref.npz"], "inception"),      # weights first
    (["metrics.extractor=random-init-convnet", "metrics.metrics=[fid]", "metrics.reference=/nowhere/ref.npz"],
     "/nowhere/ref.npz"),
    (["metrics.extractor=random-init-convnet", "metrics.reference=synthetic:x"], "metrics.reference"),
])
def test_missing_metrics_inputs_fail_before_sampling(export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     metrics: list[str], needle: str) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))          # no Inception weights anywhere
    for fn in ("load_model", "_sample_chunks", "load_vae"):
        monkeypatch.setattr(evaluate, fn, lambda *a, **k: pytest.fail("work started before the metrics check"))
    line = error_line(CliRunner().invoke(cli, cli_args(export, tmp_path / "e", *metrics)))
    assert needle in line.lower() or needle in line
    assert not (tmp_path / "e").exists()


# ----------------------------------------------------------------------------------------------
# Output: one summary line, a progress bar for the features


def test_summary_is_printed_once_and_features_show_progress(export: Path, tmp_path: Path) -> None:
    args = cli_args(export, tmp_path / "e", "metrics.extractor=random-init-convnet", "metrics.metrics=[is,kid]",
                    "metrics.reference=synthetic:6", "metrics.kid_subsets=3", "metrics.is_splits=2",
                    "metrics.save_cpu_ram=true", "metrics.device=cpu")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "e" / "metrics.json").read_text())["summary"]
    assert summary.startswith("IS ") and "KID" in summary and result.output.count(summary) == 1
    assert result.stdout.rstrip().endswith(summary)                  # the last line of stdout
    assert "features random-init-convnet" in result.output and "4/4" in result.output


# ----------------------------------------------------------------------------------------------
# Nothing lost, nothing left: temp files of a killed run


def test_a_rerun_removes_the_temp_files_a_killed_run_left(export: Path, tmp_path: Path) -> None:
    out = tmp_path / "e"
    evaluate.run(run_cfg(export, out))
    stale = [out / ".samples.npz.tmp4242", out / ".grid.png.tmp4242", out / ".metrics.json.tmp4242",
             out / ".reference-synthetic-8-4cls-seed0-64px.npz.tmp4242"]
    for p in stale:
        p.write_bytes(b"x" * 1000)
    evaluate.run(run_cfg(export, out))
    assert not [p for p in stale if p.exists()]
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "metrics.json", "samples.npz", "samples.zarr"]


# ----------------------------------------------------------------------------------------------
# The store and its exports, read by other tools


def small_store(path: Path):
    store = open_store(path, num_samples=5, chunk=2, shape=(4, 4, 3), meta={"k": 1})
    rng = np.random.default_rng(0)
    for c in range(store.num_chunks):
        n = len(store.chunk_range(c))
        store.write_chunk(c, rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8), np.arange(n) + c, np.arange(n))
    return store


def test_npz_is_byte_identical_across_rewrites(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = small_store(tmp_path / "s.zarr")
    first = export_npz(store, tmp_path / "a.npz").read_bytes()
    real = zipfile.time.time
    monkeypatch.setattr(zipfile.time, "time", lambda: real() + 86_400 * 400)   # another day, another year
    second = export_npz(store, tmp_path / "b.npz").read_bytes()
    assert first == second
    with np.load(tmp_path / "b.npz") as z:                                       # and numpy still reads it
        np.testing.assert_array_equal(z["arr_0"], store.images[:])
        np.testing.assert_array_equal(z["arr_1"], store.labels[:])


def test_store_is_zarr_format_2_with_raw_chunks(tmp_path: Path) -> None:
    """What zarr-python 2 needs (.zgroup/.zarray, no codecs), checked without zarr: plain JSON + numpy."""
    store = small_store(tmp_path / "s.zarr")
    root = tmp_path / "s.zarr"
    assert json.loads((root / ".zgroup").read_text()) == {"zarr_format": 2}
    assert json.loads((root / ".zattrs").read_text())["haste"]["k"] == 1
    for name, dtype in (("images", "|u1"), ("labels", "<i8"), ("seeds", "<u4"), ("done", "|u1")):
        meta = json.loads((root / name / ".zarray").read_text())
        assert (meta["zarr_format"], meta["dtype"], meta["compressor"], meta["filters"], meta["order"]) == \
            (2, dtype, None, None, "C")
    raw = np.frombuffer((root / "images" / "0.0.0.0").read_bytes(), np.uint8).reshape(2, 4, 4, 3)
    np.testing.assert_array_equal(raw, store.images[0:2])
    assert np.frombuffer((root / "labels" / "2").read_bytes(), "<i8").tolist()[:1] == [2]   # rows 4.. (chunk 2)
    assert [np.frombuffer((root / "done" / str(c)).read_bytes(), np.uint8)[0] for c in range(3)] == [1, 1, 1]


def test_a_store_with_a_foreign_codec_is_refused_before_any_read(tmp_path: Path) -> None:
    import pickle

    small_store(tmp_path / "s.zarr")
    meta_path = tmp_path / "s.zarr" / "labels" / ".zarray"
    meta = json.loads(meta_path.read_text())
    meta["compressor"] = {"id": "pickle", "protocol": 5}
    meta_path.write_text(json.dumps(meta))
    marker = tmp_path / "pwned"
    (tmp_path / "s.zarr" / "labels" / "0").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(SampleStoreError, match="labels.*not a sample store written by haste eval"):
        open_store(tmp_path / "s.zarr", num_samples=5, chunk=2, shape=(4, 4, 3), meta={"k": 1})
    assert not marker.exists()


class _Payload:
    """Unpickling this creates ``marker``: proof that code from a file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_stores_of_earlier_versions_in_zarr_format_3_still_resume(tmp_path: Path) -> None:
    import zarr

    path = tmp_path / "old.zarr"
    g = zarr.open_group(str(path), mode="w")                       # what the previous version wrote
    g.create_array("images", shape=(4, 4, 4, 3), chunks=(2, 4, 4, 3), dtype="uint8", fill_value=0, compressors=None)
    g.create_array("labels", shape=(4,), chunks=(2,), dtype="int64", fill_value=-1)
    g.create_array("seeds", shape=(4,), chunks=(2,), dtype="uint32", fill_value=0)
    g.create_array("done", shape=(2,), chunks=(1,), dtype="uint8", fill_value=0)
    g.attrs["haste"] = {"k": 1, "num_samples": 4, "shape": [4, 4, 3]}
    store = open_store(path, num_samples=4, chunk=2, shape=(4, 4, 3), meta={"k": 1})
    assert store.pending() == [0, 1] and (path / "zarr.json").is_file() and not (path / ".zgroup").exists()

