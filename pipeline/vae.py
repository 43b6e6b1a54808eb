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

from pipeline import weights
from pipeline.schema import SD_VAE_SCALE

log = logging.getLogger(__name__)

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"

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


def load_vae(name: str = DEFAULT_VAE, *, seed: int = 0, device: torch.device | str = "cpu"):
    """Return (AutoencoderKL in eval mode, identity dict for the manifest)."""
    from diffusers import AutoencoderKL

    ref = weights.parse(name)
    if ref.kind == "random":
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
        "name": name, "source": ref.kind, "class": "diffusers.AutoencoderKL",
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
def decode_latents(vae, z: torch.Tensor, scale: float, bias: float) -> torch.Tensor:
    """Model-space latents -> uint8 (N, 3, H, W), rounded (the official code truncates, SPEC §5.4)."""
    x = vae.decode((z.to(next(vae.parameters()).device) - bias) / scale).sample
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
