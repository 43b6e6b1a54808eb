"""Training step time with cached targets vs the official online-teacher step, and loader speed.

Same model, same batch, one process. Variants (median seconds per optimizer step; see online_fn):
  denoise_only   SiT without projector, no taps: the floor
  phase2         our Phase II step (projector frozen and out of the forward, no taps)
  phase1_cached  our Phase I step: features + attention logits decoded from cached q/k
  official       HASTE train.py emulated, every step incl. Phase II: DINOv2-B with explicit
                 attention and all 12 layers' logits, student logits in every block, projector
  online_lean    a lean online teacher (4 hooked layers, 4 student taps): the floor of not caching
Loader: samples/s of the Phase I (latents+teacher) and Phase II (latents) streams vs a raw read
of the same shard bytes. Targets: phase1_cached <= 0.85x official, phase2 <= 1.02x denoise_only.

    python benchmarks/bench_train.py [--device cuda --model SiT-XL/2 --batch 32]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, interleaved_medians, sync, write  # noqa: E402
from pipeline.cache.loader import CacheStream  # noqa: E402
from pipeline.cache.reader import open_cache  # noqa: E402
from pipeline.dist import DistInfo  # noqa: E402
from pipeline.encoders.teacher import load_teacher  # noqa: E402
from pipeline.inputs.synth import synth_image  # noqa: E402
from stages.preprocess import PreprocessConfig, run  # noqa: E402
from trainer.config import load_train_config  # noqa: E402
from trainer.engine import (  # noqa: E402
    autocast,
    build_model,
    build_optimizer,
    prepare_inputs,
    setup_numerics,
    train_step,
    wrap,
)
from trainer.models.sit import SIT_PRESETS  # noqa: E402
from trainer.objectives import attention_alignment_loss, repa_loss  # noqa: E402
from trainer.phases import Phase, build_phases  # noqa: E402


def build_cache(root: Path, n: int, args) -> Path:
    run(PreprocessConfig(source=f"synthetic:{n}", synthetic_classes=8, out=str(root), resolution=256,
                         shard_size=args.batch, vae="random:tiny", teacher="random:base", batch_size=args.batch,
                         num_workers=0, device=args.device))
    return root


def overrides(args) -> tuple[str, ...]:
    """ATTA aligns the first min(12, heads) student heads (all 12 for B, L, XL)."""
    heads = list(range(min(12, SIT_PRESETS[args.model]["num_heads"])))
    return (f"model.preset={args.model}", f"align.student_heads={heads}", f"align.teacher_heads={heads}")


def trainer(args, cache_root: Path, z_dim: int = 768):
    over = (*overrides(args), f"model.z_dim={z_dim}", f"global_batch_size={args.batch}",
            f"precision={args.precision}", f"device={args.device}", f"data.cache={cache_root}", "data.num_workers=0")
    if z_dim == 0:  # a plain SiT: no projector, so no feature loss either
        over = (*over, "align.feat_weight=0", "align.attn_weight=0")
    cfg = load_train_config(None, over)
    setup_numerics(cfg)
    d = DistInfo(device=torch.device(args.device))
    model, _ = build_model(cfg, d.device)
    opt = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(d.device.type, enabled=False)
    return cfg, d, model, opt, scaler


def step_fn(args, cache, batch, phase: Phase, z_dim: int):
    cfg, d, model, opt, scaler = trainer(args, cache.root, z_dim)
    net = wrap(model, phase, d, args.compile)
    return lambda: train_step(net, model, opt, scaler, cfg, phase, cache, [batch], 0, d)


def online_fn(args, cache, batch, images, faithful: bool):
    """An online-teacher step on the same model and batch.

    faithful=True emulates HASTE train.py as SPEC §2.4/§7 describes it, which is what runs in
    both of its phases: DINOv2 with explicit (unfused) attention materialising the logits of
    all 12 layers, the student computing q·kᵀ in every block and returning blocks
    0..feature_block, the projector, and Accelerate's fp32 copies of the returned logits.
    faithful=False is a lean online teacher: fused attention, hooks on the 4 aligned layers
    only, student taps on the aligned blocks only (the cost floor of not caching).
    """
    cfg, d, model, opt, scaler = trainer(args, cache.root)
    a = cfg.align
    layers = tuple(range(12)) if faithful else a.teacher_layers
    teacher, _ = load_teacher("random:base", layers=layers, resolution=256, device=d.device)
    if faithful:
        for blk in teacher.model.blocks:
            blk.attn.fused_attn = False
    taps = tuple(range(cfg.model.depth)) if faithful else a.student_blocks
    pick = [layers.index(layer) for layer in a.teacher_layers]
    prec = "bf16" if args.precision != "fp32" else "fp32"
    lat = {k: v for k, v in batch.items() if k not in ("q", "k", "feat")}

    def step():
        with torch.no_grad():
            t = teacher(images, prec)
            with autocast(cfg, d.device):
                logits = (t.q * teacher.scale) @ t.k.transpose(-1, -2)      # (N, L, H, T, T)
        g = torch.Generator(device=d.device).manual_seed(0)
        inp = prepare_inputs(lat, model, cfg, Phase(name="x", start=0, end=None), cache, d.device, g)
        tt = torch.rand(inp.x0.shape[0], device=d.device)
        with autocast(cfg, d.device):
            out = model(inp.x0, tt, inp.y, attn_blocks=taps, feature_block=a.feature_block)
        student = {b: (out.attn_logits[b].float() if faithful else out.attn_logits[b]) for b in taps}
        loss = ((out.out.float() - inp.x0) ** 2).mean() + 0.5 * repa_loss(out.features.float(), t.feat) + \
            0.5 * attention_alignment_loss([student[b] for b in a.student_blocks], [logits[:, i] for i in pick],
                                           a.student_heads, a.teacher_heads)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def loader_speed(cache_root: Path, batch: int, samples: int) -> dict:
    out = {}
    for name, with_teacher in (("phase1", True), ("phase2", False)):
        cache = open_cache(cache_root, need_teacher=with_teacher)
        it = iter(CacheStream(cache, with_teacher=with_teacher, batch_size=batch, seed=0))
        next(it)
        t0, n = time.perf_counter(), 0
        while n < samples:
            n += len(next(it)["key"])
        out[f"{name}_samples_per_s"] = n / (time.perf_counter() - t0)
    cache = open_cache(cache_root, need_teacher=True)
    paths = [cache.shard_path(k, s) for s in range(cache.num_shards) for k in ("latents", "teacher")]
    t0, nbytes = time.perf_counter(), 0
    for p in paths:
        nbytes += len(p.read_bytes())
    raw_s = time.perf_counter() - t0
    out["raw_read_samples_per_s"] = cache.latents.num_samples / raw_s
    out["raw_read_mb_per_s"] = nbytes / raw_s / 1e6
    out["phase1_over_raw"] = out["phase1_samples_per_s"] / out["raw_read_samples_per_s"]
    return {k: round(v, 3) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="SiT-B/2")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--loader-samples", type=int, default=64)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = build_cache(Path(tmp) / "cache", args.batch * 4, args)
        cache = open_cache(root)
        batch = next(iter(CacheStream(cache, with_teacher=True, batch_size=args.batch, seed=0)))
        if device.type == "cuda":  # the trainer's DataLoader pins batches in a background thread
            batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
        images = torch.stack([torch.from_numpy(synth_image(i, 8, 256)[0]) for i in range(args.batch)])
        images = images.permute(0, 3, 1, 2).contiguous().to(device)
        phases = build_phases(load_train_config(None, overrides(args)).align)
        fns = {
            "denoise_only": step_fn(args, open_cache(root, need_teacher=False), batch, phases[1], z_dim=0),
            "phase2": step_fn(args, open_cache(root, need_teacher=False), batch, phases[1], z_dim=768),
            "phase1_cached": step_fn(args, cache, batch, phases[0], z_dim=768),
            "official": online_fn(args, cache, batch, images, faithful=True),
            "online_lean": online_fn(args, cache, batch, images, faithful=False),
        }
        secs = interleaved_medians(fns, reps=args.reps, warmup=2, device=device)
        sync(device)
        loader = loader_speed(root, args.batch, args.loader_samples)
    result = {
        "benchmark": "train_step", "env": environment(device), "model": args.model, "batch": args.batch,
        "precision": args.precision, "compile": args.compile, "seconds_per_step": {k: round(v, 4) for k, v in secs.items()},
        "ratios": {"phase1_cached_over_official": round(secs["phase1_cached"] / secs["official"], 3),
                   "phase1_cached_over_online_lean": round(secs["phase1_cached"] / secs["online_lean"], 3),
                   "phase2_over_denoise_only": round(secs["phase2"] / secs["denoise_only"], 3),
                   "phase2_over_official": round(secs["phase2"] / secs["official"], 3)},
        "targets": {"phase1_cached_over_official": 0.85, "phase2_over_denoise_only": 1.02},
        "loader": loader,
    }
    path = write(f"train-{device.type}-{args.model.replace('/', '_')}", result, args.out)
    print(f"{result['seconds_per_step']} {result['ratios']} loader {loader} -> {path}")


if __name__ == "__main__":
    main()
