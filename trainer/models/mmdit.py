"""MM-DiT, the text-to-image network of HASTE/REPA (SD3-style joint attention): one file, DiT-style.

Owns the network only: `MMDiTConfig`, the `MMDIT_PRESETS`, the `MMDiT` module and the config of
an official T2I checkpoint. Intermediate outputs are requested explicitly through
`MMDiT.forward(x, t, context, attn_blocks=..., feature_block=...)`, which returns SiT's `ModelOut`.

Follows HASTE/REPA `models/mmdit.py` (SPEC §8) with the options `train_t2i.py` uses: hidden
= 32·depth and heads = depth (head_dim 32), qkv bias, no class embedder (conditioning is t only;
text enters through joint attention over [context; image] tokens), the last block's context
stream `pre_only`, PyTorch default init, a fixed sin-cos `pos_embed` buffer. State-dict keys are
identical to the official file's, so released checkpoints load strictly. Deliberate differences:
- attention logits (image tokens only, q·kᵀ·scale before the text tokens are joined) are
  materialised only for the blocks asked for, and the projector runs only when asked for (the
  official file ties both to `return_act`: all blocks 0..encoder_depth-1, projector at the last);
- width, heads and the context dim are config (the official file hard-codes 32·depth, depth and
  768), as are `context_len` (checked; the official file takes any length) and `input_size`:
  the official 16×16 table cropped to the centre (`cropped_pos_embed`, max size 16) only builds
  at 256 px, where it is the full g×g table this module builds for any grid g;
- the unused official options are absent: learn_sigma, adm_in_channels (y_embedder),
  registers, rmsnorm, qk_norm, scale_mod_only, swiglu, `detach`, the pos-embed scaling/offset.
"""

from __future__ import annotations

import functools
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor

from trainer.models.common import (
    FinalLayer,
    ModelOut,
    PatchEmbed,
    TimestepEmbedder,
    TransformerShape,
    build_mlp,
    check_request,
    get_2d_sincos_pos_embed,
    modulate,
    unpatchify,
)

# ----------------------------------------------------------------------------
# Config


@dataclass(frozen=True, kw_only=True)
class MMDiTConfig(TransformerShape):
    """Architecture of one MM-DiT. Defaults are the official T2I model at 256 px (SPEC §8).

    num_tokens counts image tokens; the text adds context_len more in every joint attention.
    ``caption_dropout_prob`` is the training-time CFG rate (the official CFGDataset's p_uncond = 0.1:
    the caption is replaced by the empty caption's encoding); like SiT's class_dropout_prob it is
    not architecture, the trainer applies it (``trainer/conditioning.py``).
    """

    arch: str = "mmdit"
    depth: int = 24
    hidden_size: int = 768  # the official rule is 32·depth
    num_heads: int = 24  # the official rule is depth (head_dim 32)
    patch_size: int = 2
    input_size: int = 32  # latent side = image side / 8
    in_channels: int = 4
    context_len: int = 77  # text tokens per caption (CLIP ViT-L/14 pads to 77)
    context_dim: int = 768  # text feature width (CLIP ViT-L/14 last_hidden_state)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    projector_dim: int = 2048  # REPA projector hidden width
    z_dim: int = 768  # teacher feature dim (DINOv2-B); 0 = build no projector
    caption_dropout_prob: float = 0.1  # training: P(caption -> the empty caption's encoding)

    def __post_init__(self) -> None:
        self.check(("context_len", "context_dim"), [
            ("arch", self.arch == "mmdit", "'mmdit' (an MM-DiT config)"),
            ("qkv_bias", isinstance(self.qkv_bias, bool), "a bool"),
            ("caption_dropout_prob", 0.0 <= self.caption_dropout_prob <= 1.0, "in [0, 1]"),
        ])


# ----------------------------------------------------------------------------
# Joint block: one stream's half (qkv, output projection, MLP, adaLN) and the mixing of two


