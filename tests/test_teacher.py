"""pipeline.encoders.teacher: the hooked targets equal a hook-free manual attention of the timm model."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from pipeline.cache.schema import TEACHER, TeacherSpec, decode_members, encode_teacher_sample, get_codec
from pipeline.encoders.teacher import IMAGENET_MEAN, IMAGENET_STD, RANDOM_PRESETS, load_teacher, preprocess
from pipeline.encoders.weights import state_dict_sha256

RES = 64  # teacher input 56 px -> 4x4 patch grid


def _images(n: int = 3, res: int = RES, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, res, res), generator=g, dtype=torch.uint8)


def _hook_free_copy(arch: str, seed: int, size: int) -> torch.nn.Module:
    """Same recipe as load_teacher('random:tiny'), built independently and never hooked."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(arch, pretrained=False, img_size=size, **RANDOM_PRESETS["tiny"]).eval()


@torch.no_grad()
def _manual(model: torch.nn.Module, x: torch.Tensor, layers) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Run the ViT by hand: per block norm1 -> qkv -> (q*scale) @ k^T among patch tokens only."""
    p = model.num_prefix_tokens
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    logits = {}
    for i, blk in enumerate(model.blocks):
        if i in layers:
            attn = blk.attn
            n, t, d = x.shape
            y = blk.norm1(x)
            qkv = F.linear(y, attn.qkv.weight, attn.qkv.bias)
            qkv = qkv.reshape(n, t, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)
            q, k = qkv[0], qkv[1]
            full = (q * attn.scale) @ k.transpose(-2, -1)            # (N, H, P+T, P+T)
            logits[i] = full[:, :, p:, p:]
        x = blk(x)
    return logits, model.norm(x)[:, p:]


@pytest.mark.parametrize("arch,prefix", [("vit_base_patch14_dinov2", 1), ("vit_small_patch14_reg4_dinov2", 5)])
def test_decoded_qk_fp32_equals_manual_attention(arch, prefix):
    layers = (0, 5, 8, 11)
    teacher, ident = load_teacher("random:tiny", arch=arch, layers=layers, resolution=RES, seed=3)
    assert teacher.num_prefix_tokens == prefix == teacher.model.num_prefix_tokens
    assert ident["num_prefix_tokens"] == prefix and ident["input_size"] == 56
    ref_model = _hook_free_copy(arch, 3, 56)
    assert state_dict_sha256(ref_model) == state_dict_sha256(teacher.model) == ident["weights_sha256"]
    assert not any(m._forward_hooks for m in ref_model.modules())

    images = _images()
    out = teacher(images)
    assert out.feat.shape == (3, 16, 96) and out.q.shape == (3, len(layers), 12, 16, 8)

    # store + load through the schema with codec qk-fp32, decode to logits
    spec = TeacherSpec(layers=layers, num_heads=12, head_dim=8, embed_dim=96, grid=4, num_prefix_tokens=prefix,
                       scale=teacher.scale, feat_dtype="float32", codec="qk-fp32")
    decoded = [decode_members(TEACHER, spec, encode_teacher_sample(spec, out.feat[i].numpy(), out.q[i].numpy(),
                                                                   out.k[i].numpy()), f"s{i}") for i in range(3)]
    arrays = {n: torch.from_numpy(np.stack([d[n] for d in decoded])) for n in ("q", "k")}
    logits = get_codec("qk-fp32").decode(arrays, spec.scale)
    feat = torch.from_numpy(np.stack([d["feat"] for d in decoded]))

    x = preprocess(images, 56)
    manual, manual_feat = _manual(ref_model, x, layers)
    for j, layer in enumerate(layers):
        err = (logits[:, j] - manual[layer]).abs().max().item()
        assert err <= 1e-5, (layer, err)
        assert manual[layer].abs().max() > 1e-3  # not trivially zero
    # the same tokens forward_features gives, prefix tokens removed by the model's own count
    with torch.no_grad():
        ff = ref_model.forward_features(x)
    assert ff.shape[1] == prefix + 16
    torch.testing.assert_close(feat, ff[:, prefix:], rtol=0, atol=0)
    torch.testing.assert_close(feat, manual_feat, rtol=0, atol=1e-5)

    # the prefix really is cls + registers: keeping any prefix token would change the grid
    assert manual[layers[0]].shape[-1] == 16 and ff.shape[1] - prefix == 16


def test_hooks_leave_model_output_unchanged():
    teacher, _ = load_teacher("random:tiny", layers=(8, 9, 10, 11), resolution=RES, seed=0)
    assert all(len(teacher.model.blocks[i].attn.qkv._forward_hooks) == 1 for i in (8, 9, 10, 11))
    ref = _hook_free_copy("vit_base_patch14_dinov2", 0, 56)
    x = preprocess(_images(), 56)
    with torch.no_grad():
        a = teacher.model.forward_features(x)
        b = ref.forward_features(x)
        c = teacher.model(x)
        d = ref(x)
    assert torch.equal(a, b) and torch.equal(c, d)
    # the teacher's own call does not leak captured activations between calls
    teacher(_images())
    assert teacher._qkv == {}


def test_teacher_is_batch_independent():
    """A sample's targets do not depend on what else is in its batch (shards are byte-stable)."""
    teacher, _ = load_teacher("random:tiny", layers=(8, 11), resolution=RES, seed=0)
    imgs = _images(4)
    full = teacher(imgs)
    part = teacher(imgs[1:3])
    torch.testing.assert_close(full.feat[1:3], part.feat, rtol=0, atol=1e-6)
    torch.testing.assert_close(full.q[1:3], part.q, rtol=0, atol=1e-6)


