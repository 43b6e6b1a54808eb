"""bench-train's re-enactment of HASTE's step (benchmarks/official_emulation.py) computes the official
math: same SiT outputs, logits and projections as our model, the teacher's logits of every block, and
loss.py's values equal to our objectives. (Its cost against the real code is a benchmark matter.)"""

from __future__ import annotations

import timm
import torch

from benchmarks.official_emulation import (
    explicit_teacher_attention,
    official_losses,
    official_mmdit_forward,
    official_sit_forward,
)
from pipeline.encoders.teacher import RANDOM_PRESETS
from trainer.config import load_train_config
from trainer.models.mmdit import MMDiT, MMDiTConfig
from trainer.models.sit import ModelConfig, SiT
from trainer.objectives import attention_alignment_loss, repa_loss


def _model() -> SiT:
    torch.manual_seed(0)
    model = SiT(ModelConfig(depth=4, hidden_size=64, num_heads=4, patch_size=2, input_size=8, num_classes=10,
                            projector_dim=32, z_dim=16, class_dropout_prob=0.0))
    with torch.no_grad():  # away from the zero init, so outputs are not trivially 0
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def test_official_forward_equals_our_model():
    model = _model()
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g), torch.tensor([3, 10])
    with torch.no_grad():
        out, acts, zs = official_sit_forward(model, x, t, y, encoder_depth=3)
        ours = model(x, t, y, attn_blocks=range(3), feature_block=2)
    assert len(acts) == 3 and len(zs) == 1 and ours.out.abs().mean() > 0.01
    torch.testing.assert_close(out, ours.out, rtol=1e-5, atol=1e-5)
    for i in range(3):
        torch.testing.assert_close(acts[i], ours.attn_logits[i], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zs[0], ours.features, rtol=1e-5, atol=1e-5)


def test_official_mmdit_forward_equals_our_model():
    """train_t2i.py's MM-DiT forward ((B, L, D) streams joined on the tokens, image-token logits in blocks
    0..encoder_depth-1, the projector after the last of them) computes what our MMDiT does when asked."""
    torch.manual_seed(0)
    model = MMDiT(MMDiTConfig(depth=4, hidden_size=64, num_heads=4, input_size=8, context_len=5, context_dim=24,
                              projector_dim=32, z_dim=16))
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g), torch.randn(2, 5, 24, generator=g)
    with torch.no_grad():
        out, acts, zs = official_mmdit_forward(model, x, t, ctx, encoder_depth=3)
        ours = model(x, t, ctx, attn_blocks=range(3), feature_block=2)
    assert len(acts) == 3 and acts[0].shape == (2, 4, 16, 16) and len(zs) == 1 and ours.out.abs().mean() > 0.01
    torch.testing.assert_close(out, ours.out, rtol=1e-5, atol=1e-5)
    for i in range(3):
        torch.testing.assert_close(acts[i], ours.attn_logits[i], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zs[0], ours.features, rtol=1e-5, atol=1e-5)


def test_explicit_teacher_keeps_every_blocks_patch_logits():
    vit = timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=56, **RANDOM_PRESETS["tiny"]).eval()
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    seen = {}

    def hook(i):
        def fn(module, inputs, output):
            seen[i] = output
        return fn

    with torch.no_grad():
        fused = vit.forward_features(images)
        for i, blk in enumerate(vit.blocks):
            blk.attn.qkv.register_forward_hook(hook(i))
        acts = explicit_teacher_attention(vit)
        explicit = vit.forward_features(images)
    torch.testing.assert_close(explicit, fused, rtol=1e-4, atol=1e-4)  # same function, explicit softmax
    assert len(acts) == len(vit.blocks)
    attn = vit.blocks[0].attn
    for i, a in enumerate(acts):
        q, k, _ = seen[i].reshape(2, 17, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        ref = (q * attn.scale) @ k.transpose(-2, -1)
        torch.testing.assert_close(a, ref[:, :, 1:, 1:])                 # CLS row and column dropped
        assert a.shape == (2, attn.num_heads, 16, 16)


def test_official_losses_equal_our_objectives():
    cfg = load_train_config(None, ("model.preset=SiT-S/2", "align.student_heads=[0, 1, 2]",
                                   "align.teacher_heads=[0, 1, 2]"))
    g = torch.Generator().manual_seed(3)
    acts = [torch.randn(2, 6, 16, 16, generator=g) for _ in range(8)]
    teacher_acts = [torch.randn(2, 3, 16, 16, generator=g) for _ in range(12)]
    zs, feat = [torch.randn(2, 16, 8, generator=g)], torch.randn(2, 16, 8, generator=g)
    out, target = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    denoise, attn, proj = official_losses(out, target, acts, zs, teacher_acts, feat, cfg, phase1=True)
    a = cfg.align
    ref_attn = attention_alignment_loss([acts[b] for b in a.student_blocks], [teacher_acts[t] for t in a.teacher_layers],
                                        a.student_heads, a.teacher_heads)
    torch.testing.assert_close(attn, ref_attn)
    torch.testing.assert_close(proj, repa_loss(zs[0], feat))
    torch.testing.assert_close(denoise, ((out - target) ** 2).mean(dim=(1, 2, 3)))
    assert official_losses(out, target, acts, zs, teacher_acts, feat, cfg, phase1=False)[1:] == (None, None)
