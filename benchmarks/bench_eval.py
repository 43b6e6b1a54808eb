"""Eval throughput: sampling images/s (NFE stated) with per-image seeds vs the official batch RNG.

The official `generate.py` draws the noise of a whole batch from one global generator; ours
gives every image its own generator (identical images at any batch size or world size). This
measures what that costs, plus the VAE decode, on random-init real architectures (SiT, SD-VAE).

    python benchmarks/bench_eval.py [--device cuda] [--model SiT-B/2] [--batch 4] [--steps 10]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, interleaved_medians, write  # noqa: E402
from pipeline.encoders.vae import decode_latents, load_vae  # noqa: E402
from trainer.generate import generate_latents, image_labels, image_seeds  # noqa: E402
from trainer.models.sit import SiT, model_config  # noqa: E402
from trainer.sampling import SamplerConfig, sample  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="SiT-B/2")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="SDE steps (the paper uses 250; NFE = steps)")
    p.add_argument("--cfg", type=float, default=1.0)
    p.add_argument("--vae", default="random:sd")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = SiT(model_config(args.model, z_dim=0)).to(device).eval().requires_grad_(False)
    vae = load_vae(args.vae, device=device)[0]
    cfg = SamplerConfig(mode="sde", num_steps=args.steps, cfg_scale=args.cfg)
    idx = np.arange(args.batch)
    seeds, labels = image_seeds(0, idx), image_labels(0, idx, model.cfg.num_classes)
    m = model.cfg
    shape = (args.batch, m.in_channels, m.input_size, m.input_size)
    fn = lambda x, t, y: model(x, t, y).out  # noqa: E731
    z = torch.randn(shape, device=device)

    def official() -> None:  # one global generator for the batch, as generate.py
        g = torch.Generator(device).manual_seed(0)
        noise = torch.randn(shape, generator=g, device=device)
        sample(fn, noise, torch.as_tensor(labels, device=device), cfg, null_label=m.num_classes, generator=g)

    fns = {
        "official_rng": official,
        "per_image_seeds": lambda: generate_latents(model, seeds, labels, cfg),
        "vae_decode": lambda: decode_latents(vae, z, 0.18215, 0.0),
    }
    secs = interleaved_medians(fns, reps=args.reps, warmup=1, device=device)
    per_image = {k: v / args.batch for k, v in secs.items()}
    result = {
        "benchmark": "eval_sampling", "env": environment(device), "model": args.model, "batch": args.batch,
        "sampler": "sde", "nfe": cfg.nfe * (2 if args.cfg > 1 else 1), "nfe_note": "model evaluations per image "
        "(CFG doubles the batch inside the guidance interval)",
        "seconds_per_batch": {k: round(v, 4) for k, v in secs.items()},
        "images_per_s": {"sampling": round(1 / per_image["per_image_seeds"], 3),
                         "sampling_official_rng": round(1 / per_image["official_rng"], 3),
                         "vae_decode": round(1 / per_image["vae_decode"], 3),
                         "end_to_end": round(1 / (per_image["per_image_seeds"] + per_image["vae_decode"]), 3)},
        "ratios": {"per_image_seeds_over_official_rng": round(secs["per_image_seeds"] / secs["official_rng"], 3)},
        "projected_hours_50k_250_steps": round(50_000 * (per_image["per_image_seeds"] * 250 / args.steps
                                                         + per_image["vae_decode"]) / 3600, 2),
    }
    path = write(f"eval-{device.type}-{args.model.replace('/', '_')}", result, args.out)
    print(f"{result['images_per_s']} {result['ratios']} -> {path}")


if __name__ == "__main__":
    main()
