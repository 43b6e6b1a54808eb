"""Training step time and memory with cached targets vs the official online-teacher step, and loader speed.

Same model, same batch, one process; every variant updates its EMA, as both trainers do every step.
Variants (median seconds per optimizer step, interleaved):
  denoise_only     SiT without projector, no taps: the floor
  phase2           our Phase II step (projector frozen and out of the forward, no taps, no teacher)
  phase1_cached    our Phase I step: features + attention logits decoded from the cache (default codec)
  official_phase1  HASTE train.py's Phase I step, re-enacted op for op (benchmarks/official_emulation.py):
                   DINOv2-B with explicit attention keeping all 12 layers' logits, the student's q·kᵀ in
                   every block with fused SDPA outputs, logits of blocks 0..7 and the projector returned
                   and converted to fp32, loss.py's losses, clipping, AdamW, per-parameter EMA
  official_phase2  the same with loss.py's denoise_only (teacher and return_act forward still run)
  online_lean      a lean online teacher (4 hooked layers, fused attention, 4 student taps): the floor
                   of not caching
  phase1_cached_attn0  (MM-DiT only) our Phase I with align.attn_weight 0: the released T2I recipe, whose
                   official step computes ATTA but zeroes it, like for like
Memory per variant: resident state (weights, EMA, optimizer state, teacher, codec arrays) plus the step's
peak tensor allocations (CUDA: allocator peak; CPU: profiler allocation events). Also the default
codec's decode of one batch against the teacher forwards it replaces. Loader: samples/s of the
Phase I (latents+teacher) and Phase II (latents) streams vs a raw read of the same shard bytes.
Targets: phase1_cached <= 0.85x official_phase1, phase2 <= 1.02x denoise_only.

MM-DiT (``--model MMDiT-24/2``, or any ``MMDiT-<depth>/<patch>`` by the official width rule, hidden
32·depth and depth heads, e.g. ``MMDiT-12/2`` on a CPU): the same variants on a captioned cache (CLIP
ViT-L/14's text tower at random init: 77 x 768 contexts), against train_t2i.py's step re-enacted
(DINOv2 online every step, the MM-DiT's image-token logits of blocks 0-7, ATTA computed then zeroed).

    python benchmarks/bench_train.py [--device cuda --model SiT-XL/2 --batch 32]
    python benchmarks/bench_train.py --model MMDiT-12/2       # the CPU size; MMDiT-24/2 = the paper's
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    environment,
    interleaved_medians,
    step_peak_bytes,
    sync,
    tensor_bytes,
    write,
)
from benchmarks.official_emulation import explicit_teacher_attention, official_step_fn  # noqa: E402
from pipeline.cache.codecs_blocks import LOW_GEMMS  # noqa: E402
from pipeline.cache.codecs_stream import DECODE_COMPUTE  # noqa: E402
from pipeline.cache.loader import CacheStream  # noqa: E402
from pipeline.cache.reader import open_cache  # noqa: E402
from pipeline.cache.schema import get_codec  # noqa: E402
from pipeline.dist import DistInfo  # noqa: E402
from pipeline.encoders.teacher import load_teacher, preprocess  # noqa: E402
from pipeline.inputs.synth import synth_image  # noqa: E402
from stages.preprocess import PreprocessConfig, run  # noqa: E402
from trainer.config import load_train_config  # noqa: E402
from trainer.engine import (  # noqa: E402
    autocast,
    build_model,
    build_optimizer,
    prepare_inputs,
    set_phase_trainable,
    setup_numerics,
    train_step,
    update_ema,
    wrap,
)
from trainer.models.mmdit import MMDIT_PRESETS  # noqa: E402
from trainer.models.sit import SIT_PRESETS  # noqa: E402
from trainer.objectives import attention_alignment_loss, repa_loss  # noqa: E402
from trainer.phases import Phase, build_phases  # noqa: E402

MIB = 2**20
EMULATION = ("HASTE train.py per phase, op for op (benchmarks/official_emulation.py); EMA in every variant")
EMULATION_T2I = ("HASTE train_t2i.py per phase, op for op (benchmarks/official_emulation.py): teacher online every "
                 "step, image-token logits of blocks 0-7, ATTA computed then zeroed; EMA in every variant")


def is_mmdit(args) -> bool:
    return args.model.startswith("MMDiT-")


def build_cache(root: Path, n: int, args) -> Path:
    source = {"source": f"synthetic-captions:{n}", "text_encoder": "random:l14", "text_batch_size": 32} \
        if is_mmdit(args) else {"source": f"synthetic:{n}", "synthetic_classes": 8}
    run(PreprocessConfig(**source, out=str(root), resolution=256, shard_size=args.batch, vae="random:tiny",
                         teacher="random:base", batch_size=args.batch, num_workers=0, device=args.device))
    return root


def model_fields(name: str) -> dict:
    """A preset's fields; ``MMDiT-<depth>/<patch>`` outside the presets by the official rule (hidden 32·depth)."""
    if name in SIT_PRESETS:
        return SIT_PRESETS[name]
    if name in MMDIT_PRESETS:
        return MMDIT_PRESETS[name]
    depth, patch = (int(v) for v in name.removeprefix("MMDiT-").split("/"))
    return dict(depth=depth, hidden_size=32 * depth, num_heads=depth, patch_size=patch)


