"""The pieces every teacher codec shares: the codec record, its error type, and int8 rows.

A leaf module (numpy + torch only), so that ``pipeline.cache.codecs`` (the registry) and
``pipeline.cache.codecs_tokens`` can both build on it without importing each other at load time.
``pipeline.cache.codecs`` re-exports all of it; import from there.

int8 rows: one scale per row, s = max|row| / 127 rounded *up* to fp16, carried in the row's last
two bytes (little-endian), so one member stays one tensor (layer selection, zero-copy stacking).
``pack_int8`` (numpy, the writer thread) and ``pack_int8_torch`` (the writer's device) produce the
same bytes: same fp32 division, same round-half-to-even, same fp16 rounding of the scale.
``pack_bits_torch`` / ``unpack_bits`` keep rows of other widths (10 or 12 bits: ``stream-int10``)
the same way, bit-packed into uint8 with the fp16 scale again in the last two bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

Member = tuple[str, tuple[int, ...]]  # (numpy dtype name, shape) of one stored array


class CacheFormatError(ValueError):
    """A cached sample, manifest or codec name does not match the schema; the message says where.

    Defined in this leaf module so that codecs can raise it; ``pipeline.cache.schema`` re-exports it.
    """


# ----------------------------------------------------------------------------------------------
# int8 rows with an fp16 scale packed into the row
# ----------------------------------------------------------------------------------------------

_INT8_MAX = 127
_NONFINITE = "int8 codec: non-finite values in the teacher output"
_OVERFLOW = "int8 codec: a row's scale overflows fp16 (|x| > 8e6)"


def _row_scale(x: np.ndarray) -> np.ndarray:
    """Per-row scale max|x|/127 as fp16, rounded *up* so that no value is clipped by |x/s| > 127."""
    s = np.abs(x).max(axis=-1, keepdims=True).astype(np.float32) / _INT8_MAX
    s16 = s.astype(np.float16)
    low = s16.astype(np.float32) < s
    s16[low] = np.nextafter(s16[low], np.float16(np.inf))
    return s16  # an all-zero row keeps scale 0 and decodes to zeros


def pack_int8(x: np.ndarray) -> np.ndarray:
    """float (..., d) -> int8 (..., d + 2): round(x / s) per row, then the fp16 scale s as 2 bytes.

    Error bound: |x̂ − x| ≤ s / 2 elementwise, s = stored scale ≈ max|x_row| / 127.
    """
    if not np.isfinite(x).all():
        raise CacheFormatError(_NONFINITE)
    s = _row_scale(x)
    if not np.isfinite(s).all():
        raise CacheFormatError(_OVERFLOW)
    safe = np.where(s > 0, s, np.float16(1)).astype(np.float32)
    v = np.clip(np.rint(x.astype(np.float32) / safe), -_INT8_MAX, _INT8_MAX).astype(np.int8)
    scale_bytes = s.astype("<f2").view(np.int8)  # (..., 2)
    return np.concatenate([v, scale_bytes], axis=-1)


def quantize_rows_torch(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float (..., d) -> (integers (..., d) int32 in [-qmax, qmax], fp16 scales (..., 1)) on x's device.

    s = max|row| / qmax rounded *up* to the next fp16 by stepping its bit pattern (s ≥ 0, so +1 is
    ``nextafter`` towards +inf, as in ``_row_scale``); values round half to even, as ``np.rint``.
    Checking finiteness syncs the device once.
    """
    x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise CacheFormatError(_NONFINITE)
    s = x.abs().amax(dim=-1, keepdim=True) / qmax
    s16 = s.to(torch.float16)
    low = s16.float() < s
    s16 = torch.where(low, (s16.view(torch.int16) + 1).view(torch.float16), s16)
    if not bool(torch.isfinite(s16).all()):
        raise CacheFormatError(_OVERFLOW)
    safe = torch.where(s16 > 0, s16, torch.ones_like(s16)).float()
    return torch.round(x / safe).clamp_(-qmax, qmax).to(torch.int32), s16


def pack_int8_torch(x: torch.Tensor) -> torch.Tensor:
    """``pack_int8`` on the tensor's device: the writer packs there, so only int8 crosses to the host."""
    v, s16 = quantize_rows_torch(x, _INT8_MAX)
    return torch.cat([v.to(torch.int8), s16.view(torch.int8)], dim=-1)  # fp16 bytes in memory order: little-endian hosts


def pack_bits_torch(x: torch.Tensor, bits: int) -> torch.Tensor:
    """float (..., d) -> uint8 (..., d·bits/8 + 2): ``bits``-bit integer rows (qmax = 2^(bits-1) − 1, one
    fp16 scale per row rounded up, as ``pack_int8``), bit-packed, then the scale's 2 bytes.

    Value v is stored as u = v + 2^(bits-1) in ``bits`` bits, least significant bit first, the row's
    bits concatenated and cut into bytes (bit j of a byte = bit 8·byte + j of the row). Error bound:
    |x̂ − x| ≤ s / 2, s ≈ max|x_row| / (2^(bits-1) − 1).
    """
    if (x.shape[-1] * bits) % 8:
        raise CacheFormatError(f"{bits}-bit rows of width {x.shape[-1]} do not fill whole bytes")
    v, s16 = quantize_rows_torch(x, (1 << (bits - 1)) - 1)
    u = v + (1 << (bits - 1))                                                   # (..., d) in [1, 2^bits − 1]
    planes = ((u.unsqueeze(-1) >> torch.arange(bits, dtype=torch.int32, device=u.device)) & 1).to(torch.uint8)
    planes = planes.flatten(-2).unflatten(-1, (-1, 8))                          # (..., d·bits/8, 8) bits
    body = (planes << torch.arange(8, dtype=torch.uint8, device=u.device)).sum(-1, dtype=torch.uint8)
    return torch.cat([body, s16.view(torch.uint8)], dim=-1)


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 (..., d·bits/8 + 2) from ``pack_bits_torch`` -> float32 (..., d) on the tensor's device."""
    body = packed[..., :-2]
    planes = (body.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=body.device)) & 1  # (..., n, 8)
    planes = planes.flatten(-2).unflatten(-1, (-1, bits)).to(torch.int16)                       # (..., d, bits)
    u = (planes << torch.arange(bits, dtype=torch.int16, device=body.device)).sum(-1)         # int64 (..., d)
    # the fp16 scale from its two little-endian bytes by arithmetic (rows of odd width cannot be viewed as
    # fp16); scales are >= 0, so the bit pattern fits int16
    pattern = packed[..., -2].to(torch.int32) | (packed[..., -1].to(torch.int32) << 8)
    scale = pattern.to(torch.int16).view(torch.float16).float().unsqueeze(-1)
    return (u - (1 << (bits - 1))).float() * scale


