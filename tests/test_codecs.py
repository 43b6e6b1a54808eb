"""pipeline.cache.codecs + pipeline.cache.fidelity: every codec within its documented bound, metrics with known
answers, names validated field by field, old caches still read, ``cache verify --fidelity``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_preprocess_config

from pipeline.cache import fidelity
from pipeline.cache.codecs import (
    FEAT_CODECS,
    decode_features,
    encode_features,
    get_codec,
    parse_codec_name,
    unpack_int8_np,
)
from pipeline.cache.schema import (
    TEACHER,
    CacheFormatError,
    TeacherSpec,
    decode_members,
    encode_teacher_sample,
    fields,
    npy_bytes,
    spec_from_dict,
)

SPEC = TeacherSpec(layers=(8, 11), num_heads=3, head_dim=8, embed_dim=24, grid=4, num_prefix_tokens=1,
                   scale=8 ** -0.5)


def _qk(seed: int = 0, spec: TeacherSpec = SPEC) -> tuple[np.ndarray, np.ndarray]:
    """q, k like a ViT's: a large component shared by all keys (which softmax ignores) plus structure."""
    rng = np.random.default_rng(seed)
    shape = (len(spec.layers), spec.num_heads, spec.num_tokens, spec.head_dim)
    q = rng.standard_normal(shape).astype(np.float32) * 2
    k = (rng.standard_normal(shape) + 4 * rng.standard_normal(shape[:2] + (1, shape[3]))).astype(np.float32)
    return q, k


def _exact(q: np.ndarray, k: np.ndarray, scale: float) -> np.ndarray:
    return scale * q.astype(np.float64) @ np.swapaxes(k, -1, -2).astype(np.float64)


def _decode_one(name: str, q: np.ndarray, k: np.ndarray, spec: TeacherSpec = SPEC) -> np.ndarray:
    """Through the whole schema path: encode -> npy bytes -> zero-copy decode -> batched decode."""
    spec = TeacherSpec(**{**spec.__dict__, "codec": name})
    feat = np.ones((spec.num_tokens, spec.embed_dim), np.float32)
    members = decode_members(TEACHER, spec, encode_teacher_sample(spec, feat, q, k), "t")
    batch = {n: torch.from_numpy(np.stack([members[n]])) for n in ("q", "k", "logits") if n in members}
    return get_codec(name).decode(batch, spec.scale)[0].double().numpy()


def _centred(x: np.ndarray) -> np.ndarray:
    return x - x.mean(-1, keepdims=True)



# ----------------------------------------------------------------------------------------------
# names


@pytest.mark.parametrize("name,parsed", [("qk-int8", ("qk", None, "int8")), ("logits-fp16", ("logits", None, "fp16")),
                                         ("lowrank-r32-fp16", ("lowrank", 32, "fp16"))])
def test_codec_names_parse(name, parsed):
    assert parse_codec_name(name) == parsed
    assert get_codec(name).name == name


@pytest.mark.parametrize("name,field", [
    ("qk-int4", "precision"), ("logits-int8", "precision"), ("lowrank-r8-bf16", "precision"),
    ("lowrank-r0-fp16", "rank"), ("lowrank-rX-fp16", "rank"), ("lowrank-fp16", "rank"), ("qk-r8-fp16", "rank"),
    ("svd-fp16", "layout"),
])
def test_bad_codec_names_name_the_field(name, field):
    with pytest.raises(CacheFormatError, match=f"unknown attention codec '{name}': field '{field}'"):
        get_codec(name)
    with pytest.raises(CacheFormatError, match="expected none, qk-<precision>"):
        get_codec("qk")


def test_rank_above_head_dim_is_a_config_error_naming_codec_and_rank(tmp_path):
    from pipeline.inputs.sources import open_source
    from stages.preprocess import plan_groups

    cfg = tiny_preprocess_config(tmp_path, codec="lowrank-r9-int8")  # the tiny teacher has head_dim 8
    with pytest.raises(ValueError, match=r"config field 'codec'.*field 'rank' is 9.*<= 8"):
        plan_groups(cfg, open_source("synthetic:8", synthetic_classes=2))
    with pytest.raises(ValueError, match="config field 'feat_codec'"):
        tiny_preprocess_config(tmp_path, feat_codec="int4")


