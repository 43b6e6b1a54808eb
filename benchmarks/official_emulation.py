"""HASTE ``train.py``'s optimizer step, re-enacted on our modules for bench-train.

Nothing here is official code: each function restates, op for op, what one official step executes
(SPEC §1.6-1.7, §2, §3.3), on our SiT's and timm DINOv2-B's submodules, so that the benchmark
times the tensors the official step materialises and nothing else. Per step:

- data: a fresh posterior sample of the moments; raw uint8 images → /255, normalise, bicubic to 224.
- teacher, under the training autocast (``accelerator.autocast()``): the patched DINOv2
  (``modify_dinov2/``) computes explicit softmax attention in all 12 blocks and returns every
  block's logits ``[:, :, 1:, 1:]``: views, so each block's full (B, 12, 1+T, 1+T) logits stay
  alive until the loss is done; plus the final-norm patch tokens.
- student (``models/sit.py``): every Attention computes ``(q·scale) kᵀ`` (L50) and its output with
  fused SDPA (``--fused-attn`` defaults to True); blocks 0..encoder_depth-1 return their logits and
  block encoder_depth-1 feeds the projector. Accelerate wraps ``forward`` in autocast and converts
  the outputs, the lists of logits included, to fp32.
- ``loss.py``: per-sample mean squared v error; in Phase I, for each aligned pair,
  ``-(softmax(teacher) · log(softmax(student[:, :12]))).sum(-1).mean()`` on (−1, T) rows (the
  teacher softmax in the autocast dtype), averaged over pairs, and the REPA cosine in a loop over
  the batch's samples. Phase II (``denoise_only``): both terms are 0, but the teacher and the
  ``return_act`` forward still run.
- ``train.py``: batch mean, ``zeros_like`` for the aux losses in Phase II, weighted sum, backward
  (GradScaler under fp16), ``clip_grad_norm_(1.0)``, optimizer step, ``zero_grad(set_to_none=True)``,
  ``update_ema`` (decay 0.9999, two in-place ops per named parameter) and the four logged
  scalars read back with ``.item()``.
Left out: the bare ``print()`` in ``loss.py`` (a newline per step), wandb and tqdm.

The text-to-image step (``train_t2i.py`` with HASTE ``models/mmdit.py``) is the same step with three
differences: the student is the MM-DiT, whose ``block_mixing`` keeps q, k, v as (B, L, D) per stream,
joins [context; image] along the tokens and runs SDPA over them, and with ``return_act`` computes
the IMAGE-token logits ``(q kᵀ)·scale`` in blocks 0..encoder_depth-1 only (the projector after block
encoder_depth-1); the condition is the batch's CLIP context (fp32 (B, 77, 768), moved to the device
every step; the caption pick and CFG null happen in the dataset workers); and the attention loss is
computed by ``loss.py`` and then replaced by zeros (``attn_loss_mean = torch.zeros_like(loss_mean)``,
SPEC §7.15), so its forward is paid and nothing flows back from it. The teacher still runs every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.encoders.teacher import preprocess
from pipeline.encoders.vae import sample_latents
from trainer.config import TrainConfig
from trainer.engine import autocast
from trainer.models.common import modulate, unpatchify
from trainer.models.mmdit import MMDiT, StreamBlock
from trainer.models.sit import SiT


def explicit_teacher_attention(vit: torch.nn.Module) -> list[Tensor]:
    """Make a timm DINOv2's attention the patched one: explicit softmax, logits kept per block.

    Returns the list each forward appends the blocks' ``logits[:, :, 1:, 1:]`` to (clear it per step).
    """
    acts: list[Tensor] = []

    def patched(attn: torch.nn.Module):
        def forward(x: Tensor, attn_mask=None, is_causal: bool = False) -> Tensor:
            B, N, C = x.shape
            qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0] * attn.scale, qkv[1], qkv[2]
            logits = q @ k.transpose(-2, -1)                         # (B, H, 1+T, 1+T)
            out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C)
            acts.append(logits[:, :, 1:, 1:])                        # CLS row/column dropped; a view
            return attn.proj(out)
        return forward

    for blk in vit.blocks:
        blk.attn.forward = patched(blk.attn)
    return acts


def official_sit_forward(model: SiT, x: Tensor, t: Tensor, y: Tensor, encoder_depth: int):
    """SiT.forward with ``return_act=True`` as HASTE runs it: logits in every block, fused SDPA for
    the output, logits of blocks 0..encoder_depth-1 returned, projector after block encoder_depth-1."""
    h = model.x_embedder(x) + model.pos_embed                       # (N, T, D)
    N, T, D = h.shape
    c = model.t_embedder(t) + model.y_embedder(model.drop_labels(y))  # label dropout inside, global RNG
    acts, zs = [], []
    for i, blk in enumerate(model.blocks):
        s_msa, c_msa, g_msa, s_mlp, c_mlp, g_mlp = blk.adaLN_modulation(c).chunk(6, dim=-1)
        a = blk.attn
        qkv = a.qkv(modulate(blk.norm1(h), s_msa, c_msa)).reshape(N, T, 3, a.num_heads, a.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)              # 3 × (N, H, T, hd)
        q, k = a.q_norm(q), a.k_norm(k)
        logits = (q * a.scale) @ k.transpose(-2, -1)                # every block, every call
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(N, T, D)
        h = h + g_msa.unsqueeze(1) * a.proj(out)
        h = h + g_mlp.unsqueeze(1) * blk.mlp(modulate(blk.norm2(h), s_mlp, c_mlp))
        if i < encoder_depth:
            acts.append(logits)
            if i == encoder_depth - 1:
                zs = [model.projectors[0](h.reshape(-1, D)).reshape(N, T, -1)]
    return unpatchify(model.final_layer(h, c), model.cfg.patch_size, model.cfg.in_channels), acts, zs


def _stream_pre_attention(blk: StreamBlock, x: Tensor, c: Tensor) -> tuple[list[Tensor], tuple[Tensor, ...]]:
    """DismantledBlock.pre_attention: q, k as (B, L, D), v as (B, L, H, hd) (split_qkv), and the modulation."""
    mods = blk.adaLN_modulation(c).chunk(2 if blk.pre_only else 6, dim=1)
    qkv = blk.attn.qkv(modulate(blk.norm1(x), mods[0], mods[1]))
    q, k, v = qkv.reshape(qkv.shape[0], qkv.shape[1], 3, -1, blk.attn.head_dim).movedim(2, 0)  # (B, L, H, hd)
    return [q.reshape(q.shape[0], q.shape[1], -1), k.reshape(k.shape[0], k.shape[1], -1), v], mods[2:]


def official_mmdit_forward(model: MMDiT, x: Tensor, t: Tensor, context: Tensor, encoder_depth: int):
    """MMDiT.forward(..., return_act=True) as train_t2i.py runs it: image-token logits in blocks
    0..encoder_depth-1, SDPA over [context; image] in (B, L, D) layout, the projector after block encoder_depth-1."""
    h = model.x_embedder(x) + model.pos_embed                       # the 16x16 table cropped = all of it at 256 px
    N, T, D = h.shape
    c = model.t_embedder(t)
    ctx = model.context_embedder(context)                           # (N, L, D)
    acts, zs = [], []
    for i, blk in enumerate(model.joint_blocks):
        heads = blk.x_block.attn.num_heads
        ctx_qkv, ctx_mods = _stream_pre_attention(blk.context_block, ctx, c)
        x_qkv, x_mods = _stream_pre_attention(blk.x_block, h, c)
        if i < encoder_depth:                                       # block_mixing's return_act branch
            q, k = (a.view(N, -1, heads, D // heads).transpose(1, 2) for a in x_qkv[:2])
            acts.append((q @ k.transpose(-2, -1)) * (D // heads) ** -0.5)
        q, k, v = (torch.cat((a, b), dim=1) for a, b in zip(ctx_qkv, x_qkv))
        q, k, v = (a.view(N, -1, heads, D // heads).transpose(1, 2) for a in (q, k, v))   # attention()
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(N, -1, D)   # (N, L+T, D)
        L = ctx.shape[1]
        ctx = None if blk.context_block.pre_only else blk.context_block.post_attention(a[:, :L], ctx, ctx_mods)
        h = blk.x_block.post_attention(a[:, L:], h, x_mods)
        if i + 1 == encoder_depth:
            zs = [model.projectors[0](h.reshape(-1, D)).reshape(N, T, -1)]
    return unpatchify(model.final_layer(h, c), model.cfg.patch_size, model.cfg.in_channels), acts, zs


def official_losses(out: Tensor, target: Tensor, acts: list[Tensor], zs: list[Tensor], teacher_acts: list[Tensor],
                    teacher_feat: Tensor, cfg: TrainConfig, phase1: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """loss.py on Accelerate's fp32 outputs: (per-sample denoise, attention, projection); no aux math in Phase II."""
    denoise = ((out - target) ** 2).mean(dim=(1, 2, 3))
    if not phase1:
        return denoise, None, None
    a = cfg.align
    tokens = acts[0].shape[-1]
    attn = 0.0
    for sb, tl in zip(a.student_blocks, a.teacher_layers):
        s = acts[sb][:, : len(a.student_heads)].reshape(-1, tokens)
        p = teacher_acts[tl].reshape(-1, tokens).softmax(dim=-1)    # the teacher's (autocast) dtype
        attn = attn + -(p * torch.log(s.softmax(dim=-1))).sum(dim=-1).mean()
    attn = attn / len(a.student_blocks)
    proj = 0.0
    for z, z_tilde in zip(teacher_feat, zs[0]):                       # one sample at a time
        proj = proj + (-(F.normalize(z, dim=-1) * F.normalize(z_tilde, dim=-1)).sum(dim=-1)).mean()
    return denoise, attn, proj / teacher_feat.shape[0]


