"""CLIP score and the text-to-image references: the formula on a tiny random-init CLIP (both towers)
against an independent computation (transformers' own PIL image processor and the towers called
directly), skip reasons, local weights with sha256, and FID references read from a caption source
(the U-ViT crop) or from U-ViT-style ``mu``/``sigma`` statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from t2i_data import make_coco, uvit_center_crop

from pipeline.encoders.text import clip_bpe_tokenizer
from pipeline.metrics.clip_score import ClipScorer, clip_scores, load_clip_scorer, preprocess
from pipeline.metrics.extractors import RANDOM_EXTRACTOR, MetricsError
from pipeline.metrics.scores import MetricsConfig, Preflight, compute_metrics, preflight, summary_line
from stages.eval_text import caption_reference

PROMPTS = ["a red square on a blue background", "three cats", "a photo of a giraffe eating leaves", "",
           "a very long caption " * 20]


@pytest.fixture(scope="module")
def scorer() -> ClipScorer:
    return load_clip_scorer("random:tiny", tokenizer=clip_bpe_tokenizer())


def _images(n: int = 5, h: int = 40, w: int = 56, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def independent_scores(images: np.ndarray, prompts: list[str], scorer: ClipScorer) -> np.ndarray:
    """The towers and projections called directly; pixels from transformers' PIL CLIP processor; numpy cosine."""
    from transformers import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": scorer.image_size},
                                 crop_size={"height": scorer.image_size, "width": scorer.image_size})
    pixels = proc(images=list(images), return_tensors="pt")["pixel_values"]
    m = scorer.model
    with torch.no_grad():
        img = m.visual_projection(m.vision_model(pixel_values=pixels).pooler_output).numpy()
        txt = []
        for p in prompts:  # one at a time: no padding at all
            ids = torch.tensor([scorer.tokenizer(p, truncation=True, max_length=77)["input_ids"]])
            txt.append(m.text_projection(m.text_model(input_ids=ids).pooler_output)[0].numpy())
    txt = np.stack(txt)
    cos = (img * txt).sum(1) / np.linalg.norm(img, axis=1) / np.linalg.norm(txt, axis=1)
    return 100 * np.maximum(cos, 0)


