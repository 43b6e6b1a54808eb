"""stream-<p>: the residual stream entering the first aligned block per sample + the frozen blocks
once per teacher group, rerun in pure torch at decode time.

The pure-torch blocks against timm's forward (logits from the qkv hooks, final-norm features),
the bit-packed rows (a hand-computed byte layout, the s/2 bound), the stored stream's round-trip
bound, a known-answer case (identity blocks, a stream on the int8 grid: decoded = exact, so the
fidelity metrics must be perfect), refusals, and a stream-int8 cache end to end: group files
hashed, no stored features, the trainer decoding and training on it, ``cache verify --fidelity``,
the dry-run's ImageNet-1k / 512 px sizes, and an old cache (manifest without the new spec fields)
still decoded by the new trainer path."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import timm
import torch

from pipeline.cache import fidelity
from pipeline.cache.codecs import decode_targets, get_codec, pack_bits_torch, row_centred, unpack_bits
from pipeline.cache.codecs_base import quantize_rows_torch
from pipeline.cache.codecs_blocks import block_shapes, run_blocks
from pipeline.cache.codecs_stream import (
    DECODE_COMPUTE,
    INT_BITS,
    _native_bf16,
    decode_gflop,
    decode_stream,
    stream_codec,
)
from pipeline.cache.codecs_tokens import basis
from pipeline.cache.schema import (
    TEACHER,
    CacheFormatError,
    TeacherSpec,
    decode_members,
    encode_teacher_sample,
    fields,
)
from pipeline.encoders.teacher import RANDOM_PRESETS, Teacher, load_teacher

SPEC = TeacherSpec(layers=(8, 11), num_heads=3, head_dim=8, embed_dim=24, grid=4, num_prefix_tokens=1,
                   scale=8 ** -0.5, codec="stream-int8", depth=12, mlp_dim=96)


def _blocks(spec: TeacherSpec = SPEC, seed: int = 0, ls: float | None = None) -> dict[str, np.ndarray]:
    """Random block arrays in codecs_blocks' layout: LayerNorms and LayerScales far from identity
    (unless ``ls`` fixes the LayerScales), weights at the scale of a trained ViT's."""
    rng = np.random.default_rng(seed)
    d = spec.embed_dim
    out = {}
    for name, shape in block_shapes(spec.depth - min(spec.layers), d, spec.mlp_dim).items():
        fan_in = shape[-1] if len(shape) == 3 else d
        out[name] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
        if name.endswith(("norm1_weight", "norm2_weight", "norm_weight")):
            out[name] = (1 + 0.3 * rng.standard_normal(shape)).astype(np.float32)
        if name.startswith("ls"):
            out[name] = np.full(shape, ls, np.float32) if ls is not None else rng.uniform(0.2, 1.0, shape).astype(np.float32)
    out["attn_qkv_weight"][:, :2 * d] *= 3  # sharper attention than 1/sqrt(D) weights give
    return out


def _stream(spec: TeacherSpec = SPEC, seed: int = 0, n: int = 2) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, spec.num_prefix_tokens + spec.num_tokens, spec.embed_dim))
    return (x * 2).astype(np.float32)


def _torch(a: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in a.items()}


def _encode(name: str, stream: np.ndarray, spec: TeacherSpec = SPEC) -> torch.Tensor:
    """Through the schema: encode -> npy bytes -> zero-copy decode; the batch of stored rows."""
    spec = TeacherSpec(**{**spec.__dict__, "codec": name})
    rows = [decode_members(TEACHER, spec, encode_teacher_sample(spec, None, stream=s), "t")["stream"] for s in stream]
    return torch.from_numpy(np.stack(rows))


