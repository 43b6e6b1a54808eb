"""Preprocess throughput: the whole stage vs the bare model compute on the same batch.

Real architectures at random init (SD-VAE, DINOv2-B), synthetic 256 px images. The stage's
marginal images/s comes from two runs of different size (fixed costs such as model loading and
weight hashing cancel); the bare compute is VAE encode + teacher forward on one batch.

    python benchmarks/bench_preprocess.py [--device cuda] [--images 8 24] [--batch 8]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, interleaved_medians, write  # noqa: E402
from pipeline.encoders.teacher import load_teacher  # noqa: E402
from pipeline.encoders.vae import encode_moments, load_vae  # noqa: E402
from pipeline.inputs.synth import synth_image  # noqa: E402
from stages.preprocess import PreprocessConfig, run  # noqa: E402


def stage_seconds(n: int, args, root: Path) -> float:
    cfg = PreprocessConfig(source=f"synthetic:{n}", synthetic_classes=8, out=str(root / f"c{n}"),
                           resolution=args.resolution, shard_size=args.batch * 2, vae="random:sd",
                           teacher="random:base", batch_size=args.batch, num_workers=args.workers,
                           device=args.device, vae_precision=args.precision, teacher_precision=args.precision)
    t0 = time.perf_counter()
    run(cfg)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, nargs=2, default=[8, 24])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)

    vae, _ = load_vae("random:sd", device=device)
    teacher, _ = load_teacher("random:base", resolution=args.resolution, device=device)
    batch = torch.stack([torch.from_numpy(synth_image(i, 8, args.resolution)[0]) for i in range(args.batch)])
    batch = batch.permute(0, 3, 1, 2).contiguous()
    bare = interleaved_medians({
        "vae": lambda: encode_moments(vae, batch, args.precision),
        "teacher": lambda: teacher(batch, args.precision),
    }, reps=args.reps, warmup=1, device=device)
    bare_s = bare["vae"] + bare["teacher"]
    # The official pipeline (edm2 dataset_tool `encode`, used by REPA/HASTE) encodes one image at a time
    # and caches no teacher output at all.
    one = batch[:1]
    official = interleaved_medians({"vae": lambda: encode_moments(vae, one, args.precision)},
                                   reps=args.reps, warmup=1, device=device)["vae"]


    with tempfile.TemporaryDirectory() as tmp:
        n1, n2 = args.images
        t1, t2 = stage_seconds(n1, args, Path(tmp)), stage_seconds(n2, args, Path(tmp))
    stage_ips = (n2 - n1) / (t2 - t1)
    bare_ips = args.batch / bare_s
    result = {
        "benchmark": "preprocess", "env": environment(device), "resolution": args.resolution,
        "batch": args.batch, "precision": args.precision, "models": "random:sd VAE + random:base DINOv2-B",
        "bare_seconds_per_batch": {"vae_encode": bare["vae"], "teacher_forward": bare["teacher"]},
        "bare_images_per_s": round(bare_ips, 3),
        "stage_runs": {"images": [n1, n2], "seconds": [round(t1, 3), round(t2, 3)]},
        "stage_images_per_s": round(stage_ips, 3),
        "stage_over_bare": round(stage_ips / bare_ips, 3),
        "official_batch1_vae_only_images_per_s": round(1 / official, 3),
        "stage_over_official_batch1": round(stage_ips * official, 3),
        "note": "the stage also runs the teacher; the official VAE-only batch-1 encode caches no teacher targets",
    }
    path = write(f"preprocess-{device.type}", result, args.out)
    print(f"stage {stage_ips:.2f} img/s vs bare compute {bare_ips:.2f} img/s "
          f"({stage_ips / bare_ips:.0%}) -> {path}")


if __name__ == "__main__":
    main()
