"""Image generation for evaluation: per-image seeds and labels, model loading, one batch → latents.

Image i depends on (seed, i) only (EDM2's per-sample generators; SPEC §5.4 ties noise to the
rank instead): its seed is a hashed base plus i, which drives its initial noise and,
for the SDE, its per-step noise; its label (or, text-to-image, its caption choice:
``pipeline.inputs.prompts``) comes from a second stream of the same pair. So a batch of 1 and a
batch of 256, on 1 or 8 ranks, give identical images.

``load_model`` reads SiT (class-conditional) and MM-DiT (text-conditional) checkpoints. The
checkpoint contract, for the trainer that writes them (all fields plain data or tensors, so
``torch.load(weights_only=True)`` reads them):

* EMA export ``ema-XXXXXXX.pt``: ``ema`` (state dict; ``projectors.*`` keys are dropped),
  ``steps``, ``model_config`` (the fields of the architecture's config: ``ModelConfig`` or
  ``MMDiTConfig``; a ``preset`` key resolves through that architecture's presets first),
  ``model_arch`` (``"sit"`` | ``"mmdit"``; also read as ``model_config["arch"]``; absent = ``"sit"``),
  ``latents`` (VAE identity, scale, bias, as now) and, for ``mmdit``:
  ``text`` = ``{"encoder": <name as given to pipeline.encoders.text, e.g. openai/clip-vit-large-patch14>,
  "seed": <int, random:* encoders>, "max_length": 77, "dim": 768, "dtype": "float16" | "float32"
  (how the training cache stored the encodings), "weights_sha256": <the encoder's state-dict sha256,
  as the text manifest records it>}`` (every key optional; ``name``/``hidden_size`` are accepted for
  ``encoder``/``dim``) and optionally ``text_null``, a float tensor (max_length, dim): the null
  (empty-caption) encoding the model was trained with.
* Training checkpoint ``step-XXXXXXX.pt`` + its JSON sidecar: the sidecar's ``config.model``
  (fields, optionally with ``arch``), or a top-level ``model_arch``; ``latents`` and ``text`` as
  above at the sidecar's top level; ``text_null`` may be in the ``.pt``.
* Official files (``ema`` + pickled argparse ``args``; Namespace allow-listed): SiT from
  ``args.model``; MM-DiT (recognised by its ``joint_blocks.*`` keys, ``train_t2i.py``/
  ``generate_t2i.py`` args) through ``official_mmdit_config``; their text encoder is U-ViT's CLIP
  ViT-L/14 (``openai/clip-vit-large-patch14``, fp32 features) and the null is encoded from "".
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
from trainer.models.mmdit import MMDIT_PRESETS, MMDiT, MMDiTConfig, mmdit_config, official_mmdit_config
from trainer.models.sit import SIT_PRESETS, ModelConfig, SiT, model_config
from trainer.sampling import PerSampleNoise, SamplerConfig, sample

log = logging.getLogger(__name__)

LabelMode = Literal["uniform", "balanced"]
Arch = Literal["sit", "mmdit"]
# architecture -> (network, config class, presets)
ARCHS: dict[str, tuple[type, type, dict[str, dict]]] = {
    "sit": (SiT, ModelConfig, SIT_PRESETS), "mmdit": (MMDiT, MMDiTConfig, MMDIT_PRESETS)}
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
class TextRecord:
    """What the text conditioning of an MM-DiT was: the encoder, its output shape and stored dtype."""

    encoder: str | None = None         # None: not recorded (official files): eval's default CLIP
    seed: int = 0                      # random:* encoders only
    max_length: int = 77
    dim: int = 768
    dtype: str = "float32"             # float16: eval rounds its encodings through fp16, as training saw them
    weights_sha256: str | None = None  # the encoder's state-dict sha256 (checked against eval's encoder)
    precision: str | None = None       # what the encode ran in at preprocess ("fp32" | "bf16"), when recorded


@dataclass(frozen=True)
class LoadedModel:
    model: SiT | MMDiT
    source: str                     # "ema-export", "checkpoint" or "official"
    step: int | None
    latents: dict[str, Any] | None  # vae identity, scale, bias, num_classes, when the file records them
    arch: str = "sit"
    text: TextRecord | None = None  # mmdit: the text conditioning
    text_null: torch.Tensor | None = None  # mmdit: (max_length, dim) float32 null encoding, when the file has one

    @property
    def conditioning(self) -> str:
        return "text" if self.arch == "mmdit" else "class"


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


def _official_mmdit(args: Any, overrides: dict[str, Any]) -> MMDiTConfig:
    """MMDiTConfig of an official T2I file (`args` of train_t2i.py / generate_t2i.py; None for a bare state dict)."""
    overrides = {**overrides, "z_dim": 0}  # sampling never runs the projector
    preset = overrides.pop("preset", None)
    if preset is not None:
        return mmdit_config(preset, **{"input_size": int(getattr(args, "resolution", 256)) // 8, **overrides})
    return official_mmdit_config(args, **overrides)


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


def _arch(path: Path, *candidates: Any) -> str:
    """The first recorded architecture among ``candidates`` (None = not recorded), default sit."""
    arch = next((a for a in candidates if a is not None), "sit")
    if arch not in ARCHS:
        raise RuntimeError(f"{path}: model architecture {arch!r} is not one of {sorted(ARCHS)}")
    return arch


def _config(path: Path, arch: str, fields: Any, overrides: dict[str, Any], where: str) -> ModelConfig | MMDiTConfig:
    if not isinstance(fields, dict):
        raise RuntimeError(f"{path}: {where} is a {type(fields).__name__}, not a mapping of model config fields")
    _, cls, presets = ARCHS[arch]
    fields = {k: v for k, v in fields.items() if k != "arch"}
    preset = fields.pop("preset", None)
    if preset is not None and preset not in presets:
        raise RuntimeError(f"{path}: {where} names preset {preset!r}, not a {arch} preset ({', '.join(presets)})")
    try:
        return cls(**{**presets.get(preset, {}), **fields, **_fields(overrides), "z_dim": 0})
    except (TypeError, ValueError) as e:
        raise RuntimeError(f"{path}: {where} does not describe a {cls.__name__} ({e})") from None


def _state_keys(ckpt: dict[str, Any]) -> list[str]:
    state = ckpt.get("ema", ckpt.get("model", ckpt))
    return [k for k in state if isinstance(k, str)] if isinstance(state, dict) else []


def _interpret(path: Path, ckpt: dict[str, Any], overrides: dict[str, Any]):
    """(source, arch, config, latents record, text record, null, ckpt) of a format eval reads, else one error."""
    if "model_config" in ckpt:
        fields = ckpt["model_config"]
        arch = _arch(path, ckpt.get("model_arch"), fields.get("arch") if isinstance(fields, dict) else None)
        cfg = _config(path, arch, fields, overrides, "'model_config'")
        return "ema-export", arch, cfg, ckpt.get("latents"), ckpt.get("text"), ckpt.get("text_null"), ckpt
    if path.with_suffix(".json").is_file() and "train_state" in ckpt:
        try:
            meta = checkpoint.load_meta(path)
            fields = meta["config"]["model"]
            arch = _arch(path, meta.get("model_arch"), fields.get("arch"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise RuntimeError(f"{path.with_suffix('.json')}: not the sidecar of a training checkpoint "
                               f"({type(e).__name__}: {e}; expected config.model)") from None
        cfg = _config(path, arch, fields, overrides, "the sidecar's config.model")
        return "checkpoint", arch, cfg, meta.get("latents"), meta.get("text"), ckpt.get("text_null"), ckpt
    if "args" in ckpt or "preset" in overrides:  # official file, or any file whose net the config describes
        preset = str(overrides.get("preset", ""))
        text = preset.startswith("MMDiT") or any(k.startswith("joint_blocks.") for k in _state_keys(ckpt))
        if "ema" not in ckpt and "model" not in ckpt:
            ckpt = {"ema": ckpt}  # a bare state dict
        try:
            cfg = _official_mmdit(ckpt.get("args"), overrides) if text else _official_config(ckpt.get("args"), overrides)
        except (TypeError, ValueError) as e:
            raise RuntimeError(f"{path}: cannot build the {'MM-DiT' if text else 'SiT'} it holds ({e})") from None
        return "official", "mmdit" if text else "sit", cfg, None, None, None, ckpt
    raise RuntimeError(f"{path}: not {EXPECTED} (no 'model_config', sidecar or 'args'); for a bare state dict "
                       "set eval.model.preset")


def _text_record(path: Path, raw: Any, cfg: MMDiTConfig) -> TextRecord:
    """The recorded text conditioning (absent: unknown encoder, the model's shape, fp32), checked against cfg."""
    if raw is None:
        return TextRecord(None, max_length=cfg.context_len, dim=cfg.context_dim)
    if not isinstance(raw, dict):
        raise RuntimeError(f"{path}: its 'text' record is a {type(raw).__name__}, not a mapping")
    encoder, seed = raw.get("encoder", raw.get("name")), raw.get("seed", 0)
    if isinstance(encoder, dict):  # a group identity ({name, seed, revision, ...}), as early MM-DiT runs wrote it
        encoder, seed = encoder.get("name"), encoder.get("seed", seed)
    if encoder is not None and not isinstance(encoder, str):
        raise RuntimeError(f"{path}: its text record names the encoder as a {type(encoder).__name__}, not a string")
    try:
        rec = TextRecord(encoder=encoder, seed=int(seed),
                         max_length=int(raw.get("max_length", cfg.context_len)),
                         dim=int(raw.get("dim", raw.get("hidden_size", cfg.context_dim))),
                         dtype=str(raw.get("dtype", "float32")), weights_sha256=raw.get("weights_sha256"),
                         precision=raw.get("precision"))
    except (TypeError, ValueError) as e:
        raise RuntimeError(f"{path}: its text record has a malformed seed, max_length or dim ({e})") from None
    if (rec.max_length, rec.dim) != (cfg.context_len, cfg.context_dim):
        raise RuntimeError(f"{path}: text record says {rec.max_length}x{rec.dim} encodings, the model takes "
                           f"{cfg.context_len}x{cfg.context_dim}")
    if rec.dtype not in ("float16", "float32"):
        raise RuntimeError(f"{path}: text dtype {rec.dtype!r} is not float16 or float32")
    return rec


def _text_null(path: Path, null: Any, cfg: MMDiTConfig) -> torch.Tensor | None:
    if null is None:
        return None
    shape = (cfg.context_len, cfg.context_dim)
    if not isinstance(null, torch.Tensor) or tuple(null.shape) != shape or not null.is_floating_point() \
            or not bool(torch.isfinite(null).all()):
        raise RuntimeError(f"{path}: 'text_null' must be a finite float tensor {shape}, got "
                           f"{getattr(null, 'dtype', type(null).__name__)} {tuple(getattr(null, 'shape', ()))}")
    return null.detach().to(torch.float32).cpu()


def load_model(path: str | Path, overrides: dict[str, Any] | None = None,
               device: torch.device | str = "cpu") -> LoadedModel:
    """The EMA weights of our ema export, our full checkpoint, or an official HASTE/REPA file (SiT or MM-DiT).

    Projector weights are dropped (sampling never uses them), so official files load whatever
    their ``--projector-embed-dims`` (SPEC §5.4's strict-load trap does not apply). Any other
    file is one RuntimeError naming it and what was expected. The formats: the module docstring.
    """
    path, overrides = Path(path), dict(overrides or {})
    source, arch, cfg, latents, text, null, ckpt = _interpret(path, _read(path), overrides)
    try:
        state = checkpoint.model_state_for_inference(ckpt)
    except RuntimeError as e:
        raise RuntimeError(f"{path}: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RuntimeError(f"{path}: its weights entry is a {type(state).__name__}, not a state dict of tensors")
    state = {k: v for k, v in state.items() if not k.startswith("projectors.")}
    model = ARCHS[arch][0](cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise RuntimeError(f"{path}: weights do not fit the model {cfg} ({first[1].strip() if len(first) > 1 else e})"
                           ) from None
    model.eval().requires_grad_(False).to(device)
    step = ckpt.get("steps")
    log.info("loaded %s (%s %s, step %s): %s", path, source, arch, step, cfg)
    text_rec = _text_record(path, text, cfg) if arch == "mmdit" else None
    text_null = _text_null(path, null, cfg) if arch == "mmdit" else None
    return LoadedModel(model, source, int(step) if step is not None else None, latents, arch, text_rec, text_null)


@torch.no_grad()
def generate_latents(model: SiT | MMDiT, seeds: np.ndarray, cond: np.ndarray | torch.Tensor, cfg: SamplerConfig,
                     dtype: torch.dtype = torch.float32, *, null_cond: torch.Tensor | None = None) -> torch.Tensor:
    """Sample one batch; row i depends only on seeds[i] and its condition. Returns float32 latents.

    SiT: ``cond`` = class labels (N,), the null is the class ``num_classes``. MM-DiT: ``cond`` = text
    contexts (N, L, D) and ``null_cond`` = the empty-caption encoding (L, D), the unconditional branch
    of CFG (the official ``y_null``).
    """
    device = next(model.parameters()).device
    m = model.cfg
    noise_source = PerSampleNoise(seeds.tolist())  # CPU generators: the same streams on every machine
    noise = noise_source.randn((len(seeds), m.in_channels, m.input_size, m.input_size), device=device).to(dtype)
    fn = lambda x, t, c: model(x, t, c).out  # noqa: E731
    if isinstance(model, MMDiT):
        if null_cond is None:
            raise ValueError("text-conditional sampling needs null_cond (the empty-caption encoding)")
        y = torch.as_tensor(cond, device=device, dtype=torch.float32)
        z = sample(fn, noise, y, cfg, null_cond=null_cond.to(device, torch.float32), generator=noise_source)
    else:
        y = torch.as_tensor(cond, device=device)
        z = sample(fn, noise, y, cfg, null_label=m.num_classes, generator=noise_source)
    return z.to(torch.float32)