class StreamAttention(nn.Module):
    """One stream's projections around the joint attention (official SelfAttention, keys qkv and proj)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, pre_only: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        if not pre_only:  # the last context stream's attention output is discarded: no proj
            self.proj = nn.Linear(dim, dim)

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        N, T, _ = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, self.head_dim)  # (N, T, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (N, H, T, hd)
        return q, k, v


class StreamBlock(nn.Module):
    """One stream of a joint block (official DismantledBlock): adaLN around attention and MLP.

    pre_only (the last block's context stream) keeps only norm1, qkv and a 2-way (shift, scale)
    adaLN: its tokens feed the image stream's attention and are then dropped.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, pre_only: bool) -> None:
        super().__init__()
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = StreamAttention(hidden_size, num_heads, qkv_bias, pre_only)
        if not pre_only:
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=functools.partial(
                nn.GELU, approximate="tanh"), drop=0.0)
        n_mods = 2 if pre_only else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, n_mods * hidden_size, bias=True))

    def pre_attention(self, x: Tensor, c: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, ...]]:
        """q, k, v of this stream (3 × (N, H, T, hd)) and the modulation its post_attention needs."""
        mods = self.adaLN_modulation(c).chunk(2 if self.pre_only else 6, dim=-1)  # 2 or 6 × (N, D)
        qkv = self.attn.heads(modulate(self.norm1(x), mods[0], mods[1]))  # 3 × (N, H, T, hd)
        return qkv, mods[2:]

    def post_attention(self, a: Tensor, x: Tensor, mods: tuple[Tensor, ...]) -> Tensor:
        """a: this stream's slice of the joint attention output (N, T, D); x: the stream's input."""
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mods  # 4 × (N, D)
        x = x + gate_msa.unsqueeze(1) * self.attn.proj(a)  # (N, T, D)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)


class JointBlock(nn.Module):
    """SD3 joint block: both streams attend over [context; image] tokens (official block_mixing)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, pre_only: bool) -> None:
        super().__init__()
        self.context_block = StreamBlock(hidden_size, num_heads, mlp_ratio, qkv_bias, pre_only=pre_only)
        self.x_block = StreamBlock(hidden_size, num_heads, mlp_ratio, qkv_bias, pre_only=False)

    def forward(self, context: Tensor, x: Tensor, c: Tensor,
                return_logits: bool = False) -> tuple[Tensor | None, Tensor, Tensor | None]:
        """context (N, L, D), x (N, T, D), c (N, D) -> context (None after a pre_only block), x, logits."""
        L, (N, T, D) = context.shape[1], x.shape
        ctx_qkv, ctx_mods = self.context_block.pre_attention(context, c)  # 3 × (N, H, L, hd)
        x_qkv, x_mods = self.x_block.pre_attention(x, c)  # 3 × (N, H, T, hd)
        logits = None
        if return_logits:  # image tokens only, in the official order: the product, then the scale
            q, k = x_qkv[0], x_qkv[1]  # 2 × (N, H, T, hd)
            logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (N, H, T, T)
        q, k, v = (torch.cat((a, b), dim=2) for a, b in zip(ctx_qkv, x_qkv))  # 3 × (N, H, L+T, hd), text first
        a = F.scaled_dot_product_attention(q, k, v)  # (N, H, L+T, hd), scale hd^-0.5
        a = a.transpose(1, 2).reshape(N, L + T, D)  # (N, L+T, D)
        x = self.x_block.post_attention(a[:, L:], x, x_mods)  # (N, T, D)
        if self.context_block.pre_only:
            return None, x, logits
        return self.context_block.post_attention(a[:, :L], context, ctx_mods), x, logits  # (N, L, D), ...


# ----------------------------------------------------------------------------
# MM-DiT


class MMDiT(nn.Module):
    """Text-conditional MM-DiT predicting the velocity; modules are built in the official order,
    so a seed gives the official file's default init."""

    def __init__(self, cfg: MMDiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.context_embedder = nn.Linear(cfg.context_dim, D)
        # A buffer (not a Parameter, unlike SiT): the official key `pos_embed`, saved, never trained.
        pos = get_2d_sincos_pos_embed(D, cfg.input_size // cfg.patch_size)  # (T, D) float64
        self.register_buffer("pos_embed", torch.tensor(pos, dtype=torch.float32).unsqueeze(0))  # (1, T, D)
        self.joint_blocks = nn.ModuleList(
            JointBlock(D, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, pre_only=i == cfg.depth - 1)
            for i in range(cfg.depth)
        )
        self.final_layer = FinalLayer(D, cfg.patch_size, cfg.in_channels)
        # One projector per teacher; we use one teacher. Empty when z_dim == 0, so no keys appear.
        self.projectors = nn.ModuleList([build_mlp(D, cfg.projector_dim, cfg.z_dim)] if cfg.z_dim > 0 else [])

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        *,
        attn_blocks: Collection[int] = (),
        feature_block: int | None = None,
    ) -> ModelOut:
        """x: (N, C, H, W) noisy latents; t: (N,) flow time in [0, 1]; context: (N, L, context_dim) text
        features (the empty caption's encoding is the null condition).

        attn_blocks: 0-based blocks whose image-token pre-softmax logits are returned (N, H, T, T).
        feature_block: 0-based block whose image-token output goes through projectors[0]
        (official encoder_depth=8 <=> feature_block=7). All blocks always run.
        """
        cfg = self.cfg
        expected = (cfg.context_len, cfg.context_dim)
        if context.ndim != 3 or tuple(context.shape[1:]) != expected or context.shape[0] != x.shape[0]:
            raise ValueError(f"context has shape {tuple(context.shape)}, expected ({x.shape[0]}, {expected[0]}, "
                             f"{expected[1]})")
        tapped = check_request(cfg, x, attn_blocks, feature_block, has_projector=len(self.projectors) > 0)
        h = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t)  # (N, D)
        ctx: Tensor | None = self.context_embedder(context)  # (N, L, D)
        attn_logits: dict[int, Tensor] = {}
        features = None
        for i, block in enumerate(self.joint_blocks):
            ctx, h, logits = block(ctx, h, c, return_logits=i in tapped)  # (N, L, D) | None, (N, T, D), (N, H, T, T)
            if logits is not None:
                attn_logits[i] = logits
            if i == feature_block:
                features = self.projectors[0](h)  # (N, T, z_dim)
        out = self.final_layer(h, c)  # (N, T, p*p*C)
        out = unpatchify(out, cfg.patch_size, cfg.in_channels)  # (N, C, H, W)
        return ModelOut(out=out, attn_logits=attn_logits, features=features)


