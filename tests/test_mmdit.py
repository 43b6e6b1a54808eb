"""Tests for trainer/models/mmdit.py: joint attention vs a straightforward reference, image-token
logits, official state-dict keys and default init, official checkpoints, presets.

The references are written from HASTE `models/mmdit.py` (and train_t2i.py's arguments), not from
our module: `official_state` lays out the official module tree layer by layer, `ref_forward` is
the official block_mixing as explicit per-head softmaxes over the [context; image] tokens.
"""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_model import ref_pos_embed  # the MAE table written per token (tests/ is on sys.path)

from trainer import checkpoint
from trainer.models.mmdit import MMDIT_PRESETS, MMDiT, MMDiTConfig, mmdit_config, official_mmdit_config
from trainer.models.sit import ModelOut, count_params

# Context width 24 != hidden 64 and context_len 5, so a mixed-up axis cannot pass by accident.
TINY = dict(depth=3, hidden_size=64, num_heads=4, patch_size=2, input_size=8, context_len=5, context_dim=24,
            projector_dim=32, z_dim=16)


def tiny(**overrides) -> MMDiT:
    torch.manual_seed(0)
    return MMDiT(MMDiTConfig(**{**TINY, **overrides}))


def inputs(cfg: MMDiTConfig, n: int = 2, seed: int = 2, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g, dtype=dtype)
    t = torch.rand(n, generator=g, dtype=dtype)
    context = torch.randn(n, cfg.context_len, cfg.context_dim, generator=g, dtype=dtype)
    return x, t, context


# ----------------------------------------------------------------------------
# The official module tree (HASTE models/mmdit.py with train_t2i.py's MMDiT(input_size, z_dims, encoder_depth))


