"""The training loop end to end on the tiny demo cache: run-dir outputs, Phase II without the
teacher group, Phase I refusing up front without it, NaN handling, and the up-front batch check."""

from __future__ import annotations

import builtins
import dataclasses
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from trainutil import ckpt_steps, copy_cache, load_ckpt, overrides, stats, tiny_cfg

import pipeline.cache.loader
import pipeline.dist
import trainer.engine
import trainer.loop
import trainer.preview
from pipeline.cache.reader import CacheMismatchError
from pipeline.configs import ConfigError, to_dict
from pipeline.dist import DistInfo
from pipeline.encoders.weights import WeightsError
from stages.cli import main as cli
from trainer.loop import TrainingError, train
from trainer.models.sit import ModelConfig, SiT

pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args: str):
    """Run the CLI; restore the root logger afterwards (``haste`` reconfigures it on every call)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        return CliRunner().invoke(cli, list(args))
    finally:
        root.handlers[:], root.level = handlers, level


def cli_sets(cache: Path, run_dir: Path, changes: dict | None = None) -> list[str]:
    return [a for kv in overrides(cache, run_dir, changes) for a in ("--set", kv)]


# ----------------------------------------------------------------------------------------------
# Outputs of a short run through Phase I into Phase II


@pytest.fixture(scope="module")
def short_run(demo_cache: Path, tmp_path_factory) -> tuple[Path, object, dict]:
    run = tmp_path_factory.mktemp("short") / "run"
    cfg = tiny_cfg(demo_cache, run, {"total_steps": 6, "align.stop_step": 3, "log_every": 2, "ckpt_every": 3,
                                     "sample_every": 3, "sample_count": 4})
    return run, cfg, train(cfg)


def test_run_dir_outputs(short_run) -> None:
    run, cfg, result = short_run
    assert result == {"step": 6, "phase": "II", "run_dir": str(run)}
    ck = run / "checkpoints"
    names = {p.name for p in ck.iterdir()}
    assert names == {f"{kind}-{s:07d}.{ext}" for s in (3, 6) for kind, ext in
                     (("step", "pt"), ("step", "json"), ("ema", "pt"))}
    meta = json.loads((ck / "step-0000003.json").read_text())
    assert (meta["step"], meta["phase"], meta["config"]) == (3, "I", to_dict(cfg))
    assert meta["cache"]["latents"] and meta["cache"]["teacher"]
    assert json.loads((ck / "step-0000006.json").read_text())["phase"] == "II"
    conf = json.loads((run / "config.json").read_text())
    assert conf["config"] == to_dict(cfg) and conf["world_size"] == 1 and "git_sha" in conf


def test_stats_one_line_per_interval(short_run) -> None:
    run, _, _ = short_run
    recs = stats(run)
    assert [(r["step"], r["phase"]) for r in recs] == [(2, "I"), (4, "II"), (6, "II")]
    for r in recs:
        for key in ("loss", "denoise", "grad_norm", "samples_per_s", "mem_gb"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), (key, r)
        assert r["samples_per_s"] > 0 and r["mem_gb"] > 0
    assert "feat" in recs[0] and "attn" in recs[0]
    assert "feat" not in recs[2] and "attn" not in recs[2]
    assert recs[2]["loss"] == pytest.approx(recs[2]["denoise"])


def test_interval_spanning_tau_averages_each_loss_over_its_own_steps(short_run) -> None:
    """Steps 3 (Phase I) and 4 (Phase II) share a log interval: feat/attn are their step-3 values,
    not halved by a Phase II step that has no such loss."""
    run, _, _ = short_run
    rec = stats(run)[1]
    assert "feat" in rec and "attn" in rec
    # attn is a cross-entropy over 16 keys: near log(16) at init, never near half of it.
    assert rec["attn"] > 0.8 * math.log(16)


def test_sample_grids_and_loss_plot(short_run) -> None:
    run, cfg, _ = short_run
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-0000003.png", "step-0000006.png"]
    for p in (run / "samples").iterdir():
        with Image.open(p) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            assert im.size == (2 * 64, 2 * 64)  # 4 samples -> 2x2 grid of 64 px images (8x8 latents x 8)
            im.load()
    with Image.open(run / "loss.png") as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_checkpoint_files_load_weights_only(short_run) -> None:
    run, cfg, _ = short_run
    ckpt = load_ckpt(run, 6)   # plain torch.load(weights_only=True), no allow-list needed
    assert set(ckpt) >= {"model", "ema", "opt", "steps", "rng", "train_state"}
    assert ckpt["steps"] == 6 and ckpt["train_state"]["phase"] == "II"
    ema = torch.load(run / "checkpoints" / "ema-0000006.pt", weights_only=True)
    assert set(ema) == {"ema", "steps", "model_config", "latents", "conditioning"} and ema["steps"] == 6
    assert ema["conditioning"] == "class" and ema["model_config"]["arch"] == "sit"  # no text records for a SiT
    assert ema["latents"]["vae"]["name"] == "random:tiny" and ema["latents"]["scale"] == 0.18215  # for `haste eval`
    model = SiT(ModelConfig(**ema["model_config"]))
    model.load_state_dict(ema["ema"], strict=True)
    assert all(torch.equal(ema["ema"][k], ckpt["ema"][k]) for k in ckpt["ema"])


# ----------------------------------------------------------------------------------------------
# Phase II without the teacher group


class _TeacherSpy:
    """Records every file access under the cache's teacher/ directory."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cache: Path):
        self.touched: list[str] = []
        self.prefix = str(cache / "teacher")
        real_open, real_index, real_shard = builtins.open, pipeline.cache.loader.index_shard, pipeline.cache.loader._open_shard

        def note(path) -> None:
            if str(path).startswith(self.prefix):
                self.touched.append(str(path))

        def spy_open(file, *a, **k):
            note(file)
            return real_open(file, *a, **k)

        def spy_index(path):
            note(path)
            return real_index(path)

        def spy_shard(path):
            note(path)
            return real_shard(path)

        monkeypatch.setattr(builtins, "open", spy_open)
        monkeypatch.setattr(pipeline.cache.loader, "index_shard", spy_index)
        monkeypatch.setattr(pipeline.cache.loader, "_open_shard", spy_shard)


