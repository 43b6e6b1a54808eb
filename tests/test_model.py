"""Tests for trainer/models/sit.py: shapes, init, parameter counts, checkpoint keys, taps, embeddings.

Every reference here is written independently of the model code (loops and explicit formulas
from SPEC §1), and tiny configs keep each test well under a second on CPU.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import trainer.models.sit as model_mod
from trainer.models.sit import SIT_PRESETS, ModelConfig, ModelOut, SiT, count_params, model_config

TINY = dict(depth=4, hidden_size=64, num_heads=4, patch_size=2, input_size=8, num_classes=10,
            projector_dim=32, z_dim=16)


def tiny(**overrides) -> SiT:
    torch.manual_seed(0)
    return SiT(ModelConfig(**{**TINY, **overrides}))


def perturb_(model: SiT, std: float = 0.1, seed: int = 1) -> SiT:
    """Give every trainable weight random values, so zero-init does not make outputs trivially 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


def inputs(cfg: ModelConfig, n: int = 2, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.rand(n, generator=g)
    y = torch.randint(0, cfg.num_classes + 1, (n,), generator=g)  # includes the null label
    return x, t, y


def ref_timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    out = torch.zeros(len(t), dim, dtype=torch.float64)
    half = dim // 2
    for n, tn in enumerate(t.tolist()):
        for k in range(half):
            f = max_period ** (-k / half)
            out[n, k] = math.cos(tn * f)
            out[n, half + k] = math.sin(tn * f)
    return out


def ref_pos_embed(dim: int, grid: int) -> np.ndarray:
    """MAE 2-D sin-cos table, written per token: token h*grid + w gets [sin ωw, cos ωw, sin ωh, cos ωh]."""
    q = dim // 4
    omega = np.array([1.0 / 10000 ** (i / q) for i in range(q)])
    table = np.zeros((grid * grid, dim))
    for h in range(grid):
        for w in range(grid):
            table[h * grid + w] = np.concatenate(
                [np.sin(w * omega), np.cos(w * omega), np.sin(h * omega), np.cos(h * omega)]
            )
    return table


def ref_forward(model: SiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
    """SiT forward from SPEC §1.2 in plain functional ops; returns output, per-block logits and hidden states."""
    cfg = model.cfg
    p, D, H = cfg.patch_size, cfg.hidden_size, cfg.num_heads
    hd, N, g = D // H, x.shape[0], cfg.input_size // cfg.patch_size
    h = F.conv2d(x, model.x_embedder.proj.weight, model.x_embedder.proj.bias, stride=p)
    h = h.flatten(2).transpose(1, 2) + model.pos_embed
    temb = ref_timestep_embedding(t).to(x.dtype)
    c = model.t_embedder.mlp(temb) + model.y_embedder.embedding_table.weight[y]
    logits_all, hidden = [], []
    for blk in model.blocks:
        mods = blk.adaLN_modulation[1](F.silu(c)).chunk(6, dim=-1)
        a_in = F.layer_norm(h, (D,), eps=1e-6) * (1 + mods[1][:, None]) + mods[0][:, None]
        q, k, v = blk.attn.qkv(a_in).reshape(N, -1, 3, H, hd).unbind(2)  # (N, T, H, hd)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        if cfg.qk_norm:
            q, k = blk.attn.q_norm(q), blk.attn.k_norm(k)
        logits = torch.einsum("nhid,nhjd->nhij", q, k) / math.sqrt(hd)
        a = torch.einsum("nhij,nhjd->nhid", logits.softmax(-1), v).transpose(1, 2).reshape(N, -1, D)
        h = h + mods[2][:, None] * blk.attn.proj(a)
        m_in = F.layer_norm(h, (D,), eps=1e-6) * (1 + mods[4][:, None]) + mods[3][:, None]
        h = h + mods[5][:, None] * blk.mlp.fc2(F.gelu(blk.mlp.fc1(m_in), approximate="tanh"))
        logits_all.append(logits)
        hidden.append(h)
    fl = model.final_layer
    shift, scale = fl.adaLN_modulation[1](F.silu(c)).chunk(2, dim=-1)
    o = fl.linear(F.layer_norm(h, (D,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None])
    C = cfg.in_channels
    img = torch.zeros(N, C, cfg.input_size, cfg.input_size, dtype=o.dtype)
    for i in range(g):
        for j in range(g):
            img[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p] = o[:, i * g + j].reshape(N, p, p, C).permute(0, 3, 1, 2)
    return img, logits_all, hidden


# ----------------------------------------------------------------------------
# Shapes, init, sizes, keys


@pytest.mark.parametrize("patch", [2, 4, 8])
def test_output_shapes(patch):
    model = tiny(patch_size=patch, input_size=16)
    x, t, y = inputs(model.cfg)
    res = model(x, t, y, attn_blocks=[0], feature_block=1)
    assert isinstance(res, ModelOut)
    T = (16 // patch) ** 2
    assert model.cfg.num_tokens == T
    assert res.out.shape == x.shape
    assert res.attn_logits[0].shape == (2, 4, T, T)
    assert res.features.shape == (2, T, 16)


def test_zero_output_at_init():
    model = tiny()
    x, t, y = inputs(model.cfg)
    assert torch.equal(model(x, t, y).out, torch.zeros_like(x))


def test_init_values():
    model = tiny()
    for blk in model.blocks:
        assert not blk.adaLN_modulation[1].weight.any() and not blk.adaLN_modulation[1].bias.any()
        assert blk.attn.qkv.weight.std() > 0 and not blk.attn.qkv.bias.any()
    fl = model.final_layer
    for t in (fl.linear.weight, fl.linear.bias, fl.adaLN_modulation[1].weight, fl.adaLN_modulation[1].bias):
        assert not t.any()
    assert not model.pos_embed.requires_grad
    table = model.y_embedder.embedding_table.weight
    assert table.shape == (11, 64) and abs(table.std().item() - 0.02) < 0.005
    assert abs(model.t_embedder.mlp[0].weight.std().item() - 0.02) < 0.003
    w = model.x_embedder.proj.weight  # xavier on the (D, C·p·p) view: bound sqrt(6 / (D + C·p·p))
    assert w.abs().max() <= math.sqrt(6 / (64 + 16)) and w.abs().max() > 0.5 * math.sqrt(6 / 80)
    assert not model.projectors[0][4].bias.any()


@pytest.mark.parametrize(
    "name, millions", [("SiT-S/2", 32.86), ("SiT-B/2", 130.30), ("SiT-L/2", 457.82), ("SiT-XL/2", 674.82)]
)
def test_param_counts(name, millions):
    with torch.device("meta"):
        model = SiT(model_config(name))
    assert round(count_params(model) / 1e6, 2) == millions


def test_count_params_options():
    with torch.device("meta"):
        model = SiT(model_config("SiT-B/2"))
    # SPEC §1.1 "+ pos_embed + projector" column: what the official train.py logs.
    assert round(count_params(model, exclude_projector=False, trainable_only=False) / 1e6, 2) == 137.85
    assert count_params(model, trainable_only=False) - count_params(model) == 256 * 768


def official_keys(depth: int, qk_norm: bool) -> set[str]:
    keys = {"pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias", "y_embedder.embedding_table.weight"}
    wb = ("weight", "bias")
    keys |= {f"t_embedder.mlp.{i}.{s}" for i in (0, 2) for s in wb}
    keys |= {f"projectors.0.{i}.{s}" for i in (0, 2, 4) for s in wb}
    keys |= {f"final_layer.{m}.{s}" for m in ("linear", "adaLN_modulation.1") for s in wb}
    mods = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"]
    mods += ["attn.q_norm", "attn.k_norm"] if qk_norm else []
    keys |= {f"blocks.{b}.{m}.{s}" for b in range(depth) for m in mods for s in wb}
    return keys


@pytest.mark.parametrize("qk_norm", [False, True])
def test_state_dict_keys_match_official(qk_norm):
    model = tiny(depth=2, qk_norm=qk_norm)
    assert set(model.state_dict()) == official_keys(2, qk_norm)
    assert len(model.state_dict()) == len(official_keys(2, qk_norm))


def test_no_projector_when_z_dim_zero():
    model = tiny(z_dim=0)
    assert not any(k.startswith("projectors") for k in model.state_dict())
    x, t, y = inputs(model.cfg)
    assert model(x, t, y).features is None
    with pytest.raises(ValueError, match="z_dim"):
        model(x, t, y, feature_block=0)


def test_sit_s2_builds_and_runs():
    torch.manual_seed(0)
    model = SiT(model_config("SiT-S/2", z_dim=0))  # the official SiT-S crashes here (SPEC §7.10)
    x, t, y = inputs(model.cfg, n=1)
    with torch.no_grad():
        assert model(x, t, y).out.shape == (1, 4, 32, 32)


# ----------------------------------------------------------------------------
# Forward semantics and taps


@pytest.mark.parametrize("qk_norm", [False, True])
def test_forward_matches_reference(qk_norm):
    model = perturb_(tiny(qk_norm=qk_norm)).double()
    x, t, y = (z.double() if z.is_floating_point() else z for z in inputs(model.cfg))
    res = model(x, t, y, attn_blocks=range(4), feature_block=3)
    ref_out, ref_logits, ref_hidden = ref_forward(model, x, t, y)
    assert res.out.abs().mean() > 0.1  # not trivially zero
    # Not exact in float64: the model computes the sinusoid in fp32, as the official code does.
    close = dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(res.out, ref_out, **close)
    for i in range(4):
        torch.testing.assert_close(res.attn_logits[i], ref_logits[i], **close)
    torch.testing.assert_close(res.features, model.projectors[0](ref_hidden[3]), **close)


def test_attn_taps_equal_fused_path():
    model = perturb_(tiny())
    x, t, y = inputs(model.cfg)
    with torch.no_grad():
        fused = model(x, t, y)
        tapped = model(x, t, y, attn_blocks={1, 3})
    assert fused.out.abs().mean() > 0.1
    torch.testing.assert_close(tapped.out, fused.out, rtol=1e-5, atol=1e-5)
    assert sorted(tapped.attn_logits) == [1, 3]
    assert sorted(model(x, t, y, attn_blocks=(i for i in (0, 2))).attn_logits) == [0, 2]  # iterator
    for a in tapped.attn_logits.values():
        assert a.shape == (2, 4, 16, 16)


def test_taps_under_bf16_autocast():
    model = perturb_(tiny())
    x, t, y = inputs(model.cfg)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = model(x, t, y)
        tapped = model(x, t, y, attn_blocks=range(4), feature_block=3)
    assert tapped.attn_logits[0].dtype == torch.bfloat16
    torch.testing.assert_close(tapped.out.float(), fused.out.float(), rtol=0.05, atol=0.05)


def test_logits_carry_gradient():
    model = perturb_(tiny())
    x, t, y = inputs(model.cfg)
    logits = model(x, t, y, attn_blocks=[0]).attn_logits[0]
    logits.softmax(-1)[..., 0].sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_unrequested_logits_are_never_computed(monkeypatch):
    calls = {"logits": 0, "sdpa": 0}
    logits_fn, sdpa = model_mod.attention_logits, F.scaled_dot_product_attention

    def counting_logits(*args, **kwargs):
        calls["logits"] += 1
        return logits_fn(*args, **kwargs)

    def counting_sdpa(*args, **kwargs):
        calls["sdpa"] += 1
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(model_mod, "attention_logits", counting_logits)
    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    model = tiny()
    x, t, y = inputs(model.cfg)
    res = model(x, t, y, feature_block=2)
    assert res.attn_logits == {} and calls == {"logits": 0, "sdpa": 4}
    res = model(x, t, y, attn_blocks=[2])  # the tapped block's output is fused SDPA too
    assert list(res.attn_logits) == [2] and calls == {"logits": 1, "sdpa": 8}


def test_tapped_blocks_keep_no_attention_probabilities_and_match_explicit_gradients():
    """Aligned blocks: output from fused SDPA, logits from their own product (the official
    fused_attn=True path). Backward keeps nothing (T, T) but the logits' own graph, and the
    gradients of a loss on both the output and the logits equal an explicit softmax's."""
    model = perturb_(tiny(input_size=12))  # T = 36 tokens, head_dim 16: a (T, T) shape is unambiguous
    x, t, y = inputs(model.cfg)
    T = model.cfg.num_tokens
    saved: list[tuple[int, ...]] = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x, t, y, attn_blocks=[1, 3])
    # An explicit softmax saved its (N, H, T, T) probabilities (and a copy); only q·kᵀ's operands remain.
    assert saved and not [s for s in saved if s[-2:] == (T, T)]

    model = model.double()  # gradients against the explicit reference, in float64
    x, t = x.double(), t.double()
    res = model(x, t, y, attn_blocks=[1, 3])
    loss = res.out.square().mean() + sum(lg.log_softmax(-1)[..., 0].mean() for lg in res.attn_logits.values())
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)

    ref_out, ref_logits, _ = ref_forward(model, x, t, y)  # explicit softmax((q k^T)/sqrt(hd)) v per block
    ref_loss = ref_out.square().mean() + sum(ref_logits[b].log_softmax(-1)[..., 0].mean() for b in (1, 3))
    ref = torch.autograd.grad(ref_loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    for g, r in zip(grads, ref):
        if r is None:
            assert g is None or not g.abs().any()
        else:
            torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-8)


def test_features_are_projected_output_of_feature_block():
    model = perturb_(tiny())
    x, t, y = inputs(model.cfg)
    with torch.no_grad():
        h = model.x_embedder(x) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y)
        hidden = []
        for blk in model.blocks:
            h, _ = blk(h, c)
            hidden.append(h)
        for k in range(4):
            feats = model(x, t, y, feature_block=k).features
            torch.testing.assert_close(feats, model.projectors[0](hidden[k]), rtol=1e-5, atol=1e-5)
        assert model(x, t, y).features is None


@pytest.mark.parametrize("kwargs, bad", [
    (dict(attn_blocks=[1, 4]), "4"), (dict(attn_blocks=[-1]), "-1"),
    (dict(feature_block=4), "4"), (dict(feature_block=-1), "-1"),
])
def test_bad_block_indices_raise(kwargs, bad):
    model = tiny()
    x, t, y = inputs(model.cfg)
    with pytest.raises(ValueError, match=rf"(?<![\d-]){bad}(?!\d)"):
        model(x, t, y, **kwargs)


def test_wrong_input_shape_raises():
    model = tiny()
    _, t, y = inputs(model.cfg)
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(2, 4, 16, 16), t, y)


