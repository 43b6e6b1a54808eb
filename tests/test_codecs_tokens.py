"""tokens-<p>: the qkv input tokens per sample + the q/k projections once per teacher group.

Round trips within the documented bound (derived from the int8 token error through W), decoded
logits against a timm teacher forward, the teacher's capture/refusal rules, and a tokens-int8
cache end to end: group files written before any shard and hashed, read back sha256-checked,
decoded by the trainer, trained on, and measured by ``cache verify --fidelity``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import timm
import torch
from conftest import tiny_preprocess_config

from pipeline.cache.codecs import (
    get_codec,
    pack_int8,
    pack_int8_torch,
    parse_codec_name,
    row_centred,
    unpack_int8_np,
)
from pipeline.cache.codecs_tokens import basis, qk_from_tokens, tokens_codec
from pipeline.cache.schema import (
    CODEC_DIR,
    TEACHER,
    CacheFormatError,
    TeacherSpec,
    decode_members,
    encode_teacher_sample,
)
from pipeline.encoders.teacher import RANDOM_PRESETS, Teacher, load_teacher

SPEC = TeacherSpec(layers=(8, 11), num_heads=3, head_dim=8, embed_dim=24, grid=4, num_prefix_tokens=1,
                   scale=8 ** -0.5, codec="tokens-int8")


def _tokens(seed: int = 0, spec: TeacherSpec = SPEC) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """x like a LayerNorm output (zero mean, unit variance per token) and random projections whose
    key bias is large: it must vanish exactly in the softmax (the decoder centres the keys)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((len(spec.layers), spec.num_tokens, spec.embed_dim))
    x = ((x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True)).astype(np.float32)
    shape = (len(spec.layers), 2, spec.num_heads, spec.head_dim, spec.embed_dim)
    w = (rng.standard_normal(shape) / np.sqrt(spec.embed_dim) * 3).astype(np.float32)
    b = rng.standard_normal(shape[:-1]).astype(np.float32)
    b[:, 1] += 5
    return x, {"qk_weight": w, "qk_bias": b}


