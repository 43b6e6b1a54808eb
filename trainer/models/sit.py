"""SiT, the diffusion transformer that HASTE and REPA train: one file, laid out like DiT's models.py.

Owns the network only: `ModelConfig` and the `SIT_PRESETS`, the `SiT` module and its weight init.
Losses, the interpolant and the loop live elsewhere; they ask for intermediate outputs explicitly
through `SiT.forward(x, t, y, attn_blocks=..., feature_block=...)`, which returns a `ModelOut`.
The pieces MM-DiT shares with it (config base, embedders, sin-cos table, projector, final layer,
checks) live in common.py.

Follows HASTE/REPA `models/sit.py` (SPEC §1). State-dict keys are identical to the official
checkpoints (SPEC §1.8). Deliberate differences (SPEC §7):
- attention logits are computed only for the blocks asked for, and every block's output comes from
  fused SDPA (the official code computes q·kᵀ in every block on every call, sampling included);
- label dropout is an explicit `drop_labels(y, generator)` call, not a side effect of `forward`
  in train mode driven by the global RNG;
- the SiT-S presets work (the official ones build the final layer 768 wide and crash);
- the null-class row always exists, so CFG sampling works even after training with p = 0.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

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
class ModelConfig(TransformerShape):
    """Architecture of one SiT. Defaults are SiT-XL/2 at 256 px (32×32×4 SD-VAE latents)."""

    arch: str = "sit"  # names the network in saved configs (models/archs.py); absent in older ones = "sit"
    depth: int = 28
    hidden_size: int = 1152
    num_heads: int = 16
    patch_size: int = 2
    input_size: int = 32  # latent side = image side / 8
    in_channels: int = 4
    num_classes: int = 1000  # the null (unconditional) label is index num_classes
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    qk_norm: bool = False
    projector_dim: int = 2048  # REPA projector hidden width
    z_dim: int = 768  # teacher feature dim (DINOv2-B); 0 = build no projector

    def __post_init__(self) -> None:
        self.check(("num_classes",), [
            ("arch", self.arch == "sit", "'sit' (a SiT config)"),
            ("class_dropout_prob", 0.0 <= self.class_dropout_prob <= 1.0, "in [0, 1]"),
        ])


# ----------------------------------------------------------------------------
# Helpers


def _gelu_tanh() -> nn.Module:
    return nn.GELU(approximate="tanh")


def attention_logits(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """Pre-softmax logits (q·scale) kᵀ (N, H, T, T) of (N, H, T, hd) inputs, q scaled first.

    HASTE's order (sit.py L50), so the loss sees the same numbers as the official model. Only the
    loss reads them: the block's output always comes from fused SDPA, as with the official
    fused_attn=True, which keeps no (T, T) probabilities for backward (an explicit softmax kept
    fp32 probabilities plus a compute-dtype copy: 18 MiB per aligned block at SiT-B/2, batch 4).
    The price is q·kᵀ twice in the aligned blocks (<1% of a step's FLOPs).
    """
    return (q * scale) @ k.transpose(-2, -1)


# ----------------------------------------------------------------------------
# Embedders


class LabelEmbedder(nn.Module):
    """Class table plus a null row at index num_classes (CFG); dropout lives in `SiT.drop_labels`."""

    def __init__(self, num_classes: int, hidden_size: int) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes

    def forward(self, y: Tensor) -> Tensor:
        return self.embedding_table(y)  # (N,) -> (N, D)


# ----------------------------------------------------------------------------
# Attention


class Attention(nn.Module):
    """Fused-SDPA self-attention that also returns the (T, T) logits when asked (and only then).

    HASTE's version computes q·kᵀ in every block on every call (SPEC §7.6).
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        # timm/HASTE qk_norm: affine LayerNorm over head_dim with the default eps 1e-5.
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: Tensor, return_logits: bool = False) -> tuple[Tensor, Tensor | None]:
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # 3 × (N, H, T, hd)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (N, H, T, hd)
        logits = attention_logits(q, k, self.scale) if return_logits else None  # (N, H, T, T)
        out = out.transpose(1, 2).reshape(N, T, D)  # (N, T, D)
        return self.proj(out), logits


# ----------------------------------------------------------------------------
# Block and final layer


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (DiT §3.2)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=_gelu_tanh, drop=0.0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: Tensor, c: Tensor, return_logits: bool = False) -> tuple[Tensor, Tensor | None]:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).chunk(6, dim=-1)  # 6 × (N, D)
        )
        a, logits = self.attn(modulate(self.norm1(x), shift_msa, scale_msa), return_logits)
        x = x + gate_msa.unsqueeze(1) * a  # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x, logits


