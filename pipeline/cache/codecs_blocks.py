"""The frozen DINOv2 blocks a ``stream-*`` codec runs at decode time: pure torch, no timm.

The math of timm's ``vit_*_dinov2`` blocks (``timm.models.vision_transformer.Block`` with
``Attention``, ``LayerScale`` and ``Mlp``), one block:

    x = x + ls1 ⊙ proj(softmax(scale · q kᵀ) v),   q, k, v = split(qkv(LN1(x)))  (per head)
    x = x + ls2 ⊙ fc2(GELU(fc1(LN2(x))))

LayerNorm eps 1e-6, exact (erf) GELU, biases on every Linear, q_norm/k_norm identities, and the
model's final ``norm`` after the last block (``forward_features``). The weights come as arrays
stacked over the stored blocks (``BLOCK_ARRAYS``, block axis first) plus the final norm
(``NORM_ARRAYS``); ``pipeline.encoders.teacher.Teacher.stream_params`` extracts them from a timm
model and checks this module against the model's own forward.

``low`` (optional) runs the GEMMs off the logit path, the attention output projection and the MLP
(3/4 of a block's multiply-adds), in a lower precision (bf16 on CPUs, where it is ~4x faster): their
rounding reaches the later blocks' logits only through the residual stream, while the qkv GEMM and
q kᵀ, which make the logits, stay in the weights' dtype (bench_codecs measured the split: bf16 q/k
take the stress cases below the bar, bf16 projections and MLPs keep them above it).

Attention runs explicitly where its logits are targets (a block in ``logits_at``), so the
logits are the very ones the block softmaxes, and through ``scaled_dot_product_attention``
elsewhere. Logits are computed over all tokens (the prefix tokens take part in every block),
then cut to patch × patch: the CLS row and column removed, as the official HASTE code does.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

LN_EPS = 1e-6
# name -> shape of one block's array in symbols (D = embed dim, M = MLP hidden dim); the names are
# timm's parameter paths with "." -> "_", so the teacher extracts them by name.
BLOCK_ARRAYS: dict[str, tuple[str, ...]] = {
    "norm1_weight": ("D",), "norm1_bias": ("D",),
    "attn_qkv_weight": ("3D", "D"), "attn_qkv_bias": ("3D",),
    "attn_proj_weight": ("D", "D"), "attn_proj_bias": ("D",),
    "ls1_gamma": ("D",),
    "norm2_weight": ("D",), "norm2_bias": ("D",),
    "mlp_fc1_weight": ("M", "D"), "mlp_fc1_bias": ("M",),
    "mlp_fc2_weight": ("D", "M"), "mlp_fc2_bias": ("D",),
    "ls2_gamma": ("D",),
}
NORM_ARRAYS = ("norm_weight", "norm_bias")  # the final LayerNorm, (D,) each


def block_shapes(blocks: int, dim: int, mlp_dim: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the stacked block arrays and the final norm for ``blocks`` blocks."""
    size = {"D": dim, "3D": 3 * dim, "M": mlp_dim}
    out = {n: (blocks, *(size[s] for s in sym)) for n, sym in BLOCK_ARRAYS.items()}
    out.update({n: (dim,) for n in NORM_ARRAYS})
    return out


def block_flops(tokens: int, dim: int, mlp_dim: int) -> int:
    """Multiply-adds x 2 of one block on ``tokens`` tokens: qkv, q kᵀ, attention @ v, proj, MLP."""
    linear = tokens * dim * (3 * dim + dim + 2 * mlp_dim)
    attention = 2 * tokens * tokens * dim
    return 2 * (linear + attention)


@dataclass
class BlocksOut:
    feat: Tensor | None      # (N, S - prefix, D) final-norm tokens after the last block, fp32
    logits: Tensor | None    # (N, len(logits_at), H, S - prefix, S - prefix) pre-softmax, fp32
    normed: Tensor | None    # (N, len(logits_at), S, D) LN1 outputs (qkv inputs) of those blocks (``keep_normed``)


def _layer_norm(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), w, b, eps=LN_EPS)