def _exact_qk(x: np.ndarray, p: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """float64 q, k (L, H, T, hd), computed independently of the codec."""
    y = np.einsum("ltc,lshdc->lshtd", x.astype(np.float64), p["qk_weight"].astype(np.float64))
    y = y + p["qk_bias"].astype(np.float64)[:, :, :, None, :]
    return y[:, 0], y[:, 1]


def _decode(name: str, x: np.ndarray, p: dict[str, np.ndarray],
            spec: TeacherSpec = SPEC) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Through the schema: encode -> npy bytes -> zero-copy decode -> batched decode with the stored
    params. Returns the logits, the stored token scales (L, T) (int8) and the stored qk_weight."""
    spec = TeacherSpec(**{**spec.__dict__, "codec": name})
    feat = np.ones((spec.num_tokens, spec.embed_dim), np.float32)
    members = decode_members(TEACHER, spec, encode_teacher_sample(spec, feat, x=x), "t")
    stored = get_codec(name).store_params(p)
    params = {n: torch.from_numpy(a) for n, a in stored.items()}
    logits = get_codec(name).decode({"x": torch.from_numpy(members["x"][None].copy())}, spec.scale, params)[0]
    scales = unpack_int8_np(members["x"])[1][..., 0] if name.endswith("int8") else None
    return logits.double(), scales, stored["qk_weight"]


def _bound(q: np.ndarray, k: np.ndarray, w: np.ndarray, s: np.ndarray, scale: float) -> np.ndarray:
    """The documented int8 bound on row-centred logits (L, H, T, T); s: token scales (L, T)."""
    kc = k - k.mean(-2, keepdims=True)
    a, b = np.abs(w[:, 0]).sum(-1), np.abs(w[:, 1]).sum(-1)               # (L, H, hd): ‖W_d‖₁
    dq = s[:, None, :, None] / 2 * a[:, :, None, :]                        # (L, H, T, hd)
    dk = (s + s.mean(-1, keepdims=True))[:, None, :, None] / 2 * b[:, :, None, :]
    t = lambda m: np.swapaxes(m, -1, -2)  # noqa: E731
    return scale * (dq @ t(np.abs(kc)) + np.abs(q) @ t(dk) + dq @ t(dk))


def _centred(m: np.ndarray) -> np.ndarray:
    return m - m.mean(-1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# names, packing, round trips


def test_tokens_names_and_members():
    assert parse_codec_name("tokens-int8") == ("tokens", None, "int8")
    for bad, field in (("tokens-int4", "precision"), ("tokens-r8-int8", "rank")):
        with pytest.raises(CacheFormatError, match=f"field '{field}'"):
            get_codec(bad)
    c = get_codec("tokens-int8")
    assert c.inputs == ("x",) and not c.lossless
    assert c.members(SPEC) == {"x": ("int8", (2, 16, 26))}
    assert c.params(SPEC) == {"qk_weight": ("float32", (2, 2, 3, 8, 24)), "qk_bias": ("float32", (2, 2, 3, 8))}
    with pytest.raises(CacheFormatError, match="qk_weight/qk_bias"):
        c.decode({"x": torch.zeros(1, 2, 16, 26, dtype=torch.int8)}, SPEC.scale)


def test_device_packing_is_bit_identical_to_numpy():
    rng = np.random.default_rng(1)
    for exp in (-6, 0, 4):
        x = (rng.standard_normal((3, 17, 40)) * 10.0 ** exp).astype(np.float32)
        x[0, 0] = 0                                   # zero row: scale 0
        x[1, 1, :3] = [0.5, 1.5, 127.0]               # exact halves: round half to even in both
        np.testing.assert_array_equal(pack_int8_torch(torch.from_numpy(x)).numpy(), pack_int8(x))
    with pytest.raises(CacheFormatError, match="non-finite"):
        pack_int8_torch(torch.tensor([[1.0, float("nan")]]))
    # what the writer hands over (packed on the device) encodes to the same bytes as floats do
    x, _ = _tokens(2)
    spec, feat = SPEC, np.ones((16, 24), np.float32)
    packed = get_codec("tokens-int8").on_device(torch.from_numpy(x)).numpy()
    assert encode_teacher_sample(spec, feat, x=packed) == encode_teacher_sample(spec, feat, x=x)
    with pytest.raises(CacheFormatError, match=r"token \(x\) shape"):
        encode_teacher_sample(spec, feat, x=x[:, :-1])
    with pytest.raises(CacheFormatError, match=r"\['x'\] not given"):
        encode_teacher_sample(spec, feat, *_exact_qk(x, _tokens(2)[1]))


def test_tokens_fp32_is_exact_up_to_row_constants():
    x, p = _tokens(3)
    q, k = _exact_qk(x, p)
    exact = SPEC.scale * q @ np.swapaxes(k, -1, -2)
    dec = _decode("tokens-fp32", x, p)[0].numpy()
    np.testing.assert_allclose(_centred(dec), _centred(exact), atol=2e-5 * np.abs(exact).max())
    p_exact = torch.from_numpy(exact).softmax(-1)
    torch.testing.assert_close(torch.from_numpy(dec).softmax(-1), p_exact, atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", [4, 5])
def test_tokens_int8_within_documented_bound(seed):
    x, p = _tokens(seed)
    q, k = _exact_qk(x, p)
    dec, s, w = _decode("tokens-int8", x, p)
    bound = _bound(q, k, w.astype(np.float64), s.astype(np.float64), SPEC.scale)
    err = np.abs(_centred(dec.numpy()) - _centred(SPEC.scale * q @ np.swapaxes(k, -1, -2)))
    assert (err <= bound * 1.0001 + 1e-5).all()
    assert err.max() > 0 and bound.max() / err.max() < 30  # lossy, and the bound is not vacuous


def test_fixed_basis_is_orthogonal_stable_and_spreads_outlier_channels():
    r = basis(24).double()
    torch.testing.assert_close(r @ r.T, torch.eye(24, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.equal(basis(24), basis.__wrapped__(24))  # a seeded draw: the same matrix on every call
    # four channels far larger than the rest, as post-LayerNorm channels of trained ViTs can be: the basis
    # spreads them over all D, so the int8 rows' range tracks the token norm (RMS logit error 3-4x lower)
    spec = TeacherSpec(**{**SPEC.__dict__, "embed_dim": 256, "num_heads": 2})
    x, p = _tokens(6, spec)
    x[..., :4] *= 20
    q, k = _exact_qk(x, p)
    exact = _centred(spec.scale * q @ np.swapaxes(k, -1, -2))
    rms = lambda d: float(np.sqrt(((_centred(d) - exact) ** 2).mean()))  # noqa: E731
    plain = tokens_codec("int8", fixed_basis=False)
    params = {n: torch.from_numpy(a) for n, a in plain.store_params(p).items()}
    raw = plain.decode({"x": torch.from_numpy(plain.encode(x, spec.scale)["x"][None])}, spec.scale, params)
    assert rms(_decode("tokens-int8", x, p, spec)[0].numpy()) < rms(raw[0].double().numpy()) / 2.5


@pytest.mark.parametrize("prec", ["int8", "fp16"])
def test_batched_decode_is_per_sample_and_layer_exact(prec):
    """The decode's batched layout (tokens regrouped by layer, one GEMM over all samples' tokens)
    gives, for every (sample, layer), scale · q k̃ᵀ of exactly that sample's stored tokens: float64
    reference, row-centred, to fp32 rounding. Samples and layers differ, so a mix-up shows."""
    spec = TeacherSpec(**{**SPEC.__dict__, "codec": f"tokens-{prec}"})
    codec = get_codec(spec.codec)
    xs, p = zip(*(_tokens(seed) for seed in (7, 8, 9)))
    p = {n: torch.from_numpy(a) for n, a in codec.store_params(p[0]).items()}
    stored = torch.from_numpy(np.stack([codec.encode(x, spec.scale)["x"] for x in xs]))  # (3, L, T, D[+2])
    dec = codec.decode({"x": stored}, spec.scale, p).double()                           # (3, L, H, T, T)
    if prec == "int8":
        vals, scales = unpack_int8_np(stored.numpy())
        x = torch.from_numpy(vals.astype(np.float64) * scales)
    else:
        x = stored.double()
    w, b = p["qk_weight"].double(), p["qk_bias"].double()
    for n in range(3):
        for layer in range(2):
            q = torch.einsum("tc,hdc->htd", x[n, layer], w[layer, 0]) + b[layer, 0][:, None]
            k = torch.einsum("tc,hdc->htd", x[n, layer], w[layer, 1]) + b[layer, 1][:, None]
            ref = spec.scale * q @ k.transpose(-1, -2)
            torch.testing.assert_close(row_centred(dec[n, layer]), row_centred(ref), rtol=0,
                                       atol=1e-5 * float(ref.abs().max()))
    assert dec.shape == (3, 2, 3, 16, 16) and not torch.allclose(dec[0], dec[1])


# ----------------------------------------------------------------------------------------------
# the teacher: captured tokens and projections reproduce its q, k


def test_decoded_logits_match_a_timm_teacher_forward():
    layers = (8, 11)
    teacher, _ = load_teacher("random:tiny", layers=layers, resolution=64, seed=2, capture=("q", "k", "x"))
    images = torch.randint(0, 256, (3, 3, 64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    out = teacher(images)
    assert out.x.shape == (3, 2, 16, 96) and out.q.shape == (3, 2, 12, 16, 8)
    p = teacher.qk_params()
    spec = TeacherSpec(layers=layers, num_heads=12, head_dim=8, embed_dim=96, grid=4, num_prefix_tokens=1,
                       scale=teacher.scale)
    # the hooked tokens and the extracted projections give the teacher's own q, k
    q, k = qk_from_tokens(out.x, torch.from_numpy(p["qk_weight"]), torch.from_numpy(p["qk_bias"]))
    torch.testing.assert_close(q, out.q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, out.k, atol=1e-5, rtol=1e-5)
    exact = get_codec("qk-fp32").decode({"q": out.q, "k": out.k}, spec.scale).double()
    for i in range(3):
        dec, s, w = _decode("tokens-int8", out.x[i].numpy(), p, spec)
        bound = _bound(out.q[i].double().numpy(), out.k[i].double().numpy(), w.astype(np.float64),
                       s.astype(np.float64), spec.scale)
        err = (row_centred(dec) - row_centred(exact[i])).abs().numpy()
        assert (err <= bound * 1.0001 + 1e-5).all() and err.max() > 0


def test_capture_pays_only_for_what_the_codec_encodes():
    none, _ = load_teacher("random:tiny", layers=(8,), resolution=64, capture=())
    assert not none.model.blocks[8].attn.qkv._forward_hooks
    tok, _ = load_teacher("random:tiny", layers=(8, 9), resolution=64, capture=("x",))
    out = tok(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    assert out.q is None and out.k is None and out.x.shape == (2, 2, 16, 96)
    assert tok._x == {} and tok._qkv == {}
    with pytest.raises(ValueError, match="q and k together"):
        load_teacher("random:tiny", layers=(8,), resolution=64, capture=("q",))


def test_non_linear_qk_is_refused():
    model = timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=56, **RANDOM_PRESETS["tiny"])
    model.blocks[8].attn.k_norm = torch.nn.LayerNorm(8)
    with pytest.raises(ValueError, match="block 8: attn.k_norm is LayerNorm.*use qk-int8"):
        Teacher(model, (8,), 64, capture=("x",))
    Teacher(model, (8,), 64)  # q, k as captured: any k_norm is applied as usual
    other = timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=56, **RANDOM_PRESETS["tiny"])
    t = Teacher(other, (9,), 64, capture=("x",))
    linear = other.blocks[9].attn.qkv.forward
    other.blocks[9].attn.qkv.forward = lambda inp: linear(inp) * 2  # e.g. a wrapped / quantised Linear
    with pytest.raises(ValueError, match="block 9: attn.qkv is not the affine map"):
        t.qk_params()


# ----------------------------------------------------------------------------------------------
# a tokens-int8 cache end to end


@pytest.fixture(scope="module")
def tokens_cache(tmp_path_factory):
    from stages import preprocess_engine
    from stages.preprocess import run

    out = tmp_path_factory.mktemp("tokens") / "c"
    real = preprocess_engine.ShardWriter
    seen = []

    def writer(path, index):  # the group files must already be in place when a shard is opened
        if "teacher" in str(path):
            seen.append(sorted(p.name for p in (path.parent / CODEC_DIR).glob("*.npy")))
        return real(path, index)

    mp = pytest.MonkeyPatch()
    mp.setattr(preprocess_engine, "ShardWriter", writer)
    try:
        run(tiny_preprocess_config(out, source="synthetic:16", codec="tokens-int8", feat_codec="int8"))
    finally:
        mp.undo()
    assert seen and all(s == ["qk_bias.npy", "qk_weight.npy"] for s in seen)
    return out


def test_group_files_hashed_and_plain(tokens_cache):
    import hashlib

    from pipeline.cache.reader import open_cache

    c = open_cache(tokens_cache)
    gdir = tokens_cache / TEACHER / c.teacher.key
    assert set(c.teacher.codec_files) == {"qk_weight.npy", "qk_bias.npy"}
    for name, rec in c.teacher.codec_files.items():
        data = (gdir / CODEC_DIR / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == rec["sha256"] and len(data) == rec["bytes"]
        arr = np.load(gdir / CODEC_DIR / name, allow_pickle=False)
        assert arr.dtype == np.float32 and list(arr.shape) == rec["shape"]
    manifest = json.loads((gdir / "manifest.json").read_text())
    assert manifest["codec_files"] == c.teacher.codec_files and manifest["fields"]["x.npy"]["codec"] == "tokens-int8"


def test_trainer_decodes_and_trains_on_a_tokens_cache(tokens_cache, tmp_path):
    from trainutil import single_thread, stats, tiny_cfg

    from pipeline.cache.loader import CacheStream
    from pipeline.cache.reader import open_cache
    from pipeline.cache.schema import load_codec_params
    from trainer.engine import build_model, prepare_inputs
    from trainer.loop import train
    from trainer.phases import build_phases

    cache = open_cache(tokens_cache)
    ts = cache.teacher.spec
    batch = next(iter(CacheStream(cache, with_teacher=True, batch_size=4, seed=0)))
    cfg = tiny_cfg(tokens_cache, tmp_path / "run", {"align.teacher_layers": [9, 11], "align.student_blocks": [4, 6]})
    model, _ = build_model(cfg, torch.device("cpu"))
    inp = prepare_inputs(batch, model, cfg, build_phases(cfg.align)[0], cache, torch.device("cpu"),
                         torch.Generator().manual_seed(0))
    idx = [ts.layers.index(layer) for layer in cfg.align.teacher_layers]
    params = load_codec_params(tokens_cache / TEACHER / cache.teacher.key, ts, cache.teacher.codec_files)
    expect = get_codec("tokens-int8").decode({"x": batch["x"][:, idx]}, ts.scale,
                                             {n: torch.from_numpy(a[idx]) for n, a in params.items()})
    torch.testing.assert_close(inp.teacher_logits, expect)
    with single_thread():
        train(tiny_cfg(tokens_cache, tmp_path / "run2", {"total_steps": 3, "align.stop_step": 3, "ckpt_every": 3}))
    phase1 = [r for r in stats(tmp_path / "run2") if r["phase"] == "I"]
    assert len(phase1) == 3 and all(np.isfinite(r["attn"]) and r["attn"] > 0 for r in phase1)


def test_verify_fidelity_and_damaged_group_files(tokens_cache, tmp_path):
    from pipeline.cache.reader import open_cache
    from stages import cache_tools

    report = cache_tools.verify(tokens_cache, samples=3, fidelity=True)
    g = next(v for k, v in report["groups"].items() if k.startswith(TEACHER))
    assert report["ok"] and g["fresh"]["ok"] and g["fresh"]["max_rel_error"]["codec:qk_weight"] == 0
    assert g["fidelity"]["measured"] and g["fidelity"]["worst"]["meets_bar"]
    assert "codec/qk_weight.npy" in cache_tools.format_info(cache_tools.info(tokens_cache))

    copy = shutil.copytree(tokens_cache, tmp_path / "copy")  # a new path: nothing of it is cached in-process
    cache = open_cache(copy)
    w = copy / TEACHER / cache.teacher.key / CODEC_DIR / "qk_weight.npy"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    batch = {"x": torch.zeros(1, 4, 16, 98, dtype=torch.int8)}
    with pytest.raises(CacheFormatError, match="qk_weight.npy: sha256 differs"):
        cache.teacher_logits(batch)
    bad = cache_tools.verify(copy, samples=1, with_models=False)
    assert not bad["ok"] and any("qk_weight.npy: size/sha256 differ" in e
                                 for g in bad["groups"].values() for e in g["errors"])
    w.unlink()
    assert any("qk_weight.npy: missing" in e for g in cache_tools.verify(copy, samples=1, with_models=False)[
        "groups"].values() for e in g["errors"])


def test_existing_group_files_are_kept_or_refused(tmp_path):
    """A codec file left by an earlier run is never replaced (its shards were encoded against it):
    it must match this teacher's arrays, else the group is refused."""
    from pipeline.inputs.sources import open_source
    from stages.preprocess import PreprocessError, plan_groups, run

    cfg = tiny_preprocess_config(tmp_path / "c", source="synthetic:8", codec="tokens-int8")
    plan = plan_groups(cfg, open_source(cfg.source, synthetic_classes=cfg.synthetic_classes))[1]
    (plan.dir / CODEC_DIR).mkdir(parents=True)
    np.save(plan.dir / CODEC_DIR / "qk_bias.npy", np.ones((4, 2, 12, 8), np.float32))
    with pytest.raises(PreprocessError, match="qk_bias.npy differs from this teacher's arrays"):
        run(cfg)
    assert not list(plan.dir.glob("shard-*.tar"))
