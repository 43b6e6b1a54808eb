"""How far decoded teacher targets are from exact ones, in the units training cares about.

Small pure functions over tensors (float64 inside, so that a KL of 1e-9 is still a number):

- ``kl_rows``: per-query-row KL(p_exact ‖ p_decoded) of the softmaxed attention logits.
- ``attention_loss`` / ``attention_grad``: the HASTE attention cross-entropy of a student against
  a teacher (the math of ``trainer.objectives.attention_alignment_loss``, SPEC §2.3: mean over
  rows of −Σ_k p_T log softmax(s)) and its gradient w.r.t. the student logits,
  (softmax(s) − p_T) / rows. The pipeline layer may not import the trainer, so the two are
  restated here and ``tests/test_codecs.py`` checks them against the trainer's loss and autograd.
- ``feature_cosine_error``: per-token 1 − cos(f_exact, f_decoded) (the REPA loss is −cos).
- ``measure``: all of the above on a batch, at several teacher sharpnesses (logits × s, both
  sides): a random-init teacher attends almost uniformly, a trained DINOv2 much more sharply,
  and sharper softmaxes amplify logit errors. ``worst`` is the worst case over sharpnesses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

SHARPNESS = (1.0, 5.0, 20.0)
GRAD_COS_MIN = 0.999      # the bar a default codec must keep in the worst case
FEAT_COS_ERR_MAX = 1e-3


def kl_rows(exact_logits: Tensor, decoded_logits: Tensor) -> Tensor:
    """KL(softmax(exact) ‖ softmax(decoded)) over the last (key) axis, shape (...), float64."""
    lp = exact_logits.double().log_softmax(-1)
    lq = decoded_logits.double().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def attention_loss(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Mean over all query rows of −Σ_k softmax(teacher)_k · log_softmax(student)_k, scalar float64."""
    p = teacher_logits.double().softmax(-1)
    return -(p * student_logits.double().log_softmax(-1)).sum(-1).mean()


def attention_grad(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """∂ attention_loss / ∂ student_logits = (softmax(s) − softmax(t)) / number of rows, float64."""
    rows = student_logits[..., 0].numel()
    return (student_logits.double().softmax(-1) - teacher_logits.double().softmax(-1)) / rows


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine of two tensors taken as flat vectors (1.0 when both are zero)."""
    a, b = a.double().flatten(), b.double().flatten()
    na, nb = a.norm(), b.norm()
    if na == 0 and nb == 0:
        return 1.0
    return float(a @ b / (na * nb).clamp_min(1e-300))


def feature_cosine_error(exact: Tensor, decoded: Tensor) -> Tensor:
    """Per-token 1 − cos(exact, decoded) over the last axis, float64 (0 for identical tokens)."""
    e, d = exact.double(), decoded.double()
    cos = (e * d).sum(-1) / (e.norm(dim=-1) * d.norm(dim=-1)).clamp_min(1e-300)
    return (1 - cos).clamp_min(0)


def entropy_rows(logits: Tensor) -> Tensor:
    """Per-row entropy (nats) of softmax(logits): how sharp the teacher is (log T = uniform)."""
    lp = logits.double().log_softmax(-1)
    return -(lp.exp() * lp).sum(-1)


def _attention_at(exact: Tensor, decoded: Tensor, student: Tensor, s: float) -> dict[str, float]:
    """Metrics of one sample (L, H, T, T) at sharpness s."""
    e, d = exact.double() * s, decoded.double() * s
    kl = kl_rows(e, d)
    loss_e, loss_d = attention_loss(e, student), attention_loss(d, student)
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "loss_rel_err": float((loss_d - loss_e).abs() / loss_e.abs().clamp_min(1e-300)),
            "grad_cos": cosine(attention_grad(e, student), attention_grad(d, student)),
            "teacher_entropy": float(entropy_rows(e).mean())}


def measure(exact_logits: Tensor | None, decoded_logits: Tensor | None, exact_feat: Tensor, decoded_feat: Tensor,
            *, sharpness: Sequence[float] = SHARPNESS, seed: int = 0) -> dict[str, Any]:
    """Fidelity of a batch: logits (N, L, H, T, T) (None when no attention is stored), features (N, T, D).

    The student is N(0, 1) logits from ``seed`` (one draw per sample, shared by the exact and
    decoded targets): the gradient then has the magnitude of early training, where the teacher's
    targets matter most. Per sharpness: mean/max row KL, max relative loss error and min gradient
    cosine over samples; samples are processed one at a time to bound memory.
    """
    out: dict[str, Any] = {"samples": int(exact_feat.shape[0]), "sharpness": {}}
    if exact_logits is not None and decoded_logits is not None:
        if exact_logits.shape != decoded_logits.shape:
            raise ValueError(f"exact logits {tuple(exact_logits.shape)} != decoded {tuple(decoded_logits.shape)}")
        g = torch.Generator().manual_seed(seed)
        per = {s: [] for s in sharpness}
        for i in range(exact_logits.shape[0]):
            student = torch.randn(exact_logits.shape[1:], generator=g, dtype=torch.float64)
            for s in sharpness:
                per[s].append(_attention_at(exact_logits[i].cpu(), decoded_logits[i].cpu(), student, s))
        for s, rows in per.items():
            out["sharpness"][f"{s:g}"] = {
                "kl_mean": sum(r["kl_mean"] for r in rows) / len(rows), "kl_max": max(r["kl_max"] for r in rows),
                "loss_rel_err_max": max(r["loss_rel_err"] for r in rows),
                "grad_cos_min": min(r["grad_cos"] for r in rows),
                "teacher_entropy": sum(r["teacher_entropy"] for r in rows) / len(rows)}
    err = feature_cosine_error(exact_feat.cpu(), decoded_feat.cpu())
    out["features"] = {"cos_err_mean": float(err.mean()), "cos_err_max": float(err.max())}
    out["worst"] = worst_case(out)
    return out


def worst_case(result: dict[str, Any]) -> dict[str, Any]:
    """Worst attention metrics over the sharpness sweep, the feature errors, and the verdict against
    the default-codec bar (gradient cosine ≥ 0.999, mean feature cosine error ≤ 1e-3)."""
    sweep = result.get("sharpness", {}).values()
    worst: dict[str, Any] = {}
    if sweep:
        worst.update(kl_max=max(r["kl_max"] for r in sweep), kl_mean=max(r["kl_mean"] for r in sweep),
                     loss_rel_err_max=max(r["loss_rel_err_max"] for r in sweep),
                     grad_cos_min=min(r["grad_cos_min"] for r in sweep))
    worst.update(feat_cos_err_mean=result["features"]["cos_err_mean"],
                 feat_cos_err_max=result["features"]["cos_err_max"])
    worst["meets_bar"] = (worst.get("grad_cos_min", 1.0) >= GRAD_COS_MIN
                          and worst["feat_cos_err_mean"] <= FEAT_COS_ERR_MAX)
    worst["bar"] = {"grad_cos_min": GRAD_COS_MIN, "feat_cos_err_mean": FEAT_COS_ERR_MAX}
    return worst