# ----------------------------------------------------------------------------------------------
# round trips within the documented bounds


def test_qk_fp32_and_fp16_bounds():
    q, k = _qk()
    ref = _exact(q, k, SPEC.scale)
    np.testing.assert_allclose(_decode_one("qk-fp32", q, k), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    nq, nk = np.linalg.norm(q, axis=-1), np.linalg.norm(k, axis=-1)
    bound = 2 ** -10 * SPEC.scale * nq[..., :, None] * nk[..., None, :] + 1e-5 * np.abs(ref).max()
    assert (np.abs(_decode_one("qk-fp16", q, k) - ref) <= bound).all()


def test_qk_int8_bound_on_row_centred_logits():
    q, k = _qk(1)
    spec = TeacherSpec(**{**SPEC.__dict__, "codec": "qk-int8"})
    arrays = get_codec("qk-int8").encode(q, k, spec.scale)
    assert arrays["q"].dtype == np.int8 and arrays["q"].shape == q.shape[:-1] + (q.shape[-1] + 2,)
    _, sq = unpack_int8_np(arrays["q"])
    _, sk = unpack_int8_np(arrays["k"])
    kc = k - k.mean(-2, keepdims=True)
    l1q, l1k = np.abs(q).sum(-1)[..., :, None], np.abs(kc).sum(-1)[..., None, :]
    sq, sk = sq[..., :, 0][..., :, None], sk[..., :, 0][..., None, :]
    bound = spec.scale * (l1q * sk + sq * l1k + spec.head_dim * sq * sk / 2) / 2
    err = np.abs(_centred(_decode_one("qk-int8", q, k)) - _centred(_exact(q, k, spec.scale)))
    assert (err <= bound * 1.0001 + 1e-6).all()
    assert err.max() > 0  # it is lossy, and the bound is not vacuous: within 10x of the worst error
    assert (bound.max() / err.max()) < 10


def test_logits_fp16_bound():
    q, k = _qk(2)
    ref = _exact(q, k, SPEC.scale)
    assert (np.abs(_decode_one("logits-fp16", q, k) - ref) <= 2 ** -11 * np.abs(ref) + 2 ** -24).all()


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_lowrank_is_the_truncated_svd_and_within_bound(rank):
    q, k = _qk(3)
    target = _centred(_exact(q, k, SPEC.scale))
    sv = np.linalg.svd(target, compute_uv=False)
    tail = np.sqrt((sv[..., rank:] ** 2).sum(-1))                          # Eckart-Young optimum
    for prec, slack in (("fp32", 1e-5), ("fp16", 2e-3), ("int8", 3e-2)):
        err = np.linalg.norm(_centred(_decode_one(f"lowrank-r{rank}-{prec}", q, k)) - target, axis=(-2, -1))
        assert (err <= tail + slack * np.linalg.norm(target, axis=(-2, -1))).all(), (prec, err, tail)
        if prec == "fp32":  # optimal, not merely bounded
            np.testing.assert_allclose(err, tail, rtol=1e-3, atol=1e-5)


def test_lowrank_full_rank_is_exact_up_to_row_constants():
    q, k = _qk(4)
    dec = _decode_one(f"lowrank-r{SPEC.head_dim}-fp32", q, k)
    np.testing.assert_allclose(_centred(dec), _centred(_exact(q, k, SPEC.scale)), atol=1e-4)
    # and the softmax, which is all training uses, is the exact one
    p = torch.from_numpy(_exact(q, k, SPEC.scale)).softmax(-1)
    torch.testing.assert_close(torch.from_numpy(dec).softmax(-1), p, atol=1e-5, rtol=0)


def test_int8_features_bound_and_scale_free_direction():
    rng = np.random.default_rng(5)
    feat = (rng.standard_normal((16, 24)) * np.where(np.arange(24) < 2, 20.0, 1.0)).astype(np.float32)
    arrays = encode_features(feat, "int8", "float16")
    assert arrays["feat"].dtype == np.int8 and arrays["feat_scale"].dtype == np.float16
    s = arrays["feat_scale"].astype(np.float64)[:, None]
    dec = decode_features({k: v[None] for k, v in arrays.items()})[0].double().numpy()
    assert (np.abs(dec - feat) <= s / 2 + 1e-7).all()
    err = fidelity.feature_cosine_error(torch.from_numpy(feat), torch.from_numpy(dec)).numpy()
    assert (err <= feat.shape[1] * s[:, 0] ** 2 / (4 * (feat.astype(np.float64) ** 2).sum(-1))).all()
    # the raw int8 values point the same way as the rescaled ones (the REPA loss normalises tokens)
    raw = fidelity.feature_cosine_error(torch.from_numpy(arrays["feat"]).float(), torch.from_numpy(dec))
    assert raw.max() < 1e-12
    assert set(FEAT_CODECS) == {"plain", "int8"}


def test_zero_rows_and_batched_decode():
    q, k = _qk(6)
    q[0, 0, 3] = 0  # an all-zero query row keeps scale 0 and decodes to a zero logit row
    spec = TeacherSpec(**{**SPEC.__dict__, "codec": "qk-int8", "feat_codec": "int8"})
    feat = np.zeros((spec.num_tokens, spec.embed_dim), np.float32)
    one = decode_members(TEACHER, spec, encode_teacher_sample(spec, feat, q, k), "t")
    assert (decode_features({n: one[n][None] for n in ("feat", "feat_scale")}) == 0).all()
    logits = _decode_one("qk-int8", q, k)
    assert (logits[0, 0, 3] == 0).all()
    two = [decode_members(TEACHER, spec, encode_teacher_sample(spec, feat, *_qk(s)), "t") for s in (7, 8)]
    batch = {n: torch.from_numpy(np.stack([d[n] for d in two])) for n in ("q", "k")}
    both = get_codec("qk-int8").decode(batch, spec.scale)
    np.testing.assert_array_equal(both[1].numpy(), _decode_one("qk-int8", *_qk(8)).astype(np.float32))


# ----------------------------------------------------------------------------------------------
# fidelity metrics with known answers


def test_identical_targets_are_perfect():
    g = torch.Generator().manual_seed(0)
    logits, feat = torch.randn(2, 2, 3, 5, 5, generator=g), torch.randn(2, 5, 7, generator=g)
    r = fidelity.measure(logits, logits.clone(), feat, feat.clone())
    for s in r["sharpness"].values():
        assert s["kl_max"] == 0 and s["loss_rel_err_max"] == 0 and s["grad_cos_min"] == pytest.approx(1, abs=1e-15)
    assert r["features"]["cos_err_max"] < 1e-15 and r["worst"]["meets_bar"]
    # a per-row constant is invisible to the softmax, hence to every attention metric
    shifted = fidelity.measure(logits, logits + torch.randn(2, 2, 3, 5, 1, generator=g), feat, feat)
    assert shifted["worst"]["kl_max"] < 1e-12 and shifted["worst"]["grad_cos_min"] > 1 - 1e-12


def test_two_key_kl_and_loss_error_closed_form():
    d, s0 = 0.7, 1.3
    exact, dec = torch.tensor([[0.0, 0.0]], dtype=torch.float64), torch.tensor([[0.0, d]], dtype=torch.float64)
    assert float(fidelity.kl_rows(exact, dec)) == pytest.approx(math.log((1 + math.exp(d)) / 2) - d / 2, rel=1e-12)
    student = torch.tensor([[0.0, s0]], dtype=torch.float64)
    lq = [-math.log1p(math.exp(s0)), s0 - math.log1p(math.exp(s0))]
    p2 = math.exp(d) / (1 + math.exp(d))
    ce_e, ce_d = -(0.5 * lq[0] + 0.5 * lq[1]), -((1 - p2) * lq[0] + p2 * lq[1])
    assert float(fidelity.attention_loss(exact, student)) == pytest.approx(ce_e, rel=1e-12)
    assert float(fidelity.attention_loss(dec, student)) == pytest.approx(ce_d, rel=1e-12)


def test_gradient_cosine_closed_form_and_matches_trainer_autograd():
    from trainer.objectives import attention_alignment_loss

    # three keys, uniform student: grad ∝ 1/3 - p, so cos is that of the centred teacher probabilities
    exact = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
    dec = torch.tensor([[1.0, 0.5, -1.0]], dtype=torch.float64)
    student = torch.zeros(1, 3, dtype=torch.float64)
    u = 1 / 3 - exact.softmax(-1)[0].numpy()
    v = 1 / 3 - dec.softmax(-1)[0].numpy()
    expect = float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
    got = fidelity.cosine(fidelity.attention_grad(exact, student), fidelity.attention_grad(dec, student))
    assert got == pytest.approx(expect, rel=1e-12)
    # the restated loss and its gradient are the trainer's (one pair, all heads)
    g = torch.Generator().manual_seed(1)
    t, s = torch.randn(2, 3, 6, 6, generator=g), torch.randn(2, 3, 6, 6, generator=g, requires_grad=True)
    loss = attention_alignment_loss([s], [t], [0, 1, 2], [0, 1, 2])
    loss.backward()
    assert float(fidelity.attention_loss(t, s.detach())) == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(fidelity.attention_grad(t, s.detach()).float(), s.grad, rtol=1e-5, atol=1e-9)


def test_feature_rotation_and_sharpness_sweep():
    theta = 0.01
    e = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    d = torch.tensor([[[math.cos(theta), math.sin(theta)]]], dtype=torch.float64) * 3
    assert float(fidelity.feature_cosine_error(e, d)) == pytest.approx(1 - math.cos(theta), rel=1e-9)
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 1, 2, 8, 8, generator=g, dtype=torch.float64)
    noisy = logits + 0.05 * torch.randn(logits.shape, generator=g)
    feat = torch.randn(1, 8, 4, generator=g)
    r = fidelity.measure(logits, noisy, feat, feat, sharpness=(1, 5, 20))
    a = fidelity.measure(logits * 5, noisy * 5, feat, feat, sharpness=(1,))
    assert r["sharpness"]["5"]["kl_max"] == pytest.approx(a["sharpness"]["1"]["kl_max"], rel=1e-9)
    kls = [r["sharpness"][s]["kl_max"] for s in ("1", "5", "20")]
    assert kls == sorted(kls) and r["worst"]["kl_max"] == kls[-1]  # sharper teachers amplify errors
    assert r["worst"]["grad_cos_min"] == min(x["grad_cos_min"] for x in r["sharpness"].values())


