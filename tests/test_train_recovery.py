"""Kills that used to leave damage a rerun did not repair, and the stats of a resumed run.

- stats.jsonl after resuming from a checkpoint inside a log interval (tau) == the uninterrupted run's;
- a kill while a resume rewrites stats.jsonl loses no history; a torn last line is repaired, named;
- a kill between a checkpoint and its preview: the rerun draws the grid (bitwise) and the loss plot;
- a rerun removes every temp file the train stage owns;
- full disks and checkpoints of another architecture are one-line messages naming the file.
"""

from __future__ import annotations

import builtins
import io
import logging
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from trainutil import Killed, ckpt_steps, kill_at, loss_records, overrides, stats, tiny_cfg

import trainer.checkpoint
import trainer.preview
import trainer.runlog
from stages.cli import main as cli
from trainer import checkpoint
from trainer.checkpoint import DiskFullError, TrainingError
from trainer.loop import train
from trainer.runlog import StatsWriter

pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args: str):
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        return CliRunner().invoke(cli, list(args))
    finally:
        root.handlers[:], root.level = handlers, level


# ----------------------------------------------------------------------------------------------
# Stats of a resumed run


@pytest.mark.slow
def test_resume_from_tau_inside_a_log_interval_writes_the_same_stats(demo_cache: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """tau = 5 with log_every = 4: the end-of-Phase-I checkpoint falls inside the interval (4, 8]. The
    resumed run must average that interval over steps 5..8 like the uninterrupted one, not 6..8."""
    changes = {"total_steps": 8, "align.stop_step": 5, "log_every": 4, "ckpt_every": 100}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_cfg(demo_cache, straight, changes))
    with monkeypatch.context() as m:
        kill_at(m, 6)
        with pytest.raises(Killed):
            train(tiny_cfg(demo_cache, resumed, changes))
    assert ckpt_steps(resumed) == [5]
    train(tiny_cfg(demo_cache, resumed, changes))
    assert [r["step"] for r in stats(straight)] == [4, 8]
    assert loss_records(resumed) == loss_records(straight)


# ----------------------------------------------------------------------------------------------
# stats.jsonl: atomic rewrite, torn last line


