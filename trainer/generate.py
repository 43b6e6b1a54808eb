"""Image generation for evaluation: per-image seeds and labels, model loading, one batch → pixels.

Image i depends on (seed, i) only (EDM2's per-sample generators; SPEC §5.4 ties noise to the
rank instead): its seed is a hashed base plus i, which drives its initial noise and,
for the SDE, its per-step noise; its label comes from a second stream of the same pair. So a
batch of 1 and a batch of 256, on 1 or 8 ranks, give identical images.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from trainer import checkpoint
from trainer.models.sit import ModelConfig, SiT, model_config
from trainer.sampling import PerSampleNoise, SamplerConfig, sample

log = logging.getLogger(__name__)

LabelMode = Literal["uniform", "balanced"]
_LABEL_STREAM = 1  # SeedSequence spawn key that separates labels from noise


def image_seeds(seed: int, indices: Sequence[int]) -> np.ndarray:
    """uint32 seed of each image: a base hashed from ``seed`` plus i, so no two images share noise.

    (Hashing (seed, i) per image would collide: 50K draws from 2^32 repeat a seed with p ≈ 0.25,
    and torch's CPU generator keeps only 32 bits. EDM2 uses consecutive seeds the same way.)
    """
    base = int(np.random.SeedSequence(seed).generate_state(1)[0])
    return np.array([(base + int(i)) % 2**32 for i in indices], dtype=np.uint32)


def image_labels(seed: int, indices: Sequence[int], num_classes: int, mode: LabelMode = "uniform") -> np.ndarray:
    """Class of each image: uniform random (the ADM protocol, SPEC §5.4) or balanced (i mod K)."""
    if mode == "balanced":
        return np.asarray(indices, dtype=np.int64) % num_classes
    if mode != "uniform":
        raise ValueError(f"labels must be 'uniform' or 'balanced', got {mode!r}")
    return np.array([np.random.default_rng([seed, int(i), _LABEL_STREAM]).integers(num_classes) for i in indices],
                    dtype=np.int64)


@dataclass(frozen=True)
class LoadedModel:
    model: SiT
    source: str                     # "ema-export", "checkpoint" or "official"
    step: int | None
    latents: dict[str, Any] | None  # vae identity, scale, bias, num_classes, when the file records them


def _official_config(args: Any, overrides: dict[str, Any]) -> ModelConfig:
    """ModelConfig from an official checkpoint's argparse Namespace (`--model SiT-XL/2` etc.)."""
    overrides = dict(overrides)
    name = overrides.pop("preset", None) or getattr(args, "model", None)
    if name is None:
        raise RuntimeError("the checkpoint does not name its model (no args.model): set eval.model.preset "
                           "(e.g. --set model.preset=SiT-XL/2) and any other differing ModelConfig field")
    fields = {"input_size": int(getattr(args, "resolution", 256)) // 8,
              "num_classes": int(getattr(args, "num_classes", 1000)),
              "qk_norm": bool(getattr(args, "qk_norm", False)), "z_dim": 0}
    return model_config(name, **{**fields, **overrides})


def _fields(overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides for a file that records its own architecture: a preset name adds nothing there."""
    return {k: v for k, v in overrides.items() if k != "preset"}


EXPECTED = ("an EMA export (ema-*.pt), a training checkpoint (step-*.pt with its .json sidecar) or an official "
            "HASTE/REPA checkpoint (.pt with 'ema' and 'args')")


def _read(path: Path) -> dict[str, Any]:
    """``checkpoint.load`` (weights_only=True) with every parse failure as one line naming the file."""
    try:
        ckpt = checkpoint.load(path)
    except RuntimeError as e:  # already one line naming the file
        why = str(e)
        if "Weights only load failed" in why:  # torch's advice to retry unsafely, not the reason
            why = (f"cannot load checkpoint {path}: not a torch.save file of tensors and plain containers "
                   "(refused by weights_only=True)")
        raise RuntimeError(f"{why}; expected {EXPECTED}") from None
    except Exception as e:  # noqa: BLE001 - torch's parser raises KeyError/ValueError/... on non-torch bytes
        raise RuntimeError(f"{path} is not a PyTorch checkpoint ({type(e).__name__}: {e}); expected {EXPECTED}"
                           ) from None
    if not isinstance(ckpt, dict):
        raise RuntimeError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict; expected {EXPECTED}")
    return ckpt


def _config(path: Path, fields: Any, overrides: dict[str, Any], where: str) -> ModelConfig:
    if not isinstance(fields, dict):
        raise RuntimeError(f"{path}: {where} is a {type(fields).__name__}, not a mapping of ModelConfig fields")
    try:
        return ModelConfig(**{**fields, **_fields(overrides), "z_dim": 0})
    except (TypeError, ValueError) as e:
        raise RuntimeError(f"{path}: {where} does not describe a SiT ({e})") from None


def _interpret(path: Path, ckpt: dict[str, Any], overrides: dict[str, Any]):
    """(source, ModelConfig, latents record, ckpt) of one of the formats eval reads, else one clear error."""
    if "model_config" in ckpt:
        return "ema-export", _config(path, ckpt["model_config"], overrides, "'model_config'"), ckpt.get("latents"), ckpt
    if path.with_suffix(".json").is_file() and "train_state" in ckpt:
        try:
            meta = checkpoint.load_meta(path)
            fields = meta["config"]["model"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RuntimeError(f"{path.with_suffix('.json')}: not the sidecar of a training checkpoint "
                               f"({type(e).__name__}: {e}; expected config.model)") from None
        return "checkpoint", _config(path, fields, overrides, "the sidecar's config.model"), meta.get("latents"), ckpt
    if "args" in ckpt or "preset" in overrides:  # official file, or any file whose net the config describes
        cfg = _official_config(ckpt.get("args"), overrides)
        if "ema" not in ckpt and "model" not in ckpt:
            ckpt = {"ema": ckpt}  # a bare state dict
        return "official", cfg, None, ckpt
    raise RuntimeError(f"{path}: not {EXPECTED} (no 'model_config', sidecar or 'args'); for a bare state dict "
                       "set eval.model.preset")


def load_model(path: str | Path, overrides: dict[str, Any] | None = None,
               device: torch.device | str = "cpu") -> LoadedModel:
    """The EMA weights of our ema export, our full checkpoint, or an official HASTE/REPA file.

    Projector weights are dropped (sampling never uses them), so official files load whatever
    their ``--projector-embed-dims`` (SPEC §5.4's strict-load trap does not apply). Any other
    file is one RuntimeError naming it and what was expected.
    """
    path, overrides = Path(path), dict(overrides or {})
    source, cfg, latents, ckpt = _interpret(path, _read(path), overrides)
    try:
        state = checkpoint.model_state_for_inference(ckpt)
    except RuntimeError as e:
        raise RuntimeError(f"{path}: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RuntimeError(f"{path}: its weights entry is a {type(state).__name__}, not a state dict of tensors")
    state = {k: v for k, v in state.items() if not k.startswith("projectors.")}
    model = SiT(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise RuntimeError(f"{path}: weights do not fit the model {cfg} ({first[1].strip() if len(first) > 1 else e})"
                           ) from None
    model.eval().requires_grad_(False).to(device)
    step = ckpt.get("steps")
    log.info("loaded %s (%s, step %s): %s", path, source, step, cfg)
    return LoadedModel(model, source, int(step) if step is not None else None, latents)


@torch.no_grad()
def generate_latents(model: SiT, seeds: np.ndarray, labels: np.ndarray, cfg: SamplerConfig,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sample one batch; row i depends only on seeds[i] and labels[i]. Returns float32 latents."""
    device = next(model.parameters()).device
    m = model.cfg
    noise_source = PerSampleNoise(seeds.tolist())  # CPU generators: the same streams on every machine
    noise = noise_source.randn((len(seeds), m.in_channels, m.input_size, m.input_size), device=device).to(dtype)
    fn = lambda x, t, y: model(x, t, y).out  # noqa: E731
    y = torch.as_tensor(labels, device=device)
    z = sample(fn, noise, y, cfg, null_label=m.num_classes, generator=noise_source)
    return z.to(torch.float32)
