"""Teacher-target codecs: how attention logits and patch features are kept on disk.

Attention codec names follow one grammar, ``<layout>[-r<rank>]-<precision>``; each has an error
bound that ``tests/test_codecs.py``, ``tests/test_codecs_tokens.py`` and
``tests/test_codecs_stream.py`` check and ``haste cache verify --fidelity`` measures end to end:

  none                 no attention (REPA only)
  qk-fp32              q, k (L, H, T, hd) as stored floats; logits = scale · q kᵀ, exact to fp32 matmul
  qk-fp16              q, k rounded to fp16: |Δlogit_ij| ≤ 2^-10·scale·‖q_i‖₂‖k_j‖₂ (+ fp32 matmul)
  qk-int8              q, k int8 with one scale per (layer, head, token) row, keys centred over tokens
  logits-fp16          scale · q kᵀ rounded to fp16: |Δlogit| ≤ 2^-11·|logit|
  lowrank-r<R>-<p>     rank-R factors a, b (L, H, T, R) of the row-centred logits (truncated SVD),
                       p ∈ {fp16, fp32, int8}: ‖Δ‖_F ≤ (Σ_{i>R} σ_i²)^½ + the storage bound of p
  tokens-<p>           the patch tokens' qkv inputs x (L, T, D) in a fixed orthogonal basis, p ∈ {fp16,
                       fp32, int8}, + the q/k projections once per teacher group (<group>/codec/*.npy);
                       q, k = x Wᵀ + b at decode. int8: one scale s per (layer, token) row,
                       |Δq_d| ≤ s/2·‖W_d‖₁, logit bound in ``pipeline.cache.codecs_tokens``
  stream-<p>           the residual stream (P + T, D) entering the first aligned block, p ∈ {int8, int10,
                       int12, fp16, fp32} (int rows in a fixed orthogonal basis, bit-packed), + that block
                       and every later one and the final norm once per group; the decode reruns them for
                       every aligned layer's logits AND the features (``pipeline.cache.codecs_stream``).
                       Stored stream: |Δ| ≤ s/2 per value; through the blocks: measured, not bounded

Default (``PreprocessConfig.codec``, the ImageNet configs): the smallest codec whose worst case over
the teacher sharpness sweep x1/x5/x20, the flat-spectrum AND the channel-outlier stress keeps the
ATTA gradient cosine ≥ 0.999 and the features' mean cosine error ≤ 1e-3, as
``benchmarks/bench_codecs.py`` measures: stream-int10, 248 KB/image whatever the number of layers
(worst 0.99995 on the random-init DINOv2-B sweep, 0.99948 on the flat-spectrum stress stack, whose
blocks act (LayerScale 1) and attend sharply inside). stream-int8 (199 KB) passes the sweep but
not that stress (0.992: the stream's rounding error grows through sharp softmaxes); stream-int12
(297 KB) and stream-fp16 (396 KB) are the steps up, tokens-int8 (+ int8 features, 989 KB) the
previous default. The lowrank codecs pass the sweep only because the random-init teacher's logits
have a decaying spectrum: on the stress stacks they fall to 0.2-0.96. Check the real teacher with
``haste cache verify --fidelity``.

Two exact identities make the lossy codecs cheaper without changing what training sees:
softmax over keys ignores a per-query-row constant, so keys may be centred over the tokens
(``q·(k_j − k̄) = q·k_j − q·k̄``), which removes their large shared component before int8
rounding or the SVD (tokens-* centres its decoded keys). Decoded logits of those codecs
therefore equal the exact ones up to a row constant; compare them with ``row_centred``. An int8
row carries its fp16 scale in its last two bytes (little-endian), so one member stays one
tensor: the trainer's layer selection and the loader's zero-copy stacking apply unchanged (the
trainer forwards the members the codec names, and a codec's group arrays are cut to the same
layers). Low-rank factors are stored in the ``q``/``k`` members with the scale folded in.

Feature codecs (``TeacherSpec.feat_codec``, unused by stream-*): ``plain`` stores ``feat_dtype`` as is; ``int8``
stores one int8 row per token plus its fp16 scale in ``feat_scale``. The int8 values alone
already point in the token's direction, and the REPA loss normalises every token, so a reader
that ignores ``feat_scale`` still computes the exact loss of the quantised targets.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from pipeline.cache.codecs_base import (  # noqa: F401  (re-exported: import codec pieces from here)
    PRECISIONS,
    AttnCodec,
    CacheFormatError,
    Member,
    pack_bits_torch,
    pack_int8,
    pack_int8_torch,
    row_centred,
    unpack_bits,
    unpack_int8,
    unpack_int8_np,
)
from pipeline.cache.codecs_base import load as _load
from pipeline.cache.codecs_base import row_dims as _row_dims
from pipeline.cache.codecs_base import store as _store
from pipeline.cache.codecs_stream import STREAM_PRECISIONS, stream_codec
from pipeline.cache.codecs_tokens import tokens_codec

_PRECISIONS = PRECISIONS
_ALL = ("fp16", "fp32", "int8")
_LAYOUT_PRECISIONS = {"qk": _ALL, "logits": ("fp16",), "lowrank": _ALL, "tokens": _ALL, "stream": STREAM_PRECISIONS}
_NAME = re.compile(r"^(?P<layout>[a-z]+)(?:-r(?P<rank>[^-]*))?-(?P<precision>[a-z0-9]+)$")


def parse_codec_name(name: str) -> tuple[str, int | None, str]:
    """``'lowrank-r32-fp16'`` -> ``('lowrank', 32, 'fp16')``; errors name the offending field."""
    m = _NAME.match(name)
    if m is None:
        raise CacheFormatError(f"unknown attention codec {name!r}: expected none, qk-<precision>, "
                               "logits-<precision>, lowrank-r<rank>-<precision>, tokens-<precision> or "
                               "stream-<precision>")
    layout, rank, prec = m["layout"], m["rank"], m["precision"]
    if layout not in _LAYOUT_PRECISIONS:
        raise CacheFormatError(f"unknown attention codec {name!r}: field 'layout' must be one of "
                               f"{sorted(_LAYOUT_PRECISIONS)}, got {layout!r}")
    if (rank is not None) != (layout == "lowrank"):
        raise CacheFormatError(f"unknown attention codec {name!r}: field 'rank' (-r<R>) is required for "
                               "lowrank and not allowed otherwise")
    if rank is not None and not (rank.isdigit() and int(rank) >= 1):
        raise CacheFormatError(f"unknown attention codec {name!r}: field 'rank' must be an integer >= 1, "
                               f"got {rank!r}")
    if prec not in _LAYOUT_PRECISIONS[layout]:
        raise CacheFormatError(f"unknown attention codec {name!r}: field 'precision' must be one of "
                               f"{list(_LAYOUT_PRECISIONS[layout])} for layout {layout!r}, got {prec!r}")
    return layout, int(rank) if rank is not None else None, prec


def _qk_shape(s: Any, width: int) -> tuple[int, ...]:
    return (len(s.layers), s.num_heads, s.num_tokens, width)


def _qk_codec(prec: str) -> AttnCodec:
    centre = prec == "int8"  # lossless variants keep q, k bit-for-bit (old caches, exact checks)

    def encode(q: np.ndarray, k: np.ndarray, scale: float) -> dict[str, np.ndarray]:
        if centre:
            k = k - k.mean(axis=-2, keepdims=True, dtype=np.float64).astype(np.float32)
        return {"q": _store(q, prec), "k": _store(k, prec)}

    def decode(arrays: Mapping[str, torch.Tensor], scale: float, params: Any = None) -> torch.Tensor:
        # Same order of operations as timm's unfused attention: (q * scale) @ k^T, in fp32.
        q, k = _load(arrays["q"], prec), _load(arrays["k"], prec)
        return (q * scale) @ k.transpose(-1, -2)

    bounds = {"fp32": "exact q, k; logits to fp32 matmul rounding",
              "fp16": "|dlogit_ij| <= 2^-10 * scale * |q_i|_2 |k_j|_2 (q, k rounded to fp16)",
              "int8": "row-centred logits: |dlogit_ij| <= scale * (|q_i|_1 s_kj + s_qi |k_j|_1 + hd s_qi s_kj / 2) / 2, "
                      "s = stored row scale ~ max|row| / 127"}
    return AttnCodec(f"qk-{prec}", _PRECISIONS[prec],
                     lambda s: {n: (_PRECISIONS[prec], _qk_shape(s, _row_dims(s.head_dim, prec))) for n in ("q", "k")},
                     encode, decode, qk_dtype="float32" if prec == "int8" else _PRECISIONS[prec],
                     error_bound=bounds[prec], lossless=prec != "int8")


def _logits_codec(prec: str) -> AttnCodec:
    dtype = _PRECISIONS[prec]

    def encode(q: np.ndarray, k: np.ndarray, scale: float) -> dict[str, np.ndarray]:
        logits = (q.astype(np.float32) * np.float32(scale)) @ np.swapaxes(k, -1, -2).astype(np.float32)
        return {"logits": logits.astype(dtype)}

    def decode(arrays: Mapping[str, torch.Tensor], scale: float, params: Any = None) -> torch.Tensor:
        return arrays["logits"].float()

    return AttnCodec(f"logits-{prec}", dtype,
                     lambda s: {"logits": (dtype, (len(s.layers), s.num_heads, s.num_tokens, s.num_tokens))},
                     encode, decode, error_bound="|dlogit| <= 2^-11 |logit| (fp16 rounding)", lossless=True)


def lowrank_factors(q: np.ndarray, k: np.ndarray, scale: float, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Balanced rank-``rank`` factors a, b (..., T, rank) with a bᵀ the best (Frobenius) approximation
    of the row-centred logits ``scale · q (k − k̄)ᵀ`` (Eckart–Young).

    The T×T matrix is never formed: thin QRs q = Q_q R_q, k = Q_k R_k reduce the SVD to the small
    (hd × hd) core ``scale · R_q R_kᵀ``; float64 throughout so that the factors are exact to fp32.
    numpy, not torch: this runs in the writer thread next to the teacher's torch work, and torch's
    threaded batched LAPACK stalled for tens of seconds per image on a busy 2-core host.
    """
    qd = q.astype(np.float64)
    kd = k.astype(np.float64)
    kd -= kd.mean(axis=-2, keepdims=True)
    qq, rq = np.linalg.qr(qd)                         # (.., T, K), (.., K, hd), K = min(T, hd)
    qk, rk = np.linalg.qr(kd)
    u, sv, vh = np.linalg.svd(scale * rq @ np.swapaxes(rk, -1, -2))  # (.., K, K)
    root = np.sqrt(sv[..., None, :rank])               # split sigma evenly: keeps fp16/int8 ranges balanced
    a = (qq @ u[..., :rank]) * root
    b = (qk @ np.swapaxes(vh[..., :rank, :], -1, -2)) * root
    return a.astype(np.float32), b.astype(np.float32)