def overrides(args) -> tuple[str, ...]:
    """ATTA aligns the first min(12, heads) student heads (all 12 for B, L, XL; the first 12 of MM-DiT's)."""
    fields = model_fields(args.model)
    heads = list(range(min(12, fields["num_heads"])))
    arch = ("model.arch=mmdit",) if is_mmdit(args) else ()
    return (*arch, *(f"model.{k}={v}" for k, v in fields.items()), f"align.student_heads={heads}",
            f"align.teacher_heads={heads}")


@dataclass
class Trainer:
    """One model with its EMA, optimizer and scaler; variants of the same architecture may share one."""

    cfg: object
    d: DistInfo
    model: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler

    def state_bytes(self) -> int:
        """Weights, EMA and optimizer state: what stays allocated between steps."""
        tensors = [*self.model.parameters(), *self.model.buffers(), *self.ema.parameters(), *self.ema.buffers()]
        tensors += [v for s in self.opt.state.values() for v in s.values() if torch.is_tensor(v)]
        return tensor_bytes(tensors)


@dataclass
class Variant:
    step: Callable[[], None]
    state_bytes: Callable[[], int]


def trainer(args, cache_root: Path, z_dim: int = 768) -> Trainer:
    over = (*overrides(args), f"model.z_dim={z_dim}", f"global_batch_size={args.batch}",
            f"precision={args.precision}", f"device={args.device}", f"data.cache={cache_root}", "data.num_workers=0",
            f"data.teacher_decode={args.teacher_decode}")
    if z_dim == 0:  # a plain SiT: no projector, so no feature loss either
        over = (*over, "align.feat_weight=0", "align.attn_weight=0")
    cfg = load_train_config(None, over)
    setup_numerics(cfg)
    d = DistInfo(device=torch.device(args.device))
    model, ema = build_model(cfg, d.device)
    scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.precision == "fp16")  # as trainer.loop
    return Trainer(cfg, d, model, ema, build_optimizer(cfg, model), scaler)


def our_variant(args, tr: Trainer, cache, batch, phase: Phase) -> Variant:
    """Our step as trainer.loop runs it: train_step, then the EMA update."""
    net = wrap(tr.model, phase, tr.d, args.compile)
    spec = cache.teacher.spec if phase.needs_attention else None
    codec_bytes = 0
    if spec is not None:  # the codec's group arrays (tokens-*: the q/k projections), kept on the device
        arrays = get_codec(spec.codec).params(spec)
        codec_bytes = sum(torch.empty((), dtype=getattr(torch, dt)).element_size() * int(torch.Size(shape).numel())
                          for dt, shape in arrays.values())
        if decode_compute(args) == "bf16-mixed" and get_codec(spec.codec).derives_features:  # + the bf16 copies
            codec_bytes += sum(2 * int(torch.Size(arrays[f"{g}_{w}"][1]).numel())
                               for g in LOW_GEMMS for w in ("weight", "bias"))

    def step() -> None:
        set_phase_trainable(tr.model, phase)  # a no-op unless the other phase's variant shares the model
        train_step(net, tr.model, tr.opt, tr.scaler, tr.cfg, phase, cache, [batch], 0, tr.d)
        update_ema(tr.ema, tr.model, tr.cfg.ema_decay)

    return Variant(step, lambda: tr.state_bytes() + codec_bytes)