def test_vanilla_trains_without_teacher_group(demo_cache: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cache = copy_cache(demo_cache, tmp_path / "cache", drop_teacher=True)
    spy = _TeacherSpy(monkeypatch, cache)
    run = tmp_path / "run"
    out = train(tiny_cfg(cache, run, {"align.stop_step": 0, "total_steps": 3, "log_every": 3}))
    assert out["step"] == 3 and out["phase"] == "denoise"
    assert spy.touched == []
    assert json.loads((run / "checkpoints" / "step-0000003.json").read_text())["cache"]["teacher"] is None


def test_resume_in_phase_two_without_teacher_group(demo_cache: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cache = copy_cache(demo_cache, tmp_path / "cache")
    run = tmp_path / "run"
    train(tiny_cfg(cache, run, {"align.stop_step": 2, "total_steps": 3, "log_every": 3}))  # ckpt at 3
    (cache / "teacher").rename(tmp_path / "teacher-gone")
    spy = _TeacherSpy(monkeypatch, cache)
    steps = []
    real = trainer.loop.train_step
    monkeypatch.setattr(trainer.loop, "train_step", lambda *a: steps.append(a[8]) or real(*a))
    out = train(tiny_cfg(cache, run, {"align.stop_step": 2, "total_steps": 6, "log_every": 3}))
    assert out == {"step": 6, "phase": "II", "run_dir": str(run)}
    assert steps == [3, 4, 5]                 # resumed, not restarted
    assert spy.touched == []
    assert ckpt_steps(run) == [2, 3, 6]          # end of Phase I, end of the first run, end


def test_phase_one_without_teacher_fails_up_front(demo_cache: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cache = copy_cache(demo_cache, tmp_path / "cache", drop_teacher=True)
    calls = []
    monkeypatch.setattr(trainer.loop, "train_step", lambda *a: calls.append(1))
    with pytest.raises(CacheMismatchError, match=r"teacher group .* is missing: Phase I needs the teacher"):
        train(tiny_cfg(cache, tmp_path / "run"))
    assert calls == [] and ckpt_steps(tmp_path / "run") == []


def test_phase_one_without_teacher_cli_message(demo_cache: Path, tmp_path: Path) -> None:
    cache = copy_cache(demo_cache, tmp_path / "cache", drop_teacher=True)
    res = invoke("train", *cli_sets(cache, tmp_path / "run"))
    assert res.exit_code == 1, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "CacheMismatchError" in errors[0] and "teacher group" in errors[0]
    assert "Traceback" not in res.output
    assert not (tmp_path / "run" / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------
# Non-finite loss


@pytest.mark.parametrize("log_every", [1, 100], ids=["caught-at-log", "caught-at-checkpoint"])
def test_nan_stops_with_step_and_keeps_last_good_checkpoint(demo_cache: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, log_every: int) -> None:
    bad_index = 4                                 # the 5th optimizer step (0-based index 4)
    real, calls = trainer.engine.micro_loss, []

    def poisoned(*a, **k):
        losses = real(*a, **k)
        if len(calls) == bad_index:
            losses["loss"] = losses["loss"] * float("nan")
        calls.append(1)
        return losses

    monkeypatch.setattr(trainer.engine, "micro_loss", poisoned)
    monkeypatch.setattr(trainer.preview, "loss_plot", lambda *a, **k: None)
    run = tmp_path / "run"
    cfg = tiny_cfg(demo_cache, run, {"total_steps": 8, "ckpt_every": 2, "log_every": log_every,
                                     "align.stop_step": 100})
    with pytest.raises(TrainingError, match=r"non-finite loss at step 5\b"):
        train(cfg)
    assert ckpt_steps(run) == [2, 4]              # nothing written after the NaN step
    good = load_ckpt(run, 4)
    assert all(torch.isfinite(v).all() for v in good["model"].values())
    assert all(math.isfinite(r["loss"]) for r in stats(run)) if (run / "stats.jsonl").exists() else True


# ----------------------------------------------------------------------------------------------
# Global batch vs world size


def test_global_batch_not_divisible_by_world(demo_cache: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_cfg(demo_cache, tmp_path / "run", {"global_batch_size": 6, "grad_accum": 2})
    assert cfg.per_rank_batch(1) == 6
    with pytest.raises(ConfigError, match=r"'global_batch_size'.*world size 2 x grad_accum 2"):
        cfg.per_rank_batch(2)
    # In the trainer the check comes first: nothing is built, read or written.
    monkeypatch.setattr(pipeline.dist, "init", lambda device="auto": DistInfo(world_size=2))
    with pytest.raises(ConfigError, match="'global_batch_size'"):
        train(cfg)
    assert not (tmp_path / "run").exists()
    # Within one process, grad_accum must divide the global batch (checked when the config is built).
    with pytest.raises(ConfigError, match=r"'grad_accum'.*global_batch_size=8"):
        tiny_cfg(demo_cache, tmp_path / "run", {"grad_accum": 3})


# ----------------------------------------------------------------------------------------------
# Every weight the run needs is resolved before step 1


def test_unloadable_preview_vae_fails_before_step_one(demo_cache: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache whose VAE is a hub id that is not cached (e.g. `haste import edm2 --vae <hub id>`
    offline) used to train until the first preview and die there."""
    real_open = trainer.loop.open_data

    def hub_vae_cache(*args, **kwargs):
        cache, batches = real_open(*args, **kwargs)
        identity = {**cache.latents.identity, "vae": {"name": "example-org/vae-never-downloaded"}}
        return dataclasses.replace(cache, latents=dataclasses.replace(cache.latents, identity=identity)), batches

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(trainer.loop, "open_data", hub_vae_cache)
    monkeypatch.setattr(trainer.loop, "train_step", lambda *a: pytest.fail("trained before checking the preview VAE"))
    with pytest.raises(WeightsError, match="VAE weights 'example-org/vae-never-downloaded' are not in the local "
                                           "Hugging Face cache and HF_HUB_OFFLINE is set"):
        train(tiny_cfg(demo_cache, tmp_path / "run", {"sample_every": 1000}))
