"""Checkpoints: kill + rerun resumes bitwise (CPU), config changes that alter the math are refused,
files are weights-only, written atomically and pruned, and the official format loads."""

from __future__ import annotations

import argparse
import io
import logging
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from trainutil import (
    Killed,
    assert_tree_equal,
    ckpt_steps,
    kill_at,
    load_ckpt,
    loss_records,
    overrides,
    tiny_cfg,
)

import trainer.checkpoint
import trainer.loop
import trainer.preview
from stages.cli import main as cli
from trainer import checkpoint
from trainer.loop import TrainingError, train
from trainer.models.sit import ModelConfig, SiT

pytestmark = pytest.mark.usefixtures("one_thread", "no_loss_plot")


# ----------------------------------------------------------------------------------------------
# Kill + rerun == uninterrupted, bitwise


def _assert_same_final_state(a: Path, b: Path, step: int) -> None:
    ca, cb = load_ckpt(a, step), load_ckpt(b, step)
    for key in ("model", "ema", "opt", "steps", "train_state", "scaler"):
        assert_tree_equal(ca[key], cb[key], key)
    assert_tree_equal(ca["rng"]["cpu"], cb["rng"]["cpu"], "rng")
    ea = torch.load(a / "checkpoints" / f"ema-{step:07d}.pt", weights_only=True)
    eb = torch.load(b / "checkpoints" / f"ema-{step:07d}.pt", weights_only=True)
    assert_tree_equal(ea, eb, "ema export")
    assert loss_records(a) == loss_records(b)
    png = f"samples/step-{step:07d}.png"                  # EMA preview from fixed noise and labels
    assert (a / png).read_bytes() == (b / png).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("changes, kill, resumed_phase", [
    ({"align.stop_step": 100}, 4, "I"),                                   # all in Phase I
    ({"align.stop_step": 3}, 5, "II"),                                    # resume exactly at tau, in Phase II
    ({"align.stop_step": 5}, 4, "I"),                                     # resumed run crosses tau
    ({"align.stop_step": 5, "grad_accum": 2, "data.num_workers": 2}, 4, "I"),
    ({"align.stop_step": 5, "data.num_workers": 2}, 4, "I"),              # resumed loader starts at worker 1
], ids=["phase1", "resume-at-tau", "cross-tau-after-resume", "accum2-workers2", "workers2-odd-batch"])
def test_kill_and_rerun_is_bitwise_identical(demo_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             changes: dict, kill: int, resumed_phase: str) -> None:
    """N = 6 steps straight == run killed at step index ``kill`` (after the step-3 checkpoint and some
    logged steps past it) then the same command rerun."""
    changes = {"total_steps": 6, "ckpt_every": 3, "log_every": 1, **changes}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_cfg(demo_cache, straight, changes))

    with monkeypatch.context() as m:
        kill_at(m, kill)
        with pytest.raises(Killed):
            train(tiny_cfg(demo_cache, resumed, changes))
    assert max(ckpt_steps(resumed)) == 3
    assert len(loss_records(resumed)) == kill            # lines past the checkpoint, dropped on resume

    seen = []
    real = trainer.loop.train_step
    monkeypatch.setattr(trainer.loop, "train_step", lambda *a: seen.append((a[8], a[5].name)) or real(*a))
    train(tiny_cfg(demo_cache, resumed, changes))
    assert seen[0] == (3, resumed_phase) and [s for s, _ in seen] == [3, 4, 5]
    _assert_same_final_state(straight, resumed, 6)


