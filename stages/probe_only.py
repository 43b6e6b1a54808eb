"""``haste train --probe-only CKPT``: the termination probe on an existing checkpoint, as JSON.

Looks at the gradient angle (``trainer/probe.py``) of runs that already exist: our full
checkpoints (``step-XXXXXXX.pt``) or an official HASTE/REPA one (``model`` + ``args``), whose
online weights and projector it loads into the model that the train config describes (``--set
model.*`` to match an official file). The probe set comes from the config's cache; the trigger's
settings from ``align.stop`` when it is a trigger, else the paper's (``TriggerStop()``); the probe
RNG is keyed by the checkpoint's step, so on one of our checkpoints it reproduces the probe the
run itself made at that step. Works under torchrun (the samples are split over the ranks).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from pipeline import dist
from pipeline.cache.reader import check_cache, open_cache
from pipeline.cache.shards import atomic_write_json
from pipeline.configs import to_dict
from trainer import checkpoint
from trainer.config import TrainConfig, config_diff, normalise_saved_config
from trainer.engine import setup_numerics
from trainer.models.archs import Network, build_network
from trainer.probe import run_probe
from trainer.stop import TriggerStop, check_trigger_fits

log = logging.getLogger(__name__)


def run(cfg: TrainConfig, ckpt_path: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Probe ``ckpt_path`` and write the cosines to ``out`` (default ``<ckpt>-probe.json``); rank 0 returns them."""
    ckpt_path = Path(ckpt_path)
    out = Path(out) if out else ckpt_path.with_name(f"{ckpt_path.stem}-probe.json")
    stop = cfg.align.stop if isinstance(cfg.align.stop, TriggerStop) else TriggerStop()
    a = cfg.align
    check_trigger_fits(stop, depth=cfg.model.depth, feat_weight=a.feat_weight, attn_weight=a.attn_weight,
                       feature_block=a.feature_block, student_blocks=a.student_blocks)
    d = dist.init(cfg.device)
    setup_numerics(cfg)
    model, step, source = load_online_model(ckpt_path, cfg, d.device)
    cache = open_cache(cfg.data.cache, latents=cfg.data.latents or None, teacher=cfg.data.teacher or None,
                       need_text=cfg.text_conditioned)
    check_cache(cache, cfg.cache_requirements(features=a.feat_weight > 0, attention=a.attn_weight > 0))
    result = run_probe(model, cfg, stop, cache, step, d)
    fires = stop.fires([result.record])
    cos = " ".join(f"t={t:g} {c:+.4f}" for t, c in zip(result.record.times, result.record.cos))
    summary = (f"probe {ckpt_path.name} (step {step}): {cos} | mean {result.record.mean:+.4f} vs threshold "
               f"{stop.threshold:+g}: {'would fire' if fires else 'would not fire'} ({stop.trigger}, block "
               f"{stop.block}, {result.samples} samples, {result.seconds:.1f} s) -> {out}")
    payload = {"checkpoint": str(ckpt_path), "source": source, "world_size": d.world_size, "stop": to_dict(stop),
               **result.to_dict(), "would_fire": fires, "summary": summary}
    if d.is_main:
        atomic_write_json(out, payload)
    dist.barrier()
    return payload


def load_online_model(path: Path, cfg: TrainConfig, device: torch.device) -> tuple[Network, int, str]:
    """The online weights (projector included) of our full checkpoint or an official file, in ``cfg.model``."""
    ckpt = checkpoint.load(path)
    if "model_config" in ckpt:
        raise ValueError(f"{path} is an EMA export: it holds neither the online weights nor the projector the "
                         "probe differentiates; pass the full checkpoint step-XXXXXXX.pt of the same step")
    if "train_state" in ckpt and path.with_suffix(".json").is_file():
        source = "checkpoint"
        saved = normalise_saved_config(checkpoint.load_meta(path)["config"])
        diff = config_diff({k: saved.get(k) for k in ("model", "align")},
                           {"model": to_dict(cfg.model), "align": to_dict(cfg.align)})
        diff = {k: v for k, v in diff.items() if not k.startswith("align.stop")}
        if diff:
            log.warning("%s was trained with another model/align config than the one given (%s); the probe "
                        "uses the given one", path, ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()))
    elif "args" in ckpt:
        source = "official"
        depth = getattr(ckpt["args"], "encoder_depth", None)
        if depth is not None and depth - 1 != cfg.align.feature_block:
            log.warning("%s: official encoder_depth %s = feature_block %d, but align.feature_block is %d",
                        path, depth, depth - 1, cfg.align.feature_block)
    else:
        source = "state-dict"
    state = ckpt.get("model", ckpt)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: no 'model' state dict of online weights (keys: {sorted(ckpt)[:8]})")
    model = build_network(cfg.model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        raise ValueError(f"{path}: the weights do not fit the configured model ({lines[1].strip() if len(lines) > 1 else e}); "
                         "set model.* (e.g. --set model.preset=SiT-XL/2) and align.* to the run's") from None
    step = int(ckpt.get("steps", 0))
    log.info("probing %s (%s, step %d) on %s", path, source, step, device)
    return model.to(device), step, source
