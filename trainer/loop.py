"""``train(cfg)``: the teacher-free two-phase HASTE loop, readable top to bottom (DiT-style).

Phase I reads latents + cached teacher targets; at tau the run checkpoints, reopens the data on
the latents group alone (teacher shards are never opened again), drops the projector from the
forward and the optimizer step, and re-wraps DDP. Rerun the same command to resume.
"""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path
from typing import Any

import torch

from pipeline import dist
from pipeline.cache.groups import git_sha
from pipeline.cache.loader import CacheStream, make_loader
from pipeline.cache.reader import Requirements, check_cache, open_cache
from pipeline.cache.shards import atomic_write_json, remove_stale_temps
from pipeline.configs import to_dict
from trainer import checkpoint
from trainer.config import RESUME_SAFE, TrainConfig, config_diff
from trainer.engine import build_model, build_optimizer, setup_numerics, train_step, update_ema, wrap
from trainer.phases import Phase, phase_at, phase_two_boundary
from trainer.preview import StatsWriter, fixed_preview_inputs, loss_plot, sample_grid
from trainer.stop import STOP_RESUME_SAFE, normalise_saved_config
from trainer.stopper import StopController

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run must stop (non-finite loss, refused resume); the message says why and where."""


def open_data(cfg: TrainConfig, phase: Phase, d: dist.DistInfo, start_batch: int):
    """Open the cache for a phase, check it against the config, and return (cache, batch iterator)."""
    cache = open_cache(cfg.data.cache, latents=cfg.data.latents or None, teacher=cfg.data.teacher or None,
                       need_teacher=phase.needs_teacher)
    m, a = cfg.model, cfg.align
    check_cache(cache, Requirements(
        latent_size=m.input_size, latent_channels=m.in_channels, num_classes=m.num_classes,
        teacher_layers=a.teacher_layers, teacher_heads=a.teacher_heads, num_tokens=m.num_tokens, feat_dim=m.z_dim,
        need_features=phase.needs_features, need_attention=phase.needs_attention))
    micro = cfg.per_rank_batch(d.world_size) // cfg.grad_accum
    stream = CacheStream(cache, with_teacher=phase.needs_teacher, batch_size=micro, seed=cfg.seed, rank=d.rank,
                         world_size=d.world_size, num_workers=cfg.data.num_workers, start_batch=start_batch,
                         shuffle=cfg.data.shuffle)
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
    d = dist.init(cfg.device)
    cfg.per_rank_batch(d.world_size)  # global batch vs world size x grad_accum, before anything is read or written
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
    stopper = StopController(cfg, d, run_dir)  # align.stop: the phase list, probes, the fired step
    step = _restore(ckpts[-1], model, ema, opt, scaler, d, stopper) if ckpts else 0
    phases = stopper.phases()
    stats = StatsWriter(run_dir, d.is_main)
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_temps(checkpoint.ckpt_dir(run_dir)):  # a killed save can be GBs
            log.info("removed %s left by an interrupted checkpoint write", stale)
        atomic_write_json(run_dir / "config.json", {"config": cfg_dict, "git_sha": git_sha(),
                                                    "world_size": d.world_size})
        stats.truncate_after(step)
    phase = phase_at(min(step, max(cfg.total_steps - 1, 0)), phases)
    cache, batches = open_data(cfg, phase, d, start_batch=step * cfg.grad_accum)
    net = wrap(model, phase, d, cfg.compile)
    log.info("run %s: step %d/%d, phase %s, %d params, world %d, per-rank batch %d x %d accum", run_dir, step,
             cfg.total_steps, phase.name, sum(p.numel() for p in model.parameters()), d.world_size,
             cfg.per_rank_batch(d.world_size) // cfg.grad_accum, cfg.grad_accum)
    meter = _Meter(d.device)
    preview = _Preview(cfg, cache, d)
    saved_at = step if ckpts else -1  # the step whose state is on disk
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
        if (probe := stopper.after_step(step, model, cache, scaler)) is not None:
            stats.write(probe)  # before this step's checkpoint, which then holds the decision
            phases = stopper.phases()
        if step % cfg.log_every == 0 or step == cfg.total_steps:
            stats.write(meter.flush(step, phase, cfg.global_batch_size))
        if step % cfg.ckpt_every == 0 or step == cfg.total_steps:
            _save(cfg, run_dir, step, model, ema, opt, scaler, phase, cache, meter, d, stopper, reason="interval")
            saved_at = step
        if step % cfg.sample_every == 0 or step == cfg.total_steps:
            preview.grid(ema, step, run_dir)
            if d.is_main:  # redrawn with the previews, not every log line: rank 0 holds the others
                loss_plot(stats.read(), run_dir / "loss.png", phase_two_boundary(phases))
    dist.barrier()
    return {"step": step, "phase": phase.name, "run_dir": str(run_dir)}


def _restore(path: Path, model, ema, opt, scaler, d: dist.DistInfo, stopper: StopController | None = None) -> int:
    ckpt = checkpoint.load(path, map_location=d.device)
    if stopper is not None:  # the fired step and probe history (align.stop)
        stopper.load_state_dict(ckpt.get("train_state", {}).get("stop"))
    model.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
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
    log.info("resumed from %s (step %d)", path, ckpt["steps"])
    return int(ckpt["steps"])


def _save(cfg, run_dir, step, model, ema, opt, scaler, phase, cache, meter, d, stopper, reason: str) -> None:
    meter.raise_if_nonfinite()  # never write a checkpoint after a NaN: the last good one stays
    if d.is_main:
        payload = {
            "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {}, "steps": step,
            "rng": {"cpu": torch.get_rng_state(),
                    "cuda": [torch.cuda.get_rng_state(d.device)] if d.device.type == "cuda" else []},
            "train_state": {"step": step, "phase": phase.name, "data_batches": step * cfg.grad_accum,
                            "world_size": d.world_size, "stop": stopper.state_dict()},
        }
        meta = {"config": to_dict(cfg), "step": step, "phase": phase.name, "reason": reason, "git_sha": git_sha(),
                "stop": stopper.state_dict(),
                "cache": {"latents": cache.latents.key, "teacher": cache.teacher.key if cache.teacher else None},
                # what `haste eval` needs to decode samples even when the cache is gone
                "latents": {"vae": cache.latents.identity["vae"], "scale": cache.latents.spec.scale,
                            "bias": cache.latents.spec.bias, "num_classes": len(cache.latents.classes)}}
        path = checkpoint.save(run_dir, step, payload, meta, keep=cfg.keep_ckpts)
        log.info("step %d: saved %s (%s)", step, path, reason)
    dist.barrier()


class _Meter:
    """Accumulates losses on the device; syncs only at log time. Remembers the first non-finite step."""

    def __init__(self, device: torch.device):
        self.device, self.sums, self.counts = device, {}, {}
        self.bad_step = torch.tensor(-1, device=device)
        self.t0, self.steps_since = time.perf_counter(), 0

    def add(self, losses: dict[str, torch.Tensor], step: int) -> None:
        for k, v in losses.items():  # per-key counts: an interval may span tau (feat/attn on only part of it)
            self.sums[k] = self.sums.get(k, 0) + v.float()
            self.counts[k] = self.counts.get(k, 0) + 1
        finite = torch.isfinite(losses["loss"])
        # new_full is a fill kernel; torch.tensor(step, device=cuda) would be a blocking copy (a host sync per step)
        self.bad_step = torch.where((self.bad_step < 0) & ~finite, self.bad_step.new_full((), step), self.bad_step)
        self.steps_since += 1

    def raise_if_nonfinite(self) -> None:
        bad = self.bad_step.clone()
        if torch.distributed.is_initialized():  # on the device: nccl cannot reduce CPU tensors
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        bad = int(bad.item())
        if bad >= 0:  # bad is the 0-based step index; logs and checkpoints count completed steps
            raise TrainingError(f"non-finite loss at step {bad + 1}; stopping. The last good checkpoint (step <= {bad}) "
                                "is kept; lower lr, check the data, or use precision=fp32 to investigate.")

    def flush(self, step: int, phase: Phase, global_batch: int) -> dict[str, Any]:
        self.raise_if_nonfinite()
        means = {k: v / self.counts[k] for k, v in self.sums.items()}
        if torch.distributed.is_initialized():  # SUM / world: gloo has no ReduceOp.AVG
            world = torch.distributed.get_world_size()
            for v in means.values():
                torch.distributed.all_reduce(v, op=torch.distributed.ReduceOp.SUM)
                v.div_(world)
        dt = time.perf_counter() - self.t0
        record = {"step": step, "phase": phase.name, **{k: round(float(v), 6) for k, v in means.items()},
                  "samples_per_s": round(global_batch * self.steps_since / max(dt, 1e-9), 2),
                  "mem_gb": round(_memory_gb(self.device), 3)}
        log.info("step %7d | phase %-7s | %s | %.1f samples/s | mem %.2f GB", step, phase.name,
                 " ".join(f"{k} {record[k]:.4f}" for k in ("loss", "denoise", "feat", "attn") if k in record),
                 record["samples_per_s"], record["mem_gb"])
        self.sums, self.counts, self.t0, self.steps_since = {}, {}, time.perf_counter(), 0
        return record


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux -> GB


class _Preview:
    """Sample grids from fixed noise/labels with the EMA model; VAE from the cache manifest, rank 0 only."""

    def __init__(self, cfg: TrainConfig, cache, d: dist.DistInfo):
        self.cfg, self.d, self.vae = cfg, d, None
        self.spec, self.vae_ident = cache.latents.spec, cache.latents.identity["vae"]
        m = cfg.model
        self.noise, self.labels = fixed_preview_inputs(cfg.sample_count, max(1, len(cache.latents.classes)),
                                                       (m.in_channels, m.input_size, m.input_size), cfg.seed)

    def grid(self, ema, step: int, run_dir: Path) -> None:
        if not self.d.is_main:
            return
        from pipeline.encoders.vae import load_vae

        if self.vae is None:
            self.vae = load_vae(self.vae_ident["name"], seed=int(self.vae_ident.get("seed", 0)), device=self.d.device)[0]
        path = sample_grid(ema, self.vae, self.noise, self.labels, steps=self.cfg.sample_steps,
                           cfg_scale=self.cfg.sample_cfg, scale=self.spec.scale, bias=self.spec.bias,
                           path=run_dir / "samples" / f"step-{step:07d}.png")
        log.info("step %d: sample grid %s", step, path)
