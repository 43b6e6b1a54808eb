"""Checkpoints: tensors + plain types (loadable with ``weights_only=True``), written atomically.

``checkpoints/step-0001000.pt`` holds model, EMA, optimizer, GradScaler, RNG and train state
(step, phase, data position); a JSON sidecar next to it holds the config and provenance.
``ema-0001000.pt`` is the EMA-only export for sampling. The official format (``model``,
``ema``, ``opt``, ``steps``, pickled ``args``) loads too, via an allow-listed Namespace.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import pickle
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.cache.shards import atomic_write_json

log = logging.getLogger(__name__)
_NAME = re.compile(r"^step-(\d{7,})\.pt$")


def ckpt_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


class TrainingError(RuntimeError):
    """The run must stop (non-finite loss, refused resume); the message says why and where."""


class DiskFullError(OSError):
    """A write ran out of space; the message names the file (one line, no library internals)."""


def _is_disk_full(e: BaseException) -> bool:
    # torch.save reports a failed write of its file object as "[enforce fail at inline_container.cc]
    # ... unexpected pos", with the OSError only as the exception's context.
    return any(isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT) for x in (e, e.__context__))


@contextlib.contextmanager
def disk_full_named(path: Path) -> Iterator[None]:
    """Re-raise ENOSPC (also wrapped by torch.save) as one line naming ``path``."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if isinstance(e, DiskFullError) or not _is_disk_full(e):
            raise
        raise DiskFullError(f"disk full while writing {path}: free space on that filesystem (or lower "
                            "keep_ckpts), then rerun to resume") from None


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with disk_full_named(path), open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # killed or failed mid-write: no half file left behind (it never counts anyway)
        tmp.unlink(missing_ok=True)
        raise


def save(run_dir: str | Path, step: int, payload: dict[str, Any], meta: dict[str, Any], keep: int) -> Path:
    """Write step-XXXXXXX.pt (+ .json, + ema-XXXXXXX.pt) atomically, then prune to the last ``keep``."""
    d = ckpt_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"step-{step:07d}.pt"
    atomic_torch_save(payload, path)
    atomic_torch_save({"ema": payload["ema"], "steps": step, "model_config": meta["config"]["model"],
                       "latents": meta.get("latents")},
                      d / f"ema-{step:07d}.pt")
    with disk_full_named(d / f"step-{step:07d}.json"):
        atomic_write_json(d / f"step-{step:07d}.json", meta)  # written last: marks the checkpoint complete
    for old in list_checkpoints(run_dir)[:-keep]:
        for p in (old, old.with_suffix(".json"), ema_path(old)):
            p.unlink(missing_ok=True)
    return path


def step_of(path: Path) -> int:
    """The step of a ``step-XXXXXXX.pt`` checkpoint."""
    return int(_NAME.match(Path(path).name).group(1))


def ema_path(path: Path) -> Path:
    """The EMA export saved with checkpoint ``path``."""
    return Path(path).with_name(Path(path).name.replace("step-", "ema-"))


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (tensor file + JSON sidecar), oldest first."""
    d = ckpt_dir(run_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if _NAME.match(p.name) and p.with_suffix(".json").is_file()]
    return sorted(found, key=step_of)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); official HASTE/REPA files included."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
            lines = str(e).strip().splitlines() or [type(e).__name__]
            why = next((ln.strip() for ln in lines if "Unsupported global" in ln), lines[0])  # not torch's advice
            raise RuntimeError(f"cannot load checkpoint {path}: {why}") from None


def check_fits(saved: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], path: str | Path,
               what: str) -> None:
    """Refuse a state dict of another architecture in one line: the file and the first differing parameter
    (``load_state_dict`` would list every mismatch, without the file name)."""
    why = None
    for name, t in expected.items():
        if name not in saved:
            why = f"parameter {name!r} {tuple(t.shape)} of the model is missing from the checkpoint"
        elif tuple(saved[name].shape) != tuple(t.shape):
            why = (f"parameter {name!r} has shape {tuple(saved[name].shape)} in the checkpoint, "
                   f"{tuple(t.shape)} in the model")
        if why:
            break
    extra = next((k for k in saved if k not in expected), None)
    if why is None and extra is not None:
        why = f"the checkpoint has parameter {extra!r} {tuple(saved[extra].shape)}, which the model does not"
    if why:
        raise TrainingError(f"checkpoint {path} does not fit the configured model ({what}): {why}. "
                           "Check the model config, or use a new run_dir")


def load_meta(path: Path) -> dict[str, Any]:
    return json.loads(path.with_suffix(".json").read_text())


def model_state_for_inference(ckpt: dict[str, Any], prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """The weights to sample with from any of our formats or the official one."""
    key = "ema" if prefer_ema and "ema" in ckpt else "model"
    if key not in ckpt:
        raise RuntimeError(f"checkpoint has neither 'ema' nor 'model' (keys: {sorted(ckpt)})")
    return ckpt[key]
