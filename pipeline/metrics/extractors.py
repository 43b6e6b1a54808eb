"""What goes into the metrics: feature extractors, their weights, samples and reference batches.

Built on torch-fidelity 0.4 (SPEC §10-11); ``pipeline.metrics.scores`` computes the numbers. This module owns:
  * ``RandomInitConvNet``: a labelled, seeded random-init extractor registered with torch-fidelity
    under ``RANDOM_EXTRACTOR``. It exposes the feature names of ``inception-v3-compat`` so every code
    path is the same, works offline and is cheap on CPU. Its numbers are NOT comparable to anything
    published; results computed with it carry ``RANDOM_LABEL``.
  * Weight resolution that fails fast and clearly offline: ``inception_weights_path`` checks for the
    file itself (torch-fidelity would otherwise try a GitHub download deep inside a constructor),
    ``dinov2_unavailable_reason`` says why FD-DINOv2 cannot run.
  * ``ImageArrayDataset``: a lazy (N, H, W, 3) uint8 array (numpy, memmap, zarr) as the torch Dataset
    of uint8 CHW tensors that torch-fidelity accepts, reading one block of rows at a time.
  * ``extract_features``: one pass of one extractor over a dataset, via torch-fidelity's own loop.
  * ``Reference`` / ``load_reference``: ADM-style .npz (``mu``/``sigma`` and/or ``arr_0``) or an image
    folder, validated, never unpickled, ``arr_0`` memory-mapped when stored uncompressed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import struct
import time
import zipfile
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.datasets import ImagesPathDataset
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset, glob_samples_paths

log = logging.getLogger(__name__)

INCEPTION = "inception-v3-compat"
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
DINOV2 = "dinov2-vit-l-14"
DINOV2_CHECKPOINT = "dinov2_vitl14_pretrain.pth"  # what the dinov2 hubconf caches for ViT-L/14
RANDOM_EXTRACTOR = "random-init-convnet"
RANDOM_LABEL = f"{RANDOM_EXTRACTOR}: random-init weights (NOT comparable to published FID)"
RANDOM_SEED = 0
FEATURES = ("64", "192", "768", "2048", "logits_unbiased", "logits")  # inception-v3-compat's names


class MetricsError(RuntimeError):
    """Evaluation cannot run or its inputs are invalid; the message says what to do."""


# Random-init extractor


class RandomInitConvNet(FeatureExtractorBase):
    """Seeded random conv net with inception-v3-compat's feature names (not its architecture).

    uint8 (N, 3, H, W) -> antialiased resize to 32² -> three stride-2 3x3 convs (64, 192, 768
    channels) -> 1x1 conv to 2048 -> mean pool; ReLU throughout. Pooled ReLU features of a random
    ResNet-like net separate image distributions (a random ViT with CLS output does not, SPEC §12).
    Weights come from a private generator seeded with ``RANDOM_SEED``, so features are identical
    in every process regardless of the global RNG. About 55 MMAC per image.
    """

    INPUT_SIZE = 32
    WIDTHS = (64, 192, 768, 2048)
    NUM_LOGITS = 1008          # inception-v3-compat's logits width
    LOGIT_SCALE = 4.0          # spreads the random logits so IS is not pinned at 1.0

    def __init__(self, name: str, features_list: Sequence[str], **kwargs: Any) -> None:
        super().__init__(name, features_list)  # kwargs: torch-fidelity options this net ignores
        gen = torch.Generator().manual_seed(RANDOM_SEED)
        convs, c_in = [], 3
        for i, c_out in enumerate(self.WIDTHS):
            k = 1 if i == len(self.WIDTHS) - 1 else 3
            conv = torch.nn.Conv2d(c_in, c_out, k, stride=1 if k == 1 else 2, padding=k // 2)
            fan_in = c_in * k * k
            conv.weight.data = torch.randn(conv.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5
            conv.bias.data = torch.randn(c_out, generator=gen) * 0.1
            convs.append(conv)
            c_in = c_out
        self.convs = torch.nn.ModuleList(convs)
        self.fc = torch.nn.Linear(c_in, self.NUM_LOGITS)
        self.fc.weight.data = torch.randn(self.fc.weight.shape, generator=gen) * self.LOGIT_SCALE / c_in**0.5
        self.fc.bias.data = torch.randn(self.NUM_LOGITS, generator=gen) * 0.1
        probe = torch.randint(0, 256, (16, 3, self.INPUT_SIZE, self.INPUT_SIZE), generator=gen, dtype=torch.uint8)
        probe[8:] = probe[8:, :, :1, :1]                      # half noise, half flat colours
        with torch.no_grad():
            self.register_buffer("center", self._pooled(probe).mean(dim=0))  # (2048,), see _logits
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 (N, 3, H, W) images, got {x.dtype} {tuple(x.shape)}")
        out = self._pooled_all(x)
        if "logits_unbiased" in self.features_list or "logits" in self.features_list:
            out["logits_unbiased"] = self._logits(out["2048"])     # no bias, as ADM's IS (SPEC §10)
            out["logits"] = out["logits_unbiased"] + self.fc.bias
        return tuple(out[name] for name in self.features_list)

    def _logits(self, pooled: torch.Tensor) -> torch.Tensor:
        # Pooled random ReLU features of all images share one dominant direction, so a plain linear
        # head gives every image the same class distribution (IS = 1). Centring on a fixed probe
        # batch and normalising makes the logits depend on content: IS then varies between sets.
        z = F.normalize(pooled - self.center, dim=1) * pooled.shape[1] ** 0.5
        return z @ self.fc.weight.T

    def _pooled_all(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = F.interpolate(x.float(), size=(self.INPUT_SIZE, self.INPUT_SIZE), mode="bilinear",
                          antialias=True, align_corners=False)
        h = (h - 128.0) / 128.0                               # (N, 3, 32, 32), inception's scaling
        out: dict[str, torch.Tensor] = {}
        for conv in self.convs:                               # 16² x64, 8² x192, 4² x768, 4² x2048
            h = F.relu(conv(h))
            out[str(conv.out_channels)] = h.mean(dim=(2, 3))  # (N, C)
        return out

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self._pooled_all(x)[str(self.WIDTHS[-1])]

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return FEATURES

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits_unbiased", "fid": "2048", "kid": "2048", "prc": "2048"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return True

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)


def ensure_registered() -> None:
    """Register the random-init extractor with torch-fidelity (idempotent; no import-time side effect)."""
    if RANDOM_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(RANDOM_EXTRACTOR, RandomInitConvNet)


# Weights: check for files ourselves, before any slow work


def hub_dir() -> Path:
    """torch's hub cache ($TORCH_HOME/hub unless torch.hub.set_dir was called), read at call time."""
    return Path(torch.hub.get_dir())