@pytest.mark.slow
def test_safe_change_resumes_and_continues(demo_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train N/2, then rerun with a larger total_steps (and other bookkeeping fields) -> continues to N."""
    base = {"align.stop_step": 2, "ckpt_every": 3, "log_every": 1}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_cfg(demo_cache, straight, {**base, "total_steps": 6}))
    train(tiny_cfg(demo_cache, resumed, {**base, "total_steps": 3}))
    seen = []
    real = trainer.loop.train_step
    monkeypatch.setattr(trainer.loop, "train_step", lambda *a: seen.append(a[8]) or real(*a))
    train(tiny_cfg(demo_cache, resumed, {**base, "total_steps": 6, "keep_ckpts": 5, "sample_every": 500,
                                         "sample_steps": 3, "sample_cfg": 1.0, "device": "cpu"}))
    assert seen == [3, 4, 5]
    ca, cb = load_ckpt(straight, 6), load_ckpt(resumed, 6)
    for key in ("model", "ema", "opt"):
        assert_tree_equal(ca[key], cb[key], key)


def test_finished_run_rerun_is_a_no_op(demo_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_cfg(demo_cache, tmp_path / "run", {"total_steps": 2, "align.stop_step": 1, "ckpt_every": 2})
    train(cfg)
    before = (tmp_path / "run" / "checkpoints" / "step-0000002.pt").read_bytes()
    monkeypatch.setattr(trainer.loop, "train_step", lambda *a: pytest.fail("trained again"))
    assert train(cfg)["step"] == 2
    assert (tmp_path / "run" / "checkpoints" / "step-0000002.pt").read_bytes() == before


# ----------------------------------------------------------------------------------------------
# Config changes on resume


@pytest.fixture(scope="module")
def two_step_run(demo_cache: Path, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("refuse") / "run"
    train(tiny_cfg(demo_cache, run, {"total_steps": 2, "ckpt_every": 2, "log_every": 2}))
    return run


@pytest.mark.parametrize("changes, field, old, new", [
    ({"lr": 1e-3}, "lr", "0.0003", "0.001"),
    ({"align.attn_weight": 0.25}, "align.attn_weight", "0.5", "0.25"),
    ({"model.depth": 9}, "model.depth", "8", "9"),
    ({"align.stop_step": 5}, "align.stop.step", "3", "5"),      # the legacy alias, compared normalised
    ({"data.num_workers": 2}, "data.num_workers", "0", "2"),   # changes the data order
    ({"precision": "bf16"}, "precision", "'fp32'", "'bf16'"),
])
def test_math_change_refuses_to_resume(demo_cache: Path, two_step_run: Path, monkeypatch: pytest.MonkeyPatch,
                                       changes: dict, field: str, old: str, new: str) -> None:
    before = sorted(p.name for p in two_step_run.rglob("*"))
    monkeypatch.setattr(trainer.loop, "train_step", lambda *a: pytest.fail("trained"))
    with pytest.raises(TrainingError, match="refusing to resume") as e:
        train(tiny_cfg(demo_cache, two_step_run, {"total_steps": 4, **changes}))
    assert f"{field}: {old} (checkpoint) -> {new} (now)" in str(e.value)
    assert "total_steps" not in str(e.value)          # safe fields are not listed
    assert sorted(p.name for p in two_step_run.rglob("*")) == before


def test_math_change_cli_prints_fields(demo_cache: Path, two_step_run: Path) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        args = [a for kv in overrides(demo_cache, two_step_run, {"lr": 1e-3, "model.depth": 9}) for a in ("--set", kv)]
        res = CliRunner().invoke(cli, ["train", *args])
    finally:
        root.handlers[:], root.level = handlers, level
    assert res.exit_code == 1
    assert "Error: TrainingError: refusing to resume" in res.output
    assert "lr: 0.0003 (checkpoint) -> 0.001 (now)" in res.output
    assert "model.depth: 8 (checkpoint) -> 9 (now)" in res.output
    assert "Traceback" not in res.output


# ----------------------------------------------------------------------------------------------
# Files: weights-only, atomic, pruned


def _payload(step: int) -> dict:
    return {"model": {"w": torch.full((2,), float(step))}, "ema": {"w": torch.zeros(2)}, "opt": {}, "steps": step}


def _meta() -> dict:
    return {"config": {"model": {"depth": 1}}}


def test_save_prunes_to_last_k(tmp_path: Path) -> None:
    for step in range(1, 6):
        checkpoint.save(tmp_path, step, _payload(step), _meta(), keep=2)
    assert ckpt_steps(tmp_path) == [4, 5]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "ema-0000004.pt", "ema-0000005.pt", "step-0000004.json", "step-0000004.pt", "step-0000005.json",
        "step-0000005.pt"]
    ckpt = torch.load(tmp_path / "checkpoints" / "step-0000005.pt", weights_only=True)
    assert ckpt["steps"] == 5 and torch.equal(ckpt["model"]["w"], torch.full((2,), 5.0))


def test_partial_files_are_never_taken(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, 1, _payload(1), _meta(), keep=3)
    d = tmp_path / "checkpoints"
    (d / ".step-0000009.pt.tmp1234").write_bytes(b"half a checkpoint")   # died inside torch.save
    shutil.copy(d / "step-0000001.pt", d / "step-0000008.pt")            # died before the JSON sidecar
    (d / "step-0000007.pt.tmp").write_bytes(b"junk")
    assert ckpt_steps(tmp_path) == [1]
    assert checkpoint.list_checkpoints(tmp_path) == [d / "step-0000001.pt"]


def test_save_interrupted_midway_leaves_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint.save(tmp_path, 1, _payload(1), _meta(), keep=3)
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.write(b"\0" * 10)
        raise OSError("disk full")

    monkeypatch.setattr(trainer.checkpoint.torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(tmp_path, 2, _payload(2), _meta(), keep=3)
    monkeypatch.undo()
    assert ckpt_steps(tmp_path) == [1]
    assert not (tmp_path / "checkpoints" / "step-0000002.pt").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "ema-0000001.pt", "step-0000001.json", "step-0000001.pt"]   # no tmp file left behind either


def test_corrupt_checkpoint_names_path(tmp_path: Path) -> None:
    path = checkpoint.save(tmp_path, 1, _payload(1), _meta(), keep=3)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RuntimeError, match=f"cannot load checkpoint {path}"):
        checkpoint.load(path)


def test_unsafe_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"x": pickle.PickleError("not allow-listed")}, path)
    with pytest.raises(RuntimeError, match=f"cannot load checkpoint {path}: .*Unsupported global.*PickleError"):
        checkpoint.load(path)


def test_resume_skips_incomplete_newest(demo_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    cfg = tiny_cfg(demo_cache, run, {"total_steps": 2, "ckpt_every": 1, "log_every": 2})
    train(cfg)
    d = run / "checkpoints"
    (d / "step-0000002.json").unlink()                                    # step 2 is incomplete
    (d / ".step-0000003.pt.tmp99").write_bytes(b"partial")
    seen = []
    real = trainer.loop.train_step
    monkeypatch.setattr(trainer.loop, "train_step", lambda *a: seen.append(a[8]) or real(*a))
    train(cfg)
    assert seen == [1]                                                   # resumed from step 1
    assert not list(d.glob(".*tmp*"))                                    # the killed write's temp is gone


# ----------------------------------------------------------------------------------------------
# The official HASTE/REPA format


def test_official_format_loads(tmp_path: Path) -> None:
    mcfg = ModelConfig(depth=2, hidden_size=48, num_heads=12, input_size=8, num_classes=4, projector_dim=64,
                       z_dim=96)
    torch.manual_seed(0)
    model, ema = SiT(mcfg), SiT(mcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1]), feature_block=1).out.square().mean().backward()
    opt.step()
    args = argparse.Namespace(model="SiT-XL/2", encoder_depth=8, proj_coeff=0.5, attn_coeff=0.5,
                              early_stop_point=250000, enc_type="dinov2-vit-b", resolution=256, batch_size=256,
                              learning_rate=1e-4, mixed_precision="fp16", output_dir="exps", seed=0,
                              projector_embed_dims="768", cfg_prob=0.1, resume_step=0, allow_tf32=True)
    path = tmp_path / "0001000.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": args,
                "steps": 1000}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)                 # the Namespace needs the allow-list ...
    ckpt = checkpoint.load(path)                            # ... which checkpoint.load supplies
    assert ckpt["steps"] == 1000 and ckpt["args"].encoder_depth == 8
    for key in ("model", "ema"):
        fresh = SiT(mcfg)
        fresh.load_state_dict(ckpt[key], strict=True)
        assert_tree_equal(fresh.state_dict(), (model if key == "model" else ema).state_dict(), key)
    assert checkpoint.model_state_for_inference(ckpt) is ckpt["ema"]
    assert checkpoint.model_state_for_inference(ckpt, prefer_ema=False) is ckpt["model"]
    fresh_opt = torch.optim.AdamW(SiT(mcfg).parameters(), lr=1e-4, weight_decay=0)
    fresh_opt.load_state_dict(ckpt["opt"])
    assert_tree_equal(fresh_opt.state_dict()["state"], opt.state_dict()["state"], "opt")
    buf = io.BytesIO()
    torch.save({"steps": 1}, buf)
    with pytest.raises(RuntimeError, match="neither 'ema' nor 'model'"):
        checkpoint.model_state_for_inference({"steps": 1})


@pytest.mark.parametrize("saved_states, device_index, expect", [
    (["s0"], 3, "s0"),                    # new format: this rank's device state only
    (["s0", "s1", "s2", "s3"], 2, "s2"),  # older all-devices format, same node
    (["s0", "s1"], 5, "s0"),              # older format from a node with fewer GPUs than this one
    ([f"s{i}" for i in range(8)], 1, "s1"),  # 8-GPU node resumed on a 2-GPU node: no IndexError
])
def test_restore_sets_only_this_ranks_cuda_rng(monkeypatch: pytest.MonkeyPatch, saved_states: list[str],
                                               device_index: int, expect: str) -> None:
    """Resuming on a node with a different GPU count must not index devices that do not exist
    (``set_rng_state_all`` with the saving node's list raised IndexError there)."""
    from pipeline.dist import DistInfo

    class _State:
        def __init__(self, name: str):
            self.name = name

        def cpu(self):
            return self

    class _Sink:
        def load_state_dict(self, state):
            pass

        def state_dict(self):
            return {}

    ckpt = {"model": {}, "ema": {}, "opt": {}, "steps": 7,
            "rng": {"cpu": torch.get_rng_state(), "cuda": [_State(s) for s in saved_states]}}
    calls = []
    monkeypatch.setattr(trainer.loop.checkpoint, "load", lambda path, map_location: ckpt)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append((state.name, device)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("sets every device"))
    device = torch.device("cuda", device_index)
    step = trainer.loop._restore(Path("x.pt"), _Sink(), _Sink(), _Sink(), _Sink(), DistInfo(device=device))
    assert step == 7 and calls == [(expect, device)]