def _targets(name: str, stream: np.ndarray, arrays: dict[str, np.ndarray], spec: TeacherSpec = SPEC,
             compute: str = "fp32", **kw):
    """Decoded through the registry; in fp32 unless ``compute`` says otherwise (the CPU default is bf16-mixed,
    tested on its own), so that these tests see the storage error alone."""
    spec = TeacherSpec(**{**spec.__dict__, "codec": name})
    params = _torch(get_codec(name).store_params(arrays))
    with mock.patch.dict(DECODE_COMPUTE, {"cpu": compute}):
        return decode_targets(spec, {"stream": _encode(name, stream, spec)}, params, **kw)


def _exact(stream: np.ndarray, arrays: dict[str, np.ndarray], spec: TeacherSpec = SPEC):
    at = [layer - min(spec.layers) for layer in spec.layers]
    out = run_blocks(torch.from_numpy(stream).double(), {k: v.double() for k, v in _torch(arrays).items()},
                     num_heads=spec.num_heads, scale=spec.scale, prefix=spec.num_prefix_tokens, logits_at=at)
    return out.feat, out.logits


# ----------------------------------------------------------------------------------------------
# names, members, packing


def test_names_members_and_params():
    c = get_codec("stream-int8")
    assert c.inputs == ("stream",) and c.derives_features and not c.per_layer and not c.lossless
    assert c.members(SPEC) == {"stream": ("int8", (17, 26))}
    assert get_codec("stream-int10").members(SPEC) == {"stream": ("uint8", (17, 32))}   # 24·10/8 + 2
    assert get_codec("stream-fp16").members(SPEC) == {"stream": ("float16", (17, 24))}
    params = c.params(SPEC)
    assert params["attn_qkv_weight"] == ("float32", (4, 72, 24)) and params["basis"] == ("float32", (24, 24))
    assert params["norm_weight"] == ("float32", (24,)) and "basis" not in get_codec("stream-fp16").params(SPEC)
    assert set(fields(TEACHER, SPEC)) == {"stream.npy"}  # features are derived, never stored
    for bad, field in (("stream-int6", "precision"), ("stream-r8-int8", "rank")):
        with pytest.raises(CacheFormatError, match=f"field '{field}'"):
            get_codec(bad)
    with pytest.raises(CacheFormatError, match="records depth=0"):
        c.params(TeacherSpec(**{**SPEC.__dict__, "depth": 0}))
    with pytest.raises(CacheFormatError, match="decode_targets"):
        c.decode({"stream": torch.zeros(1, 17, 26, dtype=torch.int8)}, SPEC.scale)
    with pytest.raises(CacheFormatError, match="non-finite values in the stored stream"):
        get_codec("stream-fp16").on_device(torch.full((17, 24), 1e5))
    with pytest.raises(CacheFormatError, match="non-finite"):
        get_codec("stream-int10").on_device(torch.full((17, 24), float("nan")))
    with pytest.raises(CacheFormatError, match="block weights"):
        decode_stream(torch.zeros(1, 17, 26, dtype=torch.int8), "int8", SPEC, None)
    # DINOv2-B, blocks 8-11 at 256 px: 4 blocks of 257 tokens + un-rotating the stream
    b = TeacherSpec(layers=(8, 9, 10, 11), num_heads=12, head_dim=64, embed_dim=768, grid=16, num_prefix_tokens=1,
                    scale=0.125, codec="stream-int8", depth=12, mlp_dim=3072)
    per_block = 2 * (257 * 768 * (4 * 768 + 2 * 3072) + 2 * 257 ** 2 * 768)
    assert decode_gflop(b) == pytest.approx((4 * per_block + 2 * 257 * 768 ** 2) / 1e9)


def test_bit_packing_layout_by_hand():
    """Row [511, -511, 1, 0]·2⁻⁴ at 10 bits: scale 2⁻⁴ exactly, u = v + 512 = [1023, 1, 513, 512], LSB first."""
    x = torch.tensor([[511.0, -511.0, 1.0, 0.0]]) / 16
    packed = pack_bits_torch(x, 10)
    assert packed.dtype == torch.uint8
    assert packed[0].tolist() == [0xFF, 0x07, 0x10, 0x20, 0x80, 0x00, 0x2C]  # + fp16 0.0625 = 0x2C00, little-endian
    torch.testing.assert_close(unpack_bits(packed, 10), x, atol=0, rtol=0)


