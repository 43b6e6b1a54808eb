"""``tokens-<p>``: store what the teacher's q/k projection reads, not what it writes.

q and k of a patch token are a per-token affine map of that token's qkv input alone
(``blocks[l].attn.qkv`` is a Linear; DINOv2's q_norm/k_norm are identities), so one sample stores
the patch tokens' qkv inputs x (L, T, D) and the teacher group stores the frozen projections
once, in ``codec/qk_weight.npy`` (L, 2, H, hd, D) float32 and ``codec/qk_bias.npy`` (L, 2, H, hd)
(index 0 = q, 1 = k; head-split, so ``q[h] = x W[l, 0, h]ᵀ + b[l, 0, h]``). int8 x is one row per
(layer, token) with its fp16 scale s packed in (``pipeline.cache.codecs_base``): L·T·(D + 2) bytes,
788 KB for DINOv2-B's 4 layers at 256 px, about half of qk-int8, and no SVD at write time.

Fixed basis: the tokens are stored as x R and the projections as W R, with R one fixed D×D
orthogonal matrix (a seeded Haar draw, ``basis``); q = (x R)(W R)ᵀ + b = x Wᵀ + b, so decoding is
unchanged and never needs R. Why: a per-token int8 row spends its range on the token's largest
channel, and LayerNorm outputs of trained ViTs have a few channels far larger than the rest
(the inter-channel variation post-LayerNorm quantisation work such as RepQ-ViT reports). R spreads
any channel over all D, so a row's max tracks its norm; bench_codecs' channel-outlier stress
(4 of 768 channels x20) measures the difference: gradient cosine 0.98 without R, above 0.999 with it.

Decoding (on the training device, no teacher model): q, k = x̂ Wᵀ + b per layer and head (x̂, W as
stored), keys centred over the tokens (exact for the softmax: it removes the row constant
``q_i · k̄``, the key bias among it), logits = scale · q kᵀ. Decoded logits therefore equal the
exact ones up to a row constant, like qk-int8's; compare them with ``row_centred``.

Error bound (int8), in stored quantities (x̂ = stored tokens, W = stored qk_weight), from
|x̂_ic − (x R)_ic| ≤ s_i / 2 through the linear map:
  |Δq_id| ≤ s_i/2 · ‖Wq_d‖₁ and |Δk_jd| ≤ s_j/2 · ‖Wk_d‖₁ (d = one output row of head h);
  centred keys: |Δk̃_jd| ≤ ‖Wk_d‖₁ · (s_j + s̄)/2, s̄ = mean over tokens of s;
  row-centred logits: |Δℓ_ij| ≤ scale · Σ_d (|Δq_id| |k̃_jd| + |q_id| |Δk̃_jd| + |Δq_id| |Δk̃_jd|)
  with q, k̃ the exact queries and centred keys (plus fp32 matmul rounding).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from pipeline.cache.codecs_base import (
    PRECISIONS,
    AttnCodec,
    CacheFormatError,
    Member,
    load,
    pack_int8_torch,
    row_dims,
)

QK_WEIGHT, QK_BIAS = "qk_weight", "qk_bias"
# Seed of the stored basis. Readers never need it (qk_weight holds W R); a writer finishing a
# partially written group must use the same R, so neither the seed nor the generator (the legacy
# RandomState stream, which numpy keeps stable across versions) ever changes.
_BASIS_SEED = 0x70CE45


@lru_cache(maxsize=4)
def basis(d: int) -> torch.Tensor:
    """The fixed orthogonal R (d, d) float32 (CPU): QR of a seeded Gaussian in float64, column signs
    fixed by R's diagonal so that the draw is Haar-uniform and the same on every run."""
    g = np.random.RandomState(_BASIS_SEED)
    q, r = np.linalg.qr(g.standard_normal((d, d)))
    return torch.from_numpy((q * np.sign(np.diag(r))).astype(np.float32))


def rotate(x: torch.Tensor) -> torch.Tensor:
    """Tokens (..., D) in the stored basis: x R, float32, on x's device."""
    return x.float() @ basis(x.shape[-1]).to(x.device)