def inception_weights_path(explicit: str | None) -> Path:
    """The Inception weights file torch-fidelity should load, or one MetricsError saying where to put it."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise MetricsError(f"inception_weights={explicit!r}: file not found. Pass the path of "
                               f"{INCEPTION_WEIGHTS_FILE} (from {INCEPTION_WEIGHTS_URL}).")
        return path
    path = hub_dir() / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if not path.is_file():
        raise MetricsError(
            f"Inception weights for {INCEPTION} not found at {path}. Download {INCEPTION_WEIGHTS_URL} "
            f"and put it at exactly that path (the torch hub cache, $TORCH_HOME/hub/checkpoints), or pass "
            f"inception_weights=/path/to/{INCEPTION_WEIGHTS_FILE}. For an offline smoke run only, "
            f"extractor={RANDOM_EXTRACTOR!r} works without weights (numbers not comparable).")
    return path


def dinov2_unavailable_reason() -> str | None:
    """Why torch-fidelity's ``dinov2-vit-l-14`` cannot load offline, or None when its hub cache is populated.

    torch-fidelity calls ``torch.hub.load("facebookresearch/dinov2", ...)`` and accepts no weights
    path, so it needs the hub repo checkout and the checkpoint in the torch hub cache.
    """
    hub = hub_dir()
    repos = [hub / f"facebookresearch_dinov2_{ref}" for ref in ("main", "master")]
    missing = [] if any(r.is_dir() for r in repos) else [f"hub repo {repos[0]}"]
    ckpt = hub / "checkpoints" / DINOV2_CHECKPOINT
    if not ckpt.is_file():
        missing.append(f"checkpoint {ckpt}")
    return f"{DINOV2} weights unavailable offline (missing {' and '.join(missing)})" if missing else None


def build_extractor(name: str, features: Sequence[str], *, device: str,
                    inception_weights: Path | None = None) -> FeatureExtractorBase:
    """torch-fidelity's ``create_feature_extractor`` with our registration and clear load errors."""
    ensure_registered()
    kwargs: dict[str, Any] = {"verbose": False}
    if name == INCEPTION:
        kwargs["feature_extractor_weights_path"] = str(inception_weights)  # never the URL download
    try:
        with _cuda_device(device):
            return create_feature_extractor(name, list(features), cuda=device.startswith("cuda"), **kwargs)
    except (RuntimeError, OSError, EOFError, KeyError, pickle.UnpicklingError) as e:
        if name != INCEPTION:
            raise
        raise MetricsError(f"could not load Inception weights from {inception_weights}: {e}. Is it "
                           f"torch-fidelity's {INCEPTION_WEIGHTS_FILE}?") from None


