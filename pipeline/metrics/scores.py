"""Sample-quality metrics for the eval stage: FID, IS, precision/recall, KID, optional FD-DINOv2.

torch-fidelity 0.4 does the heavy lifting (feature extractors, IS, KID, P/R); we add what it
lacks (SPEC §10-11): the Fréchet distance against *external* statistics (ADM's ``mu``/``sigma``),
loading reference batches, lazy inputs, clear offline errors, and loading that never unpickles
(weights as plain tensors, our own .npy feature cache instead of its pickled one). The recipe
that reproduces ADM-evaluator numbers without TensorFlow (SPEC §10):

  * ``inception-v3-compat`` pool_3 (``'2048'``) features of uint8 samples at their stored size
    (the extractor does TF1 bilinear to 299 itself), Fréchet distance in float64 against the
    reference npz's ``mu``/``sigma`` (``scipy.linalg.sqrtm``, ADM's eps/real-part handling);
  * IS from ``logits_unbiased`` in ``is_splits`` consecutive, unshuffled splits;
  * precision/recall (k = 3) and KID against the reference images (``arr_0``);
  * text-to-image: CLIP score of each sample against its prompt (``clip_score``, defined there).

Each extractor runs once over the samples (and once over the reference images); every metric
reads the same feature dict. Usage::

    cfg = MetricsConfig(reference="VIRTUAL_imagenet256_labeled.npz", device="cuda")
    checked = preflight(cfg)                                         # weights, sha256, reference: seconds
    result = compute_metrics(zarr.open_group("samples.zarr")["images"], cfg, checked=checked)
    line = summary_line(result)                                      # one line; the caller reports it
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity import FeatureExtractorBase
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from pipeline.configs import check
from pipeline.metrics.clip_score import (
    DEFAULT_CLIP,
    clip_score_summary,
    clip_scores,
    clip_unavailable_reason,
    load_clip_scorer,
)
from pipeline.metrics.extractors import (
    DINOV2,
    INCEPTION,
    INCEPTION_WEIGHTS_FILE,
    RANDOM_EXTRACTOR,
    RANDOM_LABEL,
    RANDOM_SEED,
    MetricsError,
    as_dataset,
    build_extractor,
    check_dinov2_checkpoint,
    check_sha256,
    dinov2_unavailable_reason,
    extract_features,
    inception_weights_path,
)
from pipeline.metrics.feature_cache import cached_features
from pipeline.metrics.frechet import feature_stats, frechet_distance
from pipeline.metrics.reference import Reference, load_reference

__all__ = ["MetricsConfig", "MetricsError", "Reference", "compute_metrics", "feature_stats",
           "frechet_distance", "load_reference", "preflight", "summary_line"]

log = logging.getLogger(__name__)

METRICS = ("fid", "is", "pr", "kid", "clip")
INCEPTION_METRICS = ("fid", "is", "pr", "kid")  # the ones read from the extractor's features
EXTRACTORS = (INCEPTION, RANDOM_EXTRACTOR)
POOL_DIM = 2048                      # width of the '2048' feature of both extractors (= ADM's mu)
INCEPTION_SHA256_PREFIX = INCEPTION_WEIGHTS_FILE.rsplit("-", 1)[1].split(".")[0]  # torch hub naming


@dataclass(frozen=True, kw_only=True, slots=True)
class MetricsConfig:
    extractor: str = INCEPTION                 # or RANDOM_EXTRACTOR (offline demo/tests; not comparable)
    inception_weights: str | None = None       # local weights file; None = torch hub cache
    inception_sha256: str = INCEPTION_SHA256_PREFIX  # required sha256 prefix of the weights (mismatch = error)
    reference: str | None = None               # ADM-style .npz, stats-only .npz, images-only .npz, or folder
    metrics: tuple[str, ...] = METRICS
    fd_dinov2: bool = False                    # torch-fidelity dinov2-vit-l-14; skipped if not cached
    batch_size: int = 64
    device: str = "auto"                       # "auto" (cuda when visible), "cpu", "cuda" or "cuda:N"
    prc_k: int = 3
    is_splits: int = 10
    kid_subsets: int = 100
    kid_subset_size: int = 1000                # clamped to the number of samples / reference images
    fid_method: Literal["sqrtm", "eigh"] = "sqrtm"   # sqrtm = ADM/pytorch-fid; eigh = same value, ~10x faster
    seed: int = 2020                           # KID subset sampling (torch-fidelity's default)
    save_cpu_ram: bool = False                 # torch-fidelity's flag: no loader workers, blockwise P/R
    cache_root: str | None = None              # cache reference features here (.npy files, never pickles)
    clip_model: str = DEFAULT_CLIP             # "clip": CLIPModel hub id (local cache) or folder; skipped if absent
    clip_sha256: str | None = None             # required sha256 prefix of the CLIP weights file (None: recorded only)

    def __post_init__(self) -> None:
        check(self.extractor in EXTRACTORS, "extractor", f"{self.extractor!r} is not one of {list(EXTRACTORS)}")
        check(self.extractor == INCEPTION or self.inception_weights is None, "inception_weights",
              f"only used with extractor={INCEPTION!r}")
        check(re.fullmatch(r"[0-9a-fA-F]{8,64}", self.inception_sha256 or "") is not None, "inception_sha256",
              f"must be 8 to 64 hex digits of the weights' sha256, got {self.inception_sha256!r}")
        check(len(self.metrics) > 0 or self.fd_dinov2, "metrics", "nothing to compute")
        bad = [m for m in self.metrics if m not in METRICS]
        check(not bad, "metrics", f"unknown {bad}; choose from {list(METRICS)}")
        check(len(set(self.metrics)) == len(self.metrics), "metrics", f"duplicates in {list(self.metrics)}")
        needs_ref = [m for m in self.metrics if m not in ("is", "clip")] + (["fd_dinov2"] if self.fd_dinov2 else [])
        check(self.reference is not None or not needs_ref, "reference",
              f"{needs_ref} need a reference (.npz or image folder); set reference= or metrics=('is',)")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None, "device",
              f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        check(self.prc_k >= 1, "prc_k", f"must be >= 1, got {self.prc_k}")
        check(self.is_splits >= 1, "is_splits", f"must be >= 1, got {self.is_splits}")
        check(self.kid_subsets >= 1, "kid_subsets", f"must be >= 1, got {self.kid_subsets}")
        check(self.kid_subset_size >= 2, "kid_subset_size", f"must be >= 2, got {self.kid_subset_size}")
        check(self.fid_method in ("sqrtm", "eigh"), "fid_method", f"{self.fid_method!r} is not 'sqrtm' or 'eigh'")
        check(self.clip_sha256 is None or re.fullmatch(r"[0-9a-fA-F]{8,64}", self.clip_sha256) is not None,
              "clip_sha256", f"must be 8 to 64 hex digits, got {self.clip_sha256!r}")


# ----------------------------------------------------------------------------
# compute_metrics


@dataclass(frozen=True)
class Preflight:
    """What ``preflight`` checked: the weights file (sha256 verified), the loaded reference, and why
    the CLIP score cannot run (None: it can, or was not asked for)."""
    weights: Path | None
    weights_sha256: str | None
    reference: Reference | None
    clip_unavailable: str | None = None


@dataclass(frozen=True)
class _Inputs:
    data: Dataset
    reference: Reference | None
    weights: Path | None
    weights_sha256: str | None
    skipped: dict[str, str]


def compute_metrics(images: Any, cfg: MetricsConfig, *, progress: bool = False,
                    checked: Preflight | None = None, prompts: list[str] | None = None,
                    clip_tokenizer: Any = None) -> dict[str, Any]:
    """Metrics of uint8 (N, H, W, 3) ``images`` (numpy, memmap, zarr, or a Dataset of CHW uint8 tensors).

    Returns a JSON-ready dict of plain floats and strings; skipped metrics are listed with the
    reason under ``"skipped"``. Raises ``MetricsError`` before any slow work when weights, the
    reference or the inputs are missing or malformed (``checked``: a ``preflight`` already done).
    ``progress`` shows a bar per feature pass. The caller reports ``summary_line(result)``.
    ``prompts`` (one per image) enable the CLIP score; ``clip_tokenizer`` serves a ``random:`` CLIP.
    """
    t0 = time.perf_counter()
    if cfg.device == "auto":  # 50K Inception passes take ~2 h on a CPU, minutes on a GPU
        cfg = dataclasses.replace(cfg, device="cuda" if torch.cuda.is_available() else "cpu")
    checked = checked or preflight(cfg)
    inp = _prepare(images, cfg, checked, prompts)
    active = [m for m in cfg.metrics if m not in inp.skipped and m in INCEPTION_METRICS]
    result = _header(cfg, inp)
    if active:
        names = (["2048"] if set(active) - {"is"} else []) + (["logits_unbiased"] if "is" in active else [])
        extractor = build_extractor(cfg.extractor, names, device=cfg.device, inception_weights=inp.weights)
        feats = extract_features(extractor, inp.data, batch_size=cfg.batch_size, device=cfg.device,
                                 save_cpu_ram=cfg.save_cpu_ram, progress=progress)
        ref = inp.reference
        ref_needed = ref is not None and ("pr" in active or "kid" in active or ("fid" in active and ref.mu is None))
        ref_feats = _reference_features(extractor, ref, cfg, inp.weights_sha256, progress) if ref_needed else {}
        result.update(_metrics_from_features(feats, ref_feats, ref, cfg, active))
    if cfg.fd_dinov2:
        result["fd_dinov2"] = _fd_dinov2(inp, cfg, progress)
    if "clip" in cfg.metrics and "clip" not in inp.skipped:
        assert prompts is not None
        scorer = load_clip_scorer(cfg.clip_model, cfg.device, tokenizer=clip_tokenizer, sha256=cfg.clip_sha256)
        scores = clip_scores(images if hasattr(images, "shape") else _hwc(inp.data), prompts, scorer,
                             batch_size=cfg.batch_size, progress=progress)
        result.update(clip_score_summary(scores), clip_weights_sha256=scorer.weights_sha256)
    result["skipped"] = dict(inp.skipped)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def preflight(cfg: MetricsConfig, *, with_reference: bool = True) -> Preflight:
    """Every check that needs no samples: device, weights (present, expected sha256), the reference
    (unless ``with_reference`` is False: one made later), the DINOv2 checkpoint. The eval stage runs
    it before sampling, so nothing is sampled for metrics that cannot be computed."""
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise MetricsError(f"device={cfg.device!r} but CUDA is not available")
    weights = inception_weights_path(cfg.inception_weights) if cfg.extractor == INCEPTION else None
    sha = check_sha256(weights, cfg.inception_sha256) if weights is not None else None
    ref = load_reference(cfg.reference) if cfg.reference is not None and with_reference else None
    if ref is not None and ref.mu is not None and ref.mu.shape[0] != POOL_DIM:
        raise MetricsError(f"reference {ref.path}: 'mu' has D={ref.mu.shape[0]}, but the '2048' features "
                           f"have D={POOL_DIM}")
    if cfg.fd_dinov2 and dinov2_unavailable_reason() is None:
        check_dinov2_checkpoint()
    clip_why = clip_unavailable_reason(cfg.clip_model) if "clip" in cfg.metrics else None
    return Preflight(weights, sha, ref, clip_why)


def _prepare(images: Any, cfg: MetricsConfig, checked: Preflight, prompts: list[str] | None = None) -> _Inputs:
    """The cheap checks on the samples (the rest is ``preflight``), so errors come before any slow work."""
    data = as_dataset(images, cfg.batch_size)
    if prompts is not None and len(prompts) != len(data):
        raise MetricsError(f"{len(prompts)} prompts for {len(data)} samples")
    skipped = _skip_reasons(cfg, len(data), checked.reference)
    if "clip" in cfg.metrics:
        why = "needs a prompt per sample (text-to-image samples)" if prompts is None else checked.clip_unavailable
        if why:
            skipped["clip"] = why
    for metric, reason in skipped.items():
        log.warning("skipping %s: %s", metric, reason)
    return _Inputs(data, checked.reference, checked.weights, checked.weights_sha256, skipped)


def _skip_reasons(cfg: MetricsConfig, n: int, ref: Reference | None) -> dict[str, str]:
    """Metrics that cannot be computed from these inputs, with the reason (recorded, never fatal)."""
    n_ref = ref.num_images if ref is not None else 0
    no_images = f"reference {ref.name if ref else None} has no images ('arr_0' or a folder)"
    k = cfg.prc_k
    checks = {
        "fid": [(n < 2, f"needs >= 2 samples, got {n}"),
                (ref is not None and ref.mu is None and n_ref < 2, "needs >= 2 reference images")],
        "is": [(n < cfg.is_splits, f"needs >= is_splits={cfg.is_splits} samples, got {n}")],
        "pr": [(n_ref == 0, no_images),
               (min(n, n_ref) < k + 1, f"needs > prc_k={k} samples and reference images, got {n} and {n_ref}")],
        "kid": [(n_ref == 0, no_images), (min(n, n_ref) < 2, "needs >= 2 samples and reference images")],
        "clip": [],  # prompts and weights: _prepare
    }
    out = {m: next((why for bad, why in checks[m] if bad), "") for m in cfg.metrics}
    if cfg.fd_dinov2:
        out["fd_dinov2"] = no_images if n_ref < 2 else (dinov2_unavailable_reason() or "")
    return {m: why for m, why in out.items() if why}


def _header(cfg: MetricsConfig, inp: _Inputs) -> dict[str, Any]:
    ref = inp.reference
    label = RANDOM_LABEL if cfg.extractor == RANDOM_EXTRACTOR else INCEPTION
    if inp.weights_sha256 is not None and not inp.weights_sha256.startswith(INCEPTION_SHA256_PREFIX):
        label = f"{INCEPTION} (non-standard weights sha256 {inp.weights_sha256[:12]})"
    fid_stats = None if ref is None else (
        f"mu/sigma from {ref.name}" if ref.mu is not None else f"computed from {ref.num_images} reference images")
    return {
        "extractor": label, "extractor_name": cfg.extractor, "random_init": cfg.extractor == RANDOM_EXTRACTOR,
        "extractor_weights": str(inp.weights) if inp.weights else None,
        "extractor_weights_sha256": inp.weights_sha256,
        "num_samples": len(inp.data), "reference": ref.name if ref else None,
        "reference_path": ref.path if ref else None, "num_reference_images": ref.num_images if ref else 0,
        "reference_fid_stats": fid_stats, "fid_method": cfg.fid_method, "prc_k": cfg.prc_k,
        "is_splits": cfg.is_splits, "torch_fidelity": torch_fidelity.__version__,
        **({"clip_model": cfg.clip_model} if "clip" in cfg.metrics else {}),
    }


def _metrics_from_features(feats: dict[str, torch.Tensor], ref_feats: dict[str, torch.Tensor],
                           ref: Reference | None, cfg: MetricsConfig, active: list[str]) -> dict[str, Any]:
    """Every metric from the one feature dict per input (torch-fidelity's metric functions, except FID)."""
    out: dict[str, Any] = {}
    if "fid" in active:
        assert ref is not None
        stats = (ref.mu, ref.sigma) if ref.mu is not None else feature_stats(ref_feats["2048"])
        out["fid"] = frechet_distance(*feature_stats(feats["2048"]), *stats, method=cfg.fid_method)
    if "is" in active:  # shuffle off: ADM's consecutive splits
        isc = isc_features_to_metric(feats["logits_unbiased"], splits=cfg.is_splits, shuffle=False)
        out["is_mean"], out["is_std"] = isc[KEY_METRIC_ISC_MEAN], isc[KEY_METRIC_ISC_STD]
    if "pr" in active:  # convention: input 1 = generated, input 2 = real
        dev = torch.device(cfg.device)
        prc = prc_features_to_metric(feats["2048"].to(dev), ref_feats["2048"].to(dev), prc_neighborhood=cfg.prc_k,
                                     save_cpu_ram=cfg.save_cpu_ram, verbose=False)
        out.update({k: float(v) for k, v in prc.items()})
    if "kid" in active:
        m = min(cfg.kid_subset_size, len(feats["2048"]), len(ref_feats["2048"]))
        if m < cfg.kid_subset_size:
            log.info("KID subset size clamped from %d to %d", cfg.kid_subset_size, m)
        kid = kid_features_to_metric(feats["2048"], ref_feats["2048"], kid_subsets=cfg.kid_subsets,
                                     kid_subset_size=m, rng_seed=cfg.seed, verbose=False)
        out.update(kid_mean=kid[KEY_METRIC_KID_MEAN], kid_std=kid[KEY_METRIC_KID_STD], kid_subset_size=m)
    return out


def _reference_features(extractor: FeatureExtractorBase, ref: Reference, cfg: MetricsConfig,
                        weights_sha256: str | None, progress: bool) -> dict[str, torch.Tensor]:
    """Reference-image features, cached under ``cfg.cache_root`` when set (plain .npy, see feature_cache)."""
    data = as_dataset(ref.images, cfg.batch_size)

    def recompute() -> dict[str, torch.Tensor]:
        return extract_features(extractor, data, batch_size=cfg.batch_size, device=cfg.device,
                                save_cpu_ram=cfg.save_cpu_ram, progress=progress)

    if cfg.cache_root is None:
        return recompute()
    ident = weights_sha256[:12] if weights_sha256 else (f"seed{RANDOM_SEED}" if extractor.get_name() ==
                                                        RANDOM_EXTRACTOR else "hub")
    prefix = f"{ref.cache_key()}-{extractor.get_name()}-{ident}"
    return cached_features(cfg.cache_root, prefix, extractor.get_requested_features_list(), len(data), recompute)


def _fd_dinov2(inp: _Inputs, cfg: MetricsConfig, progress: bool) -> float | str:
    """FD-DINOv2 (torch-fidelity's dinov2-vit-l-14, bilinear resize to 224) or "skipped: reason"."""
    if "fd_dinov2" in inp.skipped:
        return f"skipped: {inp.skipped['fd_dinov2']}"
    assert inp.reference is not None
    try:
        extractor = build_extractor(DINOV2, ["dinov2"], device=cfg.device)
    except (RuntimeError, OSError, ImportError, ValueError) as e:  # optional metric: record, do not fail
        inp.skipped["fd_dinov2"] = f"{DINOV2} failed to load: {e}"
        log.warning("skipping fd_dinov2: %s", inp.skipped["fd_dinov2"])
        return f"skipped: {inp.skipped['fd_dinov2']}"
    feats = extract_features(extractor, inp.data, batch_size=cfg.batch_size, device=cfg.device,
                             save_cpu_ram=cfg.save_cpu_ram, progress=progress)["dinov2"]
    ref_feats = _reference_features(extractor, inp.reference, cfg, None, progress)["dinov2"]
    return frechet_distance(*feature_stats(feats), *feature_stats(ref_feats), method=cfg.fid_method)


_SUMMARY = (  # (metric, display name, result key that shows it was computed, rendering)
    ("fid", "FID", "fid", lambda r: f"FID {r['fid']:.2f}"),
    ("is", "IS", "is_mean", lambda r: f"IS {r['is_mean']:.2f} ± {r['is_std']:.2f}"),
    ("pr", "P/R", "precision", lambda r: f"P {r['precision']:.3f} R {r['recall']:.3f}"),
    ("kid", "KID", "kid_mean", lambda r: f"KID {r['kid_mean']:.5f} ± {r['kid_std']:.5f}"),
    ("fd_dinov2", "FD-DINOv2", "fd_dinov2", lambda r: f"FD-DINOv2 {r['fd_dinov2']:.2f}"),
    ("clip", "CLIP score", "clip_score", lambda r: f"CLIP score {r['clip_score']:.2f}"),
)


def _hwc(data: Dataset) -> np.ndarray:
    """A Dataset of uint8 CHW tensors as one (N, H, W, 3) array (the CLIP pass slices arrays)."""
    return np.stack([np.asarray(data[i]).transpose(1, 2, 0) for i in range(len(data))])


def summary_line(result: dict[str, Any]) -> str:
    """One line, e.g. 'FID 2.10 | IS 250.30 ± 3.10 | P 0.800 R 0.600 | KID ... (extractor, N samples, ref X)'."""
    skipped = result.get("skipped", {})
    parts = [f"{name} skipped" if metric in skipped else render(result)
             for metric, name, key, render in _SUMMARY if metric in skipped or key in result]
    ref = result.get("reference") or "none"
    return f"{' | '.join(parts)} ({result['extractor']}, {result['num_samples']} samples, ref {ref})"
