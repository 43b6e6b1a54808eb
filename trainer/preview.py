"""Rank-0 training artefacts: EMA sample grids from fixed noise, a loss plot; redrawn when a kill skipped them.

The preview VAE (named in the cache manifest) is loaded before step 1, so a VAE that cannot be
loaded (offline, missing directory) stops the run at once instead of at the first preview.

Class models draw labels ``i mod classes``. Text models have no text encoder at train time, so their
prompts are cached captions: the first caption of each of the first ``sample_count`` samples of the
cache (or of the samples named by ``sample_keys``), read once by offset; CFG guides against the cached
empty caption (the training null). The grid gets a caption strip (tile numbers, one line per prompt)
and ``samples/prompts.json`` lists the same prompts with their cache keys.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import dist
from pipeline.cache.schema import TEXT
from pipeline.cache.shards import atomic_write_json
from trainer import checkpoint
from trainer.checkpoint import disk_full_named
from trainer.config import TrainConfig
from trainer.models.archs import Network
from trainer.probe_data import preview_samples, read_members
from trainer.runlog import StatsWriter
from trainer.sampling import euler_sampler

log = logging.getLogger(__name__)


class Previewer:
    """Sample grids from fixed noise/labels with the EMA model, and the loss plot; rank 0 only."""

    def __init__(self, cfg: TrainConfig, cache, d: dist.DistInfo):
        self.cfg, self.d, self.vae = cfg, d, None
        self.spec, vae_ident = cache.latents.spec, cache.latents.identity["vae"]
        m = cfg.model
        self.contexts = self.prompts = None  # text models: [prompt encodings; null] (n + 1, L, D), prompt records
        count, classes = cfg.sample_count, max(1, len(cache.latents.classes))
        if cfg.text_conditioned and d.is_main:
            self.prompts, self.contexts = cached_prompts(cache, cfg.sample_keys, cfg.sample_count)
            count, classes = len(self.prompts), len(self.prompts) + 1  # labels 0..n-1 = rows of contexts
        self.noise, self.labels = fixed_preview_inputs(count, classes, (m.in_channels, m.input_size, m.input_size),
                                                       cfg.seed)
        if d.is_main:  # every weight the run needs, before step 1 (raises the offline/missing-weights message)
            from pipeline.encoders.vae import load_vae

            self.vae = load_vae(vae_ident["name"], seed=int(vae_ident.get("seed", 0)), device=d.device)[0]

    def is_preview_step(self, step: int) -> bool:
        return step % self.cfg.sample_every == 0 or step == self.cfg.total_steps

    def grid(self, ema: Network, step: int, run_dir: Path) -> None:
        if not self.d.is_main:
            return
        path = run_dir / "samples" / f"step-{step:07d}.png"
        captions = None
        if self.prompts is not None:
            captions = [p["caption"] for p in self.prompts]
            path.parent.mkdir(parents=True, exist_ok=True)
            with disk_full_named(path.parent / "prompts.json"):  # the prompts beside the PNGs, machine-readable
                atomic_write_json(path.parent / "prompts.json", {"prompts": self.prompts})
        with disk_full_named(path):
            sample_grid(ema, self.vae, self.noise, self.labels, steps=self.cfg.sample_steps,
                        cfg_scale=self.cfg.sample_cfg, scale=self.spec.scale, bias=self.spec.bias, path=path,
                        contexts=self.contexts, captions=captions)
        log.info("step %d: sample grid %s", step, path)

    def plot(self, stats: StatsWriter, run_dir: Path, phase_two: int | None) -> None:
        """loss.png with Phase II's first step (tau, or where the trigger fired) dashed."""
        if self.d.is_main:
            loss_plot(stats.read(), run_dir / "loss.png", phase_two)

    def repair(self, ema: Network, run_dir: Path, step: int, stats: StatsWriter, phase_two: int | None) -> None:
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


def cached_prompts(cache, keys: tuple[str, ...], count: int) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """Preview prompts of a text model: records {index, key, caption} and the float32 table
    [encodings of the prompts; the empty caption] (n + 1, L, D), from the cache's text group."""
    samples = [read_members(cache, s, (TEXT,)) for s in preview_samples(cache, keys, count)]
    prompts = [{"index": i + 1, "key": s["key"], "caption": s["captions"][0]} for i, s in enumerate(samples)]
    table = torch.stack([torch.tensor(s["text"][0]) for s in samples] + [cache.text_null()])
    return prompts, table.float()


@torch.no_grad()
def sample_grid(ema: Network, vae, noise: torch.Tensor, labels: torch.Tensor, *, steps: int, cfg_scale: float,
                scale: float, bias: float, path: Path, contexts: torch.Tensor | None = None,
                captions: list[str] | None = None) -> Path:
    """Euler ODE samples from the EMA model (eval mode), decoded with the cache's VAE, as one PNG.

    Class models: ``labels`` are classes, CFG against the null class. Text models: ``labels`` index the
    rows of ``contexts`` = [prompt encodings; null encoding] (n + 1, L, D), and CFG's null "label" is its
    last row, so the class sampler guides against the empty caption unchanged. ``captions`` adds the strip.
    """
    from pipeline.encoders.vae import decode_latents
    from pipeline.metrics.sample_store import write_grid

    device = next(ema.parameters()).device
    if contexts is None:
        fn, null = (lambda x, t, y: ema(x, t, y).out), ema.cfg.num_classes  # noqa: E731
    else:
        table = contexts.to(device)
        fn, null = (lambda x, t, y: ema(x, t, table[y]).out), len(table) - 1  # noqa: E731
    z = euler_sampler(fn, noise.to(device), labels.to(device), num_steps=steps, cfg_scale=cfg_scale, null_label=null)
    images = decode_latents(vae, z.float(), scale, bias).permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, 3) uint8
    path.parent.mkdir(parents=True, exist_ok=True)
    if captions is not None:
        return captioned_grid(images, captions, path)
    return write_grid(images, path)  # the same contact sheet as `haste eval`'s grid.png


def captioned_grid(images: np.ndarray, captions: list[str], path: Path, min_width: int = 480) -> Path:
    """``write_grid``'s contact sheet (row-major, ceil(sqrt(n)) columns) with each tile numbered and a
    strip below listing "number  caption", wrapped to the sheet's width (at least ``min_width`` px)."""
    from PIL import Image, ImageDraw, ImageFont

    n, h, w, _ = images.shape
    cols = math.ceil(math.sqrt(n))
    font = ImageFont.load_default(size=12)
    width = max(cols * w, min_width)
    lines = [ln for i, c in enumerate(captions) for ln in _wrap(f"{i + 1}  {c}", font, width - 8)]
    line_h = 15
    sheet = Image.new("RGB", (width, math.ceil(n / cols) * h + 6 + line_h * len(lines)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        sheet.paste(Image.fromarray(img), (c * w, r * h))
        draw.rectangle((c * w, r * h, c * w + 7 * len(str(i + 1)) + 3, r * h + 13), fill=(0, 0, 0))
        draw.text((c * w + 2, r * h), str(i + 1), fill=(255, 255, 255), font=font)
    y0 = math.ceil(n / cols) * h + 4
    for k, line in enumerate(lines):
        draw.text((4, y0 + k * line_h), line, fill=(0, 0, 0), font=font)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        sheet.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels (a word longer than a line stays whole)."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}" if line else word
        if line and font.getlength(trial) > width:
            lines.append(line)
            trial = "   " + word
        line = trial
    return [*lines, line] if line else lines


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
