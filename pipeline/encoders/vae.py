"""SD-VAE: load it, encode uint8 images to posterior moments, sample and decode latents.

Stored latents are the posterior moments (mean ++ std, SPEC §4, the edm2/REPA convention);
the model-space latent z = (mean + std * eps) * scale + bias is drawn fresh at train time from
the scale/bias recorded in the cache manifest, never from a literal in the trainer.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from pipeline.cache.schema import SD_VAE_SCALE
from pipeline.encoders import weights

log = logging.getLogger(__name__)

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
POOL_VAE_SCALE = 2.5  # ~1 / std (0.36) of box-filtered synthetic-image latents, measured at 128 px
POOL_VAE_BIAS = 1.6   # ~ -scale * their mean (-0.65): centred latents train faster in a short demo

# The SD-VAE architecture (SPEC §12) and a tiny member of the same family for tests and demo.
_SD_ARCH: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
    sample_size=256, scaling_factor=SD_VAE_SCALE,
)
RANDOM_PRESETS: dict[str, dict[str, Any]] = {
    "sd": _SD_ARCH,
    "tiny": {**_SD_ARCH, "block_out_channels": (16, 32, 32, 32), "layers_per_block": 1, "norm_num_groups": 8},
}


class _Config(dict):
    """Attribute access like diffusers' FrozenDict, for the few fields callers read."""

    __getattr__ = dict.__getitem__


class _Posterior:
    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.mean, self.std = mean, std


class _Out:
    def __init__(self, **kw: Any):
        self.__dict__.update(kw)


class PoolVAE(torch.nn.Module):
    """``builtin:pool``: a trivially defined VAE with AutoencoderKL's interface, for the offline demo.

    A random-init AutoencoderKL decodes anything to noise, so a demo with it could never show
    what the model learned. This one is an 8×8 box filter: latent channels 0–2 are the patch's
    mean RGB in [-1, 1], channel 3 its luminance contrast (std); the posterior std is a small
    constant. Decoding upsamples channels 0–2 bilinearly, so samples look like blurred images,
    which is enough to see colour, layout and shape of the synthetic classes at 128 px.
    """

    POSTERIOR_STD = 0.02

    def __init__(self, scaling_factor: float = POOL_VAE_SCALE):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # device/dtype probe
        self.config = _Config(scaling_factor=scaling_factor, shift_factor=0.0, block_out_channels=[],
                              latent_channels=4)

    def encode(self, x: torch.Tensor) -> _Out:
        mean_rgb = torch.nn.functional.avg_pool2d(x, 8)
        luma = x.mean(dim=1, keepdim=True)
        contrast = (torch.nn.functional.avg_pool2d(luma**2, 8) - torch.nn.functional.avg_pool2d(luma, 8) ** 2)
        mean = torch.cat([mean_rgb, 4 * contrast.clamp_min(0).sqrt() - 1], dim=1)
        return _Out(latent_dist=_Posterior(mean, torch.full_like(mean, self.POSTERIOR_STD)))

    def decode(self, z: torch.Tensor) -> _Out:
        x = torch.nn.functional.interpolate(z[:, :3], scale_factor=8, mode="bilinear", align_corners=False)
        return _Out(sample=x.clamp(-1, 1))


def latent_scale_bias(name: str) -> tuple[float, float]:
    """(scale, bias) a VAE's latents are trained with, z = x * scale + bias (recorded in the manifest)."""
    return (POOL_VAE_SCALE, POOL_VAE_BIAS) if name == "builtin:pool" else (SD_VAE_SCALE, 0.0)


def load_vae(name: str = DEFAULT_VAE, *, seed: int = 0, device: torch.device | str = "cpu"):
    """Return (AutoencoderKL in eval mode, identity dict for the manifest)."""
    from diffusers import AutoencoderKL

    ref = weights.parse(name)
    if ref.kind == "builtin":
        if ref.preset != "pool":
            raise weights.WeightsError(f"unknown builtin VAE {name!r} (known: builtin:pool)")
        vae = PoolVAE()
    elif ref.kind == "random":
        vae = weights.build_random(ref, RANDOM_PRESETS, seed, AutoencoderKL, "VAE")
    else:
        local_only = ref.kind == "local" or weights.require_hub(name, "VAE")
        src = str(ref.path) if ref.kind == "local" else name
        sub = {"subfolder": "vae"} if ref.kind == "local" and (ref.path / "vae").is_dir() else {}
        try:
            vae = AutoencoderKL.from_pretrained(src, local_files_only=local_only, low_cpu_mem_usage=False, **sub)
        except (OSError, ValueError, EnvironmentError) as e:
            raise weights.WeightsError(
                f"could not load the VAE from {name!r}: {str(e).splitlines()[0]} "
                "(expected a diffusers AutoencoderKL directory or hub id)") from None
    vae = vae.to(device).eval().requires_grad_(False)
    identity = {
        "name": name, "source": ref.kind, "class": "diffusers.AutoencoderKL" if isinstance(vae, AutoencoderKL) else "haste.PoolVAE",
        "weights_sha256": weights.state_dict_sha256(vae),
        "params": sum(p.numel() for p in vae.parameters()),
        "scaling_factor": float(vae.config.scaling_factor),
        "shift_factor": float(vae.config.get("shift_factor") or 0.0),
        "block_out_channels": list(vae.config.block_out_channels),
    }
    return vae, identity


def autocast(device: torch.device, precision: str):
    """bf16 autocast context, or nothing for fp32 (the recorded choice of each stage)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def encode_moments(vae, images: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 moments (N, 2C, H/8, W/8) = mean ++ std (SPEC §4).

    Pixels enter as x/127.5 - 1 (the REPA/HASTE range, not edm2's [0, 1]).
    """
    x = images.to(next(vae.parameters()).device).float() / 127.5 - 1.0
    with autocast(x.device, precision):
        dist = vae.encode(x).latent_dist
    return torch.cat([dist.mean, dist.std], dim=1).float()


def sample_latents(moments: torch.Tensor, scale: float, bias: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh posterior sample in model space: (mean + std * eps) * scale + bias."""
    mean, std = moments.float().chunk(2, dim=1)
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps) * scale + bias


@torch.no_grad()
def decode_latents(vae, z: torch.Tensor, scale: float, bias: float, rounding: str = "round") -> torch.Tensor:
    """Model-space latents -> uint8 (N, 3, H, W).

    ``round`` maps to the nearest uint8. ``truncate`` is the official `generate.py`
    (clamp(255·(x+1)/2) cast to uint8, SPEC §5.4): it floors, so images are on average 0.5
    levels darker; kept as an option to reproduce official sample batches bit for bit.
    """
    x = vae.decode((z.to(next(vae.parameters()).device) - bias) / scale).sample.float()
    if rounding == "truncate":
        return torch.clamp(255.0 * ((x + 1) / 2), 0, 255).to(torch.uint8)
    if rounding != "round":
        raise ValueError(f"rounding must be 'round' or 'truncate', got {rounding!r}")
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