def _cuda_device(device: str):
    """torch-fidelity moves things with ``.cuda()``; make that mean the configured ``cuda:N``."""
    return torch.cuda.device(torch.device(device)) if device.startswith("cuda") else nullcontext()


# Samples


class ImageArrayDataset(Dataset):
    """(N, H, W, 3) uint8 array-like -> Dataset of uint8 (3, H, W) tensors, read lazily in row blocks.

    ``images[start:stop]`` is the only access, so numpy arrays, memmaps and zarr arrays too large
    for RAM all work. One block is cached per process (each DataLoader worker holds its own);
    with ``block_rows`` equal to the loader batch size every batch costs exactly one read.
    """

    def __init__(self, images: Any, block_rows: int = 64) -> None:
        shape = tuple(getattr(images, "shape", ()))
        dtype = getattr(images, "dtype", None)
        if len(shape) != 4 or shape[-1] != 3:
            raise MetricsError(f"images must have shape (N, H, W, 3), got {shape}")
        if not _is_uint8(dtype):
            raise MetricsError(f"images must be uint8 (N, H, W, 3), got dtype {dtype}")
        if shape[0] == 0:
            raise MetricsError("images is empty (N = 0)")
        if block_rows < 1:
            raise MetricsError(f"block_rows must be >= 1, got {block_rows}")
        self.images, self.n, self.block_rows = images, shape[0], block_rows
        self._start, self._block = -1, np.empty((0, *shape[1:]), np.uint8)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.n:
            raise IndexError(i)
        start = i - i % self.block_rows
        if start != self._start:
            block = self.images[start:min(start + self.block_rows, self.n)]
            self._block = block.numpy() if isinstance(block, torch.Tensor) else np.asarray(block)
            self._start = start
        # copy: the source may be a read-only memmap, and torch wants writable, contiguous memory
        return torch.from_numpy(np.ascontiguousarray(self._block[i - start].transpose(2, 0, 1)))


def _is_uint8(dtype: Any) -> bool:
    """numpy/zarr dtypes (or scalar types such as ``np.uint8``) and torch dtypes alike."""
    if isinstance(dtype, torch.dtype):
        return dtype == torch.uint8
    try:
        return dtype is not None and np.dtype(dtype) == np.uint8
    except TypeError:
        return False


def as_dataset(images: Any, block_rows: int) -> Dataset:
    """A torch Dataset of uint8 CHW tensors: Datasets pass through, arrays are wrapped lazily."""
    return images if isinstance(images, Dataset) else ImageArrayDataset(images, block_rows)


def extract_features(extractor: FeatureExtractorBase, data: Dataset, *, batch_size: int, device: str,
                     save_cpu_ram: bool) -> dict[str, torch.Tensor]:
    """{feature name: (N, D) float32 CPU tensor} from one pass over ``data`` (torch-fidelity's loop)."""
    t0 = time.perf_counter()
    with _cuda_device(device):
        feats = get_featuresdict_from_dataset(data, extractor, batch_size, device.startswith("cuda"),
                                              save_cpu_ram, False)
    dt = time.perf_counter() - t0
    log.info("%s features of %d images in %.1f s (%.1f img/s)", extractor.get_name(), len(data), dt,
             len(data) / max(dt, 1e-9))
    return feats


# Reference batches


