"""What goes into the metrics: feature extractors, their weights, and the samples as a Dataset.

Built on torch-fidelity 0.4 (SPEC §10-11); ``pipeline.metrics.scores`` computes the numbers. This module owns:
  * ``RandomInitConvNet``: a labelled, seeded random-init extractor registered with torch-fidelity
    under ``RANDOM_EXTRACTOR``. It exposes the feature names of ``inception-v3-compat`` so every code
    path is the same, works offline and is cheap on CPU. Its numbers are NOT comparable to anything
    published; results computed with it carry ``RANDOM_LABEL``.
  * Weights that fail fast and never run code: ``inception_weights_path`` checks for the file itself
    (torch-fidelity would otherwise try a GitHub download deep inside a constructor),
    ``check_sha256`` refuses weights other than the expected ones, ``load_tensors`` reads a weights
    file as plain tensors (safetensors, or ``torch.load(weights_only=True)``), and
    ``build_extractor`` hands torch-fidelity those tensors, never the file (its own loader
    unpickles with ``weights_only=False``). ``dinov2_unavailable_reason`` says why FD-DINOv2
    cannot run; ``check_dinov2_checkpoint`` reads that checkpoint as plain tensors first.
  * ``ImageArrayDataset``: a lazy (N, H, W, 3) uint8 array (numpy, memmap, zarr) as the torch Dataset
    of uint8 CHW tensors that torch-fidelity accepts, reading one block of rows at a time.
  * ``extract_features``: one pass of one extractor over a dataset, with an optional progress bar.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor
from tqdm import tqdm

from pipeline.cache.shards import file_sha256

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


def check_sha256(path: Path, expected_prefix: str) -> str:
    """sha256 of ``path``; a MetricsError unless it starts with ``expected_prefix`` (torch hub's naming)."""
    sha = file_sha256(path)
    if not sha.startswith(expected_prefix.lower()):
        raise MetricsError(
            f"Inception weights {path} have sha256 {sha[:16]}..., expected {expected_prefix}... (torch-fidelity's "
            f"{INCEPTION_WEIGHTS_FILE}); replace the file, or set metrics.inception_sha256={sha[:16]} to use "
            "these weights on purpose (numbers then do not match the ADM evaluator)")
    return sha


def load_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A weights file as {name: tensor}: safetensors, or ``torch.load(weights_only=True)`` (no code runs)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - untrusted bytes: any parser error means "not a weights file"
        raise MetricsError(f"could not load {what} from {path}: {type(e).__name__}: {_load_reason(e)} (only "
                           "plain tensors are read: safetensors or torch.save of a state dict)") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise MetricsError(f"could not load {what} from {path}: not a state dict of tensors "
                           f"(got {type(state).__name__})")
    return state


def _load_reason(e: Exception) -> str:
    """The line of a torch.load error that says why (not torch's advice to retry with weights_only=False)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    why = next((ln for ln in lines if "unsupported" in ln.lower() or "blocked" in ln.lower()), None)
    if why is None and lines and lines[0].startswith("Weights only load failed"):
        why = "holds objects other than tensors (refused by weights_only=True)"
    return (why or (lines[0] if lines else type(e).__name__))[:300]


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


def check_dinov2_checkpoint() -> None:
    """Read the hub's DINOv2 checkpoint as plain tensors before torch.hub unpickles it (weights_only=False).

    (torch.hub.load also runs the hub repo's own Python code: keep $TORCH_HOME/hub as trusted as
    site-packages.)
    """
    load_tensors(hub_dir() / "checkpoints" / DINOV2_CHECKPOINT, f"{DINOV2} weights")


def build_extractor(name: str, features: Sequence[str], *, device: str,
                    inception_weights: Path | None = None) -> FeatureExtractorBase:
    """torch-fidelity's ``create_feature_extractor`` with our registration and weights read as plain tensors.

    torch-fidelity's Inception constructor calls ``torch.load(path, weights_only=False)``: a hostile
    file would run code there. So the file is read here with ``load_tensors`` and the constructor
    gets an in-memory copy of those tensors (``torch.load`` accepts a file object).
    """
    ensure_registered()
    kwargs: dict[str, Any] = {"verbose": False}
    if name == INCEPTION:
        if inception_weights is None:
            raise MetricsError(f"{INCEPTION} needs a weights file (never the URL download)")
        buf = io.BytesIO()
        torch.save(load_tensors(inception_weights, "Inception weights"), buf)
        buf.seek(0)
        kwargs["feature_extractor_weights_path"] = buf
    try:
        with _cuda_device(device):
            return create_feature_extractor(name, list(features), cuda=device.startswith("cuda"), **kwargs)
    except (RuntimeError, KeyError) as e:
        if name != INCEPTION:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MetricsError(f"could not load Inception weights from {inception_weights}: {first[:300]}. Is it "
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
                     save_cpu_ram: bool, progress: bool = False) -> dict[str, torch.Tensor]:
    """{feature name: (N, D) float32 CPU tensor} from one pass over ``data``.

    torch-fidelity's ``get_featuresdict_from_dataset`` loop (same loader workers: none with
    ``save_cpu_ram``, else min(4, 2 x cores)), with a tqdm bar (rate, ETA) when ``progress``.
    """
    t0 = time.perf_counter()
    cuda = device.startswith("cuda")
    workers = 0 if save_cpu_ram else min(4, 2 * multiprocessing.cpu_count())
    loader = DataLoader(data, batch_size=min(batch_size, len(data)), drop_last=False, num_workers=workers,
                        pin_memory=cuda)
    parts: dict[str, list[torch.Tensor]] = {}
    bar = tqdm(total=len(data), unit="img", desc=f"features {extractor.get_name()}", disable=not progress,
               dynamic_ncols=True)
    with _cuda_device(device), torch.no_grad(), bar:
        for batch in loader:
            out = extractor.convert_features_tuple_to_dict(extractor(batch.cuda(non_blocking=True) if cuda else batch))
            for k, v in out.items():
                parts.setdefault(k, []).append(v.cpu())
            bar.update(len(batch))
    feats = {k: torch.cat(v) for k, v in parts.items()}
    dt = time.perf_counter() - t0
    log.info("%s features of %d images in %.1f s (%.1f img/s)", extractor.get_name(), len(data), dt,
             len(data) / max(dt, 1e-9))
    return feats