class _DiesMidWrite:
    """A file that writes half of what it is given, then the process 'dies'."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise Killed("killed mid-write")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_kill_while_resume_rewrites_stats_loses_no_history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = StatsWriter(tmp_path, enabled=True)
    records = [{"step": s, "phase": "I", "loss": 1.0 / s} for s in range(1, 7)]
    for r in records:
        writer.write(r)
    real_open = builtins.open

    def dying_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return _DiesMidWrite(f) if str(file).startswith(str(tmp_path)) and any(c in mode for c in "wa") else f

    with monkeypatch.context() as m:  # every way of opening a file for writing dies half-way
        m.setattr(builtins, "open", dying_open)
        m.setattr(io, "open", dying_open)
        with pytest.raises(Killed):
            writer.truncate_after(3)
    assert writer.read() == records                       # the old file, whole
    writer.truncate_after(3)                              # the rerun finishes the job
    assert writer.read() == records[:3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.jsonl"]


def test_torn_last_line_is_repaired_on_resume_and_named(demo_cache: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    changes = {"total_steps": 2, "log_every": 1, "ckpt_every": 2, "align.stop_step": 1}
    train(tiny_cfg(demo_cache, run, changes))
    path = run / "stats.jsonl"
    before = stats(run)
    with open(path, "a") as f:
        f.write('{"step": 3, "phase": "II", "loss": 0.12')   # killed inside the append of step 3
    with caplog.at_level(logging.WARNING):
        train(tiny_cfg(demo_cache, run, {**changes, "total_steps": 3}))
    assert any(str(path) in r.getMessage() and "line 3" in r.getMessage() for r in caplog.records), caplog.text
    after = stats(run)                                    # every line parses again
    assert after[:2] == before and [r["step"] for r in after] == [1, 2, 3]


def test_stats_reader_skips_a_torn_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "stats.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    with caplog.at_level(logging.WARNING):
        assert StatsWriter(tmp_path, enabled=True).read() == [{"step": 1, "loss": 1.0}]
    assert f"{tmp_path / 'stats.jsonl'} line 2 is unreadable" in caplog.text


# ----------------------------------------------------------------------------------------------
# A kill between a checkpoint and its preview


@pytest.mark.slow
@pytest.mark.parametrize("kill_step", [3, 6], ids=["mid-run", "last-step"])
def test_rerun_draws_previews_a_kill_skipped(demo_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             kill_step: int) -> None:
    changes = {"total_steps": 6, "align.stop_step": 2, "log_every": 1, "ckpt_every": 3, "sample_every": 3}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_cfg(demo_cache, straight, changes))
    real_grid = trainer.preview.Previewer.grid

    def dying_grid(self, ema, step, run_dir):
        if step == kill_step:
            raise Killed(f"killed before the step-{step} preview")
        return real_grid(self, ema, step, run_dir)

    with monkeypatch.context() as m:
        m.setattr(trainer.preview.Previewer, "grid", dying_grid)
        with pytest.raises(Killed):
            train(tiny_cfg(demo_cache, resumed, changes))
    png = f"samples/step-{kill_step:07d}.png"
    assert ckpt_steps(resumed)[-1] == kill_step and not (resumed / png).exists()
    (resumed / "loss.png").unlink(missing_ok=True)
    train(tiny_cfg(demo_cache, resumed, changes))
    for name in ("samples/step-0000003.png", "samples/step-0000006.png"):
        assert (resumed / name).read_bytes() == (straight / name).read_bytes(), name
    assert (resumed / "loss.png").is_file()


# ----------------------------------------------------------------------------------------------
# Temp files


def test_rerun_removes_the_temp_files_of_the_train_stage(demo_cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = tiny_cfg(demo_cache, run, {"total_steps": 1, "ckpt_every": 1, "sample_every": 1})
    train(cfg)
    temps = [run / ".config.json.tmp41", run / ".stats.jsonl.tmp42", run / ".loss.png.tmp43",
             run / "samples" / ".step-0000001.png.tmp44", run / "checkpoints" / ".step-0000002.pt.tmp45",
             run / "checkpoints" / ".ema-0000002.pt.tmp45", run / "checkpoints" / ".step-0000002.json.tmp45"]
    for p in temps:
        p.write_bytes(b"half")
    other_stage = run / "eval" / "tag" / ".samples.npz.tmp46"   # eval's own, not train's to remove
    other_stage.parent.mkdir(parents=True)
    other_stage.write_bytes(b"half")
    train(cfg)
    assert [p for p in temps if p.exists()] == [] and other_stage.exists()


def test_loss_plot_is_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "loss.png"
    path.write_bytes(b"the previous plot")
    import matplotlib.figure

    def dying_savefig(self, fname, *a, **k):
        Path(fname).write_bytes(b"half a png")
        raise Killed("killed inside savefig")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", dying_savefig)
    with pytest.raises(Killed):
        trainer.preview.loss_plot([{"step": 1, "denoise": 1.0}], path, None)
    assert path.read_bytes() == b"the previous plot" and sorted(tmp_path.iterdir()) == [path]


# ----------------------------------------------------------------------------------------------
# Messages: full disk, weights of another architecture


def _dev_full(monkeypatch: pytest.MonkeyPatch, module, suffix: str) -> None:
    """Writes to files ending in ``suffix`` go to /dev/full (the kernel answers ENOSPC)."""
    real_open = builtins.open

    def full_open(file, mode="r", *a, **k):
        if str(file).endswith(suffix) and any(c in mode for c in "wa"):
            return real_open("/dev/full", mode.replace("a", "w"), *a, **k)
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(module, "open", full_open, raising=False)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_disk_full_during_checkpoint_names_the_file(demo_cache: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    _dev_full(monkeypatch, trainer.checkpoint, f".pt.tmp{os.getpid()}")
    res = invoke("train", *[a for kv in overrides(demo_cache, run, {"total_steps": 1, "ckpt_every": 1})
                            for a in ("--set", kv)])
    assert res.exit_code == 1
    error = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert error == [f"Error: DiskFullError: disk full while writing {run / 'checkpoints' / 'step-0000001.pt'}: "
                     "free space on that filesystem (or lower keep_ckpts), then rerun to resume"], res.output
    assert "enforce fail" not in res.output and "Traceback" not in res.output
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == []   # no temp left behind


def test_disk_full_inside_torch_save_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails inside torch.save surfaces as "[enforce fail at inline_container.cc] ...
    unexpected pos"; the ENOSPC underneath must become the one-line message."""
    import errno

    import torch

    real_save = torch.save

    class Filling(io.RawIOBase):
        def __init__(self, f):
            self.f, self.n = f, 0

        def writable(self):
            return True

        def write(self, b):
            self.n += len(b)
            if self.n > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

    monkeypatch.setattr(trainer.checkpoint.torch, "save", lambda obj, f: real_save(obj, Filling(f)))
    with pytest.raises(DiskFullError) as e:
        checkpoint.save(tmp_path, 1, {"model": {"w": torch.zeros(10_000)}, "ema": {}, "opt": {}, "steps": 1},
                        {"config": {"model": {}}}, keep=2)
    assert str(e.value).startswith(f"disk full while writing {tmp_path / 'checkpoints' / 'step-0000001.pt'}: ")
    assert "enforce fail" not in str(e.value) and sorted((tmp_path / "checkpoints").iterdir()) == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_disk_full_while_logging_names_stats_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _dev_full(monkeypatch, trainer.runlog, "stats.jsonl")
    with pytest.raises(DiskFullError, match=f"^disk full while writing {tmp_path / 'stats.jsonl'}: "):
        StatsWriter(tmp_path, enabled=True).write({"step": 1, "loss": 1.0})


