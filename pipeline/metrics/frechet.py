"""The Fréchet distance between Gaussian fits of features (FID, FD-DINOv2): pure float64 statistics.

``feature_stats`` fits (mu, sigma) as ADM does; ``frechet_distance`` compares two fits, with ADM's
``sqrtm`` recipe or the equal, faster ``eigh`` one (``MetricsConfig.fid_method``).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import torch
from scipy import linalg

from pipeline.metrics.extractors import MetricsError

log = logging.getLogger(__name__)


def feature_stats(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> float64 mean (D,) and covariance (D, D) (np.cov, rowvar=False, as ADM)."""
    x = features.double().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise MetricsError(f"feature statistics need (N >= 2, D) features, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, *,
                     method: Literal["sqrtm", "eigh"] = "sqrtm", eps: float = 1e-6) -> float:
    """|mu1 - mu2|² + tr(s1 + s2 - 2 (s1 s2)^½) in float64.

    ``sqrtm`` follows ADM's evaluator / pytorch-fid: scipy's matrix square root of s1·s2, an eps·I
    offset when the result is not finite, then the real part. ``eigh`` computes the same trace as
    the eigenvalues of the symmetric PSD s1^½ s2 s1^½ (similar to s1 s2): about 10x faster at
    D = 2048 on CPU, and free of spurious imaginary parts.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise MetricsError(f"Fréchet distance needs mu (D,) and sigma (D, D) with one D; got "
                           f"{mu1.shape}, {s1.shape}, {mu2.shape}, {s2.shape}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * _trace_sqrt_product(s1, s2, method, eps))


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray, method: str, eps: float) -> float:
    if method == "eigh":
        # s1 = V W Vᵀ; with B = V_r W_r^½ over the r non-zero eigenvalues, s1^½ s2 s1^½ = V_r (Bᵀ s2 B) V_rᵀ,
        # so its non-zero eigenvalues are those of the r x r matrix Bᵀ s2 B (r = N - 1 for N < D samples).
        # torch (float64, CPU) rather than numpy: its thread count follows torch.set_num_threads.
        a, c = torch.from_numpy(s1), torch.from_numpy(s2)
        w, v = torch.linalg.eigh(a)
        keep = w > w.max().clamp(min=0.0) * len(w) * torch.finfo(torch.float64).eps
        b = v[:, keep] * w[keep].sqrt()                             # (D, r)
        ev = torch.linalg.eigvalsh(b.T @ c @ b)
        return float(ev.clamp(min=0.0).sqrt().sum())               # tiny negative eigenvalues are rounding
    if method != "sqrtm":
        raise MetricsError(f"unknown Fréchet method {method!r}")
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        log.warning("sqrtm(sigma1 sigma2) is not finite (near-singular covariances); adding %g to the "
                    "diagonals, as ADM's evaluator does", eps)
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = float(np.abs(np.diagonal(covmean).imag).max())
        if imag > 1e-3:  # ADM raises here; we keep the number but say it is numerically shaky
            log.warning("sqrtm has an imaginary diagonal component of %.3g; taking the real part", imag)
        covmean = covmean.real
    return float(np.trace(covmean))