# ----------------------------------------------------------------------------------------------
# old caches; the trainer decodes the new codecs


def test_old_format_members_and_manifest_still_read():
    """Bytes as the pre-codec-registry writer made them (plain np.save), spec without feat_codec."""
    old = {"layers": [8, 11], "num_heads": 3, "head_dim": 8, "embed_dim": 24, "grid": 4, "num_prefix_tokens": 1,
           "scale": 8 ** -0.5, "feat_dtype": "float16", "codec": "qk-fp16"}
    spec = spec_from_dict(TEACHER, old)
    assert spec.feat_codec == "plain"
    q, k = _qk(9)
    feat = np.random.default_rng(9).standard_normal((16, 24)).astype(np.float16)
    members = {"feat.npy": npy_bytes(feat), "q.npy": npy_bytes(q.astype(np.float16)),
               "k.npy": npy_bytes(k.astype(np.float16))}
    out = decode_members(TEACHER, spec, members, "old")
    np.testing.assert_array_equal(out["feat"], feat)
    assert set(fields(TEACHER, spec)) == {"feat.npy", "q.npy", "k.npy"}
    logits = get_codec("qk-fp16").decode({n: torch.from_numpy(out[n][None].copy()) for n in ("q", "k")}, spec.scale)
    ref = _exact(q.astype(np.float16), k.astype(np.float16), spec.scale)
    np.testing.assert_allclose(logits[0].numpy(), ref, atol=1e-5)
    logit_spec = spec_from_dict(TEACHER, {**old, "codec": "logits-fp16"})
    lg = _exact(q, k, spec.scale).astype(np.float16)
    assert decode_members(TEACHER, logit_spec, {"feat.npy": npy_bytes(feat), "logits.npy": npy_bytes(lg)},
                          "old")["logits"].dtype == np.float16