def test_forward_never_drops_labels_in_train_mode():
    model = perturb_(tiny()).train()
    x, t, y = inputs(model.cfg, n=64)
    torch.testing.assert_close(model(x, t, y).out, model(x, t, y).out, rtol=0, atol=0)


# ----------------------------------------------------------------------------
# Embeddings and labels


def test_pos_embed_matches_mae_formula():
    for cfg in (dict(), dict(hidden_size=96, num_heads=4, input_size=12, patch_size=2)):
        model = tiny(**cfg)
        g = model.cfg.input_size // model.cfg.patch_size
        ref = ref_pos_embed(model.cfg.hidden_size, g)
        assert model.pos_embed.shape == (1, g * g, model.cfg.hidden_size)
        np.testing.assert_allclose(model.pos_embed[0].numpy(), ref, rtol=0, atol=1e-6)


def test_timestep_embedding_matches_formula():
    t = torch.tensor([0.0, 1e-3, 0.25, 0.5, 0.999, 1.0])
    emb = model_mod.TimestepEmbedder.timestep_embedding(t, 256)
    assert emb.shape == (6, 256)
    torch.testing.assert_close(emb.double(), ref_timestep_embedding(t), rtol=0, atol=1e-5)
    model = tiny()
    torch.testing.assert_close(model.t_embedder(t), model.t_embedder.mlp(ref_timestep_embedding(t).float()),
                               rtol=1e-5, atol=1e-6)