def test_preprocess_equals_transformers_pil_processor(scorer: ClipScorer) -> None:
    from transformers import CLIPImageProcessorPil

    for batch in (_images(2, 40, 56), _images(2, 56, 40, seed=1), _images(1, 33, 33, seed=2)):
        ours = preprocess(batch, 32, scorer.mean, scorer.std)
        ref = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})(
            images=list(batch), return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_clip_score_formula_equals_independent_computation(scorer: ClipScorer) -> None:
    images = _images()
    got = clip_scores(images, PROMPTS, scorer, batch_size=2)
    ref = independent_scores(images, PROMPTS, scorer)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert got.min() >= 0
    result = compute_metrics(images, MetricsConfig(extractor=RANDOM_EXTRACTOR, metrics=("clip",), device="cpu",
                                                   clip_model="random:tiny"),
                             prompts=PROMPTS, clip_tokenizer=scorer.tokenizer)
    assert result["clip_score"] == pytest.approx(ref.mean(), rel=1e-4, abs=1e-4)
    assert result["clip_score_std"] == pytest.approx(ref.std(), rel=1e-3, abs=1e-3)
    assert result["skipped"] == {} and result["clip_model"] == "random:tiny"


def test_negative_cosines_count_as_zero(scorer: ClipScorer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Flipping the text embedding negates every cosine: scores become max(-cos, 0), zero where cos > 0."""
    import pipeline.metrics.clip_score as cs

    images = _images(4)
    plain = clip_scores(images, PROMPTS[:4], scorer)
    real, calls = cs._features, []

    def flipped(out):
        calls.append(1)
        return real(out) * (1.0 if len(calls) % 2 else -1.0)  # image features first, then text

    monkeypatch.setattr(cs, "_features", flipped)
    negated = clip_scores(images, PROMPTS[:4], scorer)
    cos = independent_scores(images, PROMPTS[:4], scorer)  # 100·max(cos, 0)
    np.testing.assert_allclose(plain, cos, rtol=1e-4, atol=1e-4)
    assert np.all((plain == 0) | (negated == 0))               # never both positive
    assert np.all(negated >= 0) and np.all(plain >= 0)


def test_clip_is_skipped_with_the_reason(tmp_path: Path) -> None:
    images = _images(3)
    cfg = MetricsConfig(extractor=RANDOM_EXTRACTOR, metrics=("is", "clip"), is_splits=1, device="cpu",
                        clip_model="someone/not-a-cached-clip", save_cpu_ram=True)
    result = compute_metrics(images, cfg, prompts=PROMPTS[:3])
    assert "not in the local Hugging Face cache" in result["skipped"]["clip"] and "clip_score" not in result
    assert "is_mean" in result and "CLIP score skipped" in summary_line(result)
    no_prompts = compute_metrics(images, MetricsConfig(extractor=RANDOM_EXTRACTOR, metrics=("clip",),
                                                       device="cpu", clip_model="random:tiny"))
    assert "needs a prompt per sample" in no_prompts["skipped"]["clip"]
    incomplete = tmp_path / "clip"
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{}")
    assert "missing model.safetensors" in preflight(
        MetricsConfig(extractor=RANDOM_EXTRACTOR, metrics=("clip",), clip_model=str(incomplete))).clip_unavailable


def test_local_clip_folder_loads_with_its_sha256(scorer: ClipScorer, tmp_path: Path) -> None:
    folder = tmp_path / "clip-tiny"
    scorer.model.save_pretrained(folder)           # model.safetensors + config.json
    scorer.tokenizer.save_pretrained(folder)
    loaded = load_clip_scorer(str(folder))
    assert loaded.weights_sha256 and len(loaded.weights_sha256) == 64
    images = _images(2)
    np.testing.assert_allclose(clip_scores(images, PROMPTS[:2], loaded), clip_scores(images, PROMPTS[:2], scorer),
                               rtol=1e-5, atol=1e-5)
    assert load_clip_scorer(str(folder), sha256=loaded.weights_sha256[:12]).weights_sha256 == loaded.weights_sha256
    with pytest.raises(MetricsError, match="clip_sha256"):
        load_clip_scorer(str(folder), sha256="00000000")


# ----------------------------------------------------------------------------------------------
# FID references for text-to-image


def test_caption_source_reference_is_the_uvit_crop_of_each_image(tmp_path: Path) -> None:
    split = make_coco(tmp_path / "coco", "val2014")
    ref = caption_reference(f"coco:{split}", 32)
    assert ref.num_images == 10                                        # the uncaptioned image is not one
    files = sorted(split.glob("*.jpg"), key=lambda f: int(f.stem.rsplit("_", 1)[1]))
    files = [f for f in files if not f.stem.endswith("000000000042")]
    for i in (0, 3, 9):
        want = uvit_center_crop(32, 32, np.array(Image.open(files[i]).convert("RGB")))
        assert np.array_equal(ref.images[i].permute(1, 2, 0).numpy(), want)
    assert ref.cache_key() == caption_reference(f"coco:{split}", 32).cache_key() != \
        caption_reference(f"coco:{split}", 16).cache_key()


def test_fid_from_a_caption_source_equals_fid_from_the_same_crops_as_arrays(tmp_path: Path) -> None:
    ref = caption_reference("synthetic-captions:12", 32)
    crops = np.stack([ref.images[i].permute(1, 2, 0).numpy() for i in range(12)])
    np.savez(tmp_path / "ref.npz", arr_0=crops)
    samples = _images(8, 32, 32, seed=3)
    cfg = MetricsConfig(extractor=RANDOM_EXTRACTOR, metrics=("fid",), device="cpu", reference=str(tmp_path / "ref.npz"),
                        save_cpu_ram=True, fid_method="eigh")
    from_npz = compute_metrics(samples, cfg)
    from_source = compute_metrics(samples, cfg, checked=Preflight(None, None, ref))
    assert from_source["fid"] == pytest.approx(from_npz["fid"], rel=1e-9)
    assert from_source["reference_fid_stats"] == "computed from 12 reference images"


def test_uvit_style_statistics_npz(tmp_path: Path) -> None:
    """U-ViT's fid_stats_mscoco256_val.npz holds 'mu' (2048,) and 'sigma' (2048, 2048) (tools/fid_score.py)."""
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(300, 2048))
    np.savez(tmp_path / "fid_stats_mscoco256_val.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    cfg = MetricsConfig(extractor=RANDOM_EXTRACTOR, metrics=("fid",), device="cpu",
                        reference=str(tmp_path / "fid_stats_mscoco256_val.npz"), fid_method="eigh", save_cpu_ram=True)
    result = compute_metrics(_images(6, 32, 32), cfg)
    assert result["reference_fid_stats"] == "mu/sigma from fid_stats_mscoco256_val.npz" and result["fid"] > 0