def decode_compute(args) -> str:
    """The stream-* decode precision the trainer runs with these arguments."""
    return DECODE_COMPUTE.get(args.device.split(":")[0], "fp32") if args.teacher_decode == "auto" else args.teacher_decode


def step_fn(args, cache, batch, phase: Phase, z_dim: int):
    """Our step on a fresh model (bench_codecs times it against the loader)."""
    return our_variant(args, trainer(args, cache.root, z_dim), cache, batch, phase).step


def official_context(batch: dict) -> torch.Tensor | None:
    """train_t2i.py's condition: one caption per image as fp32 (B, L, D) on the host (its dataset's output)."""
    if "text" not in batch:
        return None
    return batch["text"][batch["text_offsets"][:-1]].float()


def official_variants(args, tr: Trainer, cache, batch, images) -> tuple[dict[str, Variant], Callable]:
    """HASTE's Phase I and II steps (shared model) and its teacher forward (for the decode comparison)."""
    teacher, _ = load_teacher("random:base", layers=(), resolution=256, device=tr.d.device, capture=())
    acts = explicit_teacher_attention(teacher.model)
    teacher_bytes = tensor_bytes([*teacher.model.parameters(), *teacher.model.buffers()])
    variants = {f"official_phase{p}": Variant(
        official_step_fn(tr.cfg, tr.model, tr.ema, tr.opt, teacher, acts, batch, images, cache.latents.spec,
                         tr.d.device, phase1=p == 1, context=official_context(batch)),
        lambda: tr.state_bytes() + teacher_bytes) for p in (1, 2)}

    def teacher_forward() -> None:
        with torch.no_grad(), autocast(tr.cfg, tr.d.device):
            teacher.model.forward_features(preprocess(images, teacher.input_size))
        acts.clear()

    return variants, teacher_forward


def lean_variant(args, tr: Trainer, cache, batch, images) -> tuple[Variant, Callable]:
    """An online teacher as cheap as it gets: fused attention, hooks on the aligned layers only,
    student taps on the aligned blocks only; our losses and EMA."""
    cfg, d, model = tr.cfg, tr.d, tr.model
    a = cfg.align
    teacher, _ = load_teacher("random:base", layers=a.teacher_layers, resolution=256, device=d.device)
    prec = "fp32" if args.precision == "fp32" else "bf16"
    lat = {k: v for k, v in batch.items() if k in ("moments", "label", "text", "text_offsets", "text_count")}
    teacher_bytes = tensor_bytes([*teacher.model.parameters(), *teacher.model.buffers()])

    def step() -> None:
        with torch.no_grad():
            t = teacher(images, prec)
            with autocast(cfg, d.device):
                logits = (t.q * teacher.scale) @ t.k.transpose(-1, -2)      # (N, L, H, T, T)
        g, g_text = torch.Generator(device=d.device).manual_seed(0), torch.Generator().manual_seed(1)
        inp = prepare_inputs(lat, model, cfg, Phase(name="x", start=0, end=None), cache, d.device, g, g_text)
        tt = torch.rand(inp.x0.shape[0], device=d.device)
        with autocast(cfg, d.device):
            out = model(inp.x0, tt, inp.cond, attn_blocks=a.student_blocks, feature_block=a.feature_block)
        loss = ((out.out.float() - inp.x0) ** 2).mean() + 0.5 * repa_loss(out.features.float(), t.feat) + \
            0.5 * attention_alignment_loss([out.attn_logits[b] for b in a.student_blocks], list(logits.unbind(1)),
                                           a.student_heads, a.teacher_heads)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        tr.opt.step()
        tr.opt.zero_grad(set_to_none=True)
        update_ema(tr.ema, model, cfg.ema_decay)

    return Variant(step, lambda: tr.state_bytes() + teacher_bytes), lambda: teacher(images, prec)


