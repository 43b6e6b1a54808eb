"""``haste import uvit``: U-ViT/HASTE coco256_features (built here as the official scripts build them)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import tiny_preprocess_config
from t2i_data import (
    EMPTY_CAPTION_ID,
    NO_CAPTION_ID,
    expected_captions,
    frozen_clip_embedder,
    make_coco,
    make_uvit_features,
)

from pipeline.cache.reader import index_shard, open_cache, read_sample
from pipeline.cache.schema import LATENTS, TEACHER, TEXT, decode_members
from pipeline.encoders.text import load_text_encoder
from pipeline.encoders.vae import load_vae
from pipeline.inputs.prepared_formats import PreparedFormatError
from pipeline.inputs.uvit import open_uvit, png_check
from stages.cache_tools import verify
from stages.cli import main as cli
from stages.import_uvit import UViTImportConfig, run_import_uvit
from stages.preprocess import PreprocessError, run

pytestmark = pytest.mark.slow
RES, VAE = 32, "stabilityai/sd-vae-ft-ema"


def pcfg(out: Path, **kw):
    return tiny_preprocess_config(out, **{"resolution": RES, "shard_size": 4, "text_encoder": "random:tiny",
                                          "max_skip_fraction": 0.2, **kw})


@pytest.fixture(scope="module")
def uvit(tmp_path_factory) -> dict[str, Path]:
    """A tiny COCO and its U-ViT features: HASTE's clipped PNGs, and a copy with correctly saved PNGs."""
    data = tmp_path_factory.mktemp("t2i")
    split = make_coco(data / "coco")
    vae, _ = load_vae("random:tiny", seed=7)
    enc, _ = load_text_encoder("random:tiny", seed=7)
    clip = frozen_clip_embedder(enc.tokenizer, enc.model)
    feats = make_uvit_features(split, data / "coco32_features" / "train", vae, clip, RES)
    good = make_uvit_features(split, data / "good_features" / "train", vae, clip, RES, png_mode="uint8")
    return {"split": split, "feats": feats, "good": good}


def decoded(root: Path, kind: str, **keys) -> dict[str, dict]:
    c = open_cache(root, need_teacher=kind == TEACHER, need_text=kind == TEXT, **keys)
    m = {LATENTS: c.latents, TEACHER: c.teacher, TEXT: c.text}[kind]
    out = {}
    for s in range(len(m.shards)):
        p = c.shard_path(kind, s)
        out.update({e[0]: decode_members(kind, m.spec, read_sample(p, e), where="") for e in index_shard(p)})
    return out


def test_import_with_coco_originals_round_trip(uvit, tmp_path):
    root = tmp_path / "cache"
    run(pcfg(root, source=f"coco:{uvit['split']}"))            # a preprocess of the same COCO first
    teacher_before = {p.name: p.stat().st_mtime_ns for p in root.glob("teacher/*/shard-*.tar")}
    res = run_import_uvit(UViTImportConfig(src=str(uvit["feats"]), vae=VAE, images=str(uvit["split"]),
                                           preprocess=pcfg(root)))
    assert res["status"] == "built"
    # the teacher comes from the COCO originals: the very group `haste preprocess` made, reused untouched
    assert len(list(root.glob("teacher/*"))) == 1
    assert {p.name: p.stat().st_mtime_ns for p in root.glob("teacher/*/shard-*.tar")} == teacher_before
    lat = decoded(root, LATENTS)
    text = decoded(root, TEXT)
    keys = sorted(int(k) for k in lat)
    assert list(text) == list(lat) and str(NO_CAPTION_ID) not in lat and len(lat) == 10
    want = expected_captions()
    ids = sorted([int(k) for k in want] + [NO_CAPTION_ID])           # feature i = i-th sorted image id
    for key in map(str, keys):
        i = ids.index(int(key))
        raw = np.load(uvit["feats"] / f"{i}.npy")                    # mean ++ logvar
        mean, logvar = raw[:4], raw[4:]
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
        assert np.array_equal(lat[key]["moments"], np.concatenate([mean, std]).astype(np.float16))
        k = len(text[key]["text"])
        ctx = np.stack([np.load(uvit["feats"] / f"{i}_{j}.npy") for j in range(k)])
        assert np.array_equal(text[key]["text"], ctx.astype(np.float16))
        if int(key) == EMPTY_CAPTION_ID:       # U-ViT encoded its empty caption too: 4 vs our 3, strings unknown
            assert text[key]["captions"] == [None] * 4
        else:
            assert text[key]["captions"] == want[key]
    cache = open_cache(root, need_text=True)
    empty = np.load(uvit["feats"].parent / "empty_context.npy")
    assert np.array_equal(cache.text_null().numpy(), empty.astype(np.float16))
    assert cache.latents.settings["imported_from"]["format"] == "uvit" and cache.text.settings["precision"] == "imported"
    assert cache.text.models["text_encoder"]["source"] == "imported"
    assert cache.text.settings["fp16_error"]["one_minus_cos_max"] > 0
    report = verify(root, samples=3)
    assert report["ok"], report
    imported = {f"latents/{cache.latents.key}", f"text/{cache.text.key}"}
    assert len(report["groups"]) == 5 and imported <= set(report["groups"])   # + preprocess's latents, teacher, text
    for name, g in report["groups"].items():  # nothing to recompute for imported groups; the others are compared
        assert ("imported" in g["fresh"].get("skipped", "")) == (name in imported)
    again = run_import_uvit(UViTImportConfig(src=str(uvit["feats"]), vae=VAE, images=str(uvit["split"]),
                                             preprocess=pcfg(root)))
    assert again["status"] == "up-to-date"
    # a kill between the manifests and the index write: the rerun records the complete groups
    index = json.loads((root / "index.json").read_text())
    (root / "index.json").write_text(json.dumps({**index, "runs": index["runs"][:-1]}))
    fixed = run_import_uvit(UViTImportConfig(src=str(uvit["feats"]), vae=VAE, images=str(uvit["split"]),
                                             preprocess=pcfg(root)))
    assert fixed["status"] == "repaired" and json.loads((root / "index.json").read_text())["runs"] == index["runs"]


