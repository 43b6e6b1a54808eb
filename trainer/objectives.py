"""Training objectives of HASTE / REPA: interpolant, time sampling and the three losses.

This module owns the math of one training step's loss (SPEC §2), as small pure functions:

- `path_coefficients`, `interpolate`: the stochastic interpolant x_t = α_t·x₀ + σ_t·ε and its
  velocity target (SPEC §2.1; REPA/HASTE `loss.py` `SILoss.interpolant`, L36–50).
- `sample_time`: uniform or EDM-style log-normal t (SPEC §2.1; `loss.py` L56–67).
- `flow_matching_loss`: per-sample v-prediction MSE (SPEC §2.1; `loss.py` L69–81).
- `repa_loss`: REPA's negative cosine similarity (SPEC §2.2; HASTE `loss.py` L103–111).
- `attention_alignment_loss`: HASTE's attention cross-entropy "ATTA" (SPEC §2.3; HASTE
  `loss.py` L87–101), with the official literals (heads, pairs, 256 tokens) made arguments.
- `total_loss`: denoise + λ_R·feature + λ_A·attention (SPEC §2.4; HASTE `train.py` L291–303).

Conventions: t = 0 is data and t = 1 is noise. Every loss is computed in float32 regardless of
the input dtype, because under fp16 autocast the model outputs may arrive in half precision and
the official teacher softmax in fp16 is a known precision hazard (SPEC §7.8).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Path = Literal["linear", "cosine"]
TimeSampling = Literal["uniform", "lognormal"]

_PATHS = ("linear", "cosine")
_SAMPLINGS = ("uniform", "lognormal")


# ----------------------------------------------------------------------------------------------
# Interpolant and time sampling


def _check_path(path: str) -> None:
    if path not in _PATHS:
        raise ValueError(f"path must be one of {_PATHS}, got {path!r}")


def path_coefficients(t: Tensor, path: Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Return (α_t, σ_t, dα/dt, dσ/dt), each shaped like `t`.

    linear: α = 1−t, σ = t. cosine: α = cos(πt/2), σ = sin(πt/2) (SPEC §2.1; `loss.py`
    L36–50). The official code returns Python scalars ±1 for the linear derivatives; we return
    tensors so callers can broadcast uniformly.
    """
    _check_path(path)
    if path == "linear":
        ones = torch.ones_like(t)
        return 1 - t, t, -ones, ones
    half_pi = math.pi / 2
    cos, sin = torch.cos(half_pi * t), torch.sin(half_pi * t)
    return cos, sin, -half_pi * sin, half_pi * cos


def sample_time(
    n: int,
    sampling: TimeSampling,
    path: Path,
    *,
    generator: torch.Generator | None,
    device: torch.device | str | None,
) -> Tensor:
    """Draw n training times, shape (n,), float32, on `device`.

    uniform: t ~ U[0, 1) via `torch.rand` (the official default). lognormal: σ = exp(N(0, 1)),
    then t = σ/(1+σ) (linear) or t = (2/π)·atan(σ) (cosine), i.e. the EDM σ-distribution mapped
    onto the path (SPEC §2.1; `loss.py` L56–67, where P_mean = 0, P_std = 1).

    Draws happen on the generator's device (then move to `device`), so a CPU generator gives
    the same times whatever the training device.
    """
    _check_path(path)
    if sampling not in _SAMPLINGS:
        raise ValueError(f"sampling must be one of {_SAMPLINGS}, got {sampling!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    draw_device = generator.device if generator is not None else device
    if sampling == "uniform":
        t = torch.rand(n, generator=generator, device=draw_device, dtype=torch.float32)
        return t.to(device)
    sigma = torch.randn(n, generator=generator, device=draw_device, dtype=torch.float32).exp()
    t = sigma / (1 + sigma) if path == "linear" else (2 / math.pi) * torch.atan(sigma)
    return t.to(device)


def _expand_like(t: Tensor, x: Tensor) -> Tensor:
    """(N,) → (N, 1, ..., 1) so that it broadcasts over x's non-batch dims."""
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))