def _attention(h: Tensor, p: Mapping[str, Tensor], i: int, num_heads: int, scale: float,
               want_logits: bool) -> tuple[Tensor, Tensor | None]:
    """One block's attention on LN1 output h (N, S, D) -> (N, S, D) before proj, and its logits (N, H, S, S)."""
    n, s, d = h.shape
    qkv = F.linear(h, p["attn_qkv_weight"][i], p["attn_qkv_bias"][i])         # (N, S, 3D)
    q, k, v = qkv.reshape(n, s, 3, num_heads, d // num_heads).permute(2, 0, 3, 1, 4)  # (N, H, S, hd) each
    if not want_logits:
        return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(n, s, d), None
    logits = (q * scale) @ k.transpose(-1, -2)                                 # timm's unfused order
    return (logits.softmax(-1) @ v).transpose(1, 2).reshape(n, s, d), logits


LOW_GEMMS = ("attn_proj", "mlp_fc1", "mlp_fc2")  # the GEMMs ``low`` may run in a lower precision


def low_precision(p: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """The weights and biases of ``LOW_GEMMS`` cast to ``dtype`` (cast once, reused by every decode)."""
    return {f"{g}_{w}": p[f"{g}_{w}"].to(dtype) for g in LOW_GEMMS for w in ("weight", "bias")}


def _linear(x: Tensor, p: Mapping[str, Tensor], low: Mapping[str, Tensor] | None, name: str, i: int) -> Tensor:
    if low is None:
        return F.linear(x, p[f"{name}_weight"][i], p[f"{name}_bias"][i])
    w = low[f"{name}_weight"][i]
    return F.linear(x.to(w.dtype), w, low[f"{name}_bias"][i]).to(x.dtype)


def block_forward(x: Tensor, p: Mapping[str, Tensor], i: int, *, num_heads: int, scale: float,
                  want_logits: bool = False, low: Mapping[str, Tensor] | None = None
                  ) -> tuple[Tensor, Tensor | None, Tensor]:
    """Stored block i on x (N, S, D): (its output, its logits (N, H, S, S) when asked, its LN1 output).
    ``low``: ``low_precision(p, dtype)``, to run the projection and the MLP in that dtype."""
    h = _layer_norm(x, p["norm1_weight"][i], p["norm1_bias"][i])
    a, logits = _attention(h, p, i, num_heads, scale, want_logits)
    x = x + p["ls1_gamma"][i] * _linear(a, p, low, "attn_proj", i)
    m = F.gelu(_linear(_layer_norm(x, p["norm2_weight"][i], p["norm2_bias"][i]), p, low, "mlp_fc1", i))
    return x + p["ls2_gamma"][i] * _linear(m, p, low, "mlp_fc2", i), logits, h


def final_norm(x: Tensor, p: Mapping[str, Tensor]) -> Tensor:
    return _layer_norm(x, p["norm_weight"], p["norm_bias"])


def run_blocks(x: Tensor, p: Mapping[str, Tensor], *, num_heads: int, scale: float, prefix: int,
               logits_at: Collection[int] = (), features: bool = True, keep_normed: bool = False,
               low: Mapping[str, Tensor] | None = None) -> BlocksOut:
    """The stored blocks on the residual stream x (N, S, D) entering the first of them, in the weights'
    dtype (float32 for decoding).

    ``logits_at``: block positions (0 = the first stored block) whose attention logits to return,
    patch × patch (the first ``prefix`` tokens cut from both axes), in ascending order. Without
    ``features`` the run stops at the last of those blocks' logits (the rest is not needed). ``low``:
    see ``block_forward``.
    """
    want = sorted(set(logits_at))
    depth = p["attn_qkv_weight"].shape[0]
    if want and not 0 <= want[0] <= want[-1] < depth:
        raise ValueError(f"logits_at {want} outside the {depth} stored blocks")
    last = depth - 1 if features else (want[-1] if want else -1)
    x = x.to(p["norm_weight"].dtype)  # float32 in the codec; float64 in reference checks
    logits, normed = [], []
    for i in range(last + 1):
        if i == last and not features:  # the targets of this block are its logits: its output is never used
            h = _layer_norm(x, p["norm1_weight"][i], p["norm1_bias"][i])
            lg = _attention(h, p, i, num_heads, scale, True)[1] if i in want else None
        else:
            x, lg, h = block_forward(x, p, i, num_heads=num_heads, scale=scale, want_logits=i in want, low=low)
        if lg is not None:
            logits.append(lg[:, :, prefix:, prefix:])
        if keep_normed and i in want:
            normed.append(h)
    feat = final_norm(x, p)[:, prefix:] if features else None
    return BlocksOut(feat=feat, logits=torch.stack(logits, 1) if logits else None,
                     normed=torch.stack(normed, 1) if keep_normed and normed else None)
