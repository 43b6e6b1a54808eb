"""``stream-<p>``: store the residual stream once, recompute the aligned blocks at train time.

One sample stores the residual stream entering the first aligned teacher block l0 = min(layers),
all S = P + T tokens (the P prefix tokens too: later blocks attend to them), one row per token:
S·(D·b/8 + 2) bytes in int<b>, 248 KB (int10, the default) for DINOv2-B at 256 px whatever the
number of aligned layers.
The teacher group stores, once, the frozen weights of blocks l0 .. depth−1 and the final norm
(``<group>/codec/*.npy``, sha256 in the manifest; ``pipeline.cache.codecs_blocks`` names them).
Decoding runs those blocks (``codecs_blocks.run_blocks``, pure torch, no timm) on the stored
stream: every aligned layer's attention logits (over all tokens, then cut to patch × patch, CLS
row and column removed as the official code does) and the final-norm patch tokens (the REPA
features) come out of one tensor, so the features are derived, not stored twice.

Precisions: ``int8``, ``int10``, ``int12`` (one fp16 scale per token row, rows bit-packed beyond
8 bits, ``codecs_base.pack_bits_torch``) in a fixed orthogonal basis R (the seeded draw of
``codecs_tokens.basis``, stored as ``codec/basis.npy`` so readers need no seed): a residual
stream's few large channels would otherwise set every row's scale. ``fp16``/``fp32`` store the
stream as is. int<b>: |x̂ R − x R| ≤ s/2 elementwise, s ≈ max|(x R)_i| / (2^(b−1) − 1), hence
‖x̂_i − x_i‖₂ ≤ √D · s_i / 2 (R is orthogonal). Beyond the stored stream there is no closed-form
bound: the error passes through LayerNorms, softmaxes and MLPs, and sharp attention inside the
blocks amplifies it. It is measured instead (``benchmarks/bench_codecs.py``: a stress stack of
random blocks with LayerScale 1 sharpened ×1/×5/×20 *inside* every block; ``haste cache verify
--fidelity`` on the real teacher).

Decode cost per image: ``decode_gflop`` (DINOv2-B, blocks 8-11, 256 px: 16.9 GFLOP, a third of a
teacher forward), run under fp16 autocast on CUDA and as ``bf16-mixed`` on CPUs (``DECODE_COMPUTE``),
never under the trainer's own autocast.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from pipeline.cache.codecs_base import (
    PRECISIONS,
    AttnCodec,
    CacheFormatError,
    Member,
    pack_bits_torch,
    pack_int8_torch,
    unpack_bits,
    unpack_int8,
)
from pipeline.cache.codecs_blocks import (
    BLOCK_ARRAYS,
    NORM_ARRAYS,
    block_flops,
    block_shapes,
    low_precision,
    run_blocks,
)
from pipeline.cache.codecs_tokens import basis

STREAM = "stream"
BASIS = "basis"
INT_BITS = {"int6": 6, "int8": 8, "int10": 10, "int12": 12}
# the registered names; int6 packs too but fails the fidelity bar (``stream_codec("int6")``: bench_codecs only)
STREAM_PRECISIONS = ("fp16", "fp32", "int8", "int10", "int12")

def _native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated, slower."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, f, lambda: False)() for f in probes)


# Precision the stored blocks run in, by device (bench_codecs' "computed in ..." rows measure each;
# ``data.teacher_decode`` overrides it). fp16 autocast (the official teacher's own precision) keeps
# every fidelity bar and is as fast as bf16 on GPUs; bf16 autocast does not (stress ×20: 0.995: its
# q kᵀ). CPUs with native bf16 run it ~4× faster than fp32 (fp16 ~4× slower), so there
# ``bf16-mixed``: the attention projection and the MLP in bf16, the qkv GEMM and the logits in fp32
# (codecs_blocks ``low``): 2× the fp32 decode, bars kept. Other CPUs: fp32.
DECODE_COMPUTE = {"cuda": "fp16", "cpu": "bf16-mixed" if _native_bf16() else "fp32"}
COMPUTE = ("fp32", "fp16", "bf16", "bf16-mixed")


def stream_width(dim: int, prec: str) -> int:
    """Stored bytes (int<b>) or values (fp16/fp32) per token row."""
    return dim * INT_BITS[prec] // 8 + 2 if prec in INT_BITS else dim


def stored_dtype(prec: str) -> str:
    return "int8" if prec == "int8" else "uint8" if prec in INT_BITS else PRECISIONS[prec]


def first_block(spec: Any) -> int:
    return min(spec.layers)


def _blocks(spec: Any, name: str) -> int:
    """Blocks l0 .. depth−1 the group stores; the spec must record the teacher's depth and MLP width."""
    if spec.depth <= max(spec.layers) or spec.mlp_dim <= 0:
        raise CacheFormatError(f"attention codec {name!r} runs teacher blocks {first_block(spec)}..depth-1, but the "
                               f"teacher spec records depth={spec.depth}, mlp_dim={spec.mlp_dim}: preprocess with "
                               "this code version (it records them), or use tokens-int8")
    return spec.depth - first_block(spec)


