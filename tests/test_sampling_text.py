"""Text-conditional sampling: CFG against the null encoding (the empty caption) instead of the null class.

The samplers take any condition with one row per sample; under guidance the unconditional half of
the doubled batch is the null condition. Checked against straightforward loops that call the
model twice per step (conditional, then unconditional with the null in every row) and combine
uncond + w·(cond − uncond), on a toy field and on a tiny MM-DiT through ``generate_latents``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.generate import generate_latents
from trainer.models.mmdit import MMDiT, MMDiTConfig
from trainer.sampling import (
    PerSampleNoise,
    SamplerConfig,
    euler_maruyama_sampler,
    euler_sampler,
    null_batch,
    sample,
)

N, C, L, D = 3, 2, 5, 4
MU, S = 1.5, 0.5


def toy(x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """Exact N(MU, S²) velocity plus a shift per sample and channel read from the context."""
    tb = t.double().view(-1, 1, 1, 1)
    var = (1 - tb) ** 2 * S**2 + tb**2
    base = -MU + (tb - (1 - tb) * S**2) / var * (x.double() - (1 - tb) * MU)
    shift = ctx[:, 0, :C].double().view(-1, C, 1, 1) + 0.1 * ctx.double().mean(dim=(1, 2)).view(-1, 1, 1, 1)
    return (base + (1 - tb) * shift).to(x.dtype)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(N, C, 3, 3, generator=g, dtype=torch.float64)
    ctx = torch.randn(N, L, D, generator=g, dtype=torch.float64)
    null = torch.randn(L, D, generator=g, dtype=torch.float64)
    return noise, ctx, null


def _guided_v(x, t, ctx, null, w, guided):
    """Two separate calls: conditional, unconditional with the null in every row."""
    tt = torch.full((x.shape[0],), t, dtype=torch.float64)
    cond = toy(x, tt, ctx)
    if not guided:
        return cond
    uncond = toy(x, tt, null.unsqueeze(0).repeat(x.shape[0], 1, 1))
    return uncond + w * (cond - uncond)


def reference_euler(noise, ctx, null, steps, w, lo, hi):
    ts = [1 - i / steps for i in range(steps + 1)]
    x = noise.clone()
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t_cur) * _guided_v(x, t_cur, ctx, null, w, w > 1 and lo <= t_cur <= hi)
    return x


def _drift(x, t, c):
    v = toy(x, torch.full((N,), t, dtype=torch.float64), c)
    return v - 0.5 * (2 * t) * ((-(1 - t) * v - x) / t)


def reference_sde(noise, ctx, null, steps, w, seed):
    """Euler–Maruyama with the linear score, guidance on the drift (d is affine in v), one noise draw per step."""
    g, x = torch.Generator().manual_seed(seed), noise.clone()
    ts = [1 - (1 - 0.04) * i / (steps - 1) for i in range(steps)] + [0.0]
    for i in range(steps):
        t, dt = ts[i], ts[i + 1] - ts[i]

        cond, uncond = (_drift(x, t, c) for c in (ctx, null.unsqueeze(0).repeat(N, 1, 1)))
        d = uncond + w * (cond - uncond)
        if i < steps - 1:
            x = x + d * dt + math.sqrt(2 * t) * torch.randn(x.shape, generator=g, dtype=torch.float64) * math.sqrt(abs(dt))
        else:
            x = x + dt * d
    return x


def test_ode_cfg_with_null_encoding_equals_two_call_reference() -> None:
    noise, ctx, null = _inputs()
    got = euler_sampler(toy, noise, ctx, num_steps=8, cfg_scale=2.25, guidance_low=0.2,
                        guidance_high=0.7, null_cond=null)
    ref = reference_euler(noise, ctx, null, 8, 2.25, 0.2, 0.7)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    unguided = euler_sampler(toy, noise, ctx, num_steps=8, null_cond=null)
    assert not torch.allclose(got, unguided)  # the null really entered


def test_sde_cfg_with_null_encoding_equals_two_call_reference() -> None:
    noise, ctx, null = _inputs(1)
    got = euler_maruyama_sampler(toy, noise, ctx, num_steps=6, cfg_scale=2.25, null_cond=null,
                                 generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, reference_sde(noise, ctx, null, 6, 2.25, seed=7), rtol=1e-10, atol=1e-10)


def test_doubled_batch_carries_the_null_in_every_unconditional_row() -> None:
    noise, ctx, null = _inputs()
    seen = []

    def spy(x, t, c):
        seen.append(c.clone())
        return toy(x, t, c)

    sample(spy, noise, ctx, SamplerConfig(mode="ode", num_steps=4, cfg_scale=3.0, guidance_high=0.5), null_cond=null)
    doubled = [c for c in seen if c.shape[0] == 2 * N]
    assert len(doubled) == 2 and len(seen) == 4  # t = 0.5 and 0.25 guided; t = 1 and 0.75 not
    for c in doubled:
        assert torch.equal(c[:N], ctx) and all(torch.equal(c[N + i], null) for i in range(N))


def test_null_once_or_per_row_and_labels_as_null_cond_are_the_same() -> None:
    noise, ctx, null = _inputs()
    cfg = SamplerConfig(mode="sde", num_steps=4, cfg_scale=2.0)
    one = sample(toy, noise, ctx, cfg, null_cond=null, generator=torch.Generator().manual_seed(3))
    rows = sample(toy, noise, ctx, cfg, null_cond=null.expand(N, L, D), generator=torch.Generator().manual_seed(3))
    assert torch.equal(one, rows)
    # the class path: null_label is the null class in every row, i.e. a (N,) null_cond
    y = torch.tensor([0, 2, 1])

    def by_label(x, t, lab):
        return toy(x, t, lab.double().view(-1, 1, 1).expand(-1, L, D))

    a = euler_sampler(by_label, noise, y, num_steps=5, cfg_scale=2.0, null_label=4)
    b = euler_sampler(by_label, noise, y, num_steps=5, cfg_scale=2.0, null_cond=torch.full((N,), 4))
    assert torch.equal(a, b)


def test_bad_null_arguments_fail_clearly() -> None:
    noise, ctx, null = _inputs()
    with pytest.raises(ValueError, match="exactly one of null_label"):
        euler_sampler(toy, noise, ctx, num_steps=2, cfg_scale=2.0)
    with pytest.raises(ValueError, match="exactly one of null_label"):
        null_batch(ctx, 3, null)
    with pytest.raises(ValueError, match="null_cond has shape"):
        euler_sampler(toy, noise, ctx, num_steps=2, cfg_scale=2.0, null_cond=null[:, :2])
    with pytest.raises(ValueError, match="one row per sample"):
        euler_sampler(toy, noise, ctx[:2], num_steps=2, null_cond=null)


# ----------------------------------------------------------------------------------------------
# A tiny MM-DiT through generate_latents


def _tiny_mmdit() -> MMDiT:
    torch.manual_seed(0)
    return MMDiT(MMDiTConfig(depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=8, context_len=L,
                             context_dim=D, z_dim=0)).eval()


def test_generate_latents_text_equals_independent_per_sample_loop() -> None:
    """Row i of a batch = an ODE loop of sample i alone, calling the model once with its caption and once
    with the null (no doubled batch), seeded by seeds[i] only."""
    model = _tiny_mmdit()
    seeds = np.array([5, 9, 11], dtype=np.uint32)
    g = torch.Generator().manual_seed(1)
    ctx, null = torch.randn(3, L, D, generator=g), torch.randn(L, D, generator=g)
    cfg = SamplerConfig(mode="ode", num_steps=4, cfg_scale=2.25)
    z = generate_latents(model, seeds, ctx, cfg, null_cond=null)
    ts = torch.linspace(1, 0, 5, dtype=torch.float64).tolist()
    for i, seed in enumerate(seeds):
        x = PerSampleNoise([int(seed)]).randn((1, 4, 8, 8)).double()
        for t_cur, t_next in zip(ts[:-1], ts[1:]):
            t = torch.full((1,), t_cur, dtype=torch.float32)
            with torch.no_grad():
                v_c = model(x.float(), t, ctx[i:i + 1]).out.double()
                v_u = model(x.float(), t, null[None]).out.double()
            x = x + (t_next - t_cur) * (v_u + 2.25 * (v_c - v_u))
        torch.testing.assert_close(z[i:i + 1], x.float(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="null_cond"):
        generate_latents(model, seeds, ctx, cfg)