@pytest.mark.parametrize("bits", [6, 10, 12])
def test_bit_packed_rows_within_half_a_step(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 5, 64, generator=g) * torch.logspace(-3, 3, 5).view(1, 5, 1)
    x[0, 0] = 0
    y = unpack_bits(pack_bits_torch(x, bits), bits)
    stored = quantize_rows_torch(x, 2 ** (bits - 1) - 1)[1].float()   # the fp16 scale in the row's last 2 bytes
    assert ((y - x).abs() <= stored / 2).all()
    assert (y[0, 0] == 0).all() and (y - x).abs().max() > 0
    # where the scale is a normal fp16 (rows not tiny), it is max|x|/qmax rounded up by at most 2^-10
    s = x.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    normal = s >= 2 ** -14
    assert normal.sum() >= 6 and ((stored <= s * (1 + 2 ** -10)) | ~normal).all()
    with pytest.raises(CacheFormatError, match="whole bytes"):
        pack_bits_torch(torch.zeros(1, 3), 10)


@pytest.mark.parametrize("prec", ["int8", "int10", "int12", "fp16"])
def test_stored_stream_round_trip_bound(prec):
    """|x̂ R − x R| ≤ s/2 per element in the stored basis, so ‖x̂_i − x_i‖₂ ≤ √D s_i/2 after un-rotating."""
    stream = _stream(seed=3)
    arrays = get_codec(f"stream-{prec}").store_params(_blocks())
    from pipeline.cache.codecs_stream import load_stream

    got = load_stream(_encode(f"stream-{prec}", stream), prec, _torch(arrays)).double().numpy()
    err = np.linalg.norm(got - stream, axis=-1)
    if prec == "fp16":
        assert (np.abs(got - stream) <= np.abs(stream) * 2 ** -11 + 1e-7).all()
        return
    rot = stream @ basis(24).double().numpy()
    s = np.abs(rot).max(-1) / (2 ** (INT_BITS[prec] - 1) - 1) * (1 + 2 ** -10)
    assert (err <= np.sqrt(24) * s / 2 * 1.0001).all() and err.max() > 0
    assert err.max() / np.linalg.norm(stream, axis=-1).min() < {"int8": 3e-2, "int10": 8e-3, "int12": 2e-3}[prec]


# ----------------------------------------------------------------------------------------------
# decode: exact math, known answers, the error through the blocks


def test_fp32_decode_is_the_exact_block_math_in_any_layer_order():
    stream, arrays = _stream(seed=1), _blocks(seed=1)
    feat, logits = _targets("stream-fp32", stream, arrays)
    ref_feat, ref_logits = _exact(stream, arrays)
    torch.testing.assert_close(feat.double(), ref_feat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits.double(), ref_logits, atol=1e-4, rtol=1e-5)
    assert logits.shape == (2, 2, 3, 16, 16) and feat.shape == (2, 16, 24)
    # the trainer's pair order, a repeated layer, attention only (the run stops at block 11's logits)
    f2, l2 = _targets("stream-fp32", stream, arrays, layer_index=[1, 0, 1], features=False)
    assert f2 is None
    torch.testing.assert_close(l2, logits[:, [1, 0, 1]])