# ----------------------------------------------------------------------------
# Presets and official checkpoints

# The official width rule (hidden = 32·depth, heads = depth) over SD3's depth ladder; the
# released T2I model is MMDiT-24/2 (~505M parameters without the projector).
MMDIT_PRESETS: dict[str, dict] = {
    f"MMDiT-{depth}/{patch}": dict(depth=depth, hidden_size=32 * depth, num_heads=depth, patch_size=patch)
    for depth in (15, 18, 24, 30, 38)
    for patch in (2, 4, 8)
}

# Teacher feature widths of the `--enc-type` names train_t2i.py accepts for DINOv2 (REPA utils.load_encoders).
_ENCODER_DIMS = {"dinov2-vit-s": 384, "dinov2-vit-b": 768, "dinov2-vit-l": 1024, "dinov2-vit-g": 1536}


def mmdit_config(name: str, **overrides: object) -> MMDiTConfig:
    """Preset by name (e.g. "MMDiT-24/2") with any MMDiTConfig field overridden."""
    if name not in MMDIT_PRESETS:
        raise ValueError(f"unknown MM-DiT preset {name!r}; known: {', '.join(MMDIT_PRESETS)}")
    return MMDiTConfig(**{**MMDIT_PRESETS[name], **overrides})


def official_mmdit_config(args: Any, **overrides: object) -> MMDiTConfig:
    """The config of an official T2I checkpoint from its pickled argparse `args` (train_t2i.py stores them).

    Both scripts build `MMDiT(input_size=resolution // 8, z_dims=..., encoder_depth=...)`, so the
    net is MMDiT-24/2 (768-dim text) and only the resolution and the projector vary. The projector
    width comes from `--enc-type` (train_t2i.py) or `--projector-embed-dims` (generate_t2i.py); one
    projector only: pass z_dim=0 (and drop the `projectors.*` keys) for files with several, for
    `--enc-type None` (a zero-width projector) or to sample. `--qk-norm`/`--fused-attn` are stored but
    never reach the official model. The alignment depth is no architecture: `args.encoder_depth - 1`
    is the feature_block.
    """
    fields: dict[str, object] = {"input_size": int(getattr(args, "resolution", 256)) // 8}
    if "z_dim" not in overrides:
        enc = getattr(args, "enc_type", None)
        dims = getattr(args, "projector_embed_dims", None)
        names = [s.strip() for s in str(enc if enc is not None else dims).split(",")]
        if enc is not None and len(names) == 1 and names[0] in _ENCODER_DIMS:
            fields["z_dim"] = _ENCODER_DIMS[names[0]]
        elif enc is None and dims is not None and len(names) == 1 and names[0].isdigit():
            fields["z_dim"] = int(names[0])
        else:
            raise ValueError(f"cannot tell the projector width from enc_type={enc!r} / projector_embed_dims="
                             f"{dims!r}: pass z_dim (0 builds none; then drop the checkpoint's projectors.* keys)")
    return mmdit_config("MMDiT-24/2", **{**fields, **overrides})
