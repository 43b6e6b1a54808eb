"""2-process gloo DDP (torchrun) == 1 process with the same global batch, through Phase I into Phase II.

The micro-batch RNG slot is ``rank * grad_accum + j`` and the reader slot ``rank * num_workers +
worker``, so one process with grad_accum=2 and 2 loader workers sees exactly the samples and noise
of 2 ranks with grad_accum=1 and one reader each. Only the gradient reduction order differs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainutil import (
    TINY,
    TINY_MMDIT,
    ckpt_steps,
    load_ckpt,
    loss_records,
    overrides,
    tiny_cfg,
)

import trainer.loop
import trainer.preview
from trainer.loop import train

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
COMMON = {"total_steps": 4, "align.stop_step": 2, "ckpt_every": 4, "log_every": 2, "global_batch_size": 8}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sit", "mmdit"])
def test_two_rank_gloo_matches_single_process(arch: str, request: pytest.FixtureRequest, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """For MM-DiT also the caption picks and CFG nulls: slot = rank * grad_accum + j names their generator too."""
    base = TINY_MMDIT if arch == "mmdit" else TINY
    demo_cache = request.getfixturevalue("caption_cache" if arch == "mmdit" else "demo_cache")
    ddp_run, single_run = tmp_path / "ddp", tmp_path / "single"
    sets = overrides(demo_cache, ddp_run, {**COMMON, "grad_accum": 1, "data.num_workers": 0}, base)
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "stages.cli", "train",
           *[a for kv in sets for a in ("--set", kv)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun timed out; stderr tail:\n{(e.stderr or b'')[-3000:]!r}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"step": 4, "phase": "II", "run_dir": str(ddp_run)}
    assert "entering phase II" in proc.stderr and "world 2, per-rank batch 4 x 1 accum" in proc.stderr

    monkeypatch.setattr(trainer.preview, "loss_plot", lambda *a, **k: None)
    train(tiny_cfg(demo_cache, single_run, {**COMMON, "grad_accum": 2, "data.num_workers": 2}, base))

    assert ckpt_steps(ddp_run) == ckpt_steps(single_run) == [2, 4]   # end of Phase I, end of run
    assert json.loads((ddp_run / "config.json").read_text())["world_size"] == 2
    for step in (2, 4):
        a, b = load_ckpt(ddp_run, step), load_ckpt(single_run, step)
        assert a["train_state"]["world_size"] == 2 and b["train_state"]["world_size"] == 1
        for key in ("model", "ema"):
            assert a[key].keys() == b[key].keys()
            for name in a[key]:
                torch.testing.assert_close(a[key][name], b[key][name], atol=1e-5, rtol=1e-4,
                                           msg=lambda m, n=name, k=key, s=step: f"step {s} {k}.{n}: {m}")
        # The projector trained in Phase I and is frozen after it, on every rank.
        proj = [n for n in a["model"] if n.startswith("projectors.")]
        assert proj
    final, at_tau = load_ckpt(ddp_run, 4), load_ckpt(ddp_run, 2)
    assert all(torch.equal(final["model"][n], at_tau["model"][n]) for n in proj)

    ra, rb = loss_records(ddp_run), loss_records(single_run)
    assert [(r["step"], r["phase"], sorted(r)) for r in ra] == [(r["step"], r["phase"], sorted(r)) for r in rb]
    for x, y in zip(ra, rb):
        for k in ("loss", "denoise", "feat", "attn"):
            if k in x:
                assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-5), (k, x, y)


def test_no_sync_reaches_ddp_through_compile(tmp_path: Path) -> None:
    """grad_accum micro-batches skip the all-reduce also when the DDP module is wrapped by torch.compile
    (an isinstance(net, DDP) test alone misses the OptimizedModule and all-reduces every micro-batch)."""
    import torch.distributed as torch_dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from trainer.engine import no_sync

    torch_dist.init_process_group("gloo", store=torch_dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                                  world_size=1)
    try:
        ddp = DDP(torch.nn.Linear(2, 2))
        for net in (ddp, torch.compile(ddp)):  # compile is lazy: nothing is traced here
            with no_sync(net):
                assert not ddp.require_backward_grad_sync
            assert ddp.require_backward_grad_sync
        with no_sync(torch.nn.Linear(2, 2)):  # a single process: nothing to skip
            pass
    finally:
        torch_dist.destroy_process_group()
