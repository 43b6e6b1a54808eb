"""Rank-0 training artefacts: stats.jsonl, EMA sample grids from fixed noise, a loss plot."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from trainer.models.sit import SiT
from trainer.sampling import euler_sampler

log = logging.getLogger(__name__)


class StatsWriter:
    """Appends one JSON object per log interval to ``stats.jsonl`` (what tests and plots read)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.path = Path(run_dir) / "stats.jsonl"
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """On resume, drop records logged after the checkpoint we restart from."""
        if self.enabled and self.path.is_file():
            keep = [r for r in self.read() if r["step"] <= step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))


def fixed_preview_inputs(count: int, num_classes: int, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same noise and labels at every preview, so grids are comparable across steps."""
    g = torch.Generator().manual_seed(seed + 12345)
    noise = torch.randn((count, *shape), generator=g)
    labels = torch.arange(count) % num_classes
    return noise, labels


@torch.no_grad()
def sample_grid(ema: SiT, vae, noise: torch.Tensor, labels: torch.Tensor, *, steps: int, cfg_scale: float,
                scale: float, bias: float, path: Path) -> Path:
    """Euler ODE samples from the EMA model (eval mode), decoded with the cache's VAE, as one PNG."""
    from pipeline.encoders.vae import decode_latents
    from pipeline.metrics.sample_store import write_grid

    device = next(ema.parameters()).device
    fn = lambda x, t, y: ema(x, t, y).out  # noqa: E731
    z = euler_sampler(fn, noise.to(device), labels.to(device), num_steps=steps, cfg_scale=cfg_scale,
                      null_label=ema.cfg.num_classes)
    images = decode_latents(vae, z.float(), scale, bias).permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, 3) uint8
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_grid(images, path)  # the same contact sheet as `haste eval`'s grid.png


def loss_plot(records: list[dict[str, Any]], path: Path, phase_boundary: int | None) -> Path | None:
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, key in zip(axes, ("denoise", "feat", "attn")):
        pts = [(s, r[key]) for s, r in zip(steps, records) if key in r]
        if pts:
            ax.plot(*zip(*pts), lw=1)
        if phase_boundary is not None:
            ax.axvline(phase_boundary, color="k", ls="--", lw=0.8, label="tau")
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