def unpack_int8(packed: torch.Tensor) -> torch.Tensor:
    """int8 (..., d + 2) -> float32 (..., d) on the tensor's device (no host round trip)."""
    values = packed[..., :-2].float()
    scale = packed[..., -2:].contiguous().view(torch.float16).float()  # (..., 1), little-endian hosts
    return values * scale


def unpack_int8_np(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 (..., d + 2) -> (int8 values (..., d), float32 scales (..., 1)); for tests and tools."""
    return packed[..., :-2], np.ascontiguousarray(packed[..., -2:]).view("<f2").astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Storage precisions shared by the layouts
# ----------------------------------------------------------------------------------------------

PRECISIONS = {"fp16": "float16", "fp32": "float32", "int8": "int8"}


def store(x: np.ndarray, prec: str) -> np.ndarray:
    return pack_int8(x) if prec == "int8" else x.astype(PRECISIONS[prec], copy=False)


def load(t: torch.Tensor, prec: str) -> torch.Tensor:
    return unpack_int8(t) if prec == "int8" else t.float()


def row_dims(width: int, prec: str) -> int:
    return width + 2 if prec == "int8" else width


def row_centred(logits: torch.Tensor) -> torch.Tensor:
    """Logits minus their per-row mean: the softmax-invariant part every codec must preserve."""
    return logits - logits.mean(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------------------------
# The codec record
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttnCodec:
    """How the teacher's attention logits of the stored layers are kept on disk.

    ``encode`` maps one sample's teacher outputs, named by ``inputs`` (q, k (L, H, T, hd) for most
    codecs; the qkv input tokens x (L, T, D) for ``tokens-*``), to named arrays; ``decode`` maps
    batched tensors (N, ...) of those arrays back to logits (N, L, H, T, T) float32 on their device
    (the trainer decodes on the GPU); ``members`` gives each array's (dtype, shape). Every member
    of a ``per_layer`` codec has the layer axis first (after the batch axis), so selecting layers
    commutes with decoding.

    ``params`` names arrays stored once per teacher group (not per sample; layer axis first too
    when ``per_layer``), which ``decode`` then needs as its third argument, on the decode device and
    with the same layer selection as the members (``pipeline.cache.reader`` loads and caches them).

    ``stream-*`` codecs (``targets`` set, ``per_layer`` False) store one tensor from which a small
    stored network derives every layer's logits *and* the features; decode them through
    ``pipeline.cache.codecs.decode_targets``, which serves every codec.
    """

    name: str
    dtype: str                       # storage dtype of the main members ("int8" for packed rows)
    members: Callable[[Any], dict[str, Member]]
    encode: Callable[..., dict[str, np.ndarray]]       # (*inputs, scale) -> named arrays
    decode: Callable[..., torch.Tensor]                # (arrays, scale, params=None) -> logits
    qk_dtype: str = "float32"        # precision ``encode`` needs its inputs in (the writer casts on the device)
    error_bound: str = ""            # the documented bound, in words (README, manifests, reports)
    lossless: bool = False           # decodes to the stored teacher's logits up to fp16/fp32 rounding
    rank: int | None = None          # low-rank codecs only
    inputs: tuple[str, ...] = ("q", "k")               # teacher outputs ``encode`` takes (TeacherOut fields)
    params: Callable[[Any], dict[str, Member]] = lambda spec: {}
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None  # device-side step before the host copy
    # the teacher's group arrays (Teacher.<teacher_arrays>()) -> what is stored (tokens-*: the fixed basis folded in)
    store_params: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]] = dict
    teacher_arrays: str = "qk_params"  # the ``Teacher`` method whose arrays ``store_params`` takes
    # False: one member serves every stored layer (stream-*: the residual stream), so members and params
    # are never cut to a layer selection; ``targets`` gets the selection instead.
    per_layer: bool = True
    # stream-*: (arrays, spec, params, layer_index, features, attention) -> (features, logits); the codec
    # then derives the features too (no feat members), ``decode_targets`` calls it instead of ``decode``.
    targets: Callable[..., tuple[torch.Tensor | None, torch.Tensor | None]] | None = None

    @property
    def derives_features(self) -> bool:
        """The features come out of this codec's decode (stream-*), not from stored ``feat`` members."""
        return self.targets is not None

    def on_device(self, t: torch.Tensor) -> torch.Tensor:
        """What the writer copies to the host for one input: cast (default) or ``prepare``d there."""
        return self.prepare(t) if self.prepare is not None else t.to(getattr(torch, self.qk_dtype))