def interpolate(x0: Tensor, noise: Tensor, t: Tensor, path: Path) -> tuple[Tensor, Tensor]:
    """Return (x_t, v_target) for data x0 (N, C, H, W), noise ε like x0 and times t (N,).

    x_t = α_t·x₀ + σ_t·ε and v = α̇_t·x₀ + σ̇_t·ε (`loss.py` L71–75); linear gives
    x_t = (1−t)·x₀ + t·ε and v = ε − x₀. The output dtype follows torch promotion of x0 and t.
    """
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
    if t.ndim != 1 or t.shape[0] != x0.shape[0]:
        raise ValueError(f"t must have shape ({x0.shape[0]},), got {tuple(t.shape)}")
    alpha, sigma, d_alpha, d_sigma = (_expand_like(c, x0) for c in path_coefficients(t, path))
    x_t = alpha * x0 + sigma * noise
    v_target = d_alpha * x0 + d_sigma * noise
    return x_t, v_target


# ----------------------------------------------------------------------------------------------
# Losses


def flow_matching_loss(v_pred: Tensor, v_target: Tensor) -> Tensor:
    """Per-sample mean squared velocity error, shape (N,), float32 (`loss.py` L78–79).

    There is no per-sample weighting in HASTE/REPA; the caller takes `.mean()` over the batch.
    Shapes must match exactly: a silent broadcast here would train on the wrong target.
    """
    if v_pred.shape != v_target.shape:
        raise ValueError(f"v_pred shape {tuple(v_pred.shape)} != v_target shape {tuple(v_target.shape)}")
    err = v_pred.float() - v_target.float()  # (N, C, H, W)
    return err.square().mean(dim=tuple(range(1, err.ndim)))


def repa_loss(z_student: Tensor, z_teacher: Tensor) -> Tensor:
    """REPA projection loss: mean over batch and tokens of −cos(z_student, z_teacher), scalar.

    Both inputs are (N, T, D) with tokens matched by index; each token is L2-normalized along D
    in float32 (SPEC §2.2; HASTE `loss.py` L103–111). The official code sums over teachers and
    divides by (num_teachers·N); with several teachers, average this function's values. The
    teacher side is detached: it is a fixed target (the official teacher runs under no_grad).
    """
    if z_student.ndim != 3 or z_student.shape != z_teacher.shape:
        raise ValueError(
            f"repa_loss needs equal (N, T, D) shapes, got student {tuple(z_student.shape)} "
            f"and teacher {tuple(z_teacher.shape)}"
        )
    s = F.normalize(z_student.float(), dim=-1)  # (N, T, D)
    t = F.normalize(z_teacher.detach().float(), dim=-1)  # (N, T, D)
    return -(s * t).sum(dim=-1).mean()


def _check_attention_pair(p: int, s: Tensor, t: Tensor) -> None:
    """Both sides must be (N, h, T, T) with identical shapes after head selection.

    The official code reshapes to (-1, 256), which at 512 px silently softmaxes quarter-rows
    (SPEC §2.3, §7.4); we refuse any mismatch instead.
    """
    ok = s.ndim == 4 and s.shape == t.shape and s.shape[-1] == s.shape[-2]
    if not ok:
        raise ValueError(
            f"attention pair {p}: student logits {tuple(s.shape)} and teacher logits "
            f"{tuple(t.shape)} (after head selection) must both be (N, h, T, T) and equal"
        )


def take(x: Tensor, dim: int, index: Sequence[int]) -> Tensor:
    """``x`` indexed by ``index`` along ``dim``: a view (no copy, no host sync) for a contiguous run.

    Indexing a CUDA tensor with a Python list copies the list to the device synchronously (a host
    sync) and gathers a copy; the default selections (heads 0–11, consecutive teacher layers) are
    contiguous runs, which a slice serves for free. Other selections still gather.
    """
    n = x.shape[dim]
    idx = [i % n if -n <= i < 0 else i for i in index]
    if idx and idx == list(range(idx[0], idx[0] + len(idx))) and 0 <= idx[0] and idx[-1] < n:
        return x.narrow(dim, idx[0], len(idx))
    return x[(slice(None),) * dim + (idx,)]


