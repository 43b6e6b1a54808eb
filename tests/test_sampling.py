"""Tests for trainer/sampling.py on a toy field whose flow and score are known in closed form.

Toy data: x₀ ~ N(μ, s²) per coordinate. On the linear path x_t = (1−t)·x₀ + t·ε has
marginal N((1−t)μ, σ_t²) with σ_t² = (1−t)²s² + t², so the exact velocity E[ε − x₀ | x_t] is
v(x, t) = −μ + (t − (1−t)s²)/σ_t² · (x − (1−t)μ), the exact score is −(x − (1−t)μ)/σ_t², and
the probability-flow ODE maps noise z at t = 1 to μ + s·z at t = 0.
"""

from __future__ import annotations

import math

import pytest
import torch

from trainer.objectives import path_coefficients
from trainer.sampling import (
    PerSampleNoise,
    SamplerConfig,
    euler_maruyama_sampler,
    euler_sampler,
    per_sample_noise,
    sample,
    score_from_velocity,
)

MU, S, NULL = 1.5, 0.5, 10
SHAPE = (4, 2, 3, 3)


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact linear-path velocity of N(MU, S²) data; ignores y."""
    tb = t.double().view(-1, 1, 1, 1)
    var = (1 - tb) ** 2 * S**2 + tb**2
    return (-MU + (tb - (1 - tb) * S**2) / var * (x.double() - (1 - tb) * MU)).to(x.dtype)


class Recorder:
    """Wraps a velocity fn and records (t, batch size, labels) of every call."""

    def __init__(self, fn=gaussian_velocity) -> None:
        self.fn, self.calls = fn, []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        assert x.shape[0] == t.shape[0] == y.shape[0]
        assert bool((t == t[0]).all())
        self.calls.append((float(t[0]), x.shape[0], y.tolist()))
        return self.fn(x, t, y)


def _noise(seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _labels() -> torch.Tensor:
    return torch.arange(SHAPE[0])


# ----------------------------------------------------------------------------------------------
# ODE accuracy and NFE


def _ode_error(num_steps: int, heun: bool) -> float:
    z = _noise()
    x = euler_sampler(gaussian_velocity, z, _labels(), num_steps=num_steps, heun=heun, null_label=NULL)
    return float((x - (MU + S * z)).abs().max())


def test_euler_converges_first_order() -> None:
    errors = [_ode_error(n, heun=False) for n in (8, 16, 32, 64)]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert 1.6 < errors[-2] / errors[-1] < 2.4  # halving dt halves the error
    assert errors[-1] < 5e-2


def test_heun_beats_euler_and_is_second_order() -> None:
    for n in (8, 16, 32):
        assert _ode_error(n, heun=True) < _ode_error(n, heun=False)
    assert 3.0 < _ode_error(16, heun=True) / _ode_error(32, heun=True) < 5.0


@pytest.mark.parametrize(("heun", "expected"), [(False, 7), (True, 13)])
def test_ode_nfe_and_time_grid(heun: bool, expected: int) -> None:
    rec = Recorder()
    euler_sampler(rec, _noise(), _labels(), num_steps=7, heun=heun, null_label=NULL)
    assert len(rec.calls) == expected
    grid = torch.linspace(1, 0, 8, dtype=torch.float64).tolist()
    seen = [c[0] for c in rec.calls]
    assert seen == (grid[:-1] if not heun else [g for i in range(7) for g in grid[i : i + 2]][:-1])


def test_sde_nfe_and_time_grid() -> None:
    rec = Recorder()
    euler_maruyama_sampler(
        rec, _noise(), _labels(), num_steps=9, null_label=NULL, generator=torch.Generator()
    )
    assert len(rec.calls) == 9
    assert [c[0] for c in rec.calls] == torch.linspace(1, 0.04, 9, dtype=torch.float64).tolist()


def test_model_called_in_noise_dtype_and_state_is_float64() -> None:
    dtypes = []

    def fn(x, t, y):
        dtypes.append((x.dtype, t.dtype))
        return gaussian_velocity(x, t, y)

    z = _noise(dtype=torch.float32)
    for out in (
        euler_sampler(fn, z, _labels(), num_steps=3, null_label=NULL),
        euler_maruyama_sampler(fn, z, _labels(), num_steps=3, null_label=NULL, generator=torch.Generator()),
    ):
        assert out.dtype == torch.float64
    assert set(dtypes) == {(torch.float32, torch.float32)}


# ----------------------------------------------------------------------------------------------
# Classifier-free guidance


def test_cfg_scale_one_equals_unguided_and_never_doubles() -> None:
    z, y = _noise(), _labels()
    for heun in (False, True):
        rec = Recorder()
        guided = euler_sampler(
            rec, z, y, num_steps=6, heun=heun, cfg_scale=1.0, guidance_high=0.5, null_label=NULL
        )
        assert torch.equal(
            guided, euler_sampler(gaussian_velocity, z, y, num_steps=6, heun=heun, null_label=NULL)
        )
        assert {c[1] for c in rec.calls} == {SHAPE[0]}
    rec = Recorder()
    a = euler_maruyama_sampler(
        rec, z, y, num_steps=6, cfg_scale=1.0, null_label=NULL, generator=torch.Generator().manual_seed(1)
    )
    b = euler_maruyama_sampler(
        gaussian_velocity, z, y, num_steps=6, null_label=NULL, generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(a, b)
    assert {c[1] for c in rec.calls} == {SHAPE[0]}


def _in_interval(t: float) -> bool:
    return 0.3 <= t <= 0.7


def test_guidance_interval_ode_and_heun_reuse_of_t_cur() -> None:
    grid = torch.linspace(1, 0, 11, dtype=torch.float64).tolist()
    rec = Recorder()
    euler_sampler(
        rec,
        _noise(),
        _labels(),
        num_steps=10,
        cfg_scale=2.0,
        guidance_low=0.3,
        guidance_high=0.7,
        null_label=NULL,
    )
    assert [c[1] == 2 * SHAPE[0] for c in rec.calls] == [_in_interval(t) for t in grid[:-1]]
    doubled = [c for c in rec.calls if c[1] == 2 * SHAPE[0]]
    assert doubled and all(c[2] == _labels().tolist() + [NULL] * SHAPE[0] for c in doubled)

    rec = Recorder()
    euler_sampler(
        rec,
        _noise(),
        _labels(),
        num_steps=10,
        heun=True,
        cfg_scale=2.0,
        guidance_low=0.3,
        guidance_high=0.7,
        null_label=NULL,
    )
    # Calls are predictor(t_i), corrector(t_{i+1}), ...; both follow the t_i test (upstream Heun branch).
    expected = [_in_interval(grid[i]) for i in range(10) for _ in range(2)][:-1]
    assert [c[1] == 2 * SHAPE[0] for c in rec.calls] == expected
    # The corrector at t_next = 0.7 follows t_cur = 0.8 (outside), so it is not doubled.
    assert rec.calls[5] == (grid[3], SHAPE[0], _labels().tolist())


def test_guidance_interval_sde() -> None:
    grid = torch.linspace(1, 0.04, 12, dtype=torch.float64).tolist()
    rec = Recorder()
    euler_maruyama_sampler(
        rec,
        _noise(),
        _labels(),
        num_steps=12,
        cfg_scale=2.0,
        guidance_low=0.3,
        guidance_high=0.7,
        null_label=NULL,
        generator=torch.Generator(),
    )
    assert [c[1] == 2 * SHAPE[0] for c in rec.calls] == [_in_interval(t) for t in grid]


def _conditional(c: float):
    """v = exact field + c for conditional labels, exact field for the null label."""

    def fn(x, t, y):
        shift = (y != NULL).to(x.dtype).view(-1, 1, 1, 1) * c
        return gaussian_velocity(x, t, y) + shift

    return fn


def test_cfg_combines_cond_and_uncond_over_all_channels() -> None:
    z, y, w, c = _noise(), _labels(), 3.0, 0.2
    # uncond + w·(cond − uncond) = field + w·c, on every channel.
    for heun in (False, True):
        guided = euler_sampler(_conditional(c), z, y, num_steps=5, heun=heun, cfg_scale=w, null_label=NULL)
        ref = euler_sampler(_conditional(w * c), z, y, num_steps=5, heun=heun, null_label=NULL)
        torch.testing.assert_close(guided, ref, rtol=0, atol=1e-12)
    guided = euler_maruyama_sampler(
        _conditional(c),
        z,
        y,
        num_steps=5,
        cfg_scale=w,
        null_label=NULL,
        generator=torch.Generator().manual_seed(2),
    )
    ref = euler_maruyama_sampler(
        _conditional(w * c), z, y, num_steps=5, null_label=NULL, generator=torch.Generator().manual_seed(2)
    )
    torch.testing.assert_close(guided, ref, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# SDE


def test_score_from_velocity_linear_special_case_and_exact_scores() -> None:
    g = torch.Generator().manual_seed(3)
    x, v = (
        torch.randn(SHAPE, generator=g, dtype=torch.float64),
        torch.randn(SHAPE, generator=g, dtype=torch.float64),
    )
    t = torch.rand(SHAPE[0], generator=g, dtype=torch.float64) * 0.9 + 0.05
    tb = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(score_from_velocity(v, x, t, "linear"), (-(1 - tb) * v - x) / tb)
    # With the exact velocity the score must equal the exact Gaussian score, on both paths.
    for path in ("linear", "cosine"):
        a, s, da, ds = (c.view(-1, 1, 1, 1) for c in path_coefficients(t, path))
        var = a**2 * S**2 + s**2
        v_exact = da * MU + (a * da * S**2 + s * ds) / var * (x - a * MU)
        torch.testing.assert_close(score_from_velocity(v_exact, x, t, path), -(x - a * MU) / var)


def _reference_sde(z: torch.Tensor, num_steps: int, seed: int) -> torch.Tensor:
    """Straight-line EM loop with the explicit linear score; same float64 draw convention."""
    g, x = torch.Generator().manual_seed(seed), z.double()
    ts = [1 - (1 - 0.04) * i / (num_steps - 1) for i in range(num_steps)] + [0.0]
    for i in range(num_steps):
        t, dt = ts[i], ts[i + 1] - ts[i]
        v = gaussian_velocity(x, torch.full((x.shape[0],), t, dtype=torch.float64), _labels())
        drift = v - 0.5 * (2 * t) * ((-(1 - t) * v - x) / t)
        x = x + drift * dt
        if i < num_steps - 1:
            x = x + math.sqrt(2 * t * abs(dt)) * torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x


def test_sde_matches_reference_loop() -> None:
    z = _noise(4)
    out = euler_maruyama_sampler(
        gaussian_velocity,
        z,
        _labels(),
        num_steps=20,
        null_label=NULL,
        generator=torch.Generator().manual_seed(5),
    )
    torch.testing.assert_close(out, _reference_sde(z, 20, seed=5), rtol=1e-9, atol=1e-9)


def test_sde_reproducible_per_generator_seed() -> None:
    z, y = _noise(), _labels()

    def run(seed: int) -> torch.Tensor:
        return euler_maruyama_sampler(
            gaussian_velocity,
            z,
            y,
            num_steps=10,
            null_label=NULL,
            generator=torch.Generator().manual_seed(seed),
        )

    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))


def test_sde_single_step_is_deterministic_mean() -> None:
    # One step: t = 1 → 0 with no noise; linear score at t = 1 is −x, so x₀ = x − (v + x) = −v.
    z = _noise()
    a = euler_maruyama_sampler(
        gaussian_velocity,
        z,
        _labels(),
        num_steps=1,
        null_label=NULL,
        generator=torch.Generator().manual_seed(0),
    )
    b = euler_maruyama_sampler(
        gaussian_velocity,
        z,
        _labels(),
        num_steps=1,
        null_label=NULL,
        generator=torch.Generator().manual_seed(9),
    )
    assert torch.equal(a, b)
    torch.testing.assert_close(a, -gaussian_velocity(z, torch.ones(SHAPE[0], dtype=torch.float64), _labels()))


def test_sde_samples_the_toy_distribution() -> None:
    n = 4096
    z = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x = euler_maruyama_sampler(
        gaussian_velocity,
        z,
        torch.zeros(n, dtype=torch.long),
        num_steps=100,
        null_label=NULL,
        generator=torch.Generator().manual_seed(7),
    )
    assert abs(float(x.mean()) - MU) < 0.03
    assert abs(float(x.std()) - S) < 0.03


# ----------------------------------------------------------------------------------------------
# Per-sample seeds, config, dispatch


def test_per_sample_noise_is_batch_size_independent() -> None:
    seeds = [11, 3, 2**32 - 1, 7]
    full = per_sample_noise(seeds, (4, 2, 3, 3), "cpu")
    assert full.shape == (4, 2, 3, 3)
    for i, seed in enumerate(seeds):
        assert torch.equal(full[i : i + 1], per_sample_noise([seed], (1, 2, 3, 3), "cpu"))
    assert not torch.equal(full[1], full[2])
    with pytest.raises(ValueError, match="number of seeds"):
        per_sample_noise(seeds, (2, 3, 3), "cpu")
    with pytest.raises(ValueError, match="seeds must be in"):
        per_sample_noise([2**32 + 3], (1, 2), "cpu")  # would alias seed 3 in torch's CPU generator


def test_sde_with_per_sample_noise_is_batch_size_independent() -> None:
    seeds = [5, 6, 7, 8]
    z = per_sample_noise(seeds, SHAPE, "cpu", dtype=torch.float64)
    cfg = SamplerConfig(num_steps=8, cfg_scale=1.5)
    batch = sample(_conditional(0.1), z, _labels(), cfg, null_label=NULL, generator=PerSampleNoise(seeds))
    for i, seed in enumerate(seeds):
        one = sample(
            _conditional(0.1),
            z[i : i + 1],
            _labels()[i : i + 1],
            cfg,
            null_label=NULL,
            generator=PerSampleNoise([seed]),
        )
        torch.testing.assert_close(batch[i : i + 1], one, rtol=0, atol=1e-12)


def test_sample_dispatches_to_the_right_sampler() -> None:
    z, y = _noise(), _labels()
    ode = sample(gaussian_velocity, z, y, SamplerConfig(mode="ode", num_steps=5, heun=True), null_label=NULL)
    assert torch.equal(ode, euler_sampler(gaussian_velocity, z, y, num_steps=5, heun=True, null_label=NULL))
    cfg = SamplerConfig(num_steps=5, path="cosine", last_step=0.1)
    sde = sample(gaussian_velocity, z, y, cfg, null_label=NULL, generator=torch.Generator().manual_seed(1))
    ref = euler_maruyama_sampler(
        gaussian_velocity,
        z,
        y,
        num_steps=5,
        path="cosine",
        last_step=0.1,
        null_label=NULL,
        generator=torch.Generator().manual_seed(1),
    )
    assert torch.equal(sde, ref)
    assert SamplerConfig(mode="ode", num_steps=5, heun=True).nfe == 9 and cfg.nfe == 5


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(mode="dpm"), "mode"),
        (dict(num_steps=0), "num_steps"),
        (dict(heun=True), "heun"),
        (dict(cfg_scale=0.5), "cfg_scale"),
        (dict(guidance_low=0.8, guidance_high=0.7), "guidance_low"),
        (dict(guidance_high=1.5), "guidance_high"),
        (dict(path="sqrt"), "path"),
        (dict(last_step=0.0), "last_step"),
    ],
)
def test_sampler_config_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplerConfig(**kwargs)


def test_samplers_reject_bad_inputs() -> None:
    with pytest.raises(ValueError, match="num_steps"):
        euler_sampler(gaussian_velocity, _noise(), _labels(), num_steps=0, null_label=NULL)
    with pytest.raises(ValueError, match="y must have shape"):
        euler_maruyama_sampler(gaussian_velocity, _noise(), torch.arange(3), num_steps=2, null_label=NULL)
