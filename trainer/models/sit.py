"""SiT, the diffusion transformer that HASTE and REPA train: one file, laid out like DiT's models.py.

Owns the network only: `ModelConfig` and the `SIT_PRESETS`, the `SiT` module and its weight init.
Losses, the interpolant and the loop live elsewhere; they ask for intermediate outputs explicitly
through `SiT.forward(x, t, y, attn_blocks=..., feature_block=...)`, which returns a `ModelOut`.
The config base, embedders, sin-cos table, projector, final layer and checks also build mmdit.py.

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

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor

# ----------------------------------------------------------------------------
# Config


class TransformerShape:
    """Base of SiT's and MM-DiT's configs: the checks every such net needs and its derived sizes."""

    hidden_size: int
    num_heads: int
    patch_size: int
    input_size: int

    def check(self, more_ints: tuple[str, ...], more_rules: list[tuple[str, bool, str]]) -> None:
        """One ValueError naming `<Class>.<field>`: ints >= 1 (z_dim >= 0), shape rules, `more_rules`."""
        kind = type(self).__name__
        for name in ("depth", "hidden_size", "num_heads", "patch_size", "input_size", "in_channels",
                     *more_ints, "projector_dim", "z_dim"):
            value, low = getattr(self, name), 0 if name == "z_dim" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{kind}.{name} must be an int >= {low}, got {value!r}")
        rules = [
            ("hidden_size", self.hidden_size % self.num_heads == 0, f"divisible by num_heads={self.num_heads}"),
            # The 2-D sin-cos pos_embed splits D into four equal sin/cos bands.
            ("hidden_size", self.hidden_size % 4 == 0, "divisible by 4"),
            ("input_size", self.input_size % self.patch_size == 0, f"divisible by patch_size={self.patch_size}"),
            ("mlp_ratio", self.mlp_ratio > 0 and int(self.hidden_size * self.mlp_ratio) >= 1, "> 0"),
            *more_rules,
        ]
        for name, ok, rule in rules:
            if not ok:
                raise ValueError(f"{kind}.{name} must be {rule}, got {getattr(self, name)!r}")

    @property
    def num_tokens(self) -> int:
        """Image tokens: (input_size / patch_size)²."""
        return (self.input_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


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

@dataclass
class ModelOut:
    out: Tensor  # (N, C, H, W) velocity prediction
    attn_logits: dict[int, Tensor]  # block index -> pre-softmax logits (N, heads, T, T), requested blocks only
    features: Tensor | None  # projector output (N, T, z_dim) when feature_block was given


# ----------------------------------------------------------------------------
# Helpers


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x (N, T, D) with per-sample shift/scale (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def build_mlp(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """REPA projector (sit.py L71-78); indices 0, 2, 4 are the Linear layers in the state dict."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


def unpatchify(x: Tensor, patch_size: int, channels: int) -> Tensor:
    """(N, T, p·p·C) -> (N, C, H, W), the inverse of the patch embedding's row-major token order."""
    p, C = patch_size, channels
    g = math.isqrt(x.shape[1])
    x = x.reshape(x.shape[0], g, g, p, p, C)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], C, g * p, g * p)


def check_request(cfg: Any, x: Tensor, attn_blocks: Collection[int], feature_block: int | None, *,
                  has_projector: bool) -> frozenset[int]:
    """Validate a forward's input shape and taps (cfg: depth, in_channels, input_size); the tapped set."""
    expected = (cfg.in_channels, cfg.input_size, cfg.input_size)
    if tuple(x.shape[1:]) != expected:
        raise ValueError(f"x has shape {tuple(x.shape)}, expected (N, {', '.join(map(str, expected))})")
    tapped = frozenset(attn_blocks)  # once: attn_blocks may be a one-shot iterator
    for i in tapped:
        if i not in range(cfg.depth):
            raise ValueError(f"attn_blocks: block index {i!r} is out of range for depth {cfg.depth} (0-based)")
    if feature_block is not None:
        if feature_block not in range(cfg.depth):
            raise ValueError(f"feature_block {feature_block!r} is out of range for depth {cfg.depth} (0-based)")
        if not has_projector:
            raise ValueError(f"feature_block={feature_block} needs a projector, but cfg.z_dim == 0")
    return tapped


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


class PatchEmbed(nn.Module):
    """timm's PatchEmbed without its options: a strided conv, tokens in row-major (h, w) order."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, C, H, W) -> (N, T, D)


class TimestepEmbedder(nn.Module):
    """Continuous flow time t in [0, 1] -> (N, D). t is not multiplied by 1000 (SPEC §1.3)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        """GLIDE sinusoidal features [cos(t f_k), sin(t f_k)], f_k = max_period^(-k/half): (N,) -> (N, dim)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # (N, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: Tensor) -> Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size).to(t.dtype)  # (N, 256)
        return self.mlp(t_freq)  # (N, D)


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


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a Linear to p·p·C values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # 2 × (N, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C)


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
# Sin-cos position embedding (MAE util/pos_embed.py, as in sit.py L226-273)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size², embed_dim) table for row-major tokens; the first half encodes w, the second h."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # w first, so grid[0] is the w coordinate
    return get_2d_sincos_pos_embed_from_grid(embed_dim, grid.reshape(2, 1, grid_size, grid_size))


def get_2d_sincos_pos_embed_from_grid(embed_dim: int, grid: np.ndarray) -> np.ndarray:
    emb_0 = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # (T, D/2)
    emb_1 = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # (T, D/2)
    return np.concatenate([emb_0, emb_1], axis=1)  # (T, D)


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """[sin(pos·ω), cos(pos·ω)] with ω_i = 1 / 10000^(i / (embed_dim/2)): (M,) -> (M, embed_dim)."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


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
