"""The caption encoder: CLIP ViT-L/14's text model, ``last_hidden_state`` (77 x 768), U-ViT's recipe.

U-ViT ``libs/clip.py`` ``FrozenCLIPEmbedder`` (which HASTE's T2I extract script runs, SPEC §8):
``CLIPTokenizer`` + ``CLIPTextModel`` from ``openai/clip-vit-large-patch14``, tokens padded and
truncated to 77 (``padding="max_length"``, pad = ``<|endoftext|>`` 49407), the model called with
``input_ids`` only (causal mask, no padding mask), fp32, ``last_hidden_state`` (after the final
LayerNorm) of every position, padding included. ``TextEncoder`` does exactly that.

Weights follow the VAE/teacher rules (``pipeline.encoders.weights``): a hub id (local HF cache,
offline errors at once), a local folder (a CLIP or CLIPTextModel ``save_pretrained`` folder with its
tokenizer files, or a diffusers pipeline root with ``text_encoder/`` + ``tokenizer/``), or
``random:<preset>`` (seeded random init of the real architecture, ``l14``, or a ``tiny`` one).
Random presets use the real CLIP BPE tokenizer built offline from the vocabulary that
``open_clip_torch`` ships (``bpe_simple_vocab_16e6.txt.gz``, the file OpenAI's CLIP tokenizer reads),
so tests tokenize exactly as CLIP does without downloading anything.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import logging
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from pipeline.encoders import weights
from pipeline.encoders.vae import autocast

log = logging.getLogger(__name__)

DEFAULT_TEXT_ENCODER = "openai/clip-vit-large-patch14"
MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"   # ids 49406, 49407; EOS also pads (HF CLIPTokenizer default)
_CLIP_TEXT = dict(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                  bos_token_id=49406, eos_token_id=49407)
RANDOM_PRESETS: dict[str, dict[str, Any]] = {
    # CLIP ViT-L/14's text tower (openai/clip-vit-large-patch14 text_config): 123M parameters
    "l14": {**_CLIP_TEXT, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
            "num_attention_heads": 12, "projection_dim": 768},
    "tiny": {**_CLIP_TEXT, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "projection_dim": 32},
}
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# ----------------------------------------------------------------------------------------------
# The CLIP BPE tokenizer, offline
# ----------------------------------------------------------------------------------------------

def bpe_vocab_path() -> Path:
    """open_clip's copy of OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (found without importing open_clip)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise weights.WeightsError("the CLIP BPE vocabulary ships with open_clip_torch, which is not installed "
                                   "(pip install open_clip_torch)")
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP ``simple_tokenizer.bytes_to_unicode``: printable stand-ins for the 256 byte values."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def clip_bpe_tokenizer():
    """transformers ``CLIPTokenizer`` over OpenAI's BPE file, built as CLIP's ``SimpleTokenizer`` builds
    its vocabulary: 256 byte symbols, the same with ``</w>``, the first 48,894 merges, then
    ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407); 49,408 entries."""
    from transformers import CLIPTokenizer

    lines = gzip.open(bpe_vocab_path()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + [BOS, EOS]
    tok = CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=merges)
    tok.model_max_length = MAX_LENGTH
    return tok


def tokenizer_identity(tokenizer) -> dict[str, Any]:
    """What decides the token ids: the whole tokenizers pipeline (normaliser, BPE, post-processor)."""
    blob = tokenizer.backend_tokenizer.to_str().encode()
    return {"class": type(tokenizer).__name__, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "sha256": hashlib.sha256(blob).hexdigest()}


def tokenizer_descriptor(name: str) -> dict[str, str]:
    """The tokenizer's part of the text group key, without loading anything."""
    ref = weights.parse(name)
    if ref.kind == "random":
        return {"name": "clip-bpe", "vocab_sha256": weights.hash_files([bpe_vocab_path()])}
    if ref.kind == "local":
        assert ref.path is not None
        found = [p for d in (ref.path, ref.path / "tokenizer") for n in TOKENIZER_FILES if (p := d / n).is_file()]
        return {"name": "local", "files_sha256": weights.hash_files(found) if found else "none"}
    return {"name": "from the model repo"}  # its revision is in the model descriptor


KNOWN_DIMS = {DEFAULT_TEXT_ENCODER: 768}  # hub ids whose width is known without their config.json


def text_dim(name: str) -> int:
    """The encoder's width (the stored D) without loading its weights: preset, local or cached config.json."""
    import json

    ref = weights.parse(name)
    if ref.kind == "random":
        if ref.preset not in RANDOM_PRESETS:
            raise weights.WeightsError(f"unknown random text encoder preset {ref.preset!r} (known: {list(RANDOM_PRESETS)})")
        return int(RANDOM_PRESETS[ref.preset]["hidden_size"])
    config = None
    if ref.kind == "local":
        assert ref.path is not None
        config = next((p for p in (ref.path / "text_encoder" / "config.json", ref.path / "config.json") if p.is_file()),
                      None)
    elif ref.kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name, "config.json")
        config = Path(hit) if isinstance(hit, str) else None
    if config is None:
        if name in KNOWN_DIMS:
            return KNOWN_DIMS[name]
        raise weights.WeightsError(f"cannot tell the width of text encoder {name!r}: no config.json found locally")
    data = json.loads(config.read_text())
    return int(data.get("text_config", data)["hidden_size"])