def official_state(cfg: MMDiTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """The official MMDiT's state dict, in state_dict order, built layer by layer from its __init__.

    MMDiT.__init__ (L527-622) registers x_embedder (PatchEmbed.proj conv), t_embedder.mlp[0, 2],
    context_embedder (Linear(768, hidden)), the `pos_embed` buffer, joint_blocks (JointBlock:
    context_block then x_block, each a DismantledBlock: norm1, attn = SelfAttention(qkv, proj unless
    pre_only), norm2 + mlp(fc1, fc2) unless pre_only, adaLN_modulation[1] with 2 or 6 × hidden; the
    context_block of block depth-1 is pre_only), final_layer (norm_final, linear, adaLN_modulation[1]),
    projectors (build_mlp: Linear at 0, 2, 4). LayerNorms have no affine weights and every other
    option is off (no y_embedder, registers, qk_norm, swiglu). Layers are created in that order
    under `seed`, so the weights are the official default init. `pos_embed` is a root buffer and is
    saved before every child.
    """
    torch.manual_seed(seed)
    D, p, C, hidden = cfg.hidden_size, cfg.patch_size, cfg.in_channels, int(cfg.hidden_size * cfg.mlp_ratio)
    table = torch.from_numpy(ref_pos_embed(D, cfg.input_size // p)).float().unsqueeze(0)
    sd = {"pos_embed": table if torch.get_default_device().type != "meta" else table.to("meta")}

    def add(prefix: str, layer: nn.Module) -> None:
        sd.update({f"{prefix}.{name}": v for name, v in layer.state_dict().items()})

    add("x_embedder.proj", nn.Conv2d(C, D, kernel_size=p, stride=p))
    add("t_embedder.mlp.0", nn.Linear(256, D))
    add("t_embedder.mlp.2", nn.Linear(D, D))
    add("context_embedder", nn.Linear(cfg.context_dim, D))
    for i in range(cfg.depth):
        for stream in ("context_block", "x_block"):
            pre_only = stream == "context_block" and i == cfg.depth - 1
            b = f"joint_blocks.{i}.{stream}"
            add(f"{b}.attn.qkv", nn.Linear(D, 3 * D, bias=cfg.qkv_bias))
            if not pre_only:
                add(f"{b}.attn.proj", nn.Linear(D, D))
                add(f"{b}.mlp.fc1", nn.Linear(D, hidden))
                add(f"{b}.mlp.fc2", nn.Linear(hidden, D))
            add(f"{b}.adaLN_modulation.1", nn.Linear(D, (2 if pre_only else 6) * D))
    add("final_layer.linear", nn.Linear(D, p * p * C))
    add("final_layer.adaLN_modulation.1", nn.Linear(D, 2 * D))
    if cfg.z_dim:
        for j, (a, b) in zip((0, 2, 4), [(D, cfg.projector_dim), (cfg.projector_dim, cfg.projector_dim),
                                         (cfg.projector_dim, cfg.z_dim)]):
            add(f"projectors.0.{j}", nn.Linear(a, b))
    return sd


def param_formula(cfg: MMDiTConfig) -> int:
    """Trainable parameters without the projector, by layer arithmetic."""
    D, pc, h = cfg.hidden_size, cfg.patch_size**2 * cfg.in_channels, int(cfg.hidden_size * cfg.mlp_ratio)
    qkv = 3 * D * D + 3 * D * cfg.qkv_bias
    full = qkv + (D * D + D) + (D * h + h) + (h * D + D) + (6 * D * D + 6 * D)  # attn, proj, fc1, fc2, adaLN
    pre_only = qkv + 2 * D * D + 2 * D
    embed = (pc * D + D) + (256 * D + D + D * D + D) + (cfg.context_dim * D + D)
    final = (D * pc + pc) + (2 * D * D + 2 * D)
    return (2 * cfg.depth - 1) * full + pre_only + embed + final


# ----------------------------------------------------------------------------
# Reference forward: official block_mixing with explicit per-head softmax


def ref_forward(model: MMDiT, x, t, context, feature_block=None):
    cfg, W = model.cfg, {k: v for k, v in model.state_dict().items()}
    D, H, p, C = cfg.hidden_size, cfg.num_heads, cfg.patch_size, cfg.in_channels
    hd, N, g, L = D // H, x.shape[0], cfg.input_size // p, cfg.context_len
    table = torch.from_numpy(ref_pos_embed(D, g)).float().to(x.dtype)  # official: float64 table -> .float()

    def lin(v, name):
        return F.linear(v, W[f"{name}.weight"], W.get(f"{name}.bias"))

    def modulate(v, shift, scale):
        return F.layer_norm(v, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    h = F.conv2d(x, W["x_embedder.proj.weight"], W["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    h = h + table
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)  # official formula, fp32
    tf = torch.cat([torch.cos(t.float()[:, None] * freqs), torch.sin(t.float()[:, None] * freqs)], -1).to(x.dtype)
    c = lin(F.silu(lin(tf, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    ctx = lin(context, "context_embedder")
    logits_img, features = {}, None
    for i in range(cfg.depth):
        streams = {}
        for name, v in (("context_block", ctx), ("x_block", h)):
            b = f"joint_blocks.{i}.{name}"
            pre_only = name == "context_block" and i == cfg.depth - 1
            mods = lin(F.silu(c), f"{b}.adaLN_modulation.1").chunk(2 if pre_only else 6, dim=1)
            qkv = lin(modulate(v, mods[0], mods[1]), f"{b}.attn.qkv")  # (N, tokens, 3D): [q | k | v]
            streams[name] = (b, v, mods, qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:])
        q, k, v = (torch.cat([streams["context_block"][j], streams["x_block"][j]], dim=1) for j in (3, 4, 5))
        att = torch.zeros_like(q)
        logits_img[i] = torch.zeros(N, H, g * g, g * g, dtype=x.dtype)
        for n in range(N):
            for head in range(H):
                s = slice(head * hd, (head + 1) * hd)
                a = torch.softmax(q[n, :, s] @ k[n, :, s].T / math.sqrt(hd), dim=-1)  # over all L + T keys
                att[n, :, s] = a @ v[n, :, s]
                xq, xk = streams["x_block"][3][n, :, s], streams["x_block"][4][n, :, s]
                logits_img[i][n, head] = (xq @ xk.T) / math.sqrt(hd)
        new = {}
        for name, part in (("context_block", att[:, :L]), ("x_block", att[:, L:])):
            b, v, mods, *_ = streams[name]
            if len(mods) == 2:  # pre_only: the last block's text stream ends here
                continue
            _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
            v = v + gate_msa[:, None] * lin(part, f"{b}.attn.proj")
            mlp = lin(F.gelu(lin(modulate(v, shift_mlp, scale_mlp), f"{b}.mlp.fc1"), approximate="tanh"), f"{b}.mlp.fc2")
            new[name] = v + gate_mlp[:, None] * mlp
        ctx, h = new.get("context_block"), new["x_block"]
        if i == feature_block:
            features = lin(F.silu(lin(F.silu(lin(h, "projectors.0.0")), "projectors.0.2")), "projectors.0.4")
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    tok = lin(modulate(h, shift, scale), "final_layer.linear")  # (N, T, p*p*C), per token (pi, qi, c)
    out = torch.zeros(N, C, g * p, g * p, dtype=x.dtype)
    for hi in range(g):
        for wi in range(g):
            out[:, :, hi * p:(hi + 1) * p, wi * p:(wi + 1) * p] = tok[:, hi * g + wi].reshape(N, p, p, C).permute(0, 3, 1, 2)
    return out, logits_img, features


# ----------------------------------------------------------------------------
# Forward


def test_forward_equals_reference_joint_attention_fp64():
    model = tiny().double()
    x, t, context = inputs(model.cfg, dtype=torch.float64)
    got = model(x, t, context, attn_blocks=(0, 2), feature_block=1)
    out, logits, features = ref_forward(model, x, t, context, feature_block=1)
    assert isinstance(got, ModelOut) and got.out.shape == (2, 4, 8, 8)
    torch.testing.assert_close(got.out, out, rtol=1e-10, atol=1e-10)
    assert sorted(got.attn_logits) == [0, 2]  # only the requested blocks
    for i in (0, 2):
        assert got.attn_logits[i].shape == (2, 4, 16, 16)  # (N, H, T_img, T_img): no text tokens
        torch.testing.assert_close(got.attn_logits[i], logits[i], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.features, features, rtol=1e-10, atol=1e-10)


def test_forward_fp32_and_text_matters():
    model = tiny(patch_size=4, input_size=16)  # g = 4 again, p = 4
    x, t, context = inputs(model.cfg)
    with torch.no_grad():
        got = model(x, t, context).out
        out, _, _ = ref_forward(model, x, t, context)
        torch.testing.assert_close(got, out, rtol=1e-4, atol=1e-5)
        # No position embedding on the text side (CLIP features carry their own): the order of the
        # text tokens does not matter, their content does.
        torch.testing.assert_close(model(x, t, context.flip(1)).out, got, rtol=1e-5, atol=1e-5)
        assert (model(x, t, context * 0.5).out - got).abs().max() > 1e-3
        # The pre_only stream's text keys feed the last image attention.
        model.joint_blocks[-1].context_block.attn.qkv.weight.add_(0.5)
        assert (model(x, t, context).out - got).abs().max() > 1e-3


def test_taps_do_not_change_the_output_and_default_init_is_not_zero():
    model = tiny()
    x, t, context = inputs(model.cfg)
    with torch.no_grad():
        plain = model(x, t, context)
        tapped = model(x, t, context, attn_blocks=range(3), feature_block=2)
    assert plain.attn_logits == {} and plain.features is None
    assert torch.equal(plain.out, tapped.out)  # the logits are a side computation; attention stays fused
    assert sorted(tapped.attn_logits) == [0, 1, 2] and tapped.features.shape == (2, 16, 16)
    # PyTorch default init, no adaLN-zero: the untrained net does not predict 0.
    assert plain.out.abs().mean() > 1e-3
    assert model.joint_blocks[0].x_block.adaLN_modulation[1].weight.abs().sum() > 0


def test_logits_are_scaled_product_of_image_queries_and_keys():
    """Independent of ref_forward: q, k read straight from block 0's qkv on the image stream."""
    model = tiny()
    x, t, context = inputs(model.cfg)
    with torch.no_grad():
        got = model(x, t, context, attn_blocks=[0]).attn_logits[0]
        blk = model.joint_blocks[0].x_block
        h = model.x_embedder(x) + model.pos_embed
        shift, scale = blk.adaLN_modulation(model.t_embedder(t)).chunk(6, dim=1)[:2]
        qkv = blk.attn.qkv(F.layer_norm(h, (64,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None])
        q = qkv[..., :64].reshape(2, 16, 4, 16).transpose(1, 2)
        k = qkv[..., 64:128].reshape(2, 16, 4, 16).transpose(1, 2)
    torch.testing.assert_close(got, torch.einsum("nhid,nhjd->nhij", q, k) * 16**-0.5, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (dict(context=(2, 6, 24)), "context has shape"),
    (dict(context=(2, 5, 64)), "context has shape"),
    (dict(x=(2, 4, 16, 16)), "x has shape"),
    (dict(attn_blocks=[3]), "attn_blocks"),
    (dict(feature_block=-1), "feature_block"),
])
def test_bad_requests_fail_clearly(bad, match):
    model = tiny()
    x, t, context = inputs(model.cfg)
    x = torch.zeros(bad["x"]) if "x" in bad else x
    context = torch.zeros(bad["context"]) if "context" in bad else context
    with pytest.raises(ValueError, match=match):
        model(x, t, context, attn_blocks=bad.get("attn_blocks", ()), feature_block=bad.get("feature_block"))
    with pytest.raises(ValueError, match="z_dim == 0"):
        tiny(z_dim=0)(*inputs(tiny(z_dim=0).cfg), feature_block=0)


@pytest.mark.parametrize("field, value", [("hidden_size", 66), ("num_heads", 0), ("input_size", 7),
                                          ("context_dim", 0), ("depth", True), ("qkv_bias", 1)])
def test_config_is_validated(field, value):
    with pytest.raises(ValueError, match=f"MMDiTConfig.{field}"):
        MMDiTConfig(**{**TINY, field: value})


# ----------------------------------------------------------------------------
# Official keys, init and checkpoints


@pytest.mark.parametrize("overrides", [{}, dict(z_dim=0), dict(qkv_bias=False, depth=1)])
def test_state_dict_is_the_official_one(overrides):
    """Same keys in the same order, same shapes, and the same default init under the same seed."""
    model = tiny(**overrides)
    ours, official = model.state_dict(), official_state(model.cfg, seed=0)
    assert list(ours) == list(official)
    for key, v in official.items():
        assert torch.equal(ours[key], v), key
    assert "pos_embed" in dict(model.named_buffers()) and "pos_embed" not in dict(model.named_parameters())


def test_paper_preset_keys_shapes_and_size():
    cfg = mmdit_config("MMDiT-24/2")
    assert cfg == MMDiTConfig() and (cfg.hidden_size, cfg.num_heads, cfg.head_dim) == (768, 24, 32)
    with torch.device("meta"):
        model, official = MMDiT(cfg), official_state(cfg)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == [
        (k, tuple(v.shape)) for k, v in official.items()]
    # pos_embed, x/t/context embedders, 23 full joint blocks, the last (x 10 + pre_only text 4), final, projector
    assert len(official) == 1 + 2 + 4 + 2 + 23 * 2 * 10 + (10 + 4) + 4 + 6 == 493
    assert count_params(model) == param_formula(cfg) == 505_070_608  # SPEC §8: about 505M
    assert count_params(model, exclude_projector=False) == 512_415_504


@pytest.mark.slow
def test_preset_shapes():
    """Every preset's size by the layer arithmetic; a meta-device forward (no memory, no math) for three."""
    assert len(MMDIT_PRESETS) == 15
    for name in MMDIT_PRESETS:
        cfg = mmdit_config(name)
        assert cfg.hidden_size == 32 * cfg.depth and cfg.head_dim == 32
        with torch.device("meta"):
            assert count_params(MMDiT(cfg)) == param_formula(cfg), name
    for name in ("MMDiT-15/2", "MMDiT-24/4", "MMDiT-30/8"):
        cfg = mmdit_config(name)
        with torch.device("meta"):
            out = MMDiT(cfg)(*inputs_meta(cfg), attn_blocks=[0], feature_block=cfg.depth - 1)
        T = cfg.num_tokens
        assert out.out.shape == (1, 4, 32, 32) and out.attn_logits[0].shape == (1, cfg.depth, T, T)
        assert out.features.shape == (1, T, 768)


def inputs_meta(cfg: MMDiTConfig):
    return (torch.empty(1, 4, cfg.input_size, cfg.input_size), torch.empty(1),
            torch.empty(1, cfg.context_len, cfg.context_dim))


def test_official_checkpoint_loads_strictly_and_samples(tmp_path):
    cfg = MMDiTConfig(**{**TINY, "z_dim": 768})
    ema = official_state(cfg, seed=3)
    args = argparse.Namespace(resolution=64, enc_type="dinov2-vit-b", encoder_depth=2, qk_norm=False,
                              fused_attn=True, exp_name="t2i_haste")
    path = tmp_path / "0150000.pt"
    torch.save({"model": official_state(cfg, seed=4), "ema": ema, "opt": {}, "args": args, "steps": 150000}, path)
    ckpt = checkpoint.load(path)  # weights_only, Namespace allow-listed
    tiny_arch = {k: v for k, v in TINY.items() if k not in ("input_size", "z_dim")}
    got_cfg = official_mmdit_config(ckpt["args"], **tiny_arch)
    assert got_cfg == cfg
    model = MMDiT(got_cfg)
    model.load_state_dict(ckpt["ema"], strict=True)
    assert torch.equal(model.joint_blocks[1].context_block.mlp.fc2.weight, ema["joint_blocks.1.context_block.mlp.fc2.weight"])
    with torch.no_grad():
        x, t, context = inputs(cfg)
        out = model(x, t, context)
        ref, _, _ = ref_forward(model, x, t, context)
    torch.testing.assert_close(out.out, ref, rtol=1e-4, atol=1e-5)


def test_official_args_give_the_paper_config():
    train = argparse.Namespace(resolution=256, enc_type="dinov2-vit-b", encoder_depth=8, qk_norm=False)
    assert official_mmdit_config(train) == MMDiTConfig()
    generate = argparse.Namespace(resolution=256, projector_embed_dims="768", encoder_depth=8)
    assert official_mmdit_config(generate) == MMDiTConfig()
    assert official_mmdit_config(argparse.Namespace(resolution=512, enc_type="dinov2-vit-l")).input_size == 64
    assert official_mmdit_config(argparse.Namespace(resolution=512, enc_type="dinov2-vit-l")).z_dim == 1024
    for bad in (argparse.Namespace(enc_type="None"), argparse.Namespace(projector_embed_dims="768,1024"),
                argparse.Namespace(enc_type="dinov2-vit-b,mocov3-vit-b")):
        with pytest.raises(ValueError, match="pass z_dim"):
            official_mmdit_config(bad)
        assert official_mmdit_config(bad, z_dim=0).z_dim == 0