# ----------------------------------------------------------------------------
# SiT


class SiT(nn.Module):
    """Class-conditional SiT predicting the velocity (out_channels = in_channels, no learned sigma)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D)
        # Fixed sin-cos table; a frozen Parameter (not a buffer) so the key matches the checkpoints.
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, D), requires_grad=False)
        self.blocks = nn.ModuleList(
            SiTBlock(D, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm) for _ in range(cfg.depth)
        )
        # One projector per teacher; we use one teacher. Empty when z_dim == 0, so no keys appear.
        self.projectors = nn.ModuleList(
            [build_mlp(D, cfg.projector_dim, cfg.z_dim)] if cfg.z_dim > 0 else []
        )
        # Width D, not REPA's decoder_hidden_size default of 768 that breaks SiT-S (SPEC §7.10).
        self.final_layer = FinalLayer(D, cfg.patch_size, cfg.in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """SPEC §1.5, in the order of the official initialize_weights."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):  # every Linear, the projector's included
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        grid = self.cfg.input_size // self.cfg.patch_size
        pos = get_2d_sincos_pos_embed(self.cfg.hidden_size, grid)  # (T, D)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        # Patch embedding initialised like the Linear it is: xavier on the (D, C·p·p) view.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every residual branch starts as the identity ...
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        # ... and the network starts by predicting exactly zero velocity.
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor,
        *,
        attn_blocks: Collection[int] = (),
        feature_block: int | None = None,
    ) -> ModelOut:
        """x: (N, C, H, W) noisy latents; t: (N,) flow time in [0, 1]; y: (N,) labels (num_classes = null).

        attn_blocks: 0-based blocks whose pre-softmax logits are returned (all others use SDPA).
        feature_block: 0-based block whose output goes through projectors[0] (official
        encoder_depth=8 <=> feature_block=7). All blocks always run.
        """
        tapped = check_request(self.cfg, x, attn_blocks, feature_block, has_projector=len(self.projectors) > 0)
        h = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        attn_logits: dict[int, Tensor] = {}
        features = None
        for i, block in enumerate(self.blocks):
            h, logits = block(h, c, return_logits=i in tapped)  # (N, T, D), (N, H, T, T) or None
            if logits is not None:
                attn_logits[i] = logits
            if i == feature_block:
                features = self.projectors[0](h)  # (N, T, z_dim)
        out = self.final_layer(h, c)  # (N, T, p*p*C)
        out = unpatchify(out, self.cfg.patch_size, self.cfg.in_channels)  # (N, C, H, W)
        return ModelOut(out=out, attn_logits=attn_logits, features=features)

    def drop_labels(self, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Replace each label by the null class with probability cfg.class_dropout_prob (CFG training).

        Uniforms are drawn on the generator's device, so a CPU generator gives the same drops for
        CUDA labels. They are drawn even when p == 0, so the RNG stream does not depend on p.
        """
        device = generator.device if generator is not None else y.device
        u = torch.rand(y.shape, generator=generator, device=device).to(y.device)
        return torch.where(u < self.cfg.class_dropout_prob, torch.full_like(y, self.cfg.num_classes), y)


# ----------------------------------------------------------------------------
# Presets and utilities

# (depth, hidden_size, num_heads) per size, from sit.py L280-322; every size comes in /2, /4, /8.
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}

SIT_PRESETS: dict[str, dict] = {
    f"SiT-{size}/{patch}": dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
    for size, (depth, hidden, heads) in _SIZES.items()
    for patch in (2, 4, 8)
}


def model_config(name: str, **overrides: object) -> ModelConfig:
    """Preset by its paper name (e.g. "SiT-XL/2") with any ModelConfig field overridden."""
    if name not in SIT_PRESETS:
        raise ValueError(f"unknown SiT preset {name!r}; known: {', '.join(SIT_PRESETS)}")
    return ModelConfig(**{**SIT_PRESETS[name], **overrides})


def count_params(model: nn.Module, *, exclude_projector: bool = True, trainable_only: bool = True) -> int:
    """Parameter count; the defaults give the paper's model sizes (no projector, no pos_embed)."""
    return sum(p.numel() for name, p in model.named_parameters()
               if not (exclude_projector and name.startswith("projectors.")) and (p.requires_grad or not trainable_only))