def test_demo_cache_keys_unchanged_and_trainer_decodes_int8(demo_cache, tmp_path):
    """Plain features keep the old group identity (no feat_codec key); the trainer's step inputs
    decode an int8 cache: logits as the codec decodes them, features with the same REPA loss."""
    from trainutil import tiny_cfg

    from pipeline.cache.loader import CacheStream
    from pipeline.cache.reader import open_cache
    from stages.preprocess import run
    from trainer.engine import build_model, prepare_inputs
    from trainer.objectives import repa_loss
    from trainer.phases import build_phases

    c = open_cache(demo_cache)
    assert "feat_codec" not in c.teacher.identity and c.teacher.spec.feat_codec == "plain"
    out = tmp_path / "c"
    run(tiny_preprocess_config(out, source="synthetic:16", codec="qk-int8", feat_codec="int8"))
    cache = open_cache(out)
    assert cache.teacher.identity["feat_codec"] == "int8"
    batch = next(iter(CacheStream(cache, with_teacher=True, batch_size=4, seed=0)))
    cfg = tiny_cfg(out, tmp_path / "run")
    model, _ = build_model(cfg, torch.device("cpu"))
    phase = build_phases(cfg.align)[0]
    inp = prepare_inputs(batch, model, cfg, phase, cache, torch.device("cpu"), torch.Generator().manual_seed(0))
    idx = [cache.teacher.spec.layers.index(layer) for layer in cfg.align.teacher_layers]
    expect = get_codec("qk-int8").decode({n: batch[n][:, idx] for n in ("q", "k")}, cache.teacher.spec.scale)
    torch.testing.assert_close(inp.teacher_logits, expect)
    student = torch.randn(inp.teacher_feat.shape)
    torch.testing.assert_close(repa_loss(student, inp.teacher_feat), repa_loss(student, decode_features(batch)))


