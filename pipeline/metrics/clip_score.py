"""CLIP score of text-to-image samples: mean over samples of 100 · max(cos(E_image, E_text), 0).

The common CLIPScore (Hessel et al. 2021, with torchmetrics' weight 100 instead of 2.5), defined
exactly as computed here:

* model: a transformers ``CLIPModel`` (both towers), default ``openai/clip-vit-large-patch14``
  (torchmetrics' ``CLIPScore`` default, and the text tower the T2I models are conditioned on);
* image: the uint8 sample, PIL bicubic resize of its short side to S (S = the vision tower's
  input, 224 for ViT-L/14; the long side ``int(S · long / short)``), centre crop S×S, /255,
  normalised with the model's mean/std (OpenAI's CLIP constants): the original CLIP preprocess
  and transformers' PIL ``CLIPImageProcessor``;
* text: the model's ``CLIPTokenizer``, truncated to its 77 positions (padding is masked);
* E_image = ``get_image_features`` (visual projection of the pooled class token), E_text =
  ``get_text_features`` (text projection of the end-of-text token), both in fp32;
* per sample 100 · max(cos(E_image, E_text), 0); ``clip_score`` is the mean over samples,
  ``clip_score_std`` the standard deviation. torchmetrics clamps the mean instead of each sample:
  the two agree whenever no cosine is negative, as for CLIP on real captions.

Weights are never downloaded here: a hub id must already be in the local Hugging Face cache, or a
local ``save_pretrained`` folder is named; otherwise ``clip_unavailable_reason`` says why and the
metric is skipped with that reason. transformers reads ``model.safetensors`` (or ``pytorch_model.bin``
with ``torch.load(weights_only=True)``); the weights files' sha256 is recorded, and required to start
with ``metrics.clip_sha256`` when that is set. ``random:tiny`` is a seeded random-init CLIP of the
same classes (tests), whose tokenizer the caller passes in (the metrics wing loads no text encoder).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from pipeline.metrics.extractors import MetricsError

log = logging.getLogger(__name__)

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))
RANDOM_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {"text_config": dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=77, projection_dim=16,
                                 bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
             "vision_config": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   image_size=32, patch_size=8, projection_dim=16)},
}


@dataclass(frozen=True)
class ClipScorer:
    """A loaded CLIP: model (eval, on its device), tokenizer, image size and normalisation, identity."""

    model: Any
    tokenizer: Any
    resize: int                      # the short side is resized to this, then
    image_size: int                  # the centre crop the vision tower takes
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str
    weights_sha256: str | None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


# ----------------------------------------------------------------------------
# The formula


def preprocess(images: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float],
               resize: int | None = None) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, size, size): PIL bicubic short side -> ``resize`` (default
    ``size``; the long side int(resize · long / short)), centre crop size × size, /255, normalise."""
    resize = resize or size
    out = []
    for img in images:
        pil = Image.fromarray(np.asarray(img, dtype=np.uint8))
        w, h = pil.size
        new_long = int(resize * max(w, h) / min(w, h))
        pil = pil.resize((resize, new_long) if w <= h else (new_long, resize), resample=Image.BICUBIC)
        w, h = pil.size
        top, left = (h - size) // 2, (w - size) // 2
        out.append(np.asarray(pil.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0)
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)  # (N, 3, S, S)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _features(out: Any) -> torch.Tensor:
    """get_*_features return the projected embedding (transformers 4) or an output with it as pooler_output (5)."""
    return (out.pooler_output if hasattr(out, "pooler_output") else out).float()


@torch.no_grad()
def clip_scores(images: Any, prompts: Sequence[str], scorer: ClipScorer, *, batch_size: int = 64,
                progress: bool = False) -> np.ndarray:
    """float64 (N,): 100 · max(cos(E_image_i, E_text_i), 0) for sample i and its prompt."""
    n, n_images = len(prompts), int(images.shape[0])
    if n_images != n:
        raise MetricsError(f"CLIP score needs one prompt per image: {n_images} images, {n} prompts")
    device, max_len = scorer.device, int(scorer.model.config.text_config.max_position_embeddings)
    scores = []
    for start in tqdm(range(0, n, batch_size), desc="CLIP score", unit="batch", disable=not progress,
                      dynamic_ncols=True):
        stop = min(start + batch_size, n)
        pixels = preprocess(np.asarray(images[start:stop]), scorer.image_size, scorer.mean, scorer.std,
                            scorer.resize).to(device)
        tok = scorer.tokenizer(list(prompts[start:stop]), padding=True, truncation=True, max_length=max_len,
                               return_tensors="pt")
        e_img = _features(scorer.model.get_image_features(pixel_values=pixels))
        e_txt = _features(scorer.model.get_text_features(input_ids=tok["input_ids"].to(device),
                                                         attention_mask=tok["attention_mask"].to(device)))
        cos = F.cosine_similarity(e_img, e_txt, dim=-1)  # (B,)
        scores.append((100.0 * cos.clamp(min=0.0)).double().cpu())
    return torch.cat(scores).numpy()