def test_hastes_pngs_are_clipped_and_refused(uvit, tmp_path):
    pngs = sorted(uvit["feats"].glob("*.png"))
    clipped = png_check(pngs)
    assert clipped["clipped"] and clipped["zero_fraction"] > 0.3
    assert not png_check(sorted(uvit["good"].glob("*.png")))["clipped"]
    with pytest.raises(PreprocessError, match=r"PNGs in .* are clipped: .* --images <coco>/train2014"):
        run_import_uvit(UViTImportConfig(src=str(uvit["feats"]), vae=VAE, preprocess=pcfg(tmp_path / "c")))
    assert not (tmp_path / "c").exists()                               # refused before anything was written


def test_pngs_without_teacher_or_when_saved_correctly(uvit, tmp_path):
    res = run_import_uvit(UViTImportConfig(src=str(uvit["feats"]), vae=VAE,
                                           preprocess=pcfg(tmp_path / "a", teacher="none")))
    assert set(res["groups"]) == {"latents", "text"}
    text = decoded(tmp_path / "a", TEXT)
    ids = sorted([int(k) for k in expected_captions()] + [NO_CAPTION_ID])
    assert sorted(text, key=int) == [str(i) for i in range(11) if i != ids.index(NO_CAPTION_ID)]
    assert all(all(c is None for c in s["captions"]) for s in text.values())  # strings unknown without COCO
    res = run_import_uvit(UViTImportConfig(src=str(uvit["good"]), vae=VAE, preprocess=pcfg(tmp_path / "b")))
    cache = open_cache(tmp_path / "b", need_text=True)
    assert cache.teacher is not None and cache.teacher.num_samples == cache.text.num_samples == 10
    assert cache.teacher.settings["transform"]["crop"] == "center-crop-uvit"


def test_broken_features_are_named(uvit, tmp_path):
    bad = Path(shutil.copytree(uvit["feats"].parent, tmp_path / "f")) / "train"
    (bad / "3_0.npy").unlink()
    (bad / "5.npy").unlink()
    with pytest.raises(PreparedFormatError, match=r"2 problem\(s\).*5.npy is missing.*3_0.npy is missing"):
        open_uvit(bad)
    bad2 = Path(shutil.copytree(uvit["feats"].parent, tmp_path / "g")) / "train"
    np.save(bad2 / "4_1.npy", np.zeros((77, 16), np.float32))
    with pytest.raises(PreparedFormatError, match=r"4_1.npy: expected float32 \[77, 32\], found float32 \[77, 16\]"):
        run_import_uvit(UViTImportConfig(src=str(bad2), vae=VAE, preprocess=pcfg(tmp_path / "c", teacher="none")))


def test_cli_import_uvit(uvit, tmp_path, restore_logging):
    sets = [x for k, v in (("out", tmp_path / "c"), ("resolution", RES), ("shard_size", 4), ("teacher", "none"),
                           ("max_skip_fraction", 0.2), ("num_workers", 0)) for x in ("--set", f"{k}={v}")]
    res = CliRunner().invoke(cli, ["import", "uvit", str(uvit["feats"]), "--vae", VAE, "--dry-run", *sets])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert plan["import"]["count"] == 11 and plan["groups"]["text"]["captions"] == 23
    res = CliRunner().invoke(cli, ["import", "uvit", str(uvit["feats"]), *sets])
    assert res.exit_code == 1 and "config field 'vae'" in res.output
    res = CliRunner().invoke(cli, ["import", "uvit", str(uvit["feats"]), "--vae", VAE, *sets])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["status"] == "built"
