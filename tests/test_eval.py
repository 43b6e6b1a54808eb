"""The eval stage: per-image seeds, the resumable zarr store, exports, checkpoint formats, CLI.

A 2-step training run on the tiny demo cache provides the checkpoint; sampling uses a few SDE
steps with CFG so that every code path (per-step noise, guidance) is exercised cheaply.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from trainutil import single_thread, tiny_cfg

import pipeline.metrics.sample_store
from pipeline.configs import ConfigError
from pipeline.metrics.sample_store import SampleStoreError
from stages.cli import main as cli
from stages.evaluate import EvalConfig, load_eval_config, run, sample_tag
from trainer.generate import image_labels, image_seeds, load_model
from trainer.loop import train
from trainer.models.sit import ModelConfig, SiT

REPO = Path(__file__).resolve().parents[1]
SAMPLER = ["sampler.mode=sde", "sampler.num_steps=3", "sampler.cfg_scale=2.0", "sampler.guidance_high=0.7"]


@pytest.fixture(scope="module")
def trained_run(demo_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    with single_thread():
        train(tiny_cfg(demo_cache, run_dir, {"total_steps": 2, "align.stop_step": 1, "ckpt_every": 2}))
    return run_dir


def eval_cfg(run_dir: Path, out: Path, *extra: str) -> EvalConfig:
    sets = [f"run_dir={run_dir}", f"out={out}", "num_samples=10", "batch_size=4", "chunk_size=4", "device=cpu",
            "compute=false",
            "grid_count=9", *SAMPLER, *extra]
    return load_eval_config(None, tuple(sets))


def images(out: Path) -> np.ndarray:
    return np.load(out / "samples.npz")["arr_0"]


def assert_same_up_to_rounding(a: np.ndarray, b: np.ndarray) -> None:
    """Batch size changes BLAS blocking, so latents differ by ~1e-7 and a rare pixel rounds the other way."""
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


# ----------------------------------------------------------------------------------------------
# Seeds and labels


def test_image_seeds_and_labels_depend_on_index_only() -> None:
    idx = np.arange(1000)
    assert np.array_equal(image_seeds(3, idx)[[5, 999]], image_seeds(3, [5, 999]))
    assert len(set(image_seeds(3, idx).tolist())) == 1000            # no collisions among neighbours
    assert not np.array_equal(image_seeds(3, idx), image_seeds(4, idx))
    uniform = image_labels(0, idx, 10)
    assert np.array_equal(uniform[[7, 500]], image_labels(0, [7, 500], 10))
    counts = np.bincount(uniform, minlength=10)
    assert counts.min() > 60 and counts.max() < 140                  # uniform, not balanced, not stuck
    assert not np.all(counts == 100)
    assert np.array_equal(np.bincount(image_labels(0, idx, 10, "balanced")), np.full(10, 100))


# ----------------------------------------------------------------------------------------------
# The stage end to end (metrics off; tests/test_metrics.py covers them)


def test_outputs_and_batch_size_independence(trained_run: Path, tmp_path: Path) -> None:
    a = run(eval_cfg(trained_run, tmp_path / "b4"))
    b = run(eval_cfg(trained_run, tmp_path / "b1", "batch_size=1"))
    c = run(eval_cfg(trained_run, tmp_path / "b8", "batch_size=8"))
    assert a["num_samples"] == 10 and a["nfe"] == 3 and a["checkpoint_source"] == "ema-export" and a["step"] == 2
    x = images(tmp_path / "b4")
    assert x.shape == (10, 64, 64, 3) and x.dtype == np.uint8 and x.std() > 0
    for other in ("b1", "b8"):  # same noise per image; only the float reduction order of the batched matmuls
        assert_same_up_to_rounding(x, images(tmp_path / other))  # differs
    labels = np.load(tmp_path / "b4" / "samples.npz")["arr_1"]
    assert np.array_equal(labels, image_labels(0, range(10), 4))
    grid = Image.open(a["grid"])
    assert grid.size == (3 * 64, 3 * 64)
    saved = json.loads((tmp_path / "b4" / "metrics.json").read_text())
    assert saved["num_samples"] == 10 and "metrics" not in saved
    assert b["sampling"]["images"] == c["sampling"]["images"] == 10


def test_rerun_of_a_finished_store_samples_nothing(trained_run: Path, tmp_path: Path) -> None:
    cfg = eval_cfg(trained_run, tmp_path / "e")
    run(cfg)
    stamp = (tmp_path / "e" / "samples.npz").stat().st_mtime_ns
    again = run(cfg)
    assert again["sampling"]["images"] == 0
    assert again["npz"] and (tmp_path / "e" / "samples.npz").stat().st_mtime_ns == stamp   # not rewritten
    (tmp_path / "e" / "samples.npz").write_bytes(b"truncated")                            # a broken export
    run(cfg)
    assert images(tmp_path / "e").shape == (10, 64, 64, 3)


def test_killed_run_resumes_to_the_uninterrupted_store(trained_run: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    run(eval_cfg(trained_run, ref_out))
    real = pipeline.metrics.sample_store.SampleStore.write_chunk
    calls = []

    def dying(self, c, imgs, labels, seeds):
        calls.append(c)
        if len(calls) == 2:  # killed after the images of chunk 1 are on disk but before its done flag
            self.images[c * self.chunk:c * self.chunk + len(imgs)] = imgs
            raise KeyboardInterrupt
        real(self, c, imgs, labels, seeds)

    monkeypatch.setattr(pipeline.metrics.sample_store.SampleStore, "write_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        run(eval_cfg(trained_run, out))
    monkeypatch.setattr(pipeline.metrics.sample_store.SampleStore, "write_chunk", real)
    import zarr

    assert list(zarr.open_group(str(out / "samples.zarr"), mode="r")["done"][:]) == [1, 0, 0]
    assert not (out / "samples.npz").exists() and not (out / "metrics.json").exists()
    (out / "samples.zarr" / "images" / "0.0.0.0.a1b2.partial").write_bytes(b"x")   # zarr's temp from a kill
    result = run(eval_cfg(trained_run, out))
    assert result["sampling"]["images"] == 6                           # chunks 1 and 2 only
    assert np.array_equal(images(out), images(ref_out))
    assert not list((out / "samples.zarr").rglob("*.partial"))


def test_a_flagged_chunk_without_labels_is_sampled_again(trained_run: Path, tmp_path: Path) -> None:
    """A node crash can keep a done flag while losing a data chunk (labels read back as the fill value)."""
    import zarr

    out = tmp_path / "e"
    run(eval_cfg(trained_run, out))
    ref = images(out)
    g = zarr.open_group(str(out / "samples.zarr"), mode="r+")
    g["labels"][4:8] = -1
    g["images"][4:8] = 0
    result = run(eval_cfg(trained_run, out))
    assert result["sampling"]["images"] == 4 and np.array_equal(images(out), ref)


def test_changed_settings_are_refused_naming_the_fields(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "e"
    run(eval_cfg(trained_run, out))
    with pytest.raises(SampleStoreError, match=r"seed: store has 0, this run wants 1"):
        run(eval_cfg(trained_run, out, "seed=1"))
    with pytest.raises(SampleStoreError, match=r"num_samples: store has 10, this run wants 12"):
        run(eval_cfg(trained_run, out, "num_samples=12"))
    # the batch size is not a setting of the store: a resume after an OOM may lower it
    assert run(eval_cfg(trained_run, out, "batch_size=3", "chunk_size=5"))["num_samples"] == 10


def test_default_output_dir_and_truncation(trained_run: Path, tmp_path: Path) -> None:
    cfg = load_eval_config(None, (f"run_dir={trained_run}", "num_samples=4", "batch_size=4", "device=cpu",
                                  "compute=false", "npz=false", "grid_count=0", "rounding=truncate", *SAMPLER))
    result = run(cfg)
    assert Path(result["out"]) == trained_run / "eval" / f"step-0000002-{sample_tag(cfg)}"
    assert sample_tag(cfg) == "sde-3-cfg2-0-0.7-seed0-n4"
    assert result["npz"] is None and result["grid"] is None
    import zarr

    truncated = zarr.open_group(str(Path(result["out"]) / "samples.zarr"), mode="r")
    run(eval_cfg(trained_run, tmp_path / "round", "num_samples=4"))
    rounded = zarr.open_group(str(tmp_path / "round" / "samples.zarr"), mode="r")
    diff = rounded["images"][:].astype(int) - truncated["images"][:].astype(int)
    assert diff.min() >= 0 and diff.max() <= 1 and diff.mean() > 0.2        # floor vs round
    assert np.array_equal(truncated["seeds"][:], image_seeds(0, range(4)))   # the seeds the images came from


def test_round_and_truncate_differ_by_at_most_one_level() -> None:
    from pipeline.encoders.vae import decode_latents, load_vae

    vae = load_vae("random:tiny")[0]
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    r, t = decode_latents(vae, z, 0.18215, 0.0), decode_latents(vae, z, 0.18215, 0.0, rounding="truncate")
    diff = r.int() - t.int()
    assert diff.min() >= 0 and diff.max() <= 1 and diff.float().mean() > 0.3


# ----------------------------------------------------------------------------------------------
# Checkpoint formats


def test_official_checkpoint_samples(tmp_path: Path) -> None:
    """An official HASTE/REPA file: ``ema`` + argparse ``args`` (projector weights of any width)."""
    mcfg = ModelConfig(depth=2, hidden_size=48, num_heads=12, patch_size=2, input_size=8, num_classes=4,
                       projector_dim=64, z_dim=768)
    torch.manual_seed(0)
    ema = SiT(mcfg)
    args = argparse.Namespace(model="SiT-S/2", resolution=64, num_classes=4, encoder_depth=1,
                              projector_embed_dims="768")
    path = tmp_path / "0400000.pt"
    torch.save({"model": ema.state_dict(), "ema": ema.state_dict(), "opt": {}, "args": args, "steps": 400000}, path)
    with pytest.raises(RuntimeError, match="weights do not fit"):  # args say S/2 (depth 12): wrong shape
        load_model(path)
    loaded = load_model(path, overrides={"depth": 2, "hidden_size": 48, "num_heads": 12})
    assert loaded.source == "official" and loaded.step == 400000 and loaded.latents is None
    for k, v in ema.state_dict().items():
        if not k.startswith("projectors."):
            assert torch.equal(loaded.model.state_dict()[k], v), k
    cfg = load_eval_config(None, (f"checkpoint={path}", "num_samples=2", "batch_size=2",
                                  "device=cpu", "compute=false", "vae=random:tiny", *SAMPLER,
                                  "model.depth=2", "model.hidden_size=48", "model.num_heads=12"))
    result = run(cfg)
    out = tmp_path.parent / "eval" / f"0400000-{sample_tag(cfg)}"           # named after the file
    assert result["checkpoint_source"] == "official" and Path(result["out"]) == out
    assert images(out).shape == (2, 64, 64, 3)

    bare = tmp_path / "bare.pt"                                              # a bare state dict + a preset
    torch.save(ema.state_dict(), bare)
    with pytest.raises(RuntimeError, match="model.preset"):
        load_model(bare)
    loaded = load_model(bare, overrides={"preset": "SiT-S/2", "depth": 2, "hidden_size": 48, "num_heads": 12,
                                         "input_size": 8, "num_classes": 4})
    assert torch.equal(loaded.model.state_dict()["x_embedder.proj.weight"], ema.state_dict()["x_embedder.proj.weight"])


def test_config_errors_name_the_field(trained_run: Path) -> None:
    with pytest.raises(ConfigError, match="'checkpoint'"):
        load_eval_config(None, ())
    with pytest.raises(ConfigError, match="sampler.preset"):
        load_eval_config(None, (f"run_dir={trained_run}", "sampler.preset=nope"))
    with pytest.raises(ConfigError, match=r"'model'.*depht"):
        load_eval_config(None, (f"run_dir={trained_run}", "model.depht=2"))
    with pytest.raises(ConfigError, match="heun"):
        load_eval_config(None, (f"run_dir={trained_run}", "sampler.heun=true"))
    cfg = load_eval_config(None, (f"run_dir={trained_run}", "sampler.preset=paper-cfg"))
    assert (cfg.sampler.mode, cfg.sampler.num_steps, cfg.sampler.cfg_scale, cfg.sampler.guidance_high) == \
        ("sde", 250, 1.65, 0.72)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        run(load_eval_config(None, (f"run_dir={trained_run / 'nothing'}", "device=cpu", "compute=false")))


def test_cli_eval(trained_run: Path, tmp_path: Path) -> None:
    args = ["eval", "--set", f"run_dir={trained_run}", "--set", f"out={tmp_path / 'e'}", "--set", "num_samples=4",
            "--set", "batch_size=4", "--set", "device=cpu", "--set", "compute=false"]
    for s in SAMPLER:
        args += ["--set", s]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["num_samples"] == 4
    bad = CliRunner().invoke(cli, ["eval", "--set", f"checkpoint={tmp_path / 'missing.pt'}", "--set", "compute=false"])
    assert bad.exit_code == 1 and "checkpoint not found" in bad.output and "Traceback" not in bad.output


@pytest.mark.slow
def test_two_gloo_ranks_make_the_same_store(trained_run: Path, tmp_path: Path) -> None:
    run(eval_cfg(trained_run, tmp_path / "one"))
    sets = []
    for s in [f"run_dir={trained_run}", f"out={tmp_path / 'two'}", "num_samples=10", "batch_size=4", "chunk_size=4",
              "device=cpu",
              "compute=false", *SAMPLER]:
        sets += ["--set", s]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "stages.cli", "eval", *sets], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = (np.load(tmp_path / d / "samples.npz") for d in ("one", "two"))
    assert np.array_equal(one["arr_1"], two["arr_1"])                  # labels
    assert_same_up_to_rounding(one["arr_0"], two["arr_0"])             # 1 vs 2 threads: reduction order