def clip_score_summary(scores: np.ndarray) -> dict[str, float]:
    return {"clip_score": float(np.mean(scores)), "clip_score_std": float(np.std(scores))}


# ----------------------------------------------------------------------------
# Weights: present or not (checked before sampling), loading


def clip_unavailable_reason(name: str) -> str | None:
    """Why the CLIP ``name`` cannot be loaded offline, or None. Reads file listings only."""
    if name.startswith("random:"):
        preset = name.split(":", 1)[1]
        return None if preset in RANDOM_PRESETS else f"unknown random CLIP preset {preset!r} ({list(RANDOM_PRESETS)})"
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            return f"CLIP model {path} is a file; expected a CLIPModel save_pretrained folder"
        missing = _missing_files(lambda f: (path / f).is_file())
        return f"CLIP folder {path} is incomplete: missing {', '.join(missing)}" if missing else None
    if name.startswith(("/", "./", "../", "~")):
        return f"CLIP model folder {name} not found"
    from huggingface_hub import try_to_load_from_cache

    missing = _missing_files(lambda f: isinstance(try_to_load_from_cache(name, f), str))
    if missing:
        return (f"CLIP weights {name} are not in the local Hugging Face cache (missing {', '.join(missing)}); "
                f"fetch them once (huggingface-cli download {name}) or set metrics.clip_model to a local "
                "CLIPModel folder")
    return None


def _missing_files(exists) -> list[str]:
    missing = [] if exists("config.json") else ["config.json"]
    if not any(exists(f) for f in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if not any(all(exists(f) for f in group) for group in TOKENIZER_FILES):
        missing.append("vocab.json + merges.txt (or tokenizer.json)")
    return missing


def load_clip_scorer(name: str, device: str | torch.device = "cpu", *, tokenizer: Any = None,
                     sha256: str | None = None, seed: int = 0) -> ClipScorer:
    """The CLIP ``name`` (hub id in the local cache, local folder, or ``random:<preset>`` with ``tokenizer``)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    why = clip_unavailable_reason(name)
    if why is not None:
        raise MetricsError(why)
    if name.startswith("random:"):
        if tokenizer is None:
            raise MetricsError(f"{name}: a random-init CLIP needs the caller's tokenizer")
        torch.manual_seed(seed)  # (the global RNG, as every random: preset; tests only)
        model = CLIPModel(CLIPConfig(**RANDOM_PRESETS[name.split(":", 1)[1]]))
        files: list[Path] = []
        size = resize = model.config.vision_config.image_size
        mean, std = OPENAI_MEAN, OPENAI_STD
    else:
        path = Path(name).expanduser()
        src = str(path) if path.exists() else name
        try:
            model = CLIPModel.from_pretrained(src, local_files_only=True)
            tokenizer = tokenizer or CLIPTokenizer.from_pretrained(src, local_files_only=True)
        except (OSError, ValueError) as e:
            raise MetricsError(f"could not load CLIP {name}: {str(e).splitlines()[0]}") from None
        files = _weight_files(name, path)
        resize, size, mean, std = _image_settings(name, path, model)
    digest = _sha256(files) if files else None
    if sha256 and (digest is None or not digest.startswith(sha256.lower())):
        raise MetricsError(f"CLIP {name}: weights sha256 {digest and digest[:16]}..., expected {sha256}... "
                           "(metrics.clip_sha256)")
    return ClipScorer(model.eval().requires_grad_(False).to(device), tokenizer, int(resize), int(size), tuple(mean),
                      tuple(std), name, digest)


def _weight_files(name: str, path: Path) -> list[Path]:
    if path.exists():
        found = [path / f for f in WEIGHT_FILES if (path / f).is_file()]
    else:
        from huggingface_hub import try_to_load_from_cache

        found = [Path(p) for f in WEIGHT_FILES if isinstance(p := try_to_load_from_cache(name, f), str)]
    return found[:1]  # the file transformers reads (safetensors first)


def _image_settings(name: str, path: Path, model: Any) -> tuple[int, int, tuple, tuple]:
    """Resize (short side), crop size, mean and std from preprocessor_config.json (plain JSON) when
    present, else CLIP's (the vision tower's input size for both)."""
    cfg_file: Any = path / "preprocessor_config.json" if path.exists() else None
    if cfg_file is None:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name, "preprocessor_config.json")
        cfg_file = Path(hit) if isinstance(hit, str) else None
    size = resize = model.config.vision_config.image_size
    mean, std = OPENAI_MEAN, OPENAI_STD
    if cfg_file is not None and cfg_file.is_file():
        pre = json.loads(cfg_file.read_text())
        crop, short = pre.get("crop_size", size), pre.get("size", resize)
        size = crop.get("height", size) if isinstance(crop, dict) else int(crop)
        resize = short.get("shortest_edge", resize) if isinstance(short, dict) else int(short)
        mean, std = tuple(pre.get("image_mean", mean)), tuple(pre.get("image_std", std))
    return int(resize), int(size), mean, std


def _sha256(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()