def decode_fn(cache, batch, cfg, device: torch.device) -> Callable[[], None]:
    """The default codec's decode of one batch (features and the aligned layers' logits, as Phase I's
    ``teacher_targets`` call makes it): what Phase I runs instead of a teacher."""
    ts = cache.teacher.spec
    idx = [ts.layers.index(layer) for layer in cfg.align.teacher_layers]
    return lambda: cache.teacher_targets(batch, idx, device=device, compute=cfg.data.decode_compute)


def loader_speed(cache_root: Path, batch: int, samples: int, text: bool = False) -> dict:
    out = {}
    for name, with_teacher in (("phase1", True), ("phase2", False)):
        cache = open_cache(cache_root, need_teacher=with_teacher, need_text=text)
        it = iter(CacheStream(cache, with_teacher=with_teacher, batch_size=batch, seed=0, with_text=text))
        next(it)
        t0, n = time.perf_counter(), 0
        while n < samples:
            n += len(next(it)["key"])
        out[f"{name}_samples_per_s"] = n / (time.perf_counter() - t0)
    cache = open_cache(cache_root, need_teacher=True, need_text=text)
    kinds = ("latents", "teacher", "text") if text else ("latents", "teacher")
    paths = [cache.shard_path(k, s) for s in range(cache.num_shards) for k in kinds]
    t0, nbytes = time.perf_counter(), 0
    for p in paths:
        nbytes += len(p.read_bytes())
    raw_s = time.perf_counter() - t0
    out["raw_read_samples_per_s"] = cache.latents.num_samples / raw_s
    out["raw_read_mb_per_s"] = nbytes / raw_s / 1e6
    out["phase1_over_raw"] = out["phase1_samples_per_s"] / out["raw_read_samples_per_s"]
    return {k: round(v, 3) for k, v in out.items()}


def build_variants(args, root: Path, cache, batch, images) -> tuple[dict[str, Variant], dict[str, Callable]]:
    """The six step variants, sharing a model where that changes no step's work (memory: SiT-XL x6
    would not fit an 80 GB GPU); under --compile each of our phases gets its own model."""
    phases = build_phases(load_train_config(None, overrides(args)).align)
    text = is_mmdit(args)
    if args.share_model:  # one model for every variant (SiT-XL/2 on a 24 GB host): denoise_only then runs
        plain = ours = official = ours2 = trainer(args, root)  # our Phase II structure (projector frozen)
    else:
        plain, ours, official = trainer(args, root, z_dim=0), trainer(args, root), trainer(args, root)
        ours2 = trainer(args, root) if args.compile else ours
    off, teacher_forward = official_variants(args, official, cache, batch, images)
    lean, lean_teacher = lean_variant(args, official, cache, batch, images)
    variants = {
        "denoise_only": our_variant(args, plain, open_cache(root, need_teacher=False, need_text=text), batch,
                                    phases[1]),
        "phase2": our_variant(args, ours2, open_cache(root, need_teacher=False, need_text=text), batch, phases[1]),
        "phase1_cached": our_variant(args, ours, cache, batch, phases[0]),
        **off,
        "online_lean": lean,
    }
    if text:  # like for like with the released train_t2i.py, whose ATTA never reaches the loss: ours with attn_weight 0
        p1 = phases[0]
        variants["phase1_cached_attn0"] = our_variant(args, ours, cache, batch, Phase(
            name="I", start=0, end=p1.end, feat_weight=p1.feat_weight, attn_weight=0.0))
    parts = {"decode_default_codec": decode_fn(cache, batch, ours.cfg, torch.device(args.device)),
             "teacher_lean": lean_teacher, "teacher_official": teacher_forward}
    return variants, parts


