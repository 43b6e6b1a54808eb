"""Tests for trainer/objectives.py: each function against a straightforward re-derivation.

The references below are deliberately written differently from the module (Python loops,
explicit formulas, float64, `torch.log(softmax)` as in the official HASTE code) so that a shared
mistake is unlikely.
"""

from __future__ import annotations

import math

import pytest
import torch

from trainer.objectives import (
    attention_alignment_loss,
    flow_matching_loss,
    interpolate,
    path_coefficients,
    repa_loss,
    sample_time,
    take,
    total_loss,
)

# ----------------------------------------------------------------------------------------------
# Paths and interpolant


def test_linear_coefficients_values() -> None:
    t = torch.tensor([0.0, 0.25, 1.0])
    alpha, sigma, d_alpha, d_sigma = path_coefficients(t, "linear")
    assert torch.equal(alpha, torch.tensor([1.0, 0.75, 0.0]))
    assert torch.equal(sigma, t)
    assert torch.equal(d_alpha, -torch.ones(3)) and torch.equal(d_sigma, torch.ones(3))


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_coefficient_derivatives_match_finite_differences(path: str) -> None:
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    a_p, s_p, _, _ = path_coefficients(t + h, path)
    a_m, s_m, _, _ = path_coefficients(t - h, path)
    _, _, d_alpha, d_sigma = path_coefficients(t, path)
    torch.testing.assert_close(d_alpha, (a_p - a_m) / (2 * h), atol=1e-7, rtol=0)
    torch.testing.assert_close(d_sigma, (s_p - s_m) / (2 * h), atol=1e-7, rtol=0)


def test_cosine_is_variance_preserving() -> None:
    t = torch.rand(100, dtype=torch.float64)
    alpha, sigma, _, _ = path_coefficients(t, "cosine")
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t))


def test_interpolate_boundaries_linear_are_exact() -> None:
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    x_t, v = interpolate(x0, eps, torch.zeros(2), "linear")
    assert torch.equal(x_t, x0)
    assert torch.equal(v, eps - x0)
    x_t, _ = interpolate(x0, eps, torch.ones(2), "linear")
    assert torch.equal(x_t, eps)


def test_interpolate_boundaries_cosine() -> None:
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    x_t, v = interpolate(x0, eps, torch.zeros(2), "cosine")
    torch.testing.assert_close(x_t, x0)
    torch.testing.assert_close(v, (math.pi / 2) * eps)  # SPEC §2.1 at t = 0
    x_t, v = interpolate(x0, eps, torch.ones(2), "cosine")
    torch.testing.assert_close(x_t, eps)
    torch.testing.assert_close(v, -(math.pi / 2) * x0)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_interpolate_matches_per_sample_formula(path: str) -> None:
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(5, 2, 3, 3, generator=g), torch.randn(5, 2, 3, 3, generator=g)
    t = torch.rand(5, generator=g)
    x_t, v = interpolate(x0, eps, t, path)
    for i in range(5):
        ti = float(t[i])
        if path == "linear":
            ref_x, ref_v = (1 - ti) * x0[i] + ti * eps[i], eps[i] - x0[i]
        else:
            c, s = math.cos(math.pi * ti / 2), math.sin(math.pi * ti / 2)
            ref_x = c * x0[i] + s * eps[i]
            ref_v = -(math.pi / 2) * s * x0[i] + (math.pi / 2) * c * eps[i]
        torch.testing.assert_close(x_t[i], ref_x)
        torch.testing.assert_close(v[i], ref_v)


def test_interpolate_rejects_bad_shapes() -> None:
    x0 = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="t must have shape"):
        interpolate(x0, x0, torch.zeros(3), "linear")
    with pytest.raises(ValueError, match="noise shape"):
        interpolate(x0, torch.zeros(2, 1, 2, 3), torch.zeros(2), "linear")
    with pytest.raises(ValueError, match="path"):
        interpolate(x0, x0, torch.zeros(2), "sqrt")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# Time sampling


def test_uniform_time_equals_torch_rand() -> None:
    t = sample_time(64, "uniform", "linear", generator=torch.Generator().manual_seed(3), device="cpu")
    ref = torch.rand(64, generator=torch.Generator().manual_seed(3))
    assert t.shape == (64,) and t.dtype == torch.float32
    assert torch.equal(t, ref)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_lognormal_time_matches_formula(path: str) -> None:
    t = sample_time(4096, "lognormal", path, generator=torch.Generator().manual_seed(4), device="cpu")
    z = torch.randn(4096, generator=torch.Generator().manual_seed(4))
    ref = [
        math.exp(zi) / (1 + math.exp(zi)) if path == "linear" else 2 / math.pi * math.atan(math.exp(zi))
        for zi in z.tolist()
    ]
    assert t.shape == (4096,) and t.dtype == torch.float32
    assert bool(((t > 0) & (t < 1)).all())
    torch.testing.assert_close(t, torch.tensor(ref, dtype=torch.float32))
    # σ = exp(N(0,1)) has median 1, i.e. t = 1/2 for both paths (atan(1) = π/4).
    assert abs(float(t.median()) - 0.5) < 0.03


