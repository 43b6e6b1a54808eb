"""The gradient-angle probe behind the termination trigger (paper App. A.2; ``trainer/stop.py``).

Definition (the paper says "compare the gradients of the denoising loss and of the alignment loss
with respect to the parameters of the 5th block"; this is what we compute, exactly):

    P      = the probe set: ``samples`` cached training samples (``trainer/probe_data.py``)
    θ_b    = the parameters of block ``block`` (0-based) of the online model
    for each t in ``times``, for each sample i in P (all at the same t):
        x₀ᵢ = a posterior sample of i's cached VAE moments,   εᵢₜ ~ N(0, I)
        xₜ  = α_t·x₀ᵢ + σ_t·εᵢₜ (the training interpolant),  label yᵢ (no CFG dropout); a text model:
              one of i's captions, drawn from i's generator after its noises (never the null)
        L_den,i(t)   = the flow-matching loss of i              (the training ``denoise`` term)
        L_align,i(t) = λ_R·L_REPA,i + λ_A·L_ATTA,i               (the terms Phase I adds, same weights)
    g_den(t)   = Σᵢ ∇θ_b L_den,i(t)          g_align(t) = Σᵢ ∇θ_b L_align,i(t)
    cos(t)     = ⟨g_den(t), g_align(t)⟩ / (‖g_den(t)‖·‖g_align(t)‖)        (float64)
    mean       = the mean of cos(t) over the times; the grad-angle trigger fires when mean < threshold

Choices the paper leaves open, and why: the gradients are summed over the whole probe set before
the angle is taken (the angle of the batch gradient the optimizer would see, not a mean of
per-sample angles, which would be dominated by per-sample noise); every sample sees every t (so
cos(t) compares like with like); the labels are the true ones (the probe asks about the data,
and CFG dropout would add a random draw); the loss terms are ``trainer.engine.loss_terms``, the
very functions of the training step, under the training precision. ``x₀ᵢ`` and ``εᵢₜ`` come from a
generator seeded by (seed, probe step, sample index), so a probe never touches the training RNG
and gives the same inputs on any number of ranks.

The probe runs on the online model, unwrapped (not through DDP), with ``torch.autograd.grad`` (no
``.grad`` is written, the optimizer is not touched). Ranks take ``P[rank::world]``; the two
gradient sums are all-reduced as one flat vector per t before the cosine, and rank 0's cosines
are broadcast, so every rank takes the same decision.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from pipeline.cache.reader import Cache
from pipeline.dist import DistInfo
from trainer.conditioning import probe_condition
from trainer.config import TrainConfig
from trainer.engine import StepInputs, loss_terms, teacher_targets
from trainer.models.archs import Network, transformer_blocks
from trainer.objectives import interpolate
from trainer.phases import Phase
from trainer.probe_data import ProbeSample, probe_set, rank_share, read_batches, sample_generator
from trainer.stop import ProbeRecord, TriggerStop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeResult:
    record: ProbeRecord                  # step, times, cos per t, mean
    denoise_norm: tuple[float, ...]      # ‖g_den(t)‖ / |P| per t (the mean per-sample gradient's norm)
    align_norm: tuple[float, ...]        # ‖g_align(t)‖ / |P|
    samples: int
    seconds: float

    def to_dict(self) -> dict:
        return {**self.record.to_dict(), "denoise_norm": list(self.denoise_norm), "align_norm": list(self.align_norm),
                "samples": self.samples, "seconds": round(self.seconds, 3)}


def aligned_phase(cfg: TrainConfig) -> Phase:
    """Phase I's loss terms and weights: what the probe differentiates."""
    a = cfg.align
    return Phase(name="I", start=0, end=None, feat_weight=a.feat_weight, attn_weight=a.attn_weight)