def decode_gflop(spec: Any, features: bool = True) -> float:
    """GFLOP per image of a stream decode: the stored blocks (to the last aligned one without features)
    plus, for rotated precisions, un-rotating the stream."""
    tokens = spec.num_prefix_tokens + spec.num_tokens
    blocks = spec.depth - first_block(spec) if features else max(spec.layers) - first_block(spec) + 1
    rot = 2 * tokens * spec.embed_dim ** 2 if spec.codec.split("-")[-1] in INT_BITS else 0
    return (blocks * block_flops(tokens, spec.embed_dim, spec.mlp_dim) + rot) / 1e9


def load_stream(stored: torch.Tensor, prec: str, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Stored rows (N, S, width) -> the residual stream (N, S, D) float32 in the teacher's own basis
    (rotated back when the group stores a ``basis``)."""
    if prec not in INT_BITS:
        return stored.float()
    y = unpack_int8(stored) if prec == "int8" else unpack_bits(stored, INT_BITS[prec])
    if BASIS not in params:  # the unrotated ablation
        return y
    return y @ params[BASIS].to(device=y.device, dtype=torch.float32).T  # x = (x R) Rᵀ


@lru_cache(maxsize=None)
def stream_codec(prec: str, fixed_basis: bool = True, compute: str | None = None) -> AttnCodec:
    """``stream-<prec>``; ``fixed_basis=False`` stores int rows unrotated and ``compute`` forces the decode
    precision (bench_codecs' ablations only)."""
    name = f"{STREAM}-{prec}"
    rotated = prec in INT_BITS and fixed_basis

    def prepare(t: torch.Tensor) -> torch.Tensor:
        """The writer's device step: (N, S, D) float -> stored rows (rotate, quantise, pack) or a cast."""
        if prec not in INT_BITS:
            out = t.to(getattr(torch, PRECISIONS[prec]))
            if not bool(torch.isfinite(out).all()):  # a massive activation beyond fp16's range, or NaN
                raise CacheFormatError(f"{name}: non-finite values in the stored stream (|x| > fp16 max?); "
                                       "use stream-int10/int12 (per-row scales)")
            return out
        y = t.float() @ basis(t.shape[-1]).to(t.device) if rotated else t.float()
        return pack_int8_torch(y) if prec == "int8" else pack_bits_torch(y, INT_BITS[prec])

    def encode(stream: np.ndarray, scale: float) -> dict[str, np.ndarray]:
        if np.dtype(stream.dtype) == np.dtype(stored_dtype(prec)):
            return {STREAM: stream}  # already prepared on the writer's device
        return {STREAM: prepare(torch.from_numpy(np.asarray(stream))).numpy()}

    def members(spec: Any) -> dict[str, Member]:
        tokens = spec.num_prefix_tokens + spec.num_tokens
        return {STREAM: (stored_dtype(prec), (tokens, stream_width(spec.embed_dim, prec)))}

    def params(spec: Any) -> dict[str, Member]:
        shapes = block_shapes(_blocks(spec, name), spec.embed_dim, spec.mlp_dim)
        if rotated:
            shapes[BASIS] = (spec.embed_dim, spec.embed_dim)
        return {n: ("float32", s) for n, s in shapes.items()}

    def store_params(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {n: np.asarray(arrays[n], dtype=np.float32) for n in (*BLOCK_ARRAYS, *NORM_ARRAYS)}
        if rotated:
            out[BASIS] = basis(out["norm_weight"].shape[0]).numpy()
        return out

    def targets(arrays: Mapping[str, torch.Tensor], spec: Any, params: Mapping[str, torch.Tensor] | None,
                layer_index: Sequence[int] | None, features: bool, attention: bool, decode_compute: str | None = None):
        return decode_stream(arrays[STREAM], prec, spec, params, layer_index, features=features, attention=attention,
                             rotated=rotated, compute=compute or decode_compute)

    def decode(arrays: Mapping[str, torch.Tensor], scale: float, params: Any = None) -> torch.Tensor:
        raise CacheFormatError(f"attention codec {name!r} decodes with the teacher spec and group weights: use "
                               "pipeline.cache.codecs.decode_targets (or Cache.teacher_targets)")

    bound = (f"stored stream (x R): |d| <= s/2 per element, s = row scale ~ max|(x R)_i| / {2 ** (INT_BITS[prec] - 1) - 1}"
             if prec in INT_BITS else f"stream rounded to {prec}") + \
        "; through the stored blocks the error is measured (bench_codecs stress stack, cache verify --fidelity)"
    return AttnCodec(name, stored_dtype(prec), members, encode, decode, qk_dtype="float32", error_bound=bound,
                     lossless=prec == "fp32", inputs=(STREAM,), params=params, prepare=prepare,
                     store_params=store_params, teacher_arrays="stream_params", per_layer=False, targets=targets)


def decode_stream(stored: torch.Tensor, prec: str, spec: Any, params: Mapping[str, torch.Tensor] | None,
                  layer_index: Sequence[int] | None = None, *, features: bool = True, attention: bool = True,
                  rotated: bool = True, compute: str | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Stored streams (N, S, width) -> features (N, T, D) and logits (N, L', H, T, T) of the layers at
    positions ``layer_index`` of ``spec.layers`` (all when None, in that order), float32, on the
    stream's device; None for what was not asked for."""
    need = {*BLOCK_ARRAYS, *NORM_ARRAYS} | ({BASIS} if prec in INT_BITS and rotated else set())
    if params is None or not need <= set(params):
        raise CacheFormatError(f"attention codec 'stream-{prec}' decodes with the teacher group's block weights "
                               "(codec/*.npy): decode through pipeline.cache.reader (Cache.teacher_targets)")
    if not (features or attention):
        return None, None
    index = range(len(spec.layers)) if layer_index is None else layer_index
    at = [spec.layers[i] - first_block(spec) for i in index] if attention else []
    device = stored.device
    p = {n: t.to(device=device, dtype=torch.float32) for n, t in params.items()}
    # compute (default: DECODE_COMPUTE of the device) "fp16"/"bf16": autocast semantics (matmuls in half
    # precision; residual stream, norms and softmax in fp32), as the official teacher runs under fp16 autocast;
    # "bf16-mixed": no autocast, the projections and MLPs in bf16 (weights cast once per process)
    compute = compute or DECODE_COMPUTE.get(device.type, "fp32")
    if compute not in COMPUTE:
        raise ValueError(f"decode precision {compute!r} is not one of {list(COMPUTE)}")
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(compute)
    low = _low_weights(params, p, device) if compute == "bf16-mixed" else None
    with torch.no_grad(), torch.autocast(device.type, dtype=half or torch.float32, enabled=half is not None):
        out = run_blocks(load_stream(stored, prec, p), p, num_heads=spec.num_heads, scale=spec.scale,
                         prefix=spec.num_prefix_tokens, logits_at=at, features=features, low=low)
    logits = None
    if at:
        order = sorted(set(at))  # run_blocks returns each block once, ascending; restore the asked order
        logits = out.logits if at == order else out.logits[:, [order.index(a) for a in at]]
        logits = logits.float()  # fp16 under the CUDA decode: the loss math is fp32
    return (out.feat.float() if out.feat is not None else None), logits


_LOW: dict[tuple[int, str], tuple[Mapping[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
_LOW_ENTRIES = 4


def _low_weights(params: Mapping[str, torch.Tensor], p: Mapping[str, torch.Tensor],
                 device: torch.device) -> dict[str, torch.Tensor]:
    """bf16 copies (on ``device``) of the low-precision GEMMs' weights, made once per params mapping and
    device (the reader keeps one mapping per group and device): casting the ~85 MB of fp32 weights
    every step would cost a tenth of the decode. 42.5 MB for DINOv2-B's blocks 8-11."""
    key = (id(params), str(device))
    hit = _LOW.get(key)
    if hit is None or hit[0] is not params:  # the mapping itself is kept, so its id cannot be reused meanwhile
        while len(_LOW) >= _LOW_ENTRIES:
            _LOW.pop(next(iter(_LOW)))
        hit = _LOW[key] = (params, low_precision(p, torch.bfloat16))
    return hit[1]