def test_sample_time_rejects_unknown_sampling() -> None:
    with pytest.raises(ValueError, match="sampling"):
        sample_time(4, "logit", "linear", generator=None, device="cpu")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# Denoising loss


def test_flow_matching_loss_matches_loops_and_is_fp32() -> None:
    g = torch.Generator().manual_seed(5)
    pred, target = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    loss = flow_matching_loss(pred.half(), target.half())
    assert loss.shape == (3,) and loss.dtype == torch.float32
    for i in range(3):
        flat_p, flat_t = (
            pred[i].half().double().flatten().tolist(),
            target[i].half().double().flatten().tolist(),
        )
        ref = sum((a - b) ** 2 for a, b in zip(flat_p, flat_t)) / len(flat_p)
        assert abs(float(loss[i]) - ref) < 1e-5


def test_flow_matching_loss_rejects_broadcasting() -> None:
    with pytest.raises(ValueError, match="shape"):
        flow_matching_loss(torch.zeros(2, 1, 2, 2), torch.zeros(1, 1, 2, 2))


# ----------------------------------------------------------------------------------------------
# REPA loss


def _repa_reference(zs: torch.Tensor, zt: torch.Tensor) -> float:
    """Mean over samples and tokens of −(a·b)/(|a||b|), one token at a time in float64."""
    total, count = 0.0, 0
    for n in range(zs.shape[0]):
        for k in range(zs.shape[1]):
            a, b = zs[n, k].double(), zt[n, k].double()
            total -= float(torch.dot(a, b) / (a.norm() * b.norm()))
            count += 1
    return total / count


def test_repa_loss_matches_per_token_dot_products() -> None:
    g = torch.Generator().manual_seed(6)
    zs, zt = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    loss = repa_loss(zs, zt)
    assert loss.ndim == 0 and loss.dtype == torch.float32
    assert abs(float(loss) - _repa_reference(zs, zt)) < 1e-6


def test_repa_loss_extremes_and_scale_invariance() -> None:
    z = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(repa_loss(z, 3.0 * z), torch.tensor(-1.0))
    torch.testing.assert_close(repa_loss(z, -z), torch.tensor(1.0))


def test_repa_loss_gradient_only_into_student() -> None:
    zs = torch.randn(2, 4, 8, requires_grad=True)
    zt = torch.randn(2, 4, 8, requires_grad=True)
    repa_loss(zs, zt).backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0
    assert zt.grad is None


def test_repa_loss_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(2, 4, 8\).*\(2, 5, 8\)"):
        repa_loss(torch.zeros(2, 4, 8), torch.zeros(2, 5, 8))
    with pytest.raises(ValueError):
        repa_loss(torch.zeros(4, 8), torch.zeros(4, 8))


# ----------------------------------------------------------------------------------------------
# Attention alignment loss


def _attention_reference(student, teacher, s_heads, t_heads) -> float:
    """Official-style CE with torch.log(softmax), float64, explicit loops over pairs and heads."""
    pair_losses = []
    for s_all, t_all in zip(student, teacher):
        head_sums, rows = 0.0, 0
        for hs, ht in zip(s_heads, t_heads):
            q = torch.softmax(s_all[:, hs].double(), dim=-1)  # (N, T, T)
            p = torch.softmax(t_all[:, ht].double(), dim=-1)
            head_sums += float((-(p * torch.log(q)).sum(dim=-1)).sum())
            rows += q.shape[0] * q.shape[1]
        pair_losses.append(head_sums / rows)
    return sum(pair_losses) / len(pair_losses)


