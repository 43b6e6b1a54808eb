"""A stream-int8 cache end to end: group files hashed, no stored features, the trainer decoding
both targets and training on it, ``cache verify --fidelity``, the dry-run's ImageNet-1k / 512 px
sizes, and an old cache (a manifest without the new spec fields) still decoded by the new
trainer path."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_preprocess_config

from pipeline.cache.codecs import get_codec
from pipeline.cache.codecs_stream import decode_stream
from pipeline.cache.schema import CODEC_DIR, TEACHER, CacheFormatError

pytestmark = pytest.mark.slow  # a preprocess, a training run and a verify: seconds each


def _torch(a: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in a.items()}


@pytest.fixture(scope="module")
def stream_cache(tmp_path_factory):
    from stages.preprocess import run

    out = tmp_path_factory.mktemp("stream") / "c"
    run(tiny_preprocess_config(out, source="synthetic:16", codec="stream-int8", feat_codec="int8"))
    return out


def test_group_files_hashed_and_no_features_stored(stream_cache):
    import hashlib

    from pipeline.cache.reader import open_cache

    c = open_cache(stream_cache)
    ts = c.teacher.spec
    assert (ts.depth, ts.mlp_dim) == (12, 384)
    gdir = stream_cache / TEACHER / c.teacher.key
    assert set(c.teacher.codec_files) == {f"{n}.npy" for n in get_codec("stream-int8").params(ts)}
    assert len(c.teacher.codec_files) == 17
    for name, rec in c.teacher.codec_files.items():
        data = (gdir / CODEC_DIR / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == rec["sha256"] and len(data) == rec["bytes"]
    manifest = json.loads((gdir / "manifest.json").read_text())
    assert set(manifest["fields"]) == {"stream.npy"} and manifest["fields"]["stream.npy"]["codec"] == "stream-int8"
    assert manifest["fields"]["stream.npy"]["shape"] == [17, 98]


def test_trainer_decodes_both_targets_and_trains(stream_cache, tmp_path):
    from trainutil import single_thread, stats, tiny_cfg

    from pipeline.cache.loader import CacheStream
    from pipeline.cache.reader import open_cache
    from pipeline.cache.schema import load_codec_params
    from trainer.engine import build_model, prepare_inputs
    from trainer.loop import train
    from trainer.phases import build_phases

    cache = open_cache(stream_cache)
    ts = cache.teacher.spec
    batch = next(iter(CacheStream(cache, with_teacher=True, batch_size=4, seed=0)))
    assert "feat" not in batch and batch["stream"].dtype == torch.int8
    cfg = tiny_cfg(stream_cache, tmp_path / "run", {"align.teacher_layers": [11, 9], "align.student_blocks": [4, 6]})
    model, _ = build_model(cfg, torch.device("cpu"))
    inp = prepare_inputs(batch, model, cfg, build_phases(cfg.align)[0], cache, torch.device("cpu"),
                         torch.Generator().manual_seed(0))
    params = load_codec_params(stream_cache / TEACHER / cache.teacher.key, ts, cache.teacher.codec_files)
    feat, logits = decode_stream(batch["stream"], "int8", ts, _torch(params), [3, 1])
    torch.testing.assert_close(inp.teacher_logits, logits)
    torch.testing.assert_close(inp.teacher_feat, feat)
    assert inp.teacher_logits.shape == (4, 2, 12, 16, 16) and inp.teacher_feat.shape == (4, 16, 96)
    # data.teacher_decode forces the decode precision through the cache reader
    cfg32 = tiny_cfg(stream_cache, tmp_path / "run", {"align.teacher_layers": [11, 9], "align.student_blocks": [4, 6],
                                                     "data.teacher_decode": "fp32"})
    inp32 = prepare_inputs(batch, model, cfg32, build_phases(cfg32.align)[0], cache, torch.device("cpu"),
                           torch.Generator().manual_seed(0))
    feat32, logits32 = decode_stream(batch["stream"], "int8", ts, _torch(params), [3, 1], compute="fp32")
    assert torch.equal(inp32.teacher_logits, logits32) and torch.equal(inp32.teacher_feat, feat32)
    with single_thread():
        train(tiny_cfg(stream_cache, tmp_path / "run2", {"total_steps": 3, "align.stop_step": 3, "ckpt_every": 3}))
    phase1 = [r for r in stats(tmp_path / "run2") if r["phase"] == "I"]
    assert len(phase1) == 3 and all(np.isfinite(r["attn"]) and r["attn"] > 0 and np.isfinite(r["feat"])
                                     for r in phase1)


def test_verify_fidelity_and_damaged_block_files(stream_cache, tmp_path):
    from pipeline.cache.reader import open_cache
    from stages import cache_tools

    report = cache_tools.verify(stream_cache, samples=3, fidelity=True)
    g = next(v for k, v in report["groups"].items() if k.startswith(TEACHER))
    assert report["ok"] and g["fresh"]["ok"] and g["fresh"]["max_rel_error"]["codec:mlp_fc1_weight"] == 0
    assert g["fidelity"]["measured"] and g["fidelity"]["worst"]["meets_bar"]
    assert 0 < g["fidelity"]["worst"]["feat_cos_err_mean"] < 1e-3  # derived features: lossy, measured
    copy = shutil.copytree(stream_cache, tmp_path / "copy")
    cache = open_cache(copy)
    w = copy / TEACHER / cache.teacher.key / CODEC_DIR / "mlp_fc2_weight.npy"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    with pytest.raises(CacheFormatError, match="mlp_fc2_weight.npy: sha256 differs"):
        cache.teacher_targets({"stream": torch.zeros(1, 17, 98, dtype=torch.int8)})


def test_dry_run_states_imagenet_and_512px_sizes(tmp_path):
    from stages.preprocess import run

    report = run(tiny_preprocess_config(tmp_path / "c", codec="stream-int8"), dry_run=True)
    proj = report["groups"]["teacher"]["imagenet_1k"]
    # 64 px tiny teacher config, projected at 256 px (1 + 256 tokens) and 512 px (1 + 1,024), D = 96
    assert proj["256px"]["bytes_per_image"] == 512 + -(-(257 * 98 + 128) // 512) * 512
    assert proj["512px"]["bytes_per_image"] == 512 + -(-(1025 * 98 + 128) // 512) * 512
    assert proj["512px"]["total_gb"] == round(proj["512px"]["bytes_per_image"] * 1_281_167 / 1e9, 1)
    lat = report["groups"]["latents"]["imagenet_1k"]
    assert lat["512px"]["bytes_per_image"] > 3 * lat["256px"]["bytes_per_image"]


def test_old_cache_without_the_new_spec_fields_still_trains(demo_cache, tmp_path):
    """A teacher manifest written before stream-* (no depth/mlp_dim in its spec) reads and decodes
    through the new one-call path: features from its feat members, logits from its q/k."""
    from trainutil import tiny_cfg

    from pipeline.cache.loader import CacheStream
    from pipeline.cache.reader import open_cache
    from trainer.engine import build_model, prepare_inputs
    from trainer.phases import build_phases

    copy = shutil.copytree(demo_cache, tmp_path / "old")
    key = open_cache(copy).teacher.key
    path = copy / TEACHER / key / "manifest.json"
    m = json.loads(path.read_text())
    for f in ("depth", "mlp_dim"):
        m["spec"].pop(f, None)
    path.write_text(json.dumps(m))
    cache = open_cache(copy)
    assert cache.teacher.spec.depth == 0 and cache.teacher.spec.codec == "qk-fp16"
    batch = next(iter(CacheStream(cache, with_teacher=True, batch_size=4, seed=0)))
    cfg = tiny_cfg(copy, tmp_path / "run")
    model, _ = build_model(cfg, torch.device("cpu"))
    inp = prepare_inputs(batch, model, cfg, build_phases(cfg.align)[0], cache, torch.device("cpu"),
                         torch.Generator().manual_seed(0))
    idx = [cache.teacher.spec.layers.index(layer) for layer in cfg.align.teacher_layers]
    expect = get_codec("qk-fp16").decode({n: batch[n][:, idx] for n in ("q", "k")}, cache.teacher.spec.scale)
    torch.testing.assert_close(inp.teacher_logits, expect)
    torch.testing.assert_close(inp.teacher_feat, batch["feat"].float())
    # a features-only step (REPA) reads the feature members alone: no q, k cross to the device
    feat, logits = cache.teacher_targets({"feat": batch["feat"]}, attention=False)
    assert logits is None and torch.equal(feat, inp.teacher_feat)