# ----------------------------------------------------------------------------------------------
# The encoder
# ----------------------------------------------------------------------------------------------

class TextEncoder:
    """``encoder(captions) -> (N, max_length, D)`` fp32 ``last_hidden_state``, U-ViT's recipe."""

    def __init__(self, model: torch.nn.Module, tokenizer, max_length: int = MAX_LENGTH):
        limit = model.config.max_position_embeddings
        if not 0 < max_length <= limit:
            raise ValueError(f"text max_length {max_length} must be in [1, {limit}] (the model's positions)")
        self.model, self.tokenizer, self.max_length = model.eval().requires_grad_(False), tokenizer, max_length
        self.dim = int(model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, max_length) int64 ids (BOS ... EOS, EOS-padded, truncated) and (N,) bool: was truncated."""
        enc = self.tokenizer(list(captions), truncation=True, max_length=self.max_length, padding="max_length",
                             return_tensors="pt")
        full = self.tokenizer(list(captions), truncation=False)["input_ids"]
        return enc["input_ids"], torch.tensor([len(ids) > self.max_length for ids in full])

    @torch.no_grad()
    def __call__(self, captions: Sequence[str], precision: str = "fp32") -> torch.Tensor:
        ids, _ = self.tokenize(captions)
        return self.encode_ids(ids, precision)

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        device = self.device
        with autocast(device, precision):  # input_ids only: causal mask, no padding mask (as U-ViT)
            out = self.model(input_ids=ids.to(device)).last_hidden_state
        return out.float()


def load_text_encoder(name: str = DEFAULT_TEXT_ENCODER, *, seed: int = 0, device: torch.device | str = "cpu",
                      max_length: int = MAX_LENGTH) -> tuple[TextEncoder, dict[str, Any]]:
    """Return (TextEncoder in eval mode, identity dict for the manifest)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    ref = weights.parse(name)
    if ref.kind == "builtin":
        raise weights.WeightsError(f"unknown text encoder {name!r}: no builtin text encoders (use a hub id, a "
                                   f"local folder or random:<{'|'.join(RANDOM_PRESETS)}>)")
    if ref.kind == "random":
        model = weights.build_random(ref, RANDOM_PRESETS, seed, lambda **kw: CLIPTextModel(CLIPTextConfig(**kw)),
                                     "text encoder")
        tokenizer = clip_bpe_tokenizer()
    else:
        model, tokenizer = _load_pretrained(name, ref)
    enc = TextEncoder(model.to(device), tokenizer, max_length)
    identity = {"name": name, "source": ref.kind, "class": f"transformers.{type(model).__name__}",
                "weights_sha256": weights.state_dict_sha256(model), "params": sum(p.numel() for p in model.parameters()),
                "hidden_size": enc.dim, "max_length": max_length, "output": "last_hidden_state",
                "tokenizer": tokenizer_identity(tokenizer)}
    return enc, identity


def _load_pretrained(name: str, ref: weights.WeightsRef):
    from transformers import CLIPTextModel, CLIPTokenizer

    local_only = ref.kind == "local" or weights.require_hub(name, "text encoder")
    src = str(ref.path) if ref.kind == "local" else name
    sub_model, sub_tok = {}, {}
    if ref.kind == "local":
        assert ref.path is not None
        if (ref.path / "text_encoder").is_dir():  # a diffusers pipeline root
            sub_model, sub_tok = {"subfolder": "text_encoder"}, {"subfolder": "tokenizer"}
        _check_local(ref.path, sub_model.get("subfolder"), sub_tok.get("subfolder"))
    try:
        tokenizer = CLIPTokenizer.from_pretrained(src, local_files_only=local_only, **sub_tok)
        model = CLIPTextModel.from_pretrained(src, local_files_only=local_only, **sub_model)
    except (OSError, ValueError, EnvironmentError) as e:
        raise weights.WeightsError(f"could not load the text encoder from {name!r}: {str(e).splitlines()[0]} "
                                   "(expected a CLIP / CLIPTextModel folder or hub id with its tokenizer)") from None
    return model, tokenizer


def _check_local(path: Path, model_sub: str | None, tok_sub: str | None) -> None:
    """Name what a local folder lacks before transformers says something vaguer."""
    mdir, tdir = path / (model_sub or ""), path / (tok_sub or "")
    missing = []
    if not (mdir / "config.json").is_file():
        missing.append(str(mdir / "config.json"))
    if not any((mdir / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")) and not any(
            mdir.glob("model-*.safetensors")):
        missing.append(f"{mdir}/model.safetensors (or pytorch_model.bin)")
    if not (tdir / "tokenizer.json").is_file() and not all((tdir / f).is_file() for f in ("vocab.json", "merges.txt")):
        missing.append(f"{tdir}/vocab.json + merges.txt (or tokenizer.json)")
    if missing:
        raise weights.WeightsError(f"text encoder folder {path} is incomplete: missing {', '.join(missing)}")