def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    t = np.abs(t)
    return np.where(t <= 1, (a + 2) * t**3 - (a + 3) * t**2 + 1,
                    np.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a, 0.0))


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of PyTorch-style bicubic (a=-0.75, half-pixel centres, edge clamp, no antialias)."""
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        i0 = int(np.floor(src))
        for j in range(i0 - 1, i0 + 3):
            w[i, min(max(j, 0), n_in - 1)] += _cubic(np.array(src - j))
    return w


def _reference_preprocess(images: np.ndarray, size: int) -> np.ndarray:
    """Independent float64 implementation of SPEC §3.2: /255 -> ImageNet normalize -> bicubic resize."""
    x = images.astype(np.float64) / 255.0
    x = (x - np.array(IMAGENET_MEAN)[None, :, None, None]) / np.array(IMAGENET_STD)[None, :, None, None]
    wh = _bicubic_matrix(x.shape[2], size)
    ww = _bicubic_matrix(x.shape[3], size)
    return wh @ x @ ww.T


@pytest.mark.parametrize("res,size", [(64, 56), (256, 224), (48, 64)])
def test_preprocess_matches_independent_reference(res, size):
    imgs = _images(2, res, seed=res)
    ours = preprocess(imgs, size).double().numpy()
    ref = _reference_preprocess(imgs.numpy(), size)
    assert ours.shape == ref.shape == (2, 3, size, size)
    # float32 torch computes source positions in fp32: ~1e-4 off the float64 reference at most
    np.testing.assert_allclose(ours, ref, rtol=0, atol=5e-4)
    # An antialiased resize (or torchvision-style [0,1] input without normalization) would not pass.
    x = (imgs.float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    if size < res:
        aa = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).double().numpy()
        assert np.abs(aa - ref).max() > 1e-2


def test_preprocess_normalizes_before_resizing():
    """Normalize, then resize the float image: bicubic overshoot at a sharp edge survives. (Resizing the
    uint8 image first, as a PIL/torchvision uint8 pipeline would, clamps it to [0, 255].)"""
    img = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    img[..., :, 16:] = 255
    ours = preprocess(img, 28)
    lo = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    hi = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    # overshoot beyond the normalized range of valid pixels survives (no clamp in between)
    assert (ours[0].amax(dim=(1, 2)) > hi + 1e-3).all() and (ours[0].amin(dim=(1, 2)) < lo - 1e-3).all()
    np.testing.assert_allclose(ours.double().numpy(), _reference_preprocess(img.numpy(), 28), rtol=0, atol=5e-4)


def test_teacher_layer_range_checked():
    with pytest.raises(ValueError, match=r"layers \[12\] out of range"):
        load_teacher("random:tiny", layers=(11, 12), resolution=RES)