def test_decode_precision_follows_the_device_and_each_stays_within_the_bar():
    """CPUs decode as bf16-mixed (the default is bitwise that run): the projections and MLPs in bf16, the
    qkv GEMM and the logits in fp32; CUDA runs the blocks under fp16 autocast, checked here on the CPU's
    fp16 kernels. Each against the float64 blocks; bf16 autocast (its q kᵀ in bf16) errs the most."""
    stream, arrays = _stream(seed=4, n=3), _blocks(seed=4)
    spec = TeacherSpec(**{**SPEC.__dict__, "codec": "stream-int10"})
    rows = _encode("stream-int10", stream)
    params = _torch(get_codec("stream-int10").store_params(arrays))
    assert DECODE_COMPUTE == {"cuda": "fp16", "cpu": "bf16-mixed" if _native_bf16() else "fp32"}
    out = {c: decode_stream(rows, "int10", spec, params, compute=c) for c in ("fp32", "bf16-mixed", "fp16", "bf16")}
    f_default, l_default = decode_stream(rows, "int10", spec, params)
    default = out[DECODE_COMPUTE["cpu"]]
    assert torch.equal(f_default, default[0]) and torch.equal(l_default, default[1])
    with pytest.raises(ValueError, match="decode precision 'fp8'"):
        decode_stream(rows, "int10", spec, params, compute="fp8")
    ref_feat, ref_logits = _exact(stream, arrays)
    err = {}
    for c, (feat, logits) in out.items():
        assert feat.dtype == logits.dtype == torch.float32
        assert c == "fp32" or not torch.equal(logits, out["fp32"][1])  # really computed in that precision
        m = fidelity.measure(ref_logits.float(), logits, ref_feat.float(), feat)
        err[c] = (logits.double() - ref_logits).abs().max().item()
        if c != "bf16":
            assert m["worst"]["grad_cos_min"] > 0.999 and m["worst"]["feat_cos_err_mean"] < 1e-3
    assert err["fp32"] < err["bf16-mixed"] < err["bf16"]


def test_bf16_mixed_keeps_the_logit_path_in_fp32():
    """Only the attention projection and the MLP run in bf16: with LayerScale 0 they never reach the
    stream, so bf16-mixed equals the fp32 decode exactly, while bf16 autocast (q kᵀ in bf16) does not."""
    stream, arrays = _stream(seed=5, n=2), _blocks(seed=5, ls=0.0)
    spec = TeacherSpec(**{**SPEC.__dict__, "codec": "stream-int10"})
    rows = _encode("stream-int10", stream)
    params = _torch(get_codec("stream-int10").store_params(arrays))
    f32, l32 = decode_stream(rows, "int10", spec, params, compute="fp32")
    fm, lm = decode_stream(rows, "int10", spec, params, compute="bf16-mixed")
    assert torch.equal(l32, lm) and torch.equal(f32, fm)
    assert not torch.equal(l32, decode_stream(rows, "int10", spec, params, compute="bf16")[1])


def test_known_answer_identity_blocks_and_int8_grid_stream():
    """LayerScale 0 makes every block the identity on the residual stream, and a stream whose rows in
    the stored basis are integers · a power of two survives int8 exactly up to a per-token factor
    (the fp16 scale rounded up), which every LayerNorm removes: decoded targets = exact targets, so
    the fidelity metrics must read perfect. With LayerScale on, the same stream is no longer exact."""
    rng = np.random.default_rng(7)
    y = rng.integers(-127, 128, size=(2, 17, 24)).astype(np.float64)
    y[..., 0] = 127                                                       # every row's max is 127
    stream = (y * 2.0 ** -4 @ basis(24).double().numpy().T).astype(np.float32)
    arrays = _blocks(seed=2, ls=0.0)
    feat, logits = _targets("stream-int8", stream, arrays)
    ref_feat, ref_logits = _exact(stream, arrays)
    torch.testing.assert_close(feat.double(), ref_feat, atol=2e-5, rtol=0)
    torch.testing.assert_close(row_centred(logits.double()), row_centred(ref_logits), atol=2e-5, rtol=0)
    m = fidelity.measure(ref_logits, logits, ref_feat, feat)
    assert m["worst"]["grad_cos_min"] > 1 - 1e-9 and m["worst"]["kl_max"] < 1e-9
    assert m["worst"]["feat_cos_err_max"] < 1e-9 and m["worst"]["meets_bar"]
    live = _blocks(seed=2)
    lossy = fidelity.measure(_exact(stream, live)[1], _targets("stream-int8", stream, live)[1], ref_feat, feat)
    assert lossy["worst"]["kl_max"] > 1e-7  # not vacuous: real blocks carry the rounding into the logits


