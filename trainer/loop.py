"""``train(cfg)``: the teacher-free two-phase HASTE loop, readable top to bottom (DiT-style).

Phase I reads latents + cached teacher targets; at tau the run checkpoints, reopens the data on
the latents group alone (teacher shards are never opened again), drops the projector from the
forward and the optimizer step, and re-wraps DDP. Rerun the same command to resume. A text model
(``model.arch: mmdit``) reads the text group too, in both phases (latents + teacher + text, then
latents + text).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from pipeline import dist
from pipeline.cache.groups import git_sha
from pipeline.cache.loader import CacheStream, make_loader
from pipeline.cache.reader import check_cache, open_cache
from pipeline.cache.shards import atomic_write_json, remove_stale_temps
from pipeline.configs import to_dict
from trainer import checkpoint
from trainer.checkpoint import TrainingError
from trainer.config import RESUME_SAFE, TrainConfig, config_diff, normalise_saved_config
from trainer.engine import (
    build_model,
    build_optimizer,
    choose_threads,
    intra_op_threads,
    setup_numerics,
    train_step,
    update_ema,
    wrap,
)
from trainer.phases import Phase, phase_at, phase_two_boundary
from trainer.preview import Previewer
from trainer.progress import Progress
from trainer.runlog import Meter, StatsWriter
from trainer.stop import STOP_RESUME_SAFE
from trainer.stopper import StopController

log = logging.getLogger(__name__)
__all__ = ["TrainingError", "train"]


def open_data(cfg: TrainConfig, phase: Phase, d: dist.DistInfo, start_batch: int):
    """Open the cache for a phase, check it against the config, and return (cache, batch iterator)."""
    cache = open_cache(cfg.data.cache, latents=cfg.data.latents or None, teacher=cfg.data.teacher or None,
                       need_teacher=phase.needs_teacher, need_text=cfg.text_conditioned)
    check_cache(cache, cfg.cache_requirements(features=phase.needs_features, attention=phase.needs_attention))
    micro = cfg.per_rank_batch(d.world_size) // cfg.grad_accum
    stream = CacheStream(cache, with_teacher=phase.needs_teacher, batch_size=micro, seed=cfg.seed, rank=d.rank,
                         world_size=d.world_size, num_workers=cfg.data.num_workers, start_batch=start_batch,
                         shuffle=cfg.data.shuffle, verify=cfg.data.verify_shards, with_text=cfg.text_conditioned)
    # A DataLoader iterator draws its workers' base seed from the global RNG; the stream does not use
    # it, so keep the global RNG (saved in checkpoints) independent of when the data was (re)opened.
    with torch.random.fork_rng(devices=[]):
        return cache, iter(make_loader(stream, cfg.data.num_workers, pin_memory=d.device.type == "cuda"))


def check_resume(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    diff = {k: v for k, v in config_diff(normalise_saved_config(saved), current).items()
            if k not in RESUME_SAFE | STOP_RESUME_SAFE}
    if diff:
        lines = "\n".join(f"  {k}: {a!r} (checkpoint) -> {b!r} (now)" for k, a, b in
                          ((k, *v) for k, v in diff.items()))
        raise TrainingError(f"refusing to resume from {path}: the config changed in fields that alter the math:\n"
                            f"{lines}\nUse a new run_dir, or restore these values.")


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train to ``cfg.total_steps``, resuming from the newest complete checkpoint in ``cfg.run_dir``."""
    d = dist.init(cfg.device)
    cfg.per_rank_batch(d.world_size)  # global batch vs world size x grad_accum, before anything is read or written
    with intra_op_threads(choose_threads(cfg.threads, d.device)), Progress(cfg.total_steps, d.is_main) as progress:
        return _train(cfg, d, progress)


