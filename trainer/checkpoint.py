"""Checkpoints: tensors + plain types (loadable with ``weights_only=True``), written atomically.

``checkpoints/step-0001000.pt`` holds model, EMA, optimizer, GradScaler, RNG and train state
(step, phase, data position); a JSON sidecar next to it holds the config and provenance.
``ema-0001000.pt`` is the EMA-only export for sampling. The official format (``model``,
``ema``, ``opt``, ``steps``, pickled ``args``) loads too, via an allow-listed Namespace.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from pipeline.cache.shards import atomic_write_json

log = logging.getLogger(__name__)
_NAME = re.compile(r"^step-(\d{7,})\.pt$")


def ckpt_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
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
    atomic_write_json(d / f"step-{step:07d}.json", meta)  # written last: marks the checkpoint complete
    for old in list_checkpoints(run_dir)[:-keep]:
        for p in (old, old.with_suffix(".json"), old.with_name(old.name.replace("step-", "ema-"))):
            p.unlink(missing_ok=True)
    return path


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (tensor file + JSON sidecar), oldest first."""
    d = ckpt_dir(run_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if _NAME.match(p.name) and p.with_suffix(".json").is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); official HASTE/REPA files included."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
            lines = str(e).strip().splitlines() or [type(e).__name__]
            why = next((ln.strip() for ln in lines if "Unsupported global" in ln), lines[0])  # not torch's advice
            raise RuntimeError(f"cannot load checkpoint {path}: {why}") from None


def load_meta(path: Path) -> dict[str, Any]:
    return json.loads(path.with_suffix(".json").read_text())


def model_state_for_inference(ckpt: dict[str, Any], prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """The weights to sample with from any of our formats or the official one."""
    key = "ema" if prefer_ema and "ema" in ckpt else "model"
    if key not in ckpt:
        raise RuntimeError(f"checkpoint has neither 'ema' nor 'model' (keys: {sorted(ckpt)})")
    return ckpt[key]
