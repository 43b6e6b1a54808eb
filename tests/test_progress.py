"""Training progress: the bar on a terminal, plain log lines otherwise, ETA, and the threads knob."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainutil import tiny_cfg

import trainer.loop
from trainer.engine import choose_threads
from trainer.loop import train
from trainer.progress import Progress, format_eta

REPO = Path(__file__).resolve().parents[1]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


RECORD = {"step": 6, "phase": "II", "loss": 0.5, "denoise": 0.5, "samples_per_s": 123.4, "mem_gb": 0.25}


@pytest.mark.parametrize("seconds, text", [(None, "?"), (0.4, "0s"), (42, "42s"), (185, "3m05s"), (3725, "1h02m"),
                                           (90000, "25h00m")])
def test_format_eta(seconds, text) -> None:
    assert format_eta(seconds) == text


def test_eta_is_remaining_steps_at_the_mean_rate_so_far() -> None:
    clock = _Clock()
    p = Progress(total=20, enabled=True, stream=io.StringIO(), clock=clock)
    p.start(4)
    assert p.eta_s() is None                       # nothing measured yet
    clock.t += 10.0
    p.update(9, "I")                               # 5 steps in 10 s -> 11 steps left take 22 s
    assert p.eta_s() == pytest.approx(22.0)


def test_plain_lines_when_not_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    stream, clock = io.StringIO(), _Clock()
    p = Progress(total=1000, enabled=True, stream=stream, clock=clock)
    p.start(0)
    clock.t += 30.0
    p.update(6, "II")
    with caplog.at_level(logging.INFO, logger="trainer.loop"):
        p.log_interval(RECORD)
    p.close()
    assert stream.getvalue() == ""                 # no bar, no carriage returns in a log file
    line = caplog.records[-1].getMessage()
    for part in ("step    6/1000", "phase II", "loss 0.5000", "123.4 samples/s", "ETA 1h22m", "mem 0.25 GB"):
        assert part in line, (part, line)


def test_bar_on_a_terminal() -> None:
    tty, clock = _Tty(), _Clock()
    with Progress(total=10, enabled=True, stream=tty, clock=clock) as p:
        p.start(4)
        clock.t += 2.0
        p.update(5, "I")
        p.log_interval({**RECORD, "step": 5, "phase": "I"})
        p.update(6, "II")
    out = tty.getvalue()
    assert "6/10" in out and "phase II" in out and "123 samples/s" in out and "<" in out  # tqdm's [elapsed<ETA]


@pytest.mark.parametrize("enabled, tty", [(False, True), (True, False)], ids=["rank-not-0", "not-a-tty"])
def test_no_bar_off_rank_zero_or_off_a_terminal(enabled: bool, tty: bool) -> None:
    stream = _Tty() if tty else io.StringIO()
    with Progress(total=10, enabled=enabled, stream=stream) as p:
        p.start(0)
        p.update(1, "I")
    assert p.bar is None and stream.getvalue() == ""


def test_train_logs_total_steps_and_progress(demo_cache: Path, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="trainer.loop"):
        train(tiny_cfg(demo_cache, tmp_path / "run", {"total_steps": 2, "log_every": 1, "ckpt_every": 2}))
    lines = [r.getMessage() for r in caplog.records if r.name == "trainer.loop"]
    assert any("2 steps in all, starting at step 0 in phase I" in line for line in lines), lines
    steps = [line for line in lines if line.startswith("step 1/2 | phase I ") or line.startswith("step 2/2 | phase I ")]
    assert len(steps) == 2 and all("samples/s | ETA " in line for line in steps), lines


# ----------------------------------------------------------------------------------------------
# Threads


def test_choose_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert choose_threads(3, cpu) == 3 and choose_threads(2, gpu) == 2     # an explicit count always wins
    assert choose_threads("auto", gpu) is None                             # a GPU run keeps torch's choice
    monkeypatch.setenv("OMP_NUM_THREADS", "1")                             # torchrun's (or the user's) choice
    assert choose_threads("auto", cpu) is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})   # e.g. taskset -c 0-2
    assert choose_threads("auto", cpu) == 3
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert choose_threads("auto", cpu) == 2


def test_threads_knob_applies_during_training_only(demo_cache: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    seen, real = [], trainer.loop.train_step
    monkeypatch.setattr(trainer.loop, "train_step", lambda *a: seen.append(torch.get_num_threads()) or real(*a))
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    train(tiny_cfg(demo_cache, tmp_path / "run", {"total_steps": 2, "threads": want}))
    assert seen == [want, want] and torch.get_num_threads() == before


def test_cli_sets_passive_wait_policy_before_torch_loads() -> None:
    """OpenMP reads OMP_WAIT_POLICY once, when torch loads it; the CLI must set it first (an explicit
    setting wins)."""
    probe = ("import builtins, os\n"
             "real = builtins.__import__\n"
             "def imp(name, *a, **k):\n"
             "    if name.startswith('torch') and 'OMP_WAIT_POLICY' not in os.environ:\n"
             "        raise SystemExit('torch imported before OMP_WAIT_POLICY was set')\n"
             "    return real(name, *a, **k)\n"
             "builtins.__import__ = imp\n"
             "import stages.cli\n"
             "print(os.environ['OMP_WAIT_POLICY'])\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "PASSIVE", out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True)
    assert out.stdout.strip() == "ACTIVE", out.stderr[-2000:]


def test_a_failing_run_closes_the_bar_and_restores_logging() -> None:
    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)
    root.addHandler(console)
    try:
        before = root.handlers[:]
        with pytest.raises(RuntimeError, match="boom"), Progress(total=10, enabled=True, stream=_Tty()) as p:
            p.start(0)
            assert root.handlers != before            # log lines go through tqdm.write while the bar is up
            raise RuntimeError("boom")
        assert p.bar is None and root.handlers == before
    finally:
        root.removeHandler(console)
