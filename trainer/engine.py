"""Pieces of one optimizer step: numerics, model/EMA/optimizer construction, DDP wrapping,
per-step RNG, and ``train_step``. The loop in ``trainer/loop.py`` strings them together.

The network is a SiT or an MM-DiT (``cfg.model.arch``); the step only differs in its condition
(labels or one caption encoding per image, ``trainer/conditioning.py``, which documents the RNG order).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline.dist import DistInfo
from pipeline.encoders.vae import sample_latents
from trainer.conditioning import is_text, training_condition
from trainer.config import TrainConfig
from trainer.models.archs import Network, build_network
from trainer.objectives import (
    attention_alignment_loss,
    flow_matching_loss,
    interpolate,
    repa_loss,
    sample_time,
    total_loss,
)
from trainer.phases import Phase

log = logging.getLogger(__name__)


def setup_numerics(cfg: TrainConfig) -> None:
    """TF32 choice in one place (recorded in config.json); called once by the stage."""
    torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    torch.backends.cudnn.allow_tf32 = cfg.tf32


def choose_threads(threads: str | int, device: torch.device) -> int | None:
    """Intra-op threads for the run; None leaves torch's choice.

    ``auto``: on a GPU, or when OMP_NUM_THREADS is set (torchrun sets 1 per process), torch's
    choice; otherwise torch's default (one per core) capped at the CPUs this process may run on
    (``taskset``, cpusets). What makes a busy machine degrade gracefully is the wait policy, not the
    count: OpenMP threads that spin while waiting for a thread another process preempted waste
    that core, so the CLI sets OMP_WAIT_POLICY=PASSIVE before torch loads (README, "Training").
    """
    if threads != "auto":
        return int(threads)
    if device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(torch.get_num_threads(), cpus))


@contextlib.contextmanager
def intra_op_threads(n: int | None):
    """Run with ``n`` intra-op threads, then restore the caller's setting (it is process-global)."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
        log.info("intra-op threads: %d (config field 'threads')", n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def autocast(cfg: TrainConfig, device: torch.device):
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_model(cfg: TrainConfig, device: torch.device) -> tuple[Network, Network]:
    """Model (SiT or MM-DiT, ``model.arch``) and its EMA, an exact copy at step 0 (SPEC §2.5), both built
    from ``cfg.seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_network(cfg.model)
    model = model.to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    return model, ema


def build_optimizer(cfg: TrainConfig, model: Network) -> torch.optim.AdamW:
    # All parameters, projector included (official). A parameter a phase freezes gets no
    # gradient and AdamW skips it; keeping it in the group keeps the state dict stable across phases.
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay)


def set_phase_trainable(model: Network, phase: Phase) -> None:
    """The projector takes part only while the feature loss is on (so DDP sees no unused params)."""
    if hasattr(model, "projectors"):
        model.projectors.requires_grad_(phase.needs_features)
        if not phase.needs_features:
            for p in model.projectors.parameters():
                p.grad = None


def wrap(model: Network, phase: Phase, d: DistInfo, compile_model: bool = False) -> torch.nn.Module:
    """(Re-)wrap for a phase: DDP over exactly the parameters the phase trains."""
    set_phase_trainable(model, phase)
    net: torch.nn.Module = model
    if d.distributed:
        net = DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                  find_unused_parameters=False, broadcast_buffers=False)
    if compile_model:
        net = torch.compile(net)
    return net


@torch.no_grad()
def update_ema(ema: Network, model: Network, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·p over all parameters, as two multi-tensor kernels (not 2 per tensor)."""
    ema_params = dict(ema.named_parameters())
    pairs = [(ema_params[name], p.detach()) for name, p in model.named_parameters()]
    targets, sources = [e for e, _ in pairs], [p for _, p in pairs]
    torch._foreach_mul_(targets, decay)
    torch._foreach_add_(targets, sources, alpha=1 - decay)


def step_generator(seed: int, step: int, slot: int, device: torch.device, stream: str = "") -> torch.Generator:
    """RNG for one micro-batch of one step: resume and world-size changes reproduce it exactly.

    ``slot`` = rank * grad_accum + micro-batch index, the micro-batch's place in the global batch.
    ``stream`` names an independent stream of the same micro-batch ("text": the caption draws, on the CPU).
    """
    digest = hashlib.sha256(f"{seed}/{step}/{slot}{'/' + stream if stream else ''}".encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def no_sync(net: torch.nn.Module):
    """DDP's no_sync() (skip the all-reduce of a non-final micro-batch), also through torch.compile's wrapper."""
    ddp = getattr(net, "_orig_mod", net)
    return ddp.no_sync() if isinstance(ddp, DDP) else contextlib.nullcontext()


@dataclass
class StepInputs:
    x0: torch.Tensor                    # (N, C, H, W) posterior sample in model space
    cond: torch.Tensor                  # (N,) labels or (N, L, D) caption encodings, after CFG dropout
    teacher_feat: torch.Tensor | None   # (N, T, D)
    teacher_logits: torch.Tensor | None  # (N, P, H, T, T) for the aligned pairs, in pair order


def micro_loss(net: torch.nn.Module, model: Network, cfg: TrainConfig, phase: Phase, inp: StepInputs,
               g: torch.Generator) -> dict[str, torch.Tensor]:
    """Losses of one micro-batch (device tensors, not yet divided by grad_accum)."""
    n = inp.x0.shape[0]
    t = sample_time(n, cfg.time_sampling, cfg.path, generator=g, device=inp.x0.device)
    noise = torch.randn(inp.x0.shape, generator=g, device=inp.x0.device)
    x_t, v = interpolate(inp.x0, noise, t, cfg.path)
    losses = loss_terms(net, cfg, phase, inp, x_t, t, v)
    losses["loss"] = total_loss(losses["denoise"], losses.get("feat"), losses.get("attn"),
                                feat_weight=phase.feat_weight, attn_weight=phase.attn_weight)
    return losses


def loss_terms(net: torch.nn.Module, cfg: TrainConfig, phase: Phase, inp: StepInputs, x_t: torch.Tensor,
               t: torch.Tensor, v: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batch-mean loss terms a phase trains on ("denoise", + "feat", "attn"), before weighting.

    Shared by the training step and the termination probe (trainer/probe.py), so the probe's
    gradients are those of exactly the terms the training loss adds. The forward runs under the
    training precision; the losses are computed outside autocast, in float32.
    """
    a = cfg.align
    with autocast(cfg, x_t.device):
        out = net(x_t, t, inp.cond, attn_blocks=a.student_blocks if phase.needs_attention else (),
                  feature_block=a.feature_block if phase.needs_features else None)
    losses = {"denoise": flow_matching_loss(out.out.float(), v).mean()}
    if phase.needs_features:
        losses["feat"] = repa_loss(out.features.float(), inp.teacher_feat)
    if phase.needs_attention:
        student = [out.attn_logits[b] for b in a.student_blocks]
        teacher = list(inp.teacher_logits.unbind(1))
        losses["attn"] = attention_alignment_loss(student, teacher, a.student_heads, a.teacher_heads)
    return losses


def prepare_inputs(batch: dict, model: Network, cfg: TrainConfig, phase: Phase, cache, device: torch.device,
                   g: torch.Generator, g_text: torch.Generator | None = None) -> StepInputs:
    """Cached batch -> step inputs: fresh posterior sample, the condition (label dropout, or caption pick and
    null substitution from ``g_text``), decoded teacher targets."""
    lat = cache.latents.spec
    moments = batch["moments"].to(device, non_blocking=True)
    x0 = sample_latents(moments, lat.scale, lat.bias, generator=g)
    cond = training_condition(batch, model, cache, device, g, g_text)
    feat, logits = teacher_targets(batch, cfg, phase, cache, device)
    return StepInputs(x0=x0, cond=cond, teacher_feat=feat, teacher_logits=logits)


def teacher_targets(batch: dict, cfg: TrainConfig, phase: Phase, cache,
                    device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A cached batch's teacher features (N, T, D) and aligned-layer logits (N, P, H, T, T), as the phase needs."""
    feat = logits = None
    if phase.needs_features or phase.needs_attention:
        # Both targets through the group's codec (stream-* derives them from one tensor), only the
        # aligned layers; the cache copies the members to the device and selects layers there.
        ts = cache.teacher.spec
        idx = [ts.layers.index(layer) for layer in cfg.align.teacher_layers] if phase.needs_attention else None
        feat, logits = cache.teacher_targets(batch, idx, device=device, features=phase.needs_features,
                                             attention=phase.needs_attention, compute=cfg.data.decode_compute)
    return feat, logits


def train_step(net: torch.nn.Module, model: Network, opt: torch.optim.Optimizer, scaler, cfg: TrainConfig,
               phase: Phase, cache, batches: list[dict], step: int, d: DistInfo) -> dict[str, torch.Tensor]:
    """One optimizer step over ``grad_accum`` micro-batches; returns detached mean losses."""
    sums: dict[str, torch.Tensor] = {}
    for j, batch in enumerate(batches):
        slot = d.rank * cfg.grad_accum + j
        g = step_generator(cfg.seed, step, slot, d.device)
        g_text = step_generator(cfg.seed, step, slot, torch.device("cpu"), stream="text") if is_text(model) else None
        inp = prepare_inputs(batch, model, cfg, phase, cache, d.device, g, g_text)
        with contextlib.nullcontext() if j == len(batches) - 1 else no_sync(net):
            losses = micro_loss(net, model, cfg, phase, inp, g)
            scaler.scale(losses["loss"] / len(batches)).backward()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0) + v.detach() / len(batches)
    scaler.unscale_(opt)
    sums["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return sums