def _lowrank_codec(rank: int, prec: str) -> AttnCodec:
    def encode(q: np.ndarray, k: np.ndarray, scale: float) -> dict[str, np.ndarray]:
        a, b = lowrank_factors(q, k, scale, rank)
        return {"q": _store(a, prec), "k": _store(b, prec)}

    def decode(arrays: Mapping[str, torch.Tensor], scale: float, params: Any = None) -> torch.Tensor:
        # the attention scale is already folded into the factors
        return _load(arrays["q"], prec) @ _load(arrays["k"], prec).transpose(-1, -2)

    def members(s: Any) -> dict[str, Member]:
        limit = min(s.head_dim, s.num_tokens)
        if rank > limit:
            raise CacheFormatError(f"attention codec 'lowrank-r{rank}-{prec}': field 'rank' is {rank} but the "
                                   f"logits have rank <= min(head_dim, tokens) = {limit}; use r <= {limit} or qk-*")
        return {n: (_PRECISIONS[prec], _qk_shape(s, _row_dims(rank, prec))) for n in ("q", "k")}

    bound = (f"row-centred logits: |d|_F <= (sum_(i>{rank}) sigma_i^2)^(1/2) (truncated SVD) "
             f"+ {prec} storage of the factors")
    return AttnCodec(f"lowrank-r{rank}-{prec}", _PRECISIONS[prec], members, encode, decode,
                     error_bound=bound, rank=rank)