def run_probe(model: Network, cfg: TrainConfig, stop: TriggerStop, cache: Cache, step: int, d: DistInfo,
              loss_scale: float = 1.0) -> ProbeResult:
    """The probe after ``step`` completed steps (see the module docstring). Collective under torchrun.

    ``loss_scale`` multiplies both losses before differentiation (the fp16 GradScaler's scale, against
    underflow); the cosine does not depend on it.
    """
    t0 = time.perf_counter()
    samples = probe_set([s.count for s in cache.latents.shards], stop.samples, cfg.seed)
    params = list(transformer_blocks(model)[stop.block].parameters())  # MM-DiT: the joint block, both streams
    sums = _gradient_sums(model, cfg, stop, cache, rank_share(samples, d.rank, d.world_size), params, step,
                          loss_scale)  # (2, T, P): denoise, align
    if d.distributed:
        torch.distributed.all_reduce(sums)
    cos, norms = cosines(sums[0], sums[1])
    if d.distributed:  # every rank decides on rank 0's numbers, whatever the reduction's rounding
        torch.distributed.broadcast(cos, src=0)
    cos_t = tuple(float(c) for c in cos.cpu())
    scale = loss_scale * len(samples)
    record = ProbeRecord(step=step, times=tuple(stop.times), cos=cos_t, mean=math.fsum(cos_t) / len(cos_t))
    if math.isnan(record.mean):
        log.warning("step %d: probe gradient is zero or non-finite at some t (cos %s); no decision this time",
                    step, cos_t)
    if d.device.type == "cuda":
        torch.cuda.synchronize(d.device)
    return ProbeResult(record=record, denoise_norm=tuple(float(x) / scale for x in norms[0].cpu()),
                       align_norm=tuple(float(x) / scale for x in norms[1].cpu()), samples=len(samples),
                       seconds=time.perf_counter() - t0)


def cosines(den: torch.Tensor, align: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine per row of two (T, P) gradient tables, in float64; NaN where a row is zero. Also the norms (2, T)."""
    a, b = den.double(), align.double()
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    cos = (a * b).sum(dim=-1) / (na * nb)
    return torch.where((na > 0) & (nb > 0), cos, torch.full_like(cos, math.nan)), torch.stack([na, nb])


def _gradient_sums(model: Network, cfg: TrainConfig, stop: TriggerStop, cache: Cache, share: list[ProbeSample],
                   params: list[torch.nn.Parameter], step: int, loss_scale: float) -> torch.Tensor:
    """This rank's Σᵢ ∇θ L_den,i(t) and Σᵢ ∇θ L_align,i(t) as a (2, T, P) float32 tensor."""
    device = next(model.parameters()).device
    phase = aligned_phase(cfg)
    sums = torch.zeros(2, len(stop.times), sum(p.numel() for p in params), device=device)
    for lo, batch in zip(range(0, len(share), stop.batch_size), read_batches(cache, share, stop.batch_size)):
        chunk = share[lo:lo + stop.batch_size]
        gens = [sample_generator(cfg.seed, step, s.index) for s in chunk]
        x0, noises = _draws(batch["moments"], gens, len(stop.times), cache)
        cond = probe_condition(batch, model, gens, device)  # labels, or a caption each (drawn after the noises)
        feat, logits = teacher_targets(batch, cfg, phase, cache, device)
        inp = StepInputs(x0=x0.to(device), cond=cond, teacher_feat=feat, teacher_logits=logits)
        n = len(chunk)
        for k, t in enumerate(stop.times):
            tt = torch.full((n,), float(t), device=device)
            x_t, v = interpolate(inp.x0, noises[k].to(device), tt, cfg.path)
            terms = loss_terms(model, cfg, phase, inp, x_t, tt, v)
            align = sum(w * terms[name] for name, w in (("feat", phase.feat_weight), ("attn", phase.attn_weight))
                        if name in terms and w)
            # Batch means times n = sums over the chunk, so chunks of any size add up to the sum over P.
            g_den = torch.autograd.grad(terms["denoise"] * (n * loss_scale), params, retain_graph=True,
                                        allow_unused=True)
            g_align = torch.autograd.grad(align * (n * loss_scale), params, allow_unused=True)
            sums[0, k] += _flat(g_den, params)
            sums[1, k] += _flat(g_align, params)
    return sums


def _draws(moments: torch.Tensor, gens: list[torch.Generator], num_times: int,
           cache: Cache) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Posterior samples x₀ (N, C, H, W) and one noise per t, from each sample's own generator (CPU)."""
    mean, std = moments.float().chunk(2, dim=1)  # (N, C, H, W) each
    eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in gens])
    noises = [torch.stack([torch.randn(mean.shape[1:], generator=g) for g in gens]) for _ in range(num_times)]
    spec = cache.latents.spec
    return (mean + std * eps) * spec.scale + spec.bias, noises


def _flat(grads: tuple[torch.Tensor | None, ...], params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(grads, params)])
