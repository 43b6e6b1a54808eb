"""Samplers for velocity-predicting SiT models: Euler/Heun ODE and Euler–Maruyama SDE.

Faithful ports of REPA/HASTE `samplers.py` (byte-identical in both repositories; SPEC §5.1–5.3)
over a velocity closure `fn(x, t, y) -> v` instead of a model returning a tuple, plus the EDM2
per-sample seeding idea (`StackedRandomGenerator`, EDM2 `generate_images.py`) so that sample i
depends only on seed i, not on the batch size or the number of GPUs (STYLE §8).

Conventions (as upstream): t = 1 is noise and t = 0 is data; the time grid and the state are
float64; the closure is called with x and t cast to the dtype of `noise`; samplers return the
float64 state (callers cast, as `generate.py` does with `.to(torch.float32)`).

Conditioning: `y` is whatever the closure takes as its third argument, with one row per sample:
class labels (N,) with `null_label` as the unconditional class (`samplers.py`), or text contexts
(N, L, D) with `null_cond` = the empty-caption encoding (L, D) as the unconditional context
(`samplers_t2i.py`, which passes `y_null`). Under guidance the closure sees [y; null] either way.

Function evaluations (NFE; a CFG-doubled batch counts once):
    euler_sampler           num_steps           (heun=False)
    euler_sampler           2·num_steps − 1     (heun=True: no corrector on the last step)
    euler_maruyama_sampler  num_steps           (num_steps − 1 stochastic steps + 1 deterministic)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from trainer.objectives import Path, path_coefficients

VelocityFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x (N,C,H,W), t (N,), y (N,) or (N,L,D)) -> v


# ----------------------------------------------------------------------------------------------
# Per-sample noise (EDM2 StackedRandomGenerator)


class PerSampleNoise:
    """One `torch.Generator` per sample seed; row i of every draw comes from seed i only.

    EDM2's `StackedRandomGenerator` idea: the noise of sample i is the same whether it is drawn
    in a batch of 1 or of 256, on any rank. Generators live on `device` (default CPU, whose
    stream is the same on every machine). Usable as the SDE sampler's `generator`.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> None:
        if len(seeds) == 0:
            raise ValueError("seeds must be non-empty")
        # torch's CPU generator keeps only 32 bits of the seed (2**32 + 3 gives seed 3's stream),
        # so larger seeds would alias silently; EDM2 takes seed % 2**32 for the same reason.
        if any(not 0 <= int(s) < 1 << 32 for s in seeds):
            raise ValueError(f"seeds must be in [0, 2**32), got {list(seeds)}")
        self.generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]

    def randn(
        self,
        shape: Sequence[int],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Normal noise of the full batch shape (N, ...), with N == number of seeds."""
        if len(shape) == 0 or shape[0] != len(self.generators):
            raise ValueError(
                f"shape {tuple(shape)} must start with the number of seeds {len(self.generators)}"
            )
        rows = [
            torch.randn(tuple(shape[1:]), generator=g, dtype=dtype, device=g.device) for g in self.generators
        ]
        return torch.stack(rows).to(device)


def per_sample_noise(
    seeds: Sequence[int],
    shape: Sequence[int],
    device: torch.device | str | None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Initial latents (N, C, H, W) for `seeds` (N of them); `shape` is the full batch shape."""
    return PerSampleNoise(seeds).randn(shape, dtype=dtype, device=device)


def _randn(
    shape: torch.Size, generator: torch.Generator | PerSampleNoise | None, device: torch.device
) -> Tensor:
    """float64 N(0, I) from the given source; a plain generator draws on its own device."""
    if isinstance(generator, PerSampleNoise):
        return generator.randn(shape, dtype=torch.float64, device=device)
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, dtype=torch.float64, device=draw_device).to(device)


# ----------------------------------------------------------------------------------------------
# Shared pieces: guidance test, model call, score