@dataclass(frozen=True, eq=False)
class Reference:
    """FID statistics and/or images to compare samples against; ``load_reference`` builds one."""

    path: str
    mu: np.ndarray | None = None      # (D,) float64
    sigma: np.ndarray | None = None   # (D, D) float64
    images: Any = None                # (N, H, W, 3) uint8 array-like (memmap when possible) or a Dataset

    @property
    def name(self) -> str:
        return Path(self.path).name

    @property
    def num_images(self) -> int:
        return 0 if self.images is None else len(self.images)

    def cache_key(self) -> str:
        """File name + a hash of path, size and mtime of every file behind the reference."""
        files = getattr(self.images, "files", None) or [self.path]   # an image folder lists its files
        h = hashlib.sha256()
        for f in files:
            st = os.stat(f)
            h.update(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return f"{re.sub(r'[^A-Za-z0-9._-]', '_', self.name)}-{h.hexdigest()[:16]}"


def load_reference(path: str | Path) -> Reference:
    """Image folder, or .npz with ``mu``+``sigma`` (statistics) and/or ``arr_0`` (uint8 NHWC images).

    Never unpickles (``allow_pickle=False``). ``arr_0`` is memory-mapped when stored uncompressed
    (``np.savez``, as ADM's 2 GB reference batch is), so loading is cheap and rows are read lazily.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        files = glob_samples_paths(str(p), True, "png,jpg,jpeg", verbose=False)
        if not files:
            raise MetricsError(f"reference folder {p} holds no .png/.jpg/.jpeg images")
        return Reference(str(p), images=ImagesPathDataset(files))
    if not p.is_file():
        raise MetricsError(f"reference {p} not found (expected an .npz or an image folder)")
    try:
        npz = np.load(p, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise MetricsError(f"reference {p} is not a readable .npz: {e}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise MetricsError(f"reference {p} is a single array, not an .npz with 'mu'/'sigma' or 'arr_0'")
    with npz:
        keys = set(npz.files)
        mu, sigma = _load_stats(npz, p) if keys & {"mu", "sigma"} else (None, None)
        images = _load_images(npz, p) if "arr_0" in keys else None
    if mu is None and images is None:
        raise MetricsError(f"reference {p} has neither 'mu'+'sigma' (FID statistics) nor 'arr_0' (images); "
                           f"keys: {sorted(keys)}")
    return Reference(str(p), mu=mu, sigma=sigma, images=images)


def _member(npz: np.lib.npyio.NpzFile, path: Path, key: str) -> np.ndarray:
    try:
        return npz[key]
    except ValueError as e:  # numpy's "Object arrays cannot be loaded when allow_pickle=False"
        raise MetricsError(f"reference {path}: key '{key}' is a pickled object array; refusing to load it "
                           f"({e})") from None


def _load_stats(npz: np.lib.npyio.NpzFile, path: Path) -> tuple[np.ndarray, np.ndarray]:
    for key in ("mu", "sigma"):
        if key not in npz.files:
            raise MetricsError(f"reference {path}: missing key '{key}' (FID statistics need both 'mu' and "
                               f"'sigma'); keys: {sorted(npz.files)}")
    mu, sigma = (_member(npz, path, k).astype(np.float64) for k in ("mu", "sigma"))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise MetricsError(f"reference {path}: 'mu' must be (D,) and 'sigma' (D, D); got {mu.shape} and "
                           f"{sigma.shape}")
    return mu, sigma


def _load_images(npz: np.lib.npyio.NpzFile, path: Path) -> np.ndarray:
    images = _npz_memmap(path, "arr_0")
    if images is None:
        log.info("reference %s: 'arr_0' is compressed; loading it into memory", path)
        images = _member(npz, path, "arr_0")
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise MetricsError(f"reference {path}: 'arr_0' must be uint8 (N, H, W, 3) images; got "
                           f"{images.dtype} {images.shape}")
    return images


def _npz_memmap(path: Path, key: str) -> np.ndarray | None:
    """Memory-map an uncompressed .npz member; None when it is compressed (then np.load reads it)."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{key}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # zip local file header: the data follows its name and extra field
        if local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            return None
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject:
        raise MetricsError(f"reference {path}: key '{key}' is a pickled object array; refusing to load it")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