def test_resume_with_weights_of_another_width_is_one_line(demo_cache: Path, tmp_path: Path) -> None:
    run, other = tmp_path / "run", tmp_path / "other"
    train(tiny_cfg(demo_cache, run, {"total_steps": 1, "ckpt_every": 1}))
    train(tiny_cfg(demo_cache, other, {"total_steps": 1, "ckpt_every": 1, "model.hidden_size": 24}))
    target = run / "checkpoints" / "step-0000001.pt"
    shutil.copy(other / "checkpoints" / "step-0000001.pt", target)  # the sidecar (config) still matches
    res = invoke("train", *[a for kv in overrides(demo_cache, run, {"total_steps": 2, "ckpt_every": 1})
                            for a in ("--set", kv)])
    assert res.exit_code == 1
    error = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "size mismatch" not in res.output, res.output
    assert error[0].startswith(f"Error: TrainingError: checkpoint {target} does not fit the configured model "
                               "(model): parameter 'pos_embed' has shape (1, 16, 24) in the checkpoint, "
                               "(1, 16, 48) in the model"), error[0]


def test_check_fits_names_missing_and_extra_parameters() -> None:
    import torch

    want = {"a": torch.zeros(2), "b": torch.zeros(3)}
    with pytest.raises(TrainingError, match=r"f\.pt does not fit .*\(ema\): parameter 'b' \(3,\) of the model is "
                                            "missing from the checkpoint"):
        checkpoint.check_fits({"a": torch.zeros(2)}, want, "f.pt", "ema")
    with pytest.raises(TrainingError, match=r"the checkpoint has parameter 'c' \(1,\), which the model does not"):
        checkpoint.check_fits({**want, "c": torch.zeros(1)}, want, "f.pt", "ema")
    checkpoint.check_fits(dict(want), want, "f.pt", "ema")   # a fitting state passes


def test_meter_state_round_trip_per_rank() -> None:
    """The partial interval is saved per rank (all ranks' sums, gathered); each rank takes its own back,
    and another world size takes the mean (its data order differs anyway)."""
    import torch

    from trainer.runlog import Meter

    m = Meter(torch.device("cpu"))
    for v in (1.0, 2.0, 4.0):
        m.add({"loss": torch.tensor(v), "feat": torch.tensor(-v)}, step=0)
    state = m.state_dict()
    assert state["counts"] == {"feat": 3, "loss": 3} and torch.equal(state["sums"]["loss"], torch.tensor([7.0]))
    fresh = Meter(torch.device("cpu"))
    fresh.load_state_dict(state, rank=0, world_size=1)
    fresh.add({"loss": torch.tensor(8.0), "feat": torch.tensor(-8.0)}, step=3)
    m.add({"loss": torch.tensor(8.0), "feat": torch.tensor(-8.0)}, step=3)
    a, b = fresh.flush(4, "I", 8), m.flush(4, "I", 8)
    assert (a["loss"], a["feat"]) == (b["loss"], b["feat"]) == (3.75, -3.75)

    two_ranks = {"sums": {"loss": torch.tensor([7.0, 9.0])}, "counts": {"loss": 3}}
    r1 = Meter(torch.device("cpu"))
    r1.load_state_dict(two_ranks, rank=1, world_size=2)
    assert float(r1.sums["loss"]) == 9.0
    r0 = Meter(torch.device("cpu"))
    r0.load_state_dict(two_ranks, rank=0, world_size=3)
    assert float(r0.sums["loss"]) == 8.0 and r0.counts == {"loss": 3}
    empty = Meter(torch.device("cpu"))
    empty.load_state_dict({}, rank=0, world_size=1)            # checkpoints from before this field
    assert empty.state_dict() == {"sums": {}, "counts": {}}