def _guided(cfg_scale: float, guidance_low: float, guidance_high: float, t_cur: float) -> bool:
    """CFG is on only for cfg_scale > 1 and guidance_low ≤ t_cur ≤ guidance_high (SPEC §5.3)."""
    return cfg_scale > 1.0 and guidance_low <= t_cur <= guidance_high


def _call(
    fn: VelocityFn, x: Tensor, t: float, y: Tensor, y_null: Tensor, guided: bool, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Evaluate fn at (x, t); under guidance on the doubled batch [x; x] with labels [y; null].

    Returns (out, x_in, t_in): the float64 output and the float64 inputs it saw, batch 2N when
    guided (`samplers.py` `euler_sampler` L67–77, repeated in every branch upstream).
    """
    x_in = torch.cat([x, x]) if guided else x  # (N or 2N, C, H, W)
    y_in = torch.cat([y, y_null]) if guided else y
    t_in = torch.full((x_in.shape[0],), t, dtype=torch.float64, device=x.device)
    out = fn(x_in.to(dtype), t_in.to(dtype), y_in).to(torch.float64)
    return out, x_in, t_in


def _cfg(out: Tensor, cfg_scale: float) -> Tensor:
    """uncond + w·(cond − uncond) over all channels of a [cond; uncond] batch (SPEC §5.3)."""
    cond, uncond = out.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def diffusion_coefficient(t: float) -> float:
    """w(t) = 2t, the SDE diffusion used for sampling (`samplers.py` `compute_diffusion`)."""
    return 2 * t


def score_from_velocity(v: Tensor, x: Tensor, t: Tensor, path: Path = "linear") -> Tensor:
    """Score ∇log p_t(x) from the velocity: ((α/α̇)·v − x) / (σ² − (α/α̇)·σ̇·σ).

    v, x (N, ...), t (N,) (`samplers.py` `get_score_from_velocity`, L15–38). For the linear
    path this is (−(1−t)·v − x)/t. Undefined where α̇ = 0 (cosine at t = 0), which the SDE grid
    never reaches because it stops at `last_step` > 0.
    """
    t = t.reshape(t.shape[0], *([1] * (x.ndim - 1)))
    alpha, sigma, d_alpha, d_sigma = path_coefficients(t, path)
    ratio = alpha / d_alpha
    var = sigma**2 - ratio * d_sigma * sigma
    return (ratio * v - x) / var


def _check_inputs(noise: Tensor, y: Tensor, num_steps: int, null_label: int | None) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if null_label is not None and (y.ndim != 1 or y.shape[0] != noise.shape[0]):
        raise ValueError(f"y must have shape ({noise.shape[0]},), got {tuple(y.shape)}")
    if null_label is None and (y.ndim < 1 or y.shape[0] != noise.shape[0]):
        raise ValueError(f"the condition must have one row per sample ({noise.shape[0]}), got shape {tuple(y.shape)}")


def null_batch(y: Tensor, null_label: int | None = None, null_cond: Tensor | None = None) -> Tensor:
    """The unconditional rows matching `y`: the null class (labels) or the null condition (e.g. the
    empty-caption encoding, given once as y.shape[1:] or per row as y.shape)."""
    if (null_label is None) == (null_cond is None):
        raise ValueError("give exactly one of null_label (class labels) or null_cond (e.g. the empty-caption "
                         "encoding for text contexts)")
    if null_cond is None:
        return torch.full_like(y, null_label)
    null = null_cond.to(device=y.device, dtype=y.dtype)
    if tuple(null.shape) == tuple(y.shape[1:]):
        null = null.unsqueeze(0).expand_as(y)  # one null for every row (the official `y_null.repeat`)
    if tuple(null.shape) != tuple(y.shape):
        raise ValueError(f"null_cond has shape {tuple(null_cond.shape)}; expected {tuple(y.shape[1:])} or "
                         f"{tuple(y.shape)} for a condition of shape {tuple(y.shape)}")
    return null


# ----------------------------------------------------------------------------------------------
# Samplers


@torch.no_grad()
def euler_sampler(
    fn: VelocityFn,
    noise: Tensor,
    y: Tensor,
    *,
    num_steps: int,
    heun: bool = False,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    null_label: int | None = None,
    null_cond: Tensor | None = None,
) -> Tensor:
    """Euler (or Heun) ODE from t = 1 to 0 on linspace(1, 0, num_steps+1); returns float64 x₀.

    Port of `samplers.py` `euler_sampler` (L46–102; SPEC §5.1): x ← x + (t_next − t_cur)·v,
    and with heun a trapezoid correction with v at t_next on every step but the last, which
    reuses the t_cur guidance test. NFE = num_steps, or 2·num_steps − 1 with heun. The
    unconditional branch is `null_label` (class labels) or `null_cond` (text: the empty caption).
    """
    _check_inputs(noise, y, num_steps, null_label)
    dtype, y_null = noise.dtype, null_batch(y, null_label, null_cond)
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()
    x_next = noise.to(torch.float64)
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        guided = _guided(cfg_scale, guidance_low, guidance_high, t_cur)
        d_cur, _, _ = _call(fn, x_cur, t_cur, y, y_null, guided, dtype)
        d_cur = _cfg(d_cur, cfg_scale) if guided else d_cur
        x_next = x_cur + (t_next - t_cur) * d_cur
        if heun and i < num_steps - 1:
            d_prime, _, _ = _call(fn, x_next, t_next, y, y_null, guided, dtype)
            d_prime = _cfg(d_prime, cfg_scale) if guided else d_prime
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def _sde_drift(
    fn: VelocityFn,
    x: Tensor,
    t_cur: float,
    y: Tensor,
    y_null: Tensor,
    *,
    guided: bool,
    cfg_scale: float,
    path: Path,
    dtype: torch.dtype,
) -> Tensor:
    """Drift d = v − ½·w(t)·s(x, t) of the reverse SDE, CFG applied to d.

    Upstream's two `# compute drift` blocks (`samplers.py` `euler_maruyama_sampler`).

    As upstream, the score is computed on the (doubled) model input and guidance combines the
    drifts; d is affine in v with the same x in both halves, so this equals guiding v.
    """
    v, x_in, t_in = _call(fn, x, t_cur, y, y_null, guided, dtype)
    s = score_from_velocity(v, x_in, t_in, path)
    d = v - 0.5 * diffusion_coefficient(t_cur) * s
    return _cfg(d, cfg_scale) if guided else d


@torch.no_grad()
def euler_maruyama_sampler(
    fn: VelocityFn,
    noise: Tensor,
    y: Tensor,
    *,
    num_steps: int,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    null_label: int | None = None,
    null_cond: Tensor | None = None,
    path: Path = "linear",
    last_step: float = 0.04,
    generator: torch.Generator | PerSampleNoise | None = None,
) -> Tensor:
    """Euler–Maruyama SDE on linspace(1, last_step, num_steps) then 0; returns float64 x₀.

    Port of `samplers.py` `euler_maruyama_sampler` (L105–183; SPEC §5.2): the first
    num_steps − 1 steps do x ← x + d·dt + √w·√|dt|·ε, the last step (last_step → 0) is the
    deterministic x ← x + dt·d. NFE = num_steps. ε is float64 and comes from `generator`
    (upstream uses the global RNG); a `PerSampleNoise` makes every row depend on its own seed.
    The unconditional branch is `null_label` or `null_cond`, as in `euler_sampler`.
    """
    _check_inputs(noise, y, num_steps, null_label)
    if not 0.0 < last_step < 1.0:
        raise ValueError(f"last_step must be in (0, 1), got {last_step}")
    dtype, y_null = noise.dtype, null_batch(y, null_label, null_cond)
    t_steps = torch.linspace(1.0, last_step, num_steps, dtype=torch.float64).tolist() + [0.0]
    x = noise.to(torch.float64)
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        guided = _guided(cfg_scale, guidance_low, guidance_high, t_cur)
        d = _sde_drift(fn, x, t_cur, y, y_null, guided=guided, cfg_scale=cfg_scale, path=path, dtype=dtype)
        dt = t_next - t_cur
        if i < num_steps - 1:
            deps = _randn(x.shape, generator, x.device) * math.sqrt(abs(dt))  # upstream's op order
            x = x + d * dt + math.sqrt(diffusion_coefficient(t_cur)) * deps
        else:
            x = x + dt * d  # last step: the mean, no noise (upstream `mean_x`)
    return x


# ----------------------------------------------------------------------------------------------
# Config and dispatch


@dataclass(frozen=True, kw_only=True)
class SamplerConfig:
    """Sampler settings; the defaults are the paper's (SDE, 250 steps, no CFG; SPEC §5.3)."""

    mode: Literal["ode", "sde"] = "sde"
    num_steps: int = 250
    heun: bool = False  # ODE only; upstream's SDE ignores it, we reject it
    cfg_scale: float = 1.0  # ≤ 1 means no guidance upstream; < 1 is rejected as a likely typo
    guidance_low: float = 0.0
    guidance_high: float = 1.0
    path: Literal["linear", "cosine"] = "linear"  # SDE score only; the ODE needs no path
    last_step: float = 0.04  # SDE: linspace(1, last_step, num_steps) then 0

    def __post_init__(self) -> None:
        if self.mode not in ("ode", "sde"):
            raise ValueError(f"mode must be 'ode' or 'sde', got {self.mode!r}")
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {self.num_steps!r}")
        if self.heun and self.mode != "ode":
            raise ValueError("heun=True needs mode='ode' (the SDE sampler has no Heun corrector)")
        if self.cfg_scale < 1.0:
            raise ValueError(f"cfg_scale must be >= 1.0 (1.0 = no guidance), got {self.cfg_scale}")
        if not 0.0 <= self.guidance_low <= self.guidance_high <= 1.0:
            raise ValueError(
                f"need 0 <= guidance_low <= guidance_high <= 1, got guidance_low={self.guidance_low}, "
                f"guidance_high={self.guidance_high}"
            )
        if self.path not in ("linear", "cosine"):
            raise ValueError(f"path must be 'linear' or 'cosine', got {self.path!r}")
        if not 0.0 < self.last_step < 1.0:
            raise ValueError(f"last_step must be in (0, 1), got {self.last_step}")

    @property
    def nfe(self) -> int:
        """Model evaluations per sample batch (a CFG-doubled batch counts once)."""
        return 2 * self.num_steps - 1 if self.heun else self.num_steps


def sample(
    fn: VelocityFn,
    noise: Tensor,
    y: Tensor,
    cfg: SamplerConfig,
    *,
    null_label: int | None = None,
    null_cond: Tensor | None = None,
    generator: torch.Generator | PerSampleNoise | None = None,
) -> Tensor:
    """Run the sampler `cfg` selects; noise (N, C, H, W), labels y (N,) with `null_label`, or
    contexts y (N, L, D) with `null_cond` (L, D) → float64 x₀."""
    common = dict(cfg_scale=cfg.cfg_scale, guidance_low=cfg.guidance_low, guidance_high=cfg.guidance_high,
                  null_label=null_label, null_cond=null_cond)
    if cfg.mode == "ode":
        return euler_sampler(fn, noise, y, num_steps=cfg.num_steps, heun=cfg.heun, **common)
    return euler_maruyama_sampler(
        fn,
        noise,
        y,
        num_steps=cfg.num_steps,
        path=cfg.path,
        last_step=cfg.last_step,
        generator=generator,
        **common,
    )
