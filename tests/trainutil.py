"""Helpers shared by the trainer tests: a CPU-sized TrainConfig and state comparisons.

The tiny model fits the ``demo_cache`` fixture: 8x8x4 latents, 16 tokens (patch 2), 4 classes,
12 heads <-> the 12 teacher heads, z_dim 96 = the tiny teacher's feature dim.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

TINY: dict[str, Any] = {
    "model.depth": 8, "model.hidden_size": 48, "model.num_heads": 12, "model.patch_size": 2,
    "model.input_size": 8, "model.num_classes": 4, "model.projector_dim": 64, "model.z_dim": 96,
    "align.preset": "haste", "align.stop_step": 3,
    "global_batch_size": 8, "grad_accum": 1, "total_steps": 6, "lr": 3e-4, "ema_decay": 0.9,
    "precision": "fp32", "tf32": False, "device": "cpu", "threads": 1, "data.num_workers": 0,
    "log_every": 1, "ckpt_every": 3, "keep_ckpts": 10, "sample_every": 1000,
    "sample_steps": 2, "sample_count": 4, "sample_cfg": 2.0,
}


# The same sizes as an MM-DiT for the ``caption_cache`` fixture: 8 text tokens of 32 dims (the tiny CLIP text
# model), the first 12 of its 12 heads aligned; no classes.
TINY_MMDIT: dict[str, Any] = {**{k: v for k, v in TINY.items() if k != "model.num_classes"},
                              "model.arch": "mmdit", "model.context_len": 8, "model.context_dim": 32}


def overrides(cache: Path | str, run_dir: Path | str, changes: dict[str, Any] | None = None,
              base: dict[str, Any] = TINY) -> list[str]:
    """``key=value`` strings (values as JSON, which YAML reads back exactly) for the tiny config."""
    merged = {**base, "data.cache": str(cache), "run_dir": str(run_dir), **(changes or {})}
    return [f"{k}={json.dumps(v)}" for k, v in merged.items()]


def tiny_cfg(cache: Path | str, run_dir: Path | str, changes: dict[str, Any] | None = None,
             base: dict[str, Any] = TINY):
    from trainer.config import load_train_config

    return load_train_config(None, tuple(overrides(cache, run_dir, changes, base)))


def tiny_t2i_cfg(cache: Path | str, run_dir: Path | str, changes: dict[str, Any] | None = None):
    """The tiny config with a tiny MM-DiT (text-conditioned) instead of the SiT."""
    return tiny_cfg(cache, run_dir, changes, TINY_MMDIT)


def copy_cache(src: Path, dst: Path, drop_teacher: bool = False) -> Path:
    shutil.copytree(src, dst)
    if drop_teacher:
        shutil.rmtree(dst / "teacher")
    return dst


def stats(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "stats.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_records(run_dir: Path) -> list[dict[str, Any]]:
    """stats.jsonl without the timing/memory fields (which legitimately differ between runs)."""
    return [{k: v for k, v in r.items() if k not in ("samples_per_s", "mem_gb")} for r in stats(run_dir)]


def ckpt_steps(run_dir: Path) -> list[int]:
    from trainer.checkpoint import list_checkpoints

    return [int(p.stem.split("-")[1]) for p in list_checkpoints(run_dir)]


def load_ckpt(run_dir: Path, step: int) -> dict[str, Any]:
    return torch.load(Path(run_dir) / "checkpoints" / f"step-{step:07d}.pt", map_location="cpu", weights_only=True)


def assert_tree_equal(a: Any, b: Any, where: str = "") -> None:
    """Bitwise equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"tensors differ at {where}: max |diff| {(a.double() - b.double()).abs().max()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"keys differ at {where}: {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_tree_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


class Killed(Exception):
    """Raised by a patched train_step to simulate a run killed mid-way."""


def kill_at(monkeypatch, step_index: int) -> None:
    """Make the trainer die when it reaches the optimizer step with 0-based ``step_index``."""
    import trainer.loop

    real = trainer.loop.train_step

    def dying(*args, **kwargs):
        step = args[8] if len(args) > 8 else kwargs["step"]
        if step == step_index:
            raise Killed(f"killed at step {step}")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer.loop, "train_step", dying)


@contextlib.contextmanager
def single_thread():
    """Tiny models run several times faster on one intra-op thread than on two (far more on a busy box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
