"""Checkpoints: tensors + plain types (loadable with ``weights_only=True``), written atomically.

``checkpoints/step-0001000.pt`` holds model, EMA, optimizer, GradScaler, RNG and train state
(step, phase, data position); a JSON sidecar next to it holds the config and provenance.
``ema-0001000.pt`` is the EMA-only export for sampling. The official format (``model``,
``ema``, ``opt``, ``steps``, pickled ``args``) loads too, via an allow-listed Namespace.

What eval reads to rebuild, condition and decode a model (``trainer/generate.py``), also when the
cache is gone:

    step-XXXXXXX.json (sidecar)
      config.model            the model config; config.model.arch = "sit" | "mmdit" (absent: "sit",
                              configs saved before arch existed); the other keys are that arch's
                              ModelConfig / MMDiTConfig fields (MM-DiT: context_len, context_dim, ...)
      conditioning            "class" | "text"
      latents                 {vae: the VAE identity (name, revision/hash/seed), scale, bias, num_classes}
      text                    text models only: {encoder: the text encoder's name (hub id, folder or
                              random:<preset>), seed (random:* only), weights_sha256, max_length, dim,
                              dtype (stored), group: the text group key, tokenizer, precision (of the
                              encode), null_sha256: the sha256 of the group's codec/empty_caption.npy}
      cache                   {latents, teacher, text}: the group keys trained on
    step-XXXXXXX.pt           + text_null (text models): the empty caption's encoding (L, D), stored dtype
    ema-XXXXXXX.pt            {ema, steps, model_config (= config.model), latents, conditioning}
                              + text, text_null (text models): the same records as above

So a prompt encoded by the recorded encoder at ``max_length`` conditions the model as training did,
and CFG's null (the empty caption) needs no encoder at all: ``text_null``.
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
from pipeline.cache.text import NULL_FILE

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
    export = {"ema": payload["ema"], "steps": step, "model_config": meta["config"]["model"],
              "latents": meta.get("latents"), "conditioning": meta.get("conditioning", "class")}
    if "text" in meta:  # text models: what prompts are encoded with, and CFG's null encoding itself
        export.update(text=meta["text"], text_null=payload["text_null"])
    atomic_torch_save(export, d / f"ema-{step:07d}.pt")
    with disk_full_named(d / f"step-{step:07d}.json"):
        atomic_write_json(d / f"step-{step:07d}.json", meta)  # written last: marks the checkpoint complete
    for old in list_checkpoints(run_dir)[:-keep]:
        for p in (old, old.with_suffix(".json"), ema_path(old)):
            p.unlink(missing_ok=True)
    return path


def inference_meta(cache, conditioning: str) -> dict[str, Any]:
    """The sidecar records eval needs besides the config (``latents``, ``conditioning``, ``text``; see the
    module docstring), from the groups the run trains on."""
    lat = cache.latents
    out: dict[str, Any] = {
        "conditioning": conditioning,
        "latents": {"vae": lat.identity["vae"], "scale": lat.spec.scale, "bias": lat.spec.bias,
                    "num_classes": len(lat.classes)}}
    if conditioning == "text":
        out["text"] = text_record(cache.text)
    return out


def text_record(t) -> dict[str, Any]:
    """The text group as eval's contract reads it (``trainer.generate.TextRecord``: encoder name, seed, shape,
    stored dtype, weights sha256, so eval encodes prompts with the very encoder), plus the group key,
    tokenizer, precision and the empty caption's sha256."""
    enc = t.identity.get("text_encoder") or {}
    return {"encoder": enc.get("name"), "seed": int(enc.get("seed", 0)),
            "weights_sha256": t.models.get("text_encoder", {}).get("weights_sha256"),
            "max_length": t.spec.max_length, "dim": t.spec.dim, "dtype": t.spec.dtype,
            "group": t.key, "tokenizer": t.identity.get("tokenizer"), "precision": t.identity.get("text_precision"),
            "null_sha256": t.codec_files.get(NULL_FILE, {}).get("sha256")}


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
