"""What the network is conditioned on: class labels (SiT) or one caption encoding per image (MM-DiT).

Conditioning is a property of the model config (``model.arch``, ``trainer/models/archs.py``); the loop,
engine, phases, probe and checkpoints are the same for both. This module turns a cached batch into
the forward's third argument:

- **class** (SiT): the labels, each replaced by the null class with ``class_dropout_prob`` (SiT.drop_labels).
- **text** (MM-DiT): per image, one of its K cached caption encodings, chosen uniformly, then replaced
  by the empty caption's encoding (``cache.text_null()``, the group's ``codec/empty_caption.npy``) with
  ``caption_dropout_prob`` = 0.1: the official CFGDataset (``random.randint`` caption per item load, then
  ``random.random() < p_uncond``), made reproducible.

RNG order of one micro-batch, for slot = rank·grad_accum + j of step s (``step_generator(seed, s, slot, ...)``):

    g       training device, stream ""     posterior ε of x₀ (N, C, H, W)
                                            -> [class only] label-dropout uniforms (N,)
                                            -> t (N,) -> noise ε (N, C, H, W)            (engine.micro_loss)
    g_text  CPU, stream "text" (text only)  caption-pick uniforms (N,) float64 -> null uniforms (N,) float32

The null uniforms are drawn even when the probability is 0, so the stream does not depend on it. The
caption draws use a CPU generator of their own (seeded like ``g``, tagged "text") for two reasons: the
caption an image sees depends on (seed, step, slot) alone, not on the device; and the pick and the null
substitution happen on the host, so only N encodings (not all ΣK) cross to the device and the step
never waits for the device (a pick drawn on the GPU would have to come back to the host each step).
The class path draws nothing new, so SiT runs keep their RNG streams bit for bit.
"""

from __future__ import annotations

import torch

from pipeline.cache.text import caption_choice, gather_captions
from trainer.models.archs import Network, arch_of


def is_text(model: Network) -> bool:
    return arch_of(model.cfg).conditioning == "text"


def training_condition(batch: dict, model: Network, cache, device: torch.device, g: torch.Generator,
                       g_text: torch.Generator | None) -> torch.Tensor:
    """Labels (N,) after CFG dropout, or caption encodings (N, L, D) float32 after the null substitution."""
    if not is_text(model):
        return model.drop_labels(batch["label"].to(device, non_blocking=True), generator=g)
    if g_text is None:
        raise ValueError("a text-conditioned step needs its text generator (step_generator(..., stream='text'))")
    ctx = pick_captions(batch, cache.text_null(), model.cfg.caption_dropout_prob, g_text)  # (N, L, D) host
    return ctx.to(device, non_blocking=True).float()


def pick_captions(batch: dict, null: torch.Tensor, p_null: float, g_text: torch.Generator) -> torch.Tensor:
    """(N, L, D) in the stored dtype, on the host: a uniform caption per image, then with probability
    ``p_null`` the empty caption's encoding ``null`` (L, D) instead (the order of draws: picks, then nulls)."""
    pick = caption_choice(batch["text_count"], g_text)                      # (N,) int64
    ctx = gather_captions(batch, pick)                                      # (N, L, D)
    drop = torch.rand(pick.shape, generator=g_text, device=g_text.device) < p_null  # (N,) bool
    return torch.where(drop.to(ctx.device)[:, None, None], null.to(ctx.dtype), ctx)


def probe_condition(batch: dict, model: Network, gens: list[torch.Generator], device: torch.device) -> torch.Tensor:
    """The probe's condition: true labels, or for a text model one real caption per sample drawn from that
    sample's own generator (after its noises; never the null: the probe asks about the data)."""
    if not is_text(model):
        return batch["label"].to(device)
    count = batch["text_count"]
    pick = torch.cat([caption_choice(count[i:i + 1], g) for i, g in enumerate(gens)])
    return gather_captions(batch, pick).to(device).float()