def test_more_bits_less_error_through_the_blocks():
    """The stored stream's error reaches the logits and features through the blocks; each precision
    step must shrink it (int10 vs int8: 4x in the stream, and in the targets by more than 2x)."""
    stream, arrays = _stream(seed=4), _blocks(seed=4)
    ref_feat, ref_logits = _exact(stream, arrays)
    errs = {}
    for prec in ("int8", "int10", "int12", "fp16"):
        feat, logits = _targets(f"stream-{prec}", stream, arrays)
        errs[prec] = (float((row_centred(logits.double()) - row_centred(ref_logits)).abs().max()),
                      float(fidelity.feature_cosine_error(ref_feat, feat).mean()))
    for a, b in (("int8", "int10"), ("int10", "int12"), ("int12", "fp16")):
        assert errs[b][0] < errs[a][0] and errs[b][1] < errs[a][1], errs
    assert errs["int10"][0] < errs["int8"][0] / 2 and errs["int10"][1] < errs["int8"][1] / 4, errs
    assert errs["int8"][1] < 1e-3


def test_unrotated_ablation_loses_to_the_basis_on_outlier_channels():
    stream, arrays = _stream(seed=5), _blocks(seed=5)
    stream[..., :2] *= 30                        # a residual stream's few huge channels
    ref = row_centred(_exact(stream, arrays)[1])
    rms = {}
    for label, codec in (("basis", stream_codec("int8")), ("plain", stream_codec("int8", fixed_basis=False))):
        spec = TeacherSpec(**{**SPEC.__dict__, "codec": "stream-int8"})
        rows = torch.from_numpy(np.stack([codec.encode(s, SPEC.scale)["stream"] for s in stream]))
        logits = codec.targets({"stream": rows}, spec, _torch(codec.store_params(arrays)), None, False, True)[1]
        rms[label] = float((row_centred(logits.double()) - ref).pow(2).mean().sqrt())
    assert rms["basis"] < rms["plain"] / 2


# ----------------------------------------------------------------------------------------------
# the teacher: captured stream and extracted blocks reproduce timm's forward


def _tiny_teacher(capture=("q", "k", "stream"), layers=(8, 9, 11)):
    teacher, _ = load_teacher("random:tiny", layers=layers, resolution=64, seed=3, capture=capture)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-like teacher: LayerScale and LayerNorms far from their init
        for blk in teacher.model.blocks:
            for ls in (blk.ls1, blk.ls2):
                ls.gamma.copy_(torch.rand(ls.gamma.shape, generator=g) * 0.8 + 0.2)
            blk.norm1.weight.copy_(1 + 0.3 * torch.randn(blk.norm1.weight.shape, generator=g))
            blk.norm1.bias.copy_(0.1 * torch.randn(blk.norm1.bias.shape, generator=g))
    return teacher