def _no_attention() -> AttnCodec:
    def decode(arrays: Mapping[str, torch.Tensor], scale: float, params: Any = None) -> torch.Tensor:
        raise CacheFormatError("this teacher group was written with codec 'none' (no attention stored)")

    # no inputs: the teacher hooks nothing and the writer copies nothing for it
    return AttnCodec("none", "float16", lambda s: {}, lambda *inputs: {}, decode,
                     error_bound="no attention stored", inputs=())


@lru_cache(maxsize=None)
def get_codec(name: str) -> AttnCodec:
    """The codec of a name (any rank for ``lowrank``); ``CacheFormatError`` naming the bad field."""
    if name == "none":
        return _no_attention()
    layout, rank, prec = parse_codec_name(name)
    if layout == "qk":
        return _qk_codec(prec)
    if layout == "logits":
        return _logits_codec(prec)
    if layout == "tokens":
        return tokens_codec(prec)
    if layout == "stream":
        return stream_codec(prec)
    assert rank is not None
    return _lowrank_codec(rank, prec)


# The named set documented in the README and swept by benchmarks/bench_codecs.py; get_codec also
# accepts any other rank.
CODECS: dict[str, AttnCodec] = {n: get_codec(n) for n in (
    "qk-fp32", "qk-fp16", "logits-fp16", "qk-int8", "lowrank-r32-fp16", "lowrank-r16-int8",
    "lowrank-r24-int8", "lowrank-r32-int8", "tokens-int8", "stream-int8", "stream-int10", "stream-int12",
    "stream-fp16", "none")}