def _logits(n: int, h: int, t: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return scale * torch.randn(n, h, t, t, generator=torch.Generator().manual_seed(seed))


def test_attention_loss_matches_reference_with_head_selection() -> None:
    # Student has 6 heads and uses the first 4 (like XL's 16 → 12); teacher has 4 heads.
    student = [_logits(2, 6, 9, seed) for seed in (10, 11, 12)]
    teacher = [_logits(2, 4, 9, seed).half() for seed in (20, 21, 22)]  # fp16 like DINOv2's
    s_heads, t_heads = [0, 1, 2, 3], [0, 1, 2, 3]
    loss = attention_alignment_loss(student, teacher, s_heads, t_heads)
    assert loss.ndim == 0 and loss.dtype == torch.float32
    assert abs(float(loss) - _attention_reference(student, teacher, s_heads, t_heads)) < 1e-5
    permuted = attention_alignment_loss(student, teacher, [5, 3, 1, 0], [2, 0, 3, 1])
    assert abs(float(permuted) - _attention_reference(student, teacher, [5, 3, 1, 0], [2, 0, 3, 1])) < 1e-5


def test_take_slices_contiguous_runs_without_copying() -> None:
    # Contiguous runs (the default heads 0-11, consecutive teacher layers) must be views: a list
    # index on a CUDA tensor is a blocking host-to-device copy plus a gather, every step.
    x = _logits(2, 6, 3, 13)
    for idx in ([0, 1, 2, 3], [2, 3, 4, 5], [5], [-2, -1]):
        view = take(x, 1, idx)
        assert torch.equal(view, x[:, idx]) and view.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    for idx in ([5, 3, 1, 0], [0, 2], [1, 1]):  # anything else still gathers, with the same values
        assert torch.equal(take(x, 1, idx), x[:, idx])
    assert torch.equal(take(x, 0, [1]), x[[1]])


def test_attention_loss_is_kl_plus_teacher_entropy() -> None:
    s, t = _logits(2, 3, 7, 30), _logits(2, 3, 7, 31)
    loss = attention_alignment_loss([s], [t], [0, 1, 2], [0, 1, 2])
    p, log_p, log_q = t.double().softmax(-1), t.double().log_softmax(-1), s.double().log_softmax(-1)
    kl = (p * (log_p - log_q)).sum(-1).mean()
    entropy = -(p * log_p).sum(-1).mean()
    assert abs(float(loss) - float(kl + entropy)) < 1e-5
    assert float(kl) > 0


def test_attention_loss_minimum_is_teacher_entropy() -> None:
    t = _logits(2, 2, 6, 40)
    entropy = float(-(t.double().softmax(-1) * t.double().log_softmax(-1)).sum(-1).mean())
    at_teacher = attention_alignment_loss([t.clone()], [t], [0, 1], [0, 1])
    assert abs(float(at_teacher) - entropy) < 1e-5
    perturbed = attention_alignment_loss([t + 0.3 * _logits(2, 2, 6, 41)], [t], [0, 1], [0, 1])
    assert float(perturbed) > float(at_teacher)
    # Shift invariance of softmax: adding a per-row constant to the student changes nothing.
    shifted = attention_alignment_loss([t + 5.0], [t], [0, 1], [0, 1])
    assert abs(float(shifted) - entropy) < 1e-5


def test_attention_loss_gradient_only_into_student() -> None:
    s = _logits(1, 2, 5, 50).requires_grad_(True)
    t = _logits(1, 2, 5, 51).requires_grad_(True)
    attention_alignment_loss([s], [t], [0, 1], [0, 1]).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_attention_loss_is_finite_for_extreme_logits() -> None:
    # torch.log(softmax) underflows to −inf here; log_softmax does not (SPEC §2.3 details).
    s = torch.tensor([[[[0.0, -200.0], [-200.0, 0.0]]]])
    t = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]]]])
    assert torch.isfinite(attention_alignment_loss([s], [t], [0], [0]))


def test_attention_loss_rejects_bad_inputs() -> None:
    s, t = _logits(2, 2, 16, 60), _logits(2, 2, 4, 61)
    with pytest.raises(ValueError, match=r"\(2, 2, 16, 16\).*\(2, 2, 4, 4\)"):
        attention_alignment_loss([s], [t], [0, 1], [0, 1])  # 512-px-style token mismatch
    with pytest.raises(ValueError, match="layers"):
        attention_alignment_loss([s, s], [s], [0], [0])
    with pytest.raises(ValueError, match="heads"):
        attention_alignment_loss([s], [s], [0, 1], [0])
    with pytest.raises(ValueError, match="out of range"):
        attention_alignment_loss([s], [s], [0, 2], [0, 1])
    with pytest.raises(ValueError, match="N, H, T, T"):
        attention_alignment_loss([s[0]], [s[0]], [0], [0])
    with pytest.raises(ValueError):
        attention_alignment_loss([s], [_logits(3, 2, 16, 62)], [0], [0])  # batch mismatch


# ----------------------------------------------------------------------------------------------
# Total loss


def test_total_loss_weights_and_skips() -> None:
    d, f, a = torch.tensor(1.0), torch.tensor(-0.5), torch.tensor(3.0)
    torch.testing.assert_close(total_loss(d, f, a, feat_weight=0.5, attn_weight=0.5), torch.tensor(2.25))
    torch.testing.assert_close(total_loss(d, None, None, feat_weight=0.5, attn_weight=0.5), d)
    torch.testing.assert_close(total_loss(d, f, None, feat_weight=2.0, attn_weight=0.5), torch.tensor(0.0))
    nan = torch.tensor(float("nan"))
    # A zero weight skips the term, so a NaN there does not poison the total.
    torch.testing.assert_close(total_loss(d, nan, nan, feat_weight=0.0, attn_weight=0.0), d)
    with pytest.raises(ValueError, match="weights"):
        total_loss(d, f, a, feat_weight=-1.0, attn_weight=0.5)