# ----------------------------------------------------------------------------------------------
# haste cache verify --fidelity


def test_verify_fidelity_writes_manifest_and_falls_back_without_teacher(tmp_path, monkeypatch, restore_logging):
    from pipeline.encoders import weights
    from stages import cache_tools
    from stages.cli import main as cli
    from stages.preprocess import run

    out = tmp_path / "c"
    run(tiny_preprocess_config(out, source="synthetic:16", codec="lowrank-r4-int8", feat_codec="int8"))
    res = CliRunner().invoke(cli, ["cache", "verify", "--fidelity", "--samples", "3", "--json", str(out)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    fid = next(g for k, g in json.loads(res.stdout)["groups"].items() if k.startswith(TEACHER))["fidelity"]
    assert fid["measured"] and fid["codec"] == "lowrank-r4-int8" and set(fid["sharpness"]) == {"1", "5", "20"}
    assert 0.9 < fid["worst"]["grad_cos_min"] < 1 and 0 < fid["worst"]["feat_cos_err_mean"] < 1e-3
    mdir = next((out / TEACHER).iterdir())
    assert json.loads((mdir / "manifest.json").read_text())["fidelity"] == fid
    before = (mdir / "manifest.json").read_text()

    def unavailable(m):
        raise weights.WeightsError("teacher weights 'x' not in the local cache")

    monkeypatch.setattr(cache_tools, "_load_model", unavailable)
    report = cache_tools.verify(out, samples=2, fidelity=True)
    fid = next(g for k, g in report["groups"].items() if k.startswith(TEACHER))["fidelity"]
    assert fid["measured"] is False and "not in the local cache" in fid["reason"] and "not measured" in fid["reason"]
    assert report["ok"] and (mdir / "manifest.json").read_text() == before
