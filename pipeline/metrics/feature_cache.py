"""Reference features cached between eval runs as plain ``.npy`` files (``metrics.cache_root``).

    feats = cached_features(root, "VIRTUAL_imagenet256_labeled.npz-<hash>-inception-v3-compat-6726825d",
                            ["2048"], num_images=10_000, recompute=lambda: extract(...))

torch-fidelity's own cache stores ``.pt`` files and reloads them with ``torch.load(weights_only=
False)``: a file planted in its cache directory runs code. Ours holds one float32 (N, D) ``.npy``
per feature, written atomically and read with ``allow_pickle=False``; anything else under one of
our names is refused with one line naming the file, never executed or silently replaced.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.cache.shards import atomic_write_bytes
from pipeline.metrics.extractors import MetricsError

log = logging.getLogger(__name__)

SUFFIX = ".features.npy"


def cache_path(root: str | Path, prefix: str, name: str) -> Path:
    return Path(root) / f"{prefix}-{name}{SUFFIX}"


def read_features(path: Path, num_images: int) -> torch.Tensor:
    """One cached (num_images, D) float32 array, or a MetricsError naming the file."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise MetricsError(f"feature cache {path} is not a plain .npy array ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); delete it and rerun") from None
    if not isinstance(arr, np.ndarray) or arr.dtype != np.float32 or arr.ndim != 2 or arr.shape[0] != num_images:
        raise MetricsError(f"feature cache {path} holds {getattr(arr, 'dtype', '?')} {getattr(arr, 'shape', '?')}, "
                           f"expected float32 ({num_images}, D); delete it and rerun")
    return torch.from_numpy(arr)


def cached_features(root: str | Path, prefix: str, names: Sequence[str], num_images: int,
                    recompute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The cached features when every name is present, else ``recompute()`` and store its result."""
    paths = {n: cache_path(root, prefix, n) for n in names}
    if all(p.is_file() for p in paths.values()):
        log.info("reference features from %s", ", ".join(str(p) for p in paths.values()))
        return {n: read_features(p, num_images) for n, p in paths.items()}
    feats = recompute()
    Path(root).mkdir(parents=True, exist_ok=True)
    for n, p in paths.items():
        buf = io.BytesIO()
        np.save(buf, feats[n].numpy().astype(np.float32, copy=False), allow_pickle=False)
        atomic_write_bytes(p, buf.getvalue())
    return feats
