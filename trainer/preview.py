"""Rank-0 training artefacts: EMA sample grids from fixed noise, a loss plot; redrawn when a kill skipped them.

The preview VAE (named in the cache manifest) is loaded before step 1, so a VAE that cannot be
loaded (offline, missing directory) stops the run at once instead of at the first preview.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import torch

from pipeline import dist
from trainer import checkpoint
from trainer.checkpoint import disk_full_named
from trainer.config import TrainConfig
from trainer.models.sit import SiT
from trainer.runlog import StatsWriter
from trainer.sampling import euler_sampler

log = logging.getLogger(__name__)


class Previewer:
    """Sample grids from fixed noise/labels with the EMA model, and the loss plot; rank 0 only."""

    def __init__(self, cfg: TrainConfig, cache, d: dist.DistInfo):
        self.cfg, self.d, self.vae = cfg, d, None
        self.spec, vae_ident = cache.latents.spec, cache.latents.identity["vae"]
        m = cfg.model
        self.noise, self.labels = fixed_preview_inputs(cfg.sample_count, max(1, len(cache.latents.classes)),
                                                       (m.in_channels, m.input_size, m.input_size), cfg.seed)
        if d.is_main:  # every weight the run needs, before step 1 (raises the offline/missing-weights message)
            from pipeline.encoders.vae import load_vae

            self.vae = load_vae(vae_ident["name"], seed=int(vae_ident.get("seed", 0)), device=d.device)[0]

    def is_preview_step(self, step: int) -> bool:
        return step % self.cfg.sample_every == 0 or step == self.cfg.total_steps

    def grid(self, ema: SiT, step: int, run_dir: Path) -> None:
        if not self.d.is_main:
            return
        path = run_dir / "samples" / f"step-{step:07d}.png"
        with disk_full_named(path):
            sample_grid(ema, self.vae, self.noise, self.labels, steps=self.cfg.sample_steps,
                        cfg_scale=self.cfg.sample_cfg, scale=self.spec.scale, bias=self.spec.bias, path=path)
        log.info("step %d: sample grid %s", step, path)

    def plot(self, stats: StatsWriter, run_dir: Path, phase_two: int | None) -> None:
        """loss.png with Phase II's first step (tau, or where the trigger fired) dashed."""
        if self.d.is_main:
            loss_plot(stats.read(), run_dir / "loss.png", phase_two)

    def repair(self, ema: SiT, run_dir: Path, step: int, stats: StatsWriter, phase_two: int | None) -> None:
        """Draw what a kill between a checkpoint and its preview left out: the grid of every kept
        checkpoint at a preview step (from its EMA export, so bitwise the grid the run would have
        drawn) and a loss plot missing or older than stats.jsonl."""
        if not self.d.is_main:
            return
        redrawn = False
        for path in checkpoint.list_checkpoints(run_dir):
            s = checkpoint.step_of(path)
            if s > step or not self.is_preview_step(s) or (run_dir / "samples" / f"step-{s:07d}.png").is_file():
                continue
            model = copy.deepcopy(ema)
            saved = checkpoint.load(checkpoint.ema_path(path), map_location=self.d.device)["ema"]
            checkpoint.check_fits(saved, model.state_dict(), checkpoint.ema_path(path), "EMA")
            model.load_state_dict(saved)
            log.info("step %d: drawing the sample grid an interrupted run did not", s)
            self.grid(model, s, run_dir)
            redrawn = True
        plot = run_dir / "loss.png"
        if stats.path.is_file() and (redrawn or not plot.is_file()
                                     or plot.stat().st_mtime_ns < stats.path.stat().st_mtime_ns):
            self.plot(stats, run_dir, phase_two)


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
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # a kill mid-save leaves the old plot, not half a PNG
    try:
        with disk_full_named(path):
            fig.savefig(tmp, dpi=90, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
