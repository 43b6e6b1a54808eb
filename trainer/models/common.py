"""What SiT and MM-DiT share: the config base, the output type, forward checks, adaLN modulation, the
patch and timestep embedders, the final layer, the REPA projector, unpatchify and the sin-cos table.

As in HASTE/REPA ``models/sit.py`` (SPEC §1), whose ``models/mmdit.py`` reuses the same pieces;
the state-dict keys of every module here are the official ones.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

# ----------------------------------------------------------------------------
# Config base and output


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


# ----------------------------------------------------------------------------
# Embedders and final layer


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