def summarise(secs: dict[str, float], memory: dict[str, dict[str, float]], parts: dict[str, float]) -> dict:
    r = lambda a, b: round(a / b, 3)  # noqa: E731
    return {
        "seconds_per_step": {k: round(v, 4) for k, v in secs.items()},
        "ratios": {"phase1_cached_over_official_phase1": r(secs["phase1_cached"], secs["official_phase1"]),
                   "phase2_over_official_phase2": r(secs["phase2"], secs["official_phase2"]),
                   "phase2_over_denoise_only": r(secs["phase2"], secs["denoise_only"]),
                   "phase1_cached_over_online_lean": r(secs["phase1_cached"], secs["online_lean"]),
                   "official_phase2_over_official_phase1": r(secs["official_phase2"], secs["official_phase1"]),
                   **({"phase1_cached_attn0_over_official_phase1": r(secs["phase1_cached_attn0"],
                                                                     secs["official_phase1"])}
                      if "phase1_cached_attn0" in secs else {})},
        "memory_mib": memory,
        "memory_ratios": {f"{k}_phase1_cached_over_official_phase1":
                          r(memory["phase1_cached"][k], memory["official_phase1"][k]) for k in ("peak", "step_peak")},
        "decode_vs_teacher_s": {**{k: round(v, 4) for k, v in parts.items()},
                                "decode_over_teacher_lean": r(parts["decode_default_codec"], parts["teacher_lean"]),
                                "decode_over_teacher_official": r(parts["decode_default_codec"],
                                                                  parts["teacher_official"])},
        "targets": {"phase1_cached_over_official_phase1": 0.85, "phase2_over_denoise_only": 1.02},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="SiT-B/2")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--loader-samples", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument("--share-model", action="store_true",
                   help="one model (+EMA, optimizer) for all variants: step times are unchanged, memory ~1/3 (XL/2 on CPU)")
    p.add_argument("--teacher-decode", default="auto", choices=["auto", "fp32", "fp16", "bf16-mixed", "bf16"],
                   help="stream-* decode precision (data.teacher_decode; auto: fp16 on CUDA, bf16-mixed on CPUs "
                        "with native bf16)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        root = build_cache(Path(tmp) / "cache", args.batch * 4, args)
        cache = open_cache(root, need_text=is_mmdit(args))
        batch = next(iter(CacheStream(cache, with_teacher=True, batch_size=args.batch, seed=0,
                                      with_text=is_mmdit(args))))
        if device.type == "cuda":  # the trainer's DataLoader pins batches in a background thread
            batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
        images = torch.stack([torch.from_numpy(synth_image(i, 8, 256)[0]) for i in range(args.batch)])
        images = images.permute(0, 3, 1, 2).contiguous().to(device)
        variants, part_fns = build_variants(args, root, cache, batch, images)
        secs = interleaved_medians({k: v.step for k, v in variants.items()}, reps=args.reps, warmup=2, device=device)
        memory = {}
        for name, v in variants.items():  # after timing: optimizer state exists, so it is counted
            step_peak, state = step_peak_bytes(v.step, device), v.state_bytes()
            memory[name] = {"resident": round(state / MIB, 1), "step_peak": round(step_peak / MIB, 1),
                            "peak": round((state + step_peak) / MIB, 1)}
        parts = interleaved_medians(part_fns, reps=args.reps, warmup=1, device=device)
        sync(device)
        loader = loader_speed(root, args.batch, args.loader_samples, text=is_mmdit(args))
    result = {"benchmark": "train_step", "env": {**environment(device), "load_avg_at_start": load_at_start},
              "model": args.model, "batch": args.batch, "share_model": args.share_model,
              "teacher_decode": decode_compute(args),
              "precision": args.precision, "compile": args.compile,
              "official_emulation": EMULATION_T2I if is_mmdit(args) else EMULATION,
              **summarise(secs, memory, parts), "loader": loader}
    path = write(f"train-{device.type}-{args.model.replace('/', '_')}", result, args.out)
    print(f"{result['seconds_per_step']}\n{result['ratios']}\nmemory MiB {memory}\n"
          f"{result['memory_ratios']}\n{result['decode_vs_teacher_s']}\nloader {loader} -> {path}")


if __name__ == "__main__":
    main()