def test_stored_blocks_reproduce_the_timm_teacher():
    teacher = _tiny_teacher()
    images = torch.randint(0, 256, (3, 3, 64, 64), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    out = teacher(images)
    assert out.stream.shape == (3, 17, 96) and teacher.depth == 12 and teacher.mlp_dim == 384
    spec = TeacherSpec(layers=(8, 9, 11), num_heads=12, head_dim=8, embed_dim=96, grid=4, num_prefix_tokens=1,
                       scale=teacher.scale, codec="stream-fp32", depth=12, mlp_dim=384)
    arrays = teacher.stream_params()
    assert arrays["attn_qkv_weight"].shape == (4, 288, 96)                  # blocks 8, 9, 10, 11
    with mock.patch.dict(DECODE_COMPUTE, {"cpu": "fp32"}):  # the block math itself, not a precision choice
        feat, logits = decode_targets(spec, {"stream": out.stream}, _torch(get_codec("stream-fp32").store_params(arrays)))
    exact = get_codec("qk-fp32").decode({"q": out.q, "k": out.k}, teacher.scale)  # the hooks' logits, CLS removed
    torch.testing.assert_close(logits, exact, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(feat, out.feat, atol=1e-4, rtol=1e-4)       # forward_features' final norm


def test_blocks_that_are_not_dinov2_are_refused():
    model = timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=56, **RANDOM_PRESETS["tiny"])
    model.blocks[10].mlp.act = torch.nn.GELU(approximate="tanh")
    with pytest.raises(ValueError, match="block 10: mlp.*not as in DINOv2.*use tokens-int8"):
        Teacher(model, (8, 11), 64, capture=("stream",))
    Teacher(model, (11,), 64, capture=("stream",))        # blocks before the first aligned one are never rerun
    other = timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=56, **RANDOM_PRESETS["tiny"])
    other.blocks[9].norm2 = torch.nn.LayerNorm(96, eps=1e-5)
    with pytest.raises(ValueError, match="block 9 norm2"):
        Teacher(other, (8,), 64, capture=("stream",))
    third = timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=56, **RANDOM_PRESETS["tiny"])
    t = Teacher(third, (10,), 64, capture=("stream",))
    forward = third.blocks[11].forward
    third.blocks[11].forward = lambda x, **kw: forward(x, **kw) * 1.5  # e.g. a patched block
    with pytest.raises(ValueError, match="does not reproduce the model's forward"):
        t.stream_params()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_decode_keeps_the_bar_and_agrees_with_the_cpu_fp16_decode():
    """The trainer decodes on the GPU under fp16 autocast (DECODE_COMPUTE; TF32 for what stays fp32): against
    the float64 blocks it must keep the bar, and agree with the CPU's fp16 kernels (the same precision,
    whose fidelity bench_codecs reports as the CUDA row). Not yet run on a GPU here."""
    stream, arrays = _stream(seed=8, n=4), _blocks(seed=8)
    spec = TeacherSpec(**{**SPEC.__dict__, "codec": "stream-int10"})
    rows = _encode("stream-int10", stream)
    params = _torch(get_codec("stream-int10").store_params(arrays))
    ref_feat, ref_logits = (t.float() for t in _exact(stream, arrays))
    cpu_feat, cpu_logits = decode_targets(spec, {"stream": rows}, params, compute="fp16")
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        gfeat, glogits = decode_targets(spec, {"stream": rows.cuda()}, {k: v.cuda() for k, v in params.items()})
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    m = fidelity.measure(ref_logits, glogits.cpu(), ref_feat, gfeat.cpu())
    assert m["worst"]["grad_cos_min"] > 0.999 and m["worst"]["feat_cos_err_mean"] < 1e-3
    same = fidelity.measure(cpu_logits, glogits.cpu(), cpu_feat, gfeat.cpu())
    assert same["worst"]["grad_cos_min"] > 0.999 and same["worst"]["feat_cos_err_mean"] < 1e-3


def test_bf16_copies_are_made_once_per_params_and_device_and_bounded():
    """The bf16 weights of bf16-mixed are cast once per (params mapping, device), reused every step,
    never confused between mappings, and at most a few mappings are kept."""
    from pipeline.cache import codecs_stream

    params = _torch(get_codec("stream-int10").store_params(_blocks(seed=9)))
    cpu = torch.device("cpu")
    first = codecs_stream._low_weights(params, params, cpu)
    assert codecs_stream._low_weights(params, params, cpu) is first
    assert all(t.dtype == torch.bfloat16 for t in first.values())
    other = {k: v * 2 for k, v in params.items()}
    second = codecs_stream._low_weights(other, other, cpu)
    assert second is not first and torch.equal(second["mlp_fc1_weight"], (params["mlp_fc1_weight"] * 2).bfloat16())
    for _ in range(2 * codecs_stream._LOW_ENTRIES):
        fresh = dict(params)
        codecs_stream._low_weights(fresh, fresh, cpu)
    assert len(codecs_stream._LOW) <= codecs_stream._LOW_ENTRIES