def store_params(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The teacher's q/k projections (``Teacher.qk_params``) as stored: W R (float64 product), b."""
    w = np.asarray(params[QK_WEIGHT], dtype=np.float64)
    r = basis(w.shape[-1]).double().numpy()
    return {QK_WEIGHT: (w @ r).astype(np.float32), QK_BIAS: np.asarray(params[QK_BIAS], dtype=np.float32)}


def param_members(spec: Any) -> dict[str, Member]:
    """The group-level arrays a ``tokens-*`` decode needs: q and k projections of the stored layers."""
    layers, heads, hd, d = len(spec.layers), spec.num_heads, spec.head_dim, spec.embed_dim
    return {QK_WEIGHT: ("float32", (layers, 2, heads, hd, d)), QK_BIAS: ("float32", (layers, 2, heads, hd))}


def qk_from_tokens(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, L, T, D), weight (L, 2, H, hd, D), bias (L, 2, H, hd) -> q, k (N, L, H, T, hd), float32.

    One GEMM per layer for q and k together (the trainer's decode cost is this plus scale · q kᵀ).
    """
    layers, _, heads, hd, d = weight.shape
    w = weight.reshape(layers, 2 * heads * hd, d).to(device=x.device, dtype=torch.float32)
    b = bias.reshape(layers, 1, 2 * heads * hd).to(device=x.device, dtype=torch.float32)
    y = x.float() @ w.transpose(-1, -2) + b                       # (N, L, T, 2·H·hd)
    y = y.unflatten(-1, (2, heads, hd)).permute(3, 0, 1, 4, 2, 5)  # (2, N, L, H, T, hd)
    return y[0], y[1]


def logits_from_tokens(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: float,
                       prec: str) -> torch.Tensor:
    """Stored tokens (N, L, T, D[+2]) -> logits (N, L, H, T, T) float32, keys centred (a row constant).

    The decode's cost is two fp32 GEMMs; everything around them is laid out to add as little as
    possible: tokens unpacked straight into (L, N·T, D), then per layer ONE GEMM over all N·T tokens
    for q and k together with the bias fused (batched matmul against the un-expanded (L, D, 2·H·hd)
    weights, not a broadcast that copies them per sample), the scale folded into the centred keys,
    and one batched q k̃ᵀ. Same numbers as ``qk_from_tokens`` then ``(q·scale) k̃ᵀ`` up to fp32
    rounding. bf16 GEMMs would be 3x faster on a CPU but cost gradient cosine (0.99912 at x20 vs
    0.99918 for the token GEMM, below 0.999 with the logits GEMM too), so the decode stays fp32.
    """
    n, layers, t = x.shape[:3]
    if prec == "int8":  # int8 rows with their fp16 scale packed last (pipeline.cache.codecs_base)
        xl = torch.empty((layers, n, t, x.shape[-1] - 2), dtype=torch.float32, device=x.device)
        xl.copy_(x[..., :-2].transpose(0, 1)).mul_(x[..., -2:].contiguous().view(torch.float16).transpose(0, 1))
    else:
        xl = load(x.transpose(0, 1), prec).contiguous()
    _, _, heads, hd, d = weight.shape
    w = weight.reshape(layers, 2 * heads * hd, d).to(device=x.device, dtype=torch.float32)
    b = bias.reshape(layers, 1, 2 * heads * hd).to(device=x.device, dtype=torch.float32)
    y = torch.baddbmm(b, xl.view(layers, n * t, d), w.transpose(1, 2))  # (L, N·T, 2·H·hd)
    y = y.view(layers, n, t, 2, heads, hd).permute(3, 1, 0, 4, 2, 5)   # (2, N, L, H, T, hd) view
    q, k = y[0], y[1]
    kc = torch.empty(k.shape, dtype=torch.float32, device=x.device)
    torch.sub(k, k.mean(dim=-2, keepdim=True), out=kc).mul_(scale)   # centred: a row constant for the softmax
    return torch.matmul(q, kc.transpose(-1, -2))                      # (N, L, H, T, T)


def tokens_codec(prec: str, fixed_basis: bool = True) -> AttnCodec:
    """``tokens-<prec>``; ``fixed_basis=False`` stores x and W as they are (bench_codecs' ablation only)."""
    dtype = PRECISIONS[prec]

    def prepare(t: torch.Tensor) -> torch.Tensor:
        t = rotate(t) if fixed_basis else t.float()
        return pack_int8_torch(t) if prec == "int8" else t.to(getattr(torch, dtype))

    def encode(x: np.ndarray, scale: float) -> dict[str, np.ndarray]:
        if prec == "int8" and x.dtype == np.int8:  # already prepared (rotated + packed) on the writer's device
            return {"x": x}
        # float tokens as the teacher gave them: the writer's device step, here on the CPU
        return {"x": prepare(torch.from_numpy(np.asarray(x))).numpy()}

    def decode(arrays: Mapping[str, torch.Tensor], scale: float,
               params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        if params is None or QK_WEIGHT not in params or QK_BIAS not in params:
            raise CacheFormatError(f"attention codec 'tokens-{prec}' decodes with the teacher group's "
                                   f"{QK_WEIGHT}/{QK_BIAS} files: decode through pipeline.cache.reader (Cache.teacher_logits)")
        return logits_from_tokens(arrays["x"], params[QK_WEIGHT], params[QK_BIAS], scale, prec)

    def members(s: Any) -> dict[str, Member]:
        return {"x": (dtype, (len(s.layers), s.num_tokens, row_dims(s.embed_dim, prec)))}

    bounds = {"fp32": "exact tokens; q, k and logits to fp32 matmul rounding",
              "fp16": "tokens (x R) rounded to fp16: |dq_d| <= 2^-11 sum_c |W_dc| |(x R)_c| (likewise k)",
              "int8": "row-centred logits: |dlogit_ij| <= scale * sum_d (|dq_id| |k~_jd| + |q_id| |dk~_jd| + "
                      "|dq_id| |dk~_jd|), |dq_id| <= s_i/2 |Wq_d|_1, |dk~_jd| <= |Wk_d|_1 (s_j + mean s)/2, "
                      "s = token row scale ~ max|(x R)_i| / 127, W = stored qk_weight (W R), k~ = keys centred "
                      "over tokens"}
    return AttnCodec(f"tokens-{prec}", dtype, members, encode, decode,
                     qk_dtype="float32" if prec == "int8" else dtype, error_bound=bounds[prec],
                     lossless=prec != "int8", inputs=("x",), params=param_members, prepare=prepare,
                     store_params=store_params if fixed_basis else dict)
