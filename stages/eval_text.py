"""The text-to-image side of ``haste eval``: prompts, their CLIP encodings, the null, caption-source references.

With ``prompts`` set (or an MM-DiT checkpoint), ``stages.evaluate`` samples image i from prompt i
(``pipeline.inputs.prompts``: COCO val2014 in sorted image-id order, one caption per image, or a
prompt file) with CFG against the null encoding, stores the prompt strings beside the images, and
scores them (FID against COCO statistics, CLIP score).

Prompts are encoded at eval time, from their strings, by the text encoder the checkpoint records
(its name, seed, and weights sha256, which must match), default CLIP ViT-L/14: the COCO val split
is usually not preprocessed, a prompt file never is, and 30K captions are about a minute of CLIP
on a GPU. When training stored its encodings in fp16 (the cache default) the eval encodings are
rounded through fp16 too, so the model sees exactly the values it was trained on. The null is the
checkpoint's ``text_null`` when it carries one, else the encoding of "" by the same encoder
(U-ViT's ``empty_context.npy`` is exactly that).

A ``metrics.reference`` of the form ``coco:<root>/val2014`` (or ``captions:...``,
``synthetic-captions:<n>``) is read as images: each cropped as preprocess crops it (U-ViT's centre
crop for captioned sources) at the sample size, and the FID statistics are computed from them
(``metrics.cache_root`` keeps their features); an ``.npz`` with ``mu``/``sigma``, such as U-ViT's
``fid_stats_mscoco256_val.npz``, is read as for ImageNet.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.encoders.text import DEFAULT_TEXT_ENCODER, TextEncoder, clip_bpe_tokenizer, load_text_encoder
from pipeline.inputs.captions import CaptionedSource, open_input
from pipeline.inputs.images import DEFAULT_MAX_PIXELS, SkipImage
from pipeline.inputs.prompts import PromptSource, open_prompts, prompts_sha256, select_prompts
from pipeline.metrics.extractors import MetricsError
from pipeline.metrics.reference import Reference
from trainer.generate import LoadedModel

log = logging.getLogger(__name__)

CAPTION_SOURCES = ("coco:", "captions:", "synthetic-captions:")  # reference specs read as images (prefix only)


@dataclass(frozen=True)
class TextSide:
    """Everything the sampler needs for text: the prompts in sample order, their encoder, the null."""

    source: PromptSource
    prompts: list[str]        # prompt of sample i, i < num_samples
    entries: np.ndarray       # int64 entry (COCO image / prompt line) of sample i: stored as its label
    encoder: TextEncoder
    identity: dict[str, Any]  # the encoder's (pipeline.encoders.text)
    null: torch.Tensor        # (L, D) float32 on the encoder's device
    null_from: str            # "checkpoint" or "encoded"
    fp16: bool                # round encodings through fp16 (the training cache stored fp16)
    precision: str

    @property
    def width(self) -> int:
        return max(len(p) for p in self.prompts)

    def contexts(self, idx: np.ndarray, batch_size: int) -> torch.Tensor:
        """(len(idx), L, D) float32 encodings of the prompts of samples ``idx``."""
        parts = [self.encoder([self.prompts[i] for i in idx[b:b + batch_size]], precision=self.precision)
                 for b in range(0, len(idx), batch_size)]
        return _round(torch.cat(parts), self.fp16)

    def meta(self, caption: str) -> dict[str, Any]:
        """The store's record of the text side: any change makes another sample set."""
        null = self.null.detach().cpu().numpy().astype(np.float32)
        return {"conditioning": "text",
                "prompts": {"source": self.source.spec, "entries_sha256": self.source.sha256(), "caption": caption,
                            "sha256": prompts_sha256(self.prompts)},
                "text_encoder": {"name": self.identity["name"], "weights_sha256": self.identity["weights_sha256"],
                                 "precision": self.precision, "fp16_rounding": self.fp16},
                "text_null": {"from": self.null_from, "sha256": hashlib.sha256(null.tobytes()).hexdigest()}}


def _round(x: torch.Tensor, fp16: bool) -> torch.Tensor:
    return x.half().float() if fp16 else x.float()


