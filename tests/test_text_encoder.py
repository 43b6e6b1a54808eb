"""The CLIP text encoder: the real BPE tokenizer offline, U-ViT's recipe, loading rules, fp16 error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from t2i_data import frozen_clip_embedder

from pipeline.cache.schema import TextSpec
from pipeline.cache.text import FP16_COS_BOUND, encode_text_sample
from pipeline.encoders import weights
from pipeline.encoders.text import clip_bpe_tokenizer, load_text_encoder, text_dim, tokenizer_descriptor
from stages.preprocess_text import one_minus_cos

# CLIP token ids, each from public test suites of independent CLIP tokenizer implementations that
# check against OpenAI's/Hugging Face's tokenizer: "a photo of a cat" (bumblebee's ClipText test,
# a Swift and a C++ CLIP tokenizer test), "Hello, world!" and "" (a JS BPE test suite), the rest
# (a Zig SDXL tokenizer test against the openai/clip-vit-large-patch14 files).
KNOWN_IDS = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "Hello, world!": [49406, 3306, 267, 1002, 256, 49407],
    "": [49406, 49407],
    "A PHOTO of  a Cat!": [49406, 320, 1125, 539, 320, 2368, 256, 49407],
    "don't stop 42 times": [49406, 847, 713, 1691, 275, 273, 1661, 49407],
    "a dog in the snow": [49406, 320, 1929, 530, 518, 2583, 49407],
}


@pytest.mark.parametrize("text,ids", list(KNOWN_IDS.items()))
def test_offline_tokenizer_gives_clip_ids(text, ids):
    assert clip_bpe_tokenizer()(text)["input_ids"] == ids


def test_tokenizer_pads_with_eos_and_truncates_to_77_keeping_eos():
    enc, _ = load_text_encoder("random:tiny")
    ids, cut = enc.tokenize(["a photo of a cat", "word " * 100])
    assert ids.shape == (2, 77) and ids.dtype == torch.int64
    assert ids[0, :7].tolist() == KNOWN_IDS["a photo of a cat"] and (ids[0, 7:] == 49407).all()
    assert ids[1, 0] == 49406 and ids[1, -1] == 49407 and cut.tolist() == [False, True]


def test_encoder_is_uvit_frozen_clip_embedder():
    enc, ident = load_text_encoder("random:tiny", seed=3)
    captions = ["A man with a red helmet on a small moped on a dirt road. ", "", "x " * 90]
    ref = frozen_clip_embedder(enc.tokenizer, enc.model)(captions)
    assert torch.equal(enc(captions), ref) and ref.shape == (3, 77, 32)
    # causal attention: a caption's encoding is the same alone or in a batch (no padding mask is passed)
    assert torch.allclose(enc(captions[:1])[0], ref[0], atol=1e-6)
    assert ident["tokenizer"]["pad_token_id"] == 49407 and ident["output"] == "last_hidden_state"
    again, ident2 = load_text_encoder("random:tiny", seed=3)
    assert ident2["weights_sha256"] == ident["weights_sha256"] != load_text_encoder("random:tiny", seed=4)[1]["weights_sha256"]


def test_l14_preset_has_clip_l_dims():
    assert text_dim("random:l14") == 768 and text_dim("openai/clip-vit-large-patch14") == 768
    assert text_dim("random:tiny") == 32


def test_local_folder_and_pipeline_root(tmp_path):
    enc, ident = load_text_encoder("random:tiny")
    folder = tmp_path / "clip"
    enc.model.save_pretrained(folder)
    enc.tokenizer.save_pretrained(folder)
    local, lid = load_text_encoder(str(folder))
    assert lid["weights_sha256"] == ident["weights_sha256"] and lid["tokenizer"]["sha256"] == ident["tokenizer"]["sha256"]
    assert torch.equal(local(["a cat"]), enc(["a cat"]))
    root = tmp_path / "sd"
    enc.model.save_pretrained(root / "text_encoder")
    enc.tokenizer.save_pretrained(root / "tokenizer")
    assert load_text_encoder(str(root))[1]["weights_sha256"] == ident["weights_sha256"]
    assert text_dim(str(root)) == 32 and tokenizer_descriptor(str(root))["files_sha256"] != "none"


def test_incomplete_local_folder_names_what_is_missing(tmp_path):
    enc, _ = load_text_encoder("random:tiny")
    enc.model.save_pretrained(tmp_path)
    with pytest.raises(weights.WeightsError, match=r"missing .*vocab.json \+ merges.txt \(or tokenizer.json\)"):
        load_text_encoder(str(tmp_path))


def test_offline_hub_id_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(weights, "cached_revision", lambda repo: None)
    with pytest.raises(weights.WeightsError, match="text encoder weights 'openai/clip-vit-large-patch14' are not in"):
        load_text_encoder("openai/clip-vit-large-patch14")


def test_fp16_storage_error_within_the_rounding_bound():
    enc, _ = load_text_encoder("random:tiny")
    x = enc(["a yellow square on a blue striped background", "", "A woman cutting a large white sheet cake."])
    err = one_minus_cos(x, x.half())
    assert 0 < float(err.max()) <= FP16_COS_BOUND
    # independent of the encoder: large-norm random tokens (CLIP's outputs have norms ~25) obey it too
    y = torch.randn(64, 77, 768) * 3
    assert float(one_minus_cos(y, y.half()).max()) <= FP16_COS_BOUND


def test_text_sample_refuses_fp16_overflow():
    spec = TextSpec(max_length=4, dim=3)
    with pytest.raises(ValueError, match="not finite in float16"):
        encode_text_sample(spec, np.full((1, 4, 3), 1e6, np.float32), ["x"])
    with pytest.raises(ValueError, match="K >= 1"):
        encode_text_sample(spec, np.zeros((0, 4, 3), np.float32), [])
