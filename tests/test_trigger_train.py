"""The trigger inside training: probes change no training step (bitwise), a fired trigger equals a fixed
tau at that step, the fired step survives a kill + rerun without being decided again, --probe-only
reproduces a run's own probe (our and the official checkpoint format), and 2 ranks agree with 1."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_trigger import trigger_cfg
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

import trainer.loop
import trainer.preview
import trainer.stopper
from stages.cli import main as cli
from trainer.loop import train

REPO = Path(__file__).resolve().parents[1]
FIRES = {"trigger": "grad-angle", "start": 2, "every": 2, "samples": 8, "batch_size": 4, "threshold": 1.0}
NEVER = {**FIRES, "start": 1, "every": 1, "threshold": -1.0}   # mean < -1 is impossible: probes, no decision


pytestmark = pytest.mark.usefixtures("one_thread", "no_loss_plot")


def _same_training(a: Path, b: Path, step: int) -> None:
    ca, cb = load_ckpt(a, step), load_ckpt(b, step)
    for key in ("model", "ema", "opt", "scaler"):
        assert_tree_equal(ca[key], cb[key], key)
    assert_tree_equal(ca["rng"]["cpu"], cb["rng"]["cpu"], "rng")


def _records(run: Path) -> list[dict]:
    """stats.jsonl without timings (samples/s, memory, a probe's seconds), which differ between runs."""
    return [{**r, "probe": {k: v for k, v in r["probe"].items() if k != "seconds"}} if "probe" in r else r
            for r in loss_records(run)]


def _losses(run: Path) -> list[dict]:
    return [r for r in loss_records(run) if "probe" not in r]


def _probes(run: Path) -> list[dict]:
    return [r for r in loss_records(run) if "probe" in r]


@pytest.mark.slow
def test_probes_do_not_change_training(demo_cache: Path, tmp_path: Path) -> None:
    """A probe after every step (never firing) vs no probe at all: bitwise the same training."""
    probed, plain = tmp_path / "probed", tmp_path / "plain"
    train(trigger_cfg(demo_cache, probed, NEVER, {"total_steps": 4, "ckpt_every": 4}))
    train(tiny_cfg(demo_cache, plain, {"align.stop_step": None, "total_steps": 4, "ckpt_every": 4}))
    _same_training(probed, plain, 4)
    assert _losses(probed) == _losses(plain)
    assert [r["step"] for r in _probes(probed)] == [1, 2, 3, 4]
    assert not any(r["probe"]["fired"] for r in _probes(probed))
    assert load_ckpt(probed, 4)["train_state"]["stop"]["fired_step"] is None


@pytest.mark.slow
def test_fired_trigger_equals_fixed_tau_and_resumes(demo_cache: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Fires after step 2 -> the same run as tau = 2. Killed in Phase II and rerun: bitwise the same, and the
    rerun takes the fired step from the checkpoint (no probe, no decision)."""
    fired, fixed, resumed = tmp_path / "fired", tmp_path / "fixed", tmp_path / "resumed"
    changes = {"total_steps": 6, "ckpt_every": 3}
    out = train(trigger_cfg(demo_cache, fired, FIRES, changes))
    train(tiny_cfg(demo_cache, fixed, {"align.stop_step": 2, **changes}))
    assert out["phase"] == "II"
    assert ckpt_steps(fired) == ckpt_steps(fixed) == [2, 3, 6]      # the phase-change checkpoint at 2
    _same_training(fired, fixed, 6)
    assert _losses(fired) == _losses(fixed)
    assert [(r["step"], r["probe"]["fired"]) for r in _probes(fired)] == [(2, True)]
    state = load_ckpt(fired, 2)["train_state"]
    assert state["stop"]["fired_step"] == 2 and len(state["stop"]["probes"]) == 1
    assert json.loads((fired / "stop.json").read_text())["fired_step"] == 2
    assert (fired / "probe.png").is_file()

    with pytest.raises(Killed):
        kill_at(monkeypatch, 4)
        train(trigger_cfg(demo_cache, resumed, FIRES, changes))
    monkeypatch.undo()
    monkeypatch.setattr(trainer.preview, "loss_plot", lambda *a, **k: None)
    monkeypatch.setattr(trainer.stopper, "run_probe", lambda *a, **k: pytest.fail("probed again after a resume"))
    assert train(trigger_cfg(demo_cache, resumed, FIRES, changes))["step"] == 6
    _same_training(fired, resumed, 6)
    assert_tree_equal(load_ckpt(fired, 6)["train_state"], load_ckpt(resumed, 6)["train_state"], "train_state")
    assert _records(fired) == _records(resumed)


@pytest.mark.slow
def test_max_step_bounds_the_trigger(demo_cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(trigger_cfg(demo_cache, run, {**NEVER, "max_step": 3}, {"total_steps": 4, "ckpt_every": 4}))
    assert [r["step"] for r in _probes(run)] == [1, 2]                # no probe at or after max_step
    assert [r["phase"] for r in _losses(run)] == ["I", "I", "I", "II"]


# ----------------------------------------------------------------------------------------------
# --probe-only


def _cli(*args: str) -> str:
    res = CliRunner().invoke(cli, list(args))
    assert res.exit_code == 0, res.output[-3000:]
    return res.output


@pytest.mark.slow
def test_probe_only_reproduces_the_runs_probe(demo_cache: Path, tmp_path: Path, restore_logging) -> None:
    run = tmp_path / "run"
    cfg_sets = [s for s in overrides(demo_cache, run, {"total_steps": 2, "ckpt_every": 2})
                if not s.startswith("align.stop_step=")] + [f"align.stop.{k}={v}" for k, v in NEVER.items()]
    train(trigger_cfg(demo_cache, run, NEVER, {"total_steps": 2, "ckpt_every": 2}))
    in_run = _probes(run)[-1]["probe"]
    args = [a for kv in cfg_sets for a in ("--set", kv)]

    ckpt = run / "checkpoints" / "step-0000002.pt"
    line = _cli("train", *args, "--probe-only", str(ckpt))
    got = json.loads((run / "checkpoints" / "step-0000002-probe.json").read_text())
    assert got["source"] == "checkpoint" and got["step"] == 2 and got["samples"] == 8
    assert got["cos"] == in_run["cos"] and got["mean"] == in_run["mean"]    # the same computation, bitwise
    assert "would not fire" in line and "step 2" in line

    # The official format: online weights + projector under "model", an argparse Namespace, "steps".
    state = torch.load(ckpt, weights_only=True)
    official = tmp_path / "0000002.pt"
    torch.save({"model": state["model"], "ema": state["ema"], "opt": {}, "steps": 2,
                "args": argparse.Namespace(model="SiT-S/2", encoder_depth=8)}, official)
    _cli("train", *args, "--probe-only", str(official), "--probe-out", str(tmp_path / "official.json"))
    off = json.loads((tmp_path / "official.json").read_text())
    assert off["source"] == "official" and off["cos"] == in_run["cos"]

    res = CliRunner().invoke(cli, ["train", *args, "--probe-only", str(run / "checkpoints" / "ema-0000002.pt")])
    assert res.exit_code == 1 and "EMA export" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["train", *args, "--set", "model.depth=9", "--probe-only", str(ckpt)])
    assert res.exit_code == 1 and "do not fit the configured model" in res.output


# ----------------------------------------------------------------------------------------------
# torchrun: the probe split over 2 ranks and reduced == 1 process


@pytest.mark.slow
def test_two_rank_probe_matches_single_process(demo_cache: Path, tmp_path: Path) -> None:
    ddp_run, single_run = tmp_path / "ddp", tmp_path / "single"
    common = {"total_steps": 3, "ckpt_every": 3, "log_every": 1}
    sets = [s for s in overrides(demo_cache, ddp_run, {**common, "grad_accum": 1})
            if not s.startswith("align.stop_step=")] + [f"align.stop.{k}={v}" for k, v in FIRES.items()]
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2", "-m",
           "stages.cli", "train", *[a for kv in sets for a in ("--set", kv)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    train(trigger_cfg(demo_cache, single_run, FIRES, {**common, "grad_accum": 2, "data.num_workers": 2}))

    pa, pb = _probes(ddp_run), _probes(single_run)
    assert [(r["step"], r["probe"]["fired"], r["probe"]["samples"]) for r in pa] == [(2, True, 8)]
    assert [(r["step"], r["probe"]["fired"]) for r in pb] == [(2, True)]
    assert pa[0]["probe"]["cos"] == pytest.approx(pb[0]["probe"]["cos"], abs=1e-5)
    assert [r["phase"] for r in _losses(ddp_run)] == [r["phase"] for r in _losses(single_run)] == ["I", "I", "II"]
    a, b = load_ckpt(ddp_run, 3), load_ckpt(single_run, 3)
    assert a["train_state"]["stop"]["fired_step"] == b["train_state"]["stop"]["fired_step"] == 2
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], atol=1e-5, rtol=1e-4)