def prepare_text(cfg: Any, loaded: LoadedModel, device: torch.device) -> TextSide:
    """Prompts for samples 0..num_samples-1, the checked text encoder and the null; one error if they do not fit."""
    if loaded.conditioning != "text":
        raise ValueError(f"eval.prompts is set but the checkpoint is a class-conditional {loaded.arch}; "
                         "unset prompts (or pass an MM-DiT checkpoint)")
    if cfg.prompts is None:
        raise ValueError("the checkpoint is a text-to-image MM-DiT: set eval.prompts (e.g. coco:/data/coco/val2014 "
                         "or file:prompts.txt)")
    rec, m = loaded.text, loaded.model.cfg
    assert rec is not None
    source = open_prompts(cfg.prompts)
    if cfg.num_samples > len(source):
        log.warning("%d samples from %d prompt entries: sample i uses entry i mod %d", cfg.num_samples, len(source),
                    len(source))
    prompts, entries = select_prompts(source, cfg.seed, range(cfg.num_samples), cfg.caption)
    name = cfg.text_encoder or rec.encoder or DEFAULT_TEXT_ENCODER
    encoder, identity = load_text_encoder(name, seed=rec.seed if name == rec.encoder else 0, device=device,
                                          max_length=m.context_len)
    if encoder.dim != m.context_dim:
        raise ValueError(f"text encoder {name} gives {encoder.dim}-dim features; the model takes {m.context_dim}")
    if rec.weights_sha256 and rec.weights_sha256 != identity["weights_sha256"]:
        why = (f"the checkpoint was trained with text encoder {rec.encoder} (weights sha256 "
               f"{rec.weights_sha256[:16]}...), {name} has {identity['weights_sha256'][:16]}...")
        if cfg.text_encoder is None:
            raise ValueError(why + "; name the encoder it was trained with in eval.text_encoder")
        log.warning("%s (eval.text_encoder chosen on purpose)", why)
    if rec.precision and rec.precision != cfg.text_precision:
        log.warning("the training captions were encoded in %s, the prompts are encoded in %s (eval.text_precision)",
                    rec.precision, cfg.text_precision)
    fp16 = rec.dtype == "float16"
    if loaded.text_null is not None:
        null, null_from = loaded.text_null.to(device), "checkpoint"
    else:
        null, null_from = encoder([""], precision=cfg.text_precision)[0], "encoded"
    log.info("prompts %s (%d entries, caption %s); text encoder %s; null %s", source.spec, len(source), cfg.caption,
             name, null_from)
    return TextSide(source, prompts, entries, encoder, identity, _round(null, fp16), null_from, fp16,
                    cfg.text_precision)


# ----------------------------------------------------------------------------------------------
# Reference images from a caption source


class SourceImages(Dataset):
    """uint8 (3, S, S) crops of a caption source's images, exactly as preprocess crops them."""

    def __init__(self, spec: str, size: int) -> None:
        src = open_input(spec)
        if not isinstance(src, CaptionedSource):
            raise MetricsError(f"metrics.reference {spec!r} is not a caption source")
        self.src, self.size = src, size
        self.items = [it for it in src.items if it.key not in src.uncaptioned]  # what preprocess would encode

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.items[i]
        try:
            arr = self.src.load(item, self.size, DEFAULT_MAX_PIXELS)
        except SkipImage as e:
            raise MetricsError(f"reference image {item.path or item.key}: {e.reason}") from None
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    def identity(self) -> dict[str, Any]:
        """What the features depend on (Reference.cache_key): listing, location, crop and size."""
        return {"source": self.src.identity(), "location": self.src.location, "transform": self.src.transform,
                "size": self.size}


def is_caption_source(spec: str | None) -> bool:
    return bool(spec) and spec.startswith(CAPTION_SOURCES)


def caption_reference(spec: str, size: int) -> Reference:
    """The images of a caption source as a FID reference (statistics computed from them)."""
    return Reference(spec, images=SourceImages(spec, size))


def clip_tokenizer(name: str) -> Any:
    """The tokenizer a ``random:`` CLIP needs (real CLIPs load their own): CLIP's BPE, offline."""
    return clip_bpe_tokenizer() if name.startswith("random:") else None
