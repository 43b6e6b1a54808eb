"""The termination probe's share of training time at the paper's settings (App. A.2, on SiT-B/2).

Same model, same batch, one process, interleaved medians: one Phase I optimizer step (batch B)
and one probe (``trainer.probe.run_probe``: the paper's 4 times, block 4, probe batch B) over a
scaled-down probe set of S samples, data read from a cache as in training. The probe is linear in
its sample count (each sample costs one forward and two partial backwards per t, plus its reads),
so a probe of the paper's 2,048 samples is extrapolated as probe_s x 2048 / S, and the training
between two probes (every = 10,000 steps of the paper's global batch 256) as step_s x 256 / B per
step, i.e. both at the per-sample cost of batch B. Reported: the share
probe / (probe + training between probes), and the per-sample cost ratio probe / step.

    python benchmarks/bench_probe.py [--device cuda --model SiT-XL/2 --batch 32 --samples 256]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, interleaved_medians, sync, write  # noqa: E402
from pipeline.cache.loader import CacheStream  # noqa: E402
from pipeline.cache.reader import open_cache  # noqa: E402
from pipeline.dist import DistInfo  # noqa: E402
from stages.preprocess import PreprocessConfig, run  # noqa: E402
from trainer.config import load_train_config  # noqa: E402
from trainer.engine import build_model, build_optimizer, setup_numerics, train_step, wrap  # noqa: E402
from trainer.models.sit import SIT_PRESETS  # noqa: E402
from trainer.phases import build_phases  # noqa: E402
from trainer.probe import run_probe  # noqa: E402

PAPER = {"samples": 2048, "every": 10_000, "global_batch": 256}


def config(args, cache_root: Path):
    """SiT-B/2: the paper's SiT-B recipe (depth 5, 2,3,4 <- 7,9,11), where its trigger was run; else HASTE's."""
    heads = list(range(min(12, SIT_PRESETS[args.model]["num_heads"])))
    preset = "haste-sit-b" if args.model.startswith("SiT-B") else "haste"
    return load_train_config(None, (
        f"model.preset={args.model}", f"align.preset={preset}", f"align.student_heads={heads}",
        f"align.teacher_heads={heads}", "align.stop.trigger=grad-angle", f"align.stop.samples={args.samples}",
        f"align.stop.batch_size={args.batch}", f"global_batch_size={args.batch}", f"precision={args.precision}",
        f"device={args.device}", f"data.cache={cache_root}", "data.num_workers=0"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="SiT-B/2")
    p.add_argument("--batch", type=int, default=4, help="training batch = probe batch")
    p.add_argument("--samples", type=int, default=8, help="probe samples measured (then extrapolated to 2,048)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cache"
        run(PreprocessConfig(source=f"synthetic:{max(args.samples, args.batch) * 2}", synthetic_classes=8,
                             out=str(root), resolution=256, shard_size=args.batch, vae="random:tiny",
                             teacher="random:base", teacher_layers=(7, 8, 9, 10, 11), batch_size=args.batch,
                             num_workers=0, device=args.device))
        cfg = config(args, root)
        setup_numerics(cfg)
        d = DistInfo(device=device)
        model, _ = build_model(cfg, device)
        opt = build_optimizer(cfg, model)
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        phase = build_phases(cfg.align)[0]
        cache = open_cache(root)
        batch = next(iter(CacheStream(cache, with_teacher=True, batch_size=args.batch, seed=0)))
        net = wrap(model, phase, d)
        fns = {"step": lambda: train_step(net, model, opt, scaler, cfg, phase, cache, [batch], 0, d),
               "probe": lambda: run_probe(model, cfg, cfg.align.stop, cache, 1, d)}
        secs = interleaved_medians(fns, reps=args.reps, warmup=1, device=device)
        sync(device)
    stop = cfg.align.stop
    probe_paper = secs["probe"] * PAPER["samples"] / args.samples
    between = PAPER["every"] * secs["step"] * PAPER["global_batch"] / args.batch
    share = probe_paper / (probe_paper + between)
    per_sample = (secs["probe"] / (args.samples * len(stop.times))) / (secs["step"] / args.batch)
    result = {
        "benchmark": "probe", "env": environment(device), "model": args.model, "batch": args.batch,
        "precision": args.precision, "align": "haste-sit-b" if args.model.startswith("SiT-B") else "haste",
        "probe": {"samples_measured": args.samples, "times": list(stop.times), "block": stop.block},
        "seconds": {"step": round(secs["step"], 4), "probe_measured": round(secs["probe"], 4)},
        "extrapolated": {"note": "linear in probe samples (2,048) and in training batch (256), per-sample cost of "
                                 f"batch {args.batch}", "probe_2048_s": round(probe_paper, 2),
                         "training_between_probes_s": round(between, 1)},
        "ratios": {"probe_share_of_training": round(share, 5),
                   "probe_per_sample_t_over_step_per_sample": round(per_sample, 3)},
        "headline": {f"probe share of training time, paper settings ({args.model})": f"{100 * share:.3f} %",
                     "probe cost per (sample, t) / training step per sample": round(per_sample, 3)},
    }
    path = write(f"probe-{device.type}-{args.model.replace('/', '_')}", result, args.out)
    print(f"{result['seconds']} {result['ratios']} -> {path}")


if __name__ == "__main__":
    main()