@torch.no_grad()
def per_parameter_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """The official EMA update: a mul_ and an add_ per named parameter (no multi-tensor kernels)."""
    ema_params = dict(ema.named_parameters())
    for name, p in model.named_parameters():
        ema_params[name].mul_(decay).add_(p.data, alpha=1 - decay)


def official_step_fn(cfg: TrainConfig, model: SiT | MMDiT, ema: SiT | MMDiT, opt: torch.optim.Optimizer, teacher,
                     teacher_acts: list[Tensor], batch: dict, images: Tensor, latents_spec, device: torch.device,
                     phase1: bool, context: Tensor | None = None):
    """One official optimizer step (Phase I or II) on a preloaded batch. ``teacher``: a Teacher whose
    timm model went through ``explicit_teacher_attention``, which returned ``teacher_acts``. With a host
    ``context`` (B, L, D) fp32 and an MM-DiT: train_t2i.py's step (ATTA computed, then zeroed)."""
    text = context is not None
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    moments, labels = batch["moments"].to(device), batch["label"].to(device)
    depth = cfg.align.feature_block + 1  # encoder_depth

    def step() -> None:
        acts = teacher_acts
        acts.clear()
        with torch.no_grad():
            x0 = sample_latents(moments, latents_spec.scale, latents_spec.bias)
            with autocast(cfg, device):
                tokens = teacher.model.forward_features(preprocess(images, teacher.input_size))
            feat = tokens[:, teacher.num_prefix_tokens:]              # x_norm_patchtokens
        t = torch.rand((x0.shape[0], 1, 1, 1)).to(device=device, dtype=x0.dtype)
        noise = torch.randn_like(x0)
        x_t, target = (1 - t) * x0 + t * noise, -1 * x0 + 1 * noise  # linear path, v target
        with autocast(cfg, device):
            if text:
                out, s_acts, zs = official_mmdit_forward(model, x_t, t.flatten(), context.to(device), depth)
            else:
                out, s_acts, zs = official_sit_forward(model, x_t, t.flatten(), labels, depth)
        out, s_acts, zs = out.float(), [s.float() for s in s_acts], [z.float() for z in zs]  # convert_to_fp32
        denoise, attn, proj = official_losses(out, target, s_acts, zs, acts, feat, cfg, phase1)
        loss_mean = denoise.mean()
        proj_mean, attn_mean = (proj.mean(), attn.mean()) if phase1 else (torch.zeros_like(loss_mean),) * 2
        if text:  # train_t2i.py L308: attn_loss_mean = torch.zeros_like(loss_mean), whatever the phase
            attn_mean = torch.zeros_like(loss_mean)
        loss = loss_mean + proj_mean * cfg.align.feat_weight + attn_mean * cfg.align.attn_weight
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        per_parameter_ema(ema, model, cfg.ema_decay)
        for v in (loss_mean, proj_mean, attn_mean, grad_norm):  # the per-step log line
            v.item()
        acts.clear()

    return step