# ----------------------------------------------------------------------------------------------
# Feature codecs
# ----------------------------------------------------------------------------------------------

FEAT_CODECS = ("plain", "int8")


def feat_members(feat_codec: str, feat_dtype: str, num_tokens: int, embed_dim: int) -> dict[str, Member]:
    if feat_codec == "plain":
        return {"feat": (feat_dtype, (num_tokens, embed_dim))}
    if feat_codec == "int8":
        return {"feat": ("int8", (num_tokens, embed_dim)), "feat_scale": ("float16", (num_tokens,))}
    raise CacheFormatError(f"unknown feature codec {feat_codec!r}: field 'feat_codec' must be one of {list(FEAT_CODECS)}")


def encode_features(feat: np.ndarray, feat_codec: str, feat_dtype: str) -> dict[str, np.ndarray]:
    """(T, D) float -> named arrays. int8: per-token scale s, |x̂ − x| ≤ s/2, so 1 − cos ≤ D s² / (4 |x|²)."""
    if feat_codec == "plain":
        return {"feat": feat.astype(feat_dtype, copy=False)}
    feat_members(feat_codec, feat_dtype, *feat.shape)  # validates the name
    packed = pack_int8(feat)
    values, scale = packed[..., :-2], np.ascontiguousarray(packed[..., -2:]).view("<f2")[..., 0]
    return {"feat": np.ascontiguousarray(values), "feat_scale": scale.astype(np.float16)}


def decode_features(arrays: Mapping[str, Any]) -> torch.Tensor:
    """Batched ``feat`` (+ ``feat_scale``) tensors or arrays -> float32 (N, T, D), magnitudes restored."""
    feat = _float(arrays["feat"])
    if "feat_scale" in arrays:
        feat = feat * _float(arrays["feat_scale"]).unsqueeze(-1)
    return feat


def _float(x: Any) -> torch.Tensor:
    # astype copies, so read-only zero-copy views of shard bytes are never wrapped by torch
    return torch.from_numpy(np.asarray(x).astype(np.float32)) if not torch.is_tensor(x) else x.float()


# ----------------------------------------------------------------------------------------------
# Both targets through one call
# ----------------------------------------------------------------------------------------------

def decode_targets(spec: Any, arrays: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor] | None = None,
                   layer_index: Sequence[int] | None = None, *, features: bool = True,
                   attention: bool = True, compute: str | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A batch's teacher targets from its stored members (on the decode device): features (N, T, D)
    and attention logits (N, L', H, T, T) of the layers at positions ``layer_index`` of ``spec.layers``
    (all when None, in the given order), float32; None for what was not asked for.

    ``params``: the group's codec arrays on the same device, already cut to ``layer_index`` for a
    ``per_layer`` codec (``pipeline.cache.reader`` does both). Per-layer codecs decode the logits from
    their members cut to those layers and the features from ``feat`` (+ ``feat_scale``); a codec that
    derives the features (stream-*) returns both from one decode, in the precision ``compute``
    (None: ``codecs_stream.DECODE_COMPUTE`` of the device; the other codecs decode in fp32).
    """
    codec = get_codec(spec.codec)
    if codec.targets is not None:
        return codec.targets(arrays, spec, params, layer_index, features, attention, compute)
    feat = decode_features(arrays) if features else None
    logits = None
    if attention:
        members = {n: _select_layers(arrays[n], layer_index) for n in codec.members(spec)}
        logits = codec.decode(members, spec.scale, params)
    return feat, logits


def _select_layers(x: torch.Tensor, index: Sequence[int] | None) -> torch.Tensor:
    """Layer axis 1 cut to ``index``: a view for a contiguous run (no gather, no host sync)."""
    if index is None:
        return x
    idx = list(index)
    if idx and idx == list(range(idx[0], idx[0] + len(idx))):
        return x.narrow(1, idx[0], len(idx))
    return x[:, idx]
