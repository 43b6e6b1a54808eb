"""``haste preprocess`` on a COCO-layout folder: latents + teacher + text groups, aligned, resumable,
verifiable; the text reader API (``need_text`` / ``with_text``) that text-to-image training streams."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_preprocess_config
from t2i_data import EMPTY_CAPTION_ID, NO_CAPTION_ID, expected_captions, frozen_clip_embedder, make_coco

from pipeline.cache import shards
from pipeline.cache.loader import CacheStream, make_loader
from pipeline.cache.reader import (
    CacheMismatchError,
    Requirements,
    check_cache,
    index_shard,
    open_cache,
    read_sample,
)
from pipeline.cache.schema import LATENTS, TEACHER, TEXT, decode_members, read_manifest
from pipeline.cache.text import FP16_COS_BOUND, caption_choice, gather_captions
from pipeline.dist import DistInfo
from pipeline.encoders.text import load_text_encoder
from stages.cache_tools import format_info, info, verify
from stages.cli import main as cli
from stages.preprocess import plan_groups, run
from stages.preprocess_text import encode_text_shards

pytestmark = pytest.mark.slow


def coco_config(out: Path, split: Path, **kw):
    base = dict(source=f"coco:{split}", resolution=32, shard_size=4, text_encoder="random:tiny", text_batch_size=3,
                max_skip_fraction=0.2)
    return tiny_preprocess_config(out, **{**base, **kw})


@pytest.fixture(scope="session")
def coco_cache(tmp_path_factory) -> tuple[Path, Path]:
    """(cache root, COCO split folder): 11 images (one without captions), 3 shards of 4; read-only."""
    data = tmp_path_factory.mktemp("coco")
    split = make_coco(data)
    out = tmp_path_factory.mktemp("coco_cache")
    run(coco_config(out, split))
    return out, split


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.glob("*/*/shard-*.tar")) + sorted(root.glob("*/*/codec/*.npy"))}


def samples(root: Path, kind: str) -> list[tuple[str, dict]]:
    c = open_cache(root, need_text=True)
    m = {LATENTS: c.latents, TEACHER: c.teacher, TEXT: c.text}[kind]
    out = []
    for s in range(len(m.shards)):
        path = c.shard_path(kind, s)
        out += [(e[0], decode_members(kind, m.spec, read_sample(path, e), where=str(path))) for e in index_shard(path)]
    return out


# ----------------------------------------------------------------------------------------------
# the cache


def test_coco_folder_gives_three_aligned_groups(coco_cache):
    root, _ = coco_cache
    cache = open_cache(root, need_text=True)
    assert cache.text is not None and cache.teacher is not None
    keys = {kind: [k for k, _ in samples(root, kind)] for kind in (LATENTS, TEACHER, TEXT)}
    assert keys[LATENTS] == keys[TEACHER] == keys[TEXT] and len(keys[TEXT]) == 10
    assert str(NO_CAPTION_ID) not in keys[TEXT]
    for m in (cache.latents, cache.teacher, cache.text):        # skipped in every group, with the reason
        assert m.skipped == [(str(NO_CAPTION_ID), "no caption (missing annotation)")]
        assert m.settings["transform"]["crop"] == "center-crop-uvit"
        assert m.settings["transform"]["exif_orientation"] == "ignored"
    assert [s.count for s in cache.text.shards] == [4, 3, 3]


def test_text_samples_are_every_caption_through_uvits_recipe(coco_cache):
    root, _ = coco_cache
    cache = open_cache(root, need_text=True)
    enc, _ = load_text_encoder("random:tiny", seed=0)
    ref = frozen_clip_embedder(enc.tokenizer, enc.model)     # U-ViT's FrozenCLIPEmbedder, fp32
    want = expected_captions()
    for key, sample in samples(root, TEXT):
        assert sample["captions"] == want[key]                 # every caption, annotation-file order
        exact = ref(want[key]).numpy()
        assert sample["text"].dtype == np.float16 and sample["text"].shape == (len(want[key]), 77, 32)
        np.testing.assert_allclose(sample["text"].astype(np.float32), exact, rtol=2e-3, atol=2e-3 * np.abs(exact).max())
    null = cache.text_null()
    assert null.dtype == torch.float16 and torch.equal(null, ref([""])[0].half())
    s = cache.text.settings
    assert s["captions"]["total"] == sum(len(c) for c in want.values())
    assert s["captions"]["max_per_image"] == 4 and s["captions"]["truncated"] == 0
    assert sorted(r for _, r in s["captions"]["dropped"]) == ["caption is not a string (NoneType)", "empty caption"]
    assert 0 < s["fp16_error"]["one_minus_cos_max"] <= FP16_COS_BOUND
    assert s["bytes_per_image"] == round(sum(r.bytes for r in cache.text.shards) / 10)


def test_cache_info_and_verify_accept_it(coco_cache):
    root, _ = coco_cache
    out = format_info(info(root))
    assert "[text]" in out and "captions 22 (2.2 per image, 2 dropped, 0 truncated)" in out
    assert "fp16 vs fp32: 1 - cos per token max" in out and "codec/empty_caption.npy" in out
    report = verify(root, samples=4)
    assert report["ok"], report
    fresh = {k.split("/")[0]: g["fresh"] for k, g in report["groups"].items()}
    assert fresh["text"]["weights_match"] and fresh["text"]["max_rel_error"]["text"] < 1e-2
    assert fresh["latents"].get("max_rel_error") and fresh["teacher"].get("max_rel_error")  # sources reopened


def test_verify_catches_a_replaced_null_file(coco_cache, tmp_path):
    root = Path(shutil.copytree(coco_cache[0], tmp_path / "c"))
    null = next(root.glob("text/*/codec/empty_caption.npy"))
    data = bytearray(null.read_bytes())
    data[-2] ^= 0x40
    null.write_bytes(bytes(data))
    report = verify(root, samples=1, with_models=False)
    assert not report["ok"] and any("empty_caption.npy: sha256 differs" in e for g in report["groups"].values()
                                    for e in g["errors"])
    with pytest.raises(ValueError, match="sha256 differs"):
        open_cache(root, need_text=True).text_null()


def test_dry_run_projects_the_text_size(coco_cache, tmp_path):
    root, split = coco_cache
    report = run(coco_config(tmp_path / "new", split), dry_run=True)
    t = report["groups"]["text"]
    assert t["captions"] == 22 and t["uncaptioned_images"] == 1 and t["dropped_captions"] == 2
    assert t["bytes_per_caption"] == 77 * 32 * 2 and t["fp16_error_bound"]["one_minus_cos_per_token"] == FP16_COS_BOUND
    actual = sum(r.bytes for r in open_cache(root, need_text=True).text.shards)
    assert abs(t["projected_bytes"] - actual) / actual < 0.05


def test_bad_captions_logged_once_each(tmp_path, caplog):
    split = make_coco(tmp_path / "data")
    with caplog.at_level(logging.WARNING):
        run(coco_config(tmp_path / "c", split, teacher="none"))
    lines = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("dropping caption") for m in lines) == 2
    assert sum(m.startswith(f"skipping input {NO_CAPTION_ID}") for m in lines) == 1
    assert f"dropping caption {EMPTY_CAPTION_ID}#ann9001: empty caption" in lines


def test_uncaptioned_images_count_against_max_skip_fraction(tmp_path):
    split = make_coco(tmp_path / "data")
    with pytest.raises(RuntimeError, match="1 of 11 inputs .* could not be used"):
        run(coco_config(tmp_path / "c", split, teacher="none", max_skip_fraction=0.01))


# ----------------------------------------------------------------------------------------------
# resume, reuse, rank split


def test_interrupted_text_pass_resumes_byte_identical(coco_cache, tmp_path, monkeypatch):
    ref_root, split = coco_cache
    out = tmp_path / "c"
    original, count = shards.ShardWriter.add, [0]

    def add(self, key, members):
        if self.path.parent.parent.name == "text":
            count[0] += 1
            if count[0] == 6:  # shard 0 committed, shard 1 half written
                raise KeyboardInterrupt("killed")
        original(self, key, members)

    monkeypatch.setattr(shards.ShardWriter, "add", add)
    with pytest.raises(KeyboardInterrupt):
        run(coco_config(out, split))
    # shard 1 (its write failed) never appears complete; shard 2 may or may not have been written meanwhile
    done = {p.name for p in out.glob("text/*/shard-*.tar")}
    assert "shard-000000.tar" in done and "shard-000001.tar" not in done
    assert not list(out.glob("text/*/progress/shard-000001.tar.json")) and not list(out.glob("text/*/manifest.json"))
    monkeypatch.setattr(shards.ShardWriter, "add", original)
    assert run(coco_config(out, split))["status"] == "built"
    assert hashes(out) == hashes(ref_root)
    assert not [p for p in out.rglob(".*") if ".tmp" in p.name]
    assert json.loads(next(out.glob("text/*/manifest.json")).read_text())["shards"] == \
        json.loads(next(ref_root.glob("text/*/manifest.json")).read_text())["shards"]


def test_another_text_encoder_reuses_latents_and_teacher(coco_cache, tmp_path):
    root = Path(shutil.copytree(coco_cache[0], tmp_path / "c"))
    split = coco_cache[1]
    def image_shards():
        return {str(p): p.stat().st_mtime_ns for g in ("latents", "teacher") for p in root.glob(f"{g}/*/shard-*.tar")}

    before = image_shards()
    run(coco_config(root, split, text_dtype="float32"))
    assert image_shards() == before and len(before) == 6
    texts = sorted(root.glob("text/*/manifest.json"))
    assert len(texts) == 2
    new = open_cache(root, need_text=True)           # the newest run's text group
    assert new.text.spec.dtype == "float32"
    old = open_cache(root, need_text=True, text=next(p.parent.name for p in texts if p.parent.name != new.text.key))
    assert old.text.spec.dtype == "float16" and old.latents.key == new.latents.key
    f32 = dict(samples(root, TEXT))                  # newest
    for key, s in _samples_of(root, old.text.key):
        assert np.array_equal(f32[key]["text"].astype(np.float16), s["text"])   # fp16 = rounded fp32


def _samples_of(root: Path, text_key: str) -> list:
    c = open_cache(root, need_text=True, text=text_key)
    out = []
    for s in range(len(c.text.shards)):
        path = c.shard_path(TEXT, s)
        out += [(e[0], decode_members(TEXT, c.text.spec, read_sample(path, e), where="")) for e in index_shard(path)]
    return out


def test_text_pass_rank_split_equals_one_process(coco_cache, tmp_path):
    ref_root, split = coco_cache
    root = Path(shutil.copytree(ref_root, tmp_path / "c"))
    shutil.rmtree(next(root.glob("text/*")))
    cfg = coco_config(root, split)
    from pipeline.inputs.captions import open_input

    source = open_input(cfg.source)
    plans = plan_groups(cfg, source)
    text = plans[-1]
    (text.dir / "progress").mkdir(parents=True)
    for rank in (1, 0):  # each simulated rank writes shards s % 2 == rank
        encode_text_shards(cfg, DistInfo(rank=rank, world_size=2), source, text, plans[0], 3)
    assert run(cfg)["status"] == "built"          # all shards found done: only the manifest is written
    assert hashes(root) == hashes(ref_root)


# ----------------------------------------------------------------------------------------------
# the reader API for text-to-image training


def test_stream_carries_every_caption_and_resumes_exactly(coco_cache):
    root, _ = coco_cache
    cache = open_cache(root, need_teacher=False, need_text=True)
    by_key = dict(samples(root, TEXT))
    stream = CacheStream(cache, with_teacher=False, with_text=True, batch_size=3, seed=5)
    it = iter(make_loader(stream, num_workers=0))
    batches = [next(it) for _ in range(7)]
    seen = [k for b in batches[:4] for k in b["key"]]
    assert sorted(seen[:10]) == sorted(by_key)                 # one epoch covers every image once
    for b in batches:
        n = len(b["key"])
        assert b["text_count"].tolist() == [len(by_key[k]["captions"]) for k in b["key"]]
        assert b["text_offsets"].tolist() == [0, *np.cumsum(b["text_count"]).tolist()]
        assert b["text"].dtype == torch.float16 and b["text"].shape[0] == int(b["text_count"].sum())
        for i, key in enumerate(b["key"]):
            rows = b["text"][b["text_offsets"][i]:b["text_offsets"][i + 1]]
            assert np.array_equal(rows.numpy(), by_key[key]["text"]) and b["captions"][i] == by_key[key]["captions"]
        g = torch.Generator().manual_seed(123)
        pick = caption_choice(b["text_count"], g)
        assert ((pick >= 0) & (pick < b["text_count"])).all() and pick.shape == (n,)
        ctx = gather_captions(b, pick)
        assert ctx.shape == (n, 77, 32)
        assert all(torch.equal(ctx[i], torch.from_numpy(np.array(by_key[k]["text"][int(pick[i])]))) for i, k in enumerate(b["key"]))
        assert torch.equal(pick, caption_choice(b["text_count"], torch.Generator().manual_seed(123)))
    resumed = iter(make_loader(CacheStream(cache, with_teacher=False, with_text=True, batch_size=3, seed=5,
                                           start_batch=4), num_workers=0))
    for b in batches[4:]:
        r = next(resumed)
        assert r["key"] == b["key"] and torch.equal(r["text"], b["text"]) and torch.equal(r["moments"], b["moments"])


def test_stream_with_teacher_and_text_and_clear_errors(coco_cache):
    root, _ = coco_cache
    b = next(iter(make_loader(CacheStream(open_cache(root, need_text=True), with_teacher=True, with_text=True,
                                          batch_size=4, seed=0), num_workers=0)))
    assert {"moments", "feat", "q", "k", "text", "text_offsets", "text_count", "captions"} <= set(b)
    with pytest.raises(CacheMismatchError, match="need_text=True"):
        CacheStream(open_cache(root), with_teacher=False, with_text=True, batch_size=2, seed=0)
    with pytest.raises(IndexError, match="caption index out of range"):
        gather_captions(b, b["text_count"])


def test_text_needs_a_captioned_cache(demo_cache, coco_cache):
    with pytest.raises(CacheMismatchError, match="no text group recorded"):
        open_cache(demo_cache, need_text=True)
    with pytest.raises(CacheMismatchError, match="needs a text group"):
        check_cache(open_cache(demo_cache), Requirements(text_dim=768))
    cache = open_cache(coco_cache[0], need_text=True)
    check_cache(cache, Requirements(text_dim=32, text_length=77))
    with pytest.raises(CacheMismatchError, match="32-dimensional but the model's context width is 768"):
        check_cache(cache, Requirements(text_dim=768, text_length=77))


def test_cli_preprocess_dry_run_and_info(coco_cache, restore_logging):
    root, split = coco_cache
    args = ["preprocess", "--dry-run"] + [x for k, v in (("source", f"coco:{split}"), ("out", str(root)),
                                                         ("resolution", 32), ("shard_size", 4), ("vae", "random:tiny"),
                                                         ("teacher", "random:tiny"), ("codec", "qk-fp16"),
                                                         ("text_encoder", "random:tiny"), ("text_batch_size", 3))
                                          for x in ("--set", f"{k}={v}")]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["groups"]["text"]["status"] == "complete"
    res = CliRunner().invoke(cli, ["cache", "info", str(root)])
    assert res.exit_code == 0 and "[text]" in res.output
    assert read_manifest(next(root.glob("text/*"))).kind == TEXT