def _train(cfg: TrainConfig, d: dist.DistInfo, progress: Progress) -> dict[str, Any]:
    setup_numerics(cfg)
    torch.manual_seed(cfg.seed + d.rank)  # global RNG (official set_seed); a resume restores the saved state
    run_dir = Path(cfg.run_dir)
    cfg_dict = to_dict(cfg)
    ckpts = checkpoint.list_checkpoints(run_dir)
    if ckpts:
        check_resume(checkpoint.load_meta(ckpts[-1])["config"], cfg_dict, ckpts[-1])
    model, ema = build_model(cfg, d.device)
    opt = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.precision == "fp16")
    meter = Meter(d.device)
    stopper = StopController(cfg, d, run_dir)  # align.stop: the phase list, probes, the fired step
    step = _restore(ckpts[-1], model, ema, opt, scaler, d, meter, stopper) if ckpts else 0
    phases = stopper.phases()
    stats = StatsWriter(run_dir, d.is_main)
    if d.is_main:
        _prepare_run_dir(run_dir, {"config": cfg_dict, "git_sha": git_sha(), "world_size": d.world_size}, stats, step)
    phase = phase_at(min(step, max(cfg.total_steps - 1, 0)), phases)
    cache, batches = open_data(cfg, phase, d, start_batch=step * cfg.grad_accum)
    net = wrap(model, phase, d, cfg.compile)
    preview = Previewer(cfg, cache, d)  # loads the preview VAE now: a missing one fails before step 1
    preview.repair(ema, run_dir, step, stats, phase_two_boundary(phases))
    log.info("run %s: %d steps in all, starting at step %d in phase %s; %d params, world %d, per-rank batch "
             "%d x %d accum", run_dir, cfg.total_steps, step, phase.name, sum(p.numel() for p in model.parameters()),
             d.world_size, cfg.per_rank_batch(d.world_size) // cfg.grad_accum, cfg.grad_accum)
    saved_at = step if ckpts else -1  # the step whose state is on disk
    meter.start()
    progress.start(step)
    while step < cfg.total_steps:
        new = phase_at(step, phases)
        if new != phase:  # an explicit event: checkpoint (unless the interval save just did), reopen data, re-wrap
            if saved_at != step:
                _save(cfg, run_dir, step, model, ema, opt, scaler, phase, cache, meter, d, stopper,
                      reason=f"end of phase {phase.name}")
                saved_at = step
            log.info("step %d: entering phase %s (teacher %s)", step, new.name, "on" if new.needs_teacher else "off")
            phase = new
            del batches
            cache, batches = open_data(cfg, phase, d, start_batch=step * cfg.grad_accum)
            net = wrap(model, phase, d, cfg.compile)
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        losses = train_step(net, model, opt, scaler, cfg, phase, cache, micro, step, d)
        update_ema(ema, model, cfg.ema_decay)
        meter.add(losses, step)
        step += 1
        progress.update(step, phase.name)
        if (probe := stopper.after_step(step, model, cache, scaler)) is not None:
            stats.write(probe)  # before this step's checkpoint, which then holds the decision
            phases = stopper.phases()
        if step % cfg.log_every == 0 or step == cfg.total_steps:
            record = meter.flush(step, phase.name, cfg.global_batch_size)
            stats.write(record)
            progress.log_interval(record)
        if step % cfg.ckpt_every == 0 or step == cfg.total_steps:
            _save(cfg, run_dir, step, model, ema, opt, scaler, phase, cache, meter, d, stopper, reason="interval")
            saved_at = step
        if preview.is_preview_step(step):
            preview.grid(ema, step, run_dir)
            preview.plot(stats, run_dir, phase_two_boundary(phases))  # redrawn with the previews, not every log line
    dist.barrier()
    return {"step": step, "phase": phase.name, "run_dir": str(run_dir)}


def _prepare_run_dir(run_dir: Path, config_json: dict[str, Any], stats: StatsWriter, step: int) -> None:
    """Rank 0, before training: remove the temp files killed writes left, record the config, and cut
    stats.jsonl back to the checkpoint we resume from (repairing a torn last line)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for d in (run_dir, run_dir / "samples", checkpoint.ckpt_dir(run_dir)):  # a killed checkpoint save can be GBs
        for stale in remove_stale_temps(d) if d.is_dir() else ():
            log.info("removed %s left by an interrupted write", stale)
    with checkpoint.disk_full_named(run_dir / "config.json"):
        atomic_write_json(run_dir / "config.json", config_json)
    stats.truncate_after(step)


def _restore(path: Path, model, ema, opt, scaler, d: dist.DistInfo, meter: Meter | None = None,
             stopper: StopController | None = None) -> int:
    ckpt = checkpoint.load(path, map_location=d.device)
    for key, module in (("model", model), ("ema", ema)):
        checkpoint.check_fits(ckpt[key], module.state_dict(), path, key)
        module.load_state_dict(ckpt[key])
    if stopper is not None:  # the fired step and probe history (align.stop)
        stopper.load_state_dict(ckpt.get("train_state", {}).get("stop"))
    opt.load_state_dict(ckpt["opt"])
    if "scaler" in ckpt and ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    rng = ckpt.get("rng", {})
    if "cpu" in rng:
        torch.set_rng_state(rng["cpu"].cpu())
    if d.device.type == "cuda" and rng.get("cuda"):
        # This rank's device only: the saved list may come from a node with more (or fewer) GPUs.
        states, idx = rng["cuda"], d.device.index or 0
        torch.cuda.set_rng_state((states[idx] if idx < len(states) else states[0]).cpu(), d.device)
    saved_world = ckpt.get("train_state", {}).get("world_size", d.world_size)
    if saved_world != d.world_size:
        log.warning("resuming with world size %d (checkpoint: %d): the data order will differ", d.world_size, saved_world)
    if meter is not None:  # the log interval the checkpoint fell into continues where it stopped
        meter.load_state_dict(ckpt.get("train_state", {}).get("log_interval", {}), d.rank, d.world_size)
    log.info("resumed from %s (step %d)", path, ckpt["steps"])
    return int(ckpt["steps"])


def _save(cfg, run_dir, step, model, ema, opt, scaler, phase, cache, meter: Meter, d, stopper: StopController,
          reason: str) -> None:
    meter.raise_if_nonfinite()  # never write a checkpoint after a NaN: the last good one stays
    log_interval = meter.state_dict()  # all ranks' partial sums (a collective)
    if d.is_main:
        payload = {
            "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {}, "steps": step,
            "rng": {"cpu": torch.get_rng_state(),
                    "cuda": [torch.cuda.get_rng_state(d.device)] if d.device.type == "cuda" else []},
            "train_state": {"step": step, "phase": phase.name, "data_batches": step * cfg.grad_accum,
                            "world_size": d.world_size, "log_interval": log_interval, "stop": stopper.state_dict()},
        }
        if cfg.text_conditioned:  # CFG's null: eval needs no text encoder for it
            payload["text_null"] = cache.text_null()
        meta = {"config": to_dict(cfg), "step": step, "phase": phase.name, "reason": reason, "git_sha": git_sha(),
                "stop": stopper.state_dict(),
                "cache": {"latents": cache.latents.key, "teacher": cache.teacher.key if cache.teacher else None,
                          "text": cache.text.key if cache.text else None},
                # what `haste eval` needs to rebuild, condition and decode samples even when the cache is gone
                **checkpoint.inference_meta(cache, "text" if cfg.text_conditioned else "class")}
        path = checkpoint.save(run_dir, step, payload, meta, keep=cfg.keep_ckpts)
        log.info("step %d: saved %s (%s)", step, path, reason)
    dist.barrier()