def _select_heads(logits: Tensor, heads: Sequence[int], side: str, p: int) -> Tensor:
    """logits (N, H, T, T) → (N, len(heads), T, T); out-of-range heads are a ValueError."""
    if logits.ndim != 4:
        raise ValueError(f"attention pair {p}: {side} logits must be (N, H, T, T), got {tuple(logits.shape)}")
    n_heads = logits.shape[1]
    if any(not -n_heads <= h < n_heads for h in heads):
        raise ValueError(f"attention pair {p}: {side} heads {list(heads)} out of range for {n_heads} heads")
    return take(logits, 1, heads)


def attention_alignment_loss(
    student_logits: Sequence[Tensor],
    teacher_logits: Sequence[Tensor],
    student_heads: Sequence[int],
    teacher_heads: Sequence[int],
) -> Tensor:
    """HASTE attention alignment (ATTA): token-wise cross-entropy teacher → student, scalar.

    Pair p aligns student_logits[p][:, student_heads] with teacher_logits[p][:, teacher_heads]
    (head k with head k). Per query row: CE = −Σ_k softmax(teacher)_k · log_softmax(student)_k
    over the key (last) axis; mean over N·h·T rows; then mean over pairs (SPEC §2.3; HASTE
    `loss.py` L87–101, whose pairs (4←8 … 7←11) and heads 0–11 become the caller's lists).

    Deviations from the official code, on purpose: float32 on both sides (the official teacher
    softmax runs in fp16), `log_softmax` instead of `torch.log(softmax)` (no −inf → NaN on
    underflow), and a ValueError on any shape mismatch instead of a `reshape(-1, 256)`.
    The teacher side is detached. The value is CE = KL + H(teacher), so it never reaches 0.
    """
    if len(student_logits) != len(teacher_logits) or not student_logits:
        raise ValueError(
            f"need the same non-zero number of student and teacher layers, got "
            f"{len(student_logits)} and {len(teacher_logits)}"
        )
    if len(student_heads) != len(teacher_heads) or not student_heads:
        raise ValueError(
            f"need the same non-zero number of student and teacher heads, got "
            f"{list(student_heads)} and {list(teacher_heads)}"
        )
    per_pair = []
    for p, (s_all, t_all) in enumerate(zip(student_logits, teacher_logits)):
        s = _select_heads(s_all, student_heads, "student", p).float()  # (N, h, T, T)
        t = _select_heads(t_all.detach(), teacher_heads, "teacher", p).float()  # (N, h, T, T)
        _check_attention_pair(p, s, t)
        ce = -(t.softmax(dim=-1) * s.log_softmax(dim=-1)).sum(dim=-1)  # (N, h, T)
        per_pair.append(ce.mean())
    return torch.stack(per_pair).mean()


def total_loss(
    denoise: Tensor,
    feature: Tensor | None,
    attention: Tensor | None,
    *,
    feat_weight: float,
    attn_weight: float,
) -> Tensor:
    """denoise + λ_R·feature + λ_A·attention (SPEC §2.4; HASTE `train.py` L291–303).

    `denoise` is normally the batch mean of `flow_matching_loss`. A term that is None or has a
    zero weight is skipped entirely (not multiplied by 0), so a Phase-II step needs no teacher
    and a NaN in an unused term cannot leak into the total. Negative weights are rejected.
    """
    if feat_weight < 0 or attn_weight < 0:
        raise ValueError(f"weights must be >= 0, got feat_weight={feat_weight}, attn_weight={attn_weight}")
    loss = denoise
    if feature is not None and feat_weight != 0:
        loss = loss + feat_weight * feature
    if attention is not None and attn_weight != 0:
        loss = loss + attn_weight * attention
    return loss