def test_drop_labels():
    model = tiny(num_classes=1000, class_dropout_prob=0.1)
    y = torch.randint(0, 1000, (100_000,), generator=torch.Generator().manual_seed(0))
    y_before = y.clone()
    a = model.drop_labels(y, torch.Generator().manual_seed(5))
    b = model.drop_labels(y, torch.Generator().manual_seed(5))
    c = model.drop_labels(y, torch.Generator().manual_seed(6))
    assert torch.equal(y, y_before)  # input untouched
    assert torch.equal(a, b) and not torch.equal(a, c)
    dropped = a != y
    assert abs(dropped.float().mean().item() - 0.1) < 0.005
    assert (a[dropped] == 1000).all() and torch.equal(a[~dropped], y[~dropped])
    assert a.dtype == y.dtype


def test_drop_labels_prob_zero_and_one():
    y = torch.arange(10).repeat(100)
    assert torch.equal(tiny(class_dropout_prob=0.0).drop_labels(y, torch.Generator().manual_seed(0)), y)
    assert (tiny(class_dropout_prob=1.0).drop_labels(y) == 10).all()


# ----------------------------------------------------------------------------
# Config and presets


@pytest.mark.parametrize("field, value", [
    ("depth", 0), ("hidden_size", 66), ("num_heads", 0), ("patch_size", 3), ("input_size", 0),
    ("in_channels", 0), ("num_classes", 0), ("mlp_ratio", 0.0), ("class_dropout_prob", 1.5),
    ("projector_dim", 0), ("z_dim", -1), ("depth", 2.5),
])
def test_config_validation_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{**TINY, field: value})


def test_config_properties_and_presets():
    cfg = ModelConfig()
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (28, 1152, 16, 2)
    assert cfg.num_tokens == 256 and cfg.head_dim == 72
    assert len(SIT_PRESETS) == 12 and "SiT-S/8" in SIT_PRESETS
    assert model_config("SiT-XL/2") == cfg
    b4 = model_config("SiT-B/4", qk_norm=True, input_size=64)
    assert (b4.depth, b4.hidden_size, b4.num_heads, b4.patch_size, b4.qk_norm) == (12, 768, 12, 4, True)
    assert b4.num_tokens == 256 and b4.head_dim == 64
    with pytest.raises(ValueError, match="SiT-M/2"):
        model_config("SiT-M/2")
    with pytest.raises(ValueError, match="hidden_size"):
        model_config("SiT-S/2", num_heads=5)
