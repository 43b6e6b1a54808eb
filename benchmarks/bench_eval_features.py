"""Eval feature extraction: images/s of each extractor, bare and through the whole input path.

  bare   extractor(batch) on one uint8 batch at --resolution (interleaved medians)
  path   pipeline.metrics.extractors.extract_features over a zarr array of --images images: lazy row-block
         Dataset + torch-fidelity's loader, in-process (save_cpu_ram) and with its 4 loader workers
Extractors: the random-init extractor (always); inception-v3-compat with its real weights when they
are present, else recorded as skipped with the path it looked for; and inception-v3-compat's
architecture at random init, for timing only (throughput does not depend on weight values; never
usable for metrics). Also the Fréchet distance at D = 2048 by sqrtm (ADM) and by eigh.

    python benchmarks/bench_eval_features.py [--device cuda] [--batch 32] [--images 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch_fidelity.feature_extractor_inceptionv3 as tf_inception  # noqa: E402

from benchmarks.common import environment, interleaved_medians, write  # noqa: E402
from pipeline.inputs.synth import synth_image  # noqa: E402
from pipeline.metrics.extractors import (  # noqa: E402
    INCEPTION,
    RANDOM_EXTRACTOR,
    MetricsError,
    as_dataset,
    build_extractor,
    extract_features,
    inception_weights_path,
)
from pipeline.metrics.scores import feature_stats, frechet_distance  # noqa: E402

FEATURES = ["2048", "logits_unbiased"]   # what compute_metrics asks for (FID/PR/KID + IS)
ARCH_ONLY = f"{INCEPTION} architecture, random weights (timing only)"


def random_weight_inception(device: str) -> torch.nn.Module:
    """torch-fidelity's InceptionV3 with its default init instead of the released weights."""
    with mock.patch.object(tf_inception, "load_state_dict_from_url", return_value=None), \
            mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict"):
        model = tf_inception.FeatureExtractorInceptionV3(INCEPTION, FEATURES)
    return model.to(device)


def path_images_per_s(extractor, images, args, save_cpu_ram: bool) -> float:
    data = as_dataset(images, args.batch)
    extract_features(extractor, torch.utils.data.Subset(data, range(args.batch)), batch_size=args.batch,
                     device=args.device, save_cpu_ram=True)  # warm-up
    t0 = time.perf_counter()
    extract_features(extractor, data, batch_size=args.batch, device=args.device, save_cpu_ram=save_cpu_ram)
    return len(data) / (time.perf_counter() - t0)


def frechet_seconds(n: int = 4096, d: int = 2048) -> dict[str, float]:
    """One full-rank D = 2048 Fréchet distance by each method (the cost after extraction)."""
    rng = np.random.default_rng(0)
    s1 = feature_stats(np.maximum(rng.normal(size=(n, d)), 0))
    s2 = feature_stats(np.maximum(rng.normal(size=(n, d)) + 0.2, 0))
    out: dict[str, float] = {}
    for method in ("eigh", "sqrtm"):
        t0 = time.perf_counter()
        out[f"{method}_fd"] = frechet_distance(*s1, *s2, method=method)
        out[f"{method}_seconds"] = round(time.perf_counter() - t0, 3)
    out["relative_difference"] = abs(out["eigh_fd"] - out["sqrtm_fd"]) / out["sqrtm_fd"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--images", type=int, default=128, help="images in the zarr array for the path runs")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--inception-weights", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--skip-frechet", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # torch-fidelity's loader always asks for min(4, 2 x cores) workers; that is what we measure
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    imgs = np.stack([synth_image(i, 8, args.resolution)[0] for i in range(args.images)])
    batch = torch.from_numpy(imgs[:args.batch]).permute(0, 3, 1, 2).contiguous().to(device)
    extractors = {RANDOM_EXTRACTOR: build_extractor(RANDOM_EXTRACTOR, FEATURES, device=args.device),
                  ARCH_ONLY: random_weight_inception(args.device)}
    try:
        weights = inception_weights_path(args.inception_weights)
        extractors[INCEPTION] = build_extractor(INCEPTION, FEATURES, device=args.device, inception_weights=weights)
        inception_status = f"measured with {weights}"
    except MetricsError as e:
        inception_status = f"skipped: {e}"

    with torch.no_grad():
        bare = interleaved_medians({k: (lambda m=m: m(batch)) for k, m in extractors.items()},
                                   reps=args.reps, warmup=1, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        z = zarr.create_array(store=os.path.join(tmp, "s.zarr"), shape=imgs.shape, dtype="uint8",
                              chunks=(args.batch, *imgs.shape[1:]))
        z[:] = imgs
        path = {}
        for name in [k for k in (RANDOM_EXTRACTOR, INCEPTION) if k in extractors]:
            for save_cpu_ram, how in ((True, "in-process"), (False, "4 loader workers")):
                path[f"{name} ({how})"] = round(path_images_per_s(extractors[name], z, args, save_cpu_ram), 2)

    result = {
        "benchmark": "eval_features",
        "env": {**environment(device), "loadavg_1m": round(os.getloadavg()[0], 2)},
        "resolution": args.resolution, "batch": args.batch, "path_images": args.images,
        "bare_images_per_s": {k: round(args.batch / v, 2) for k, v in bare.items()},
        "path_images_per_s": path,
        INCEPTION: inception_status,
        "frechet_d2048": None if args.skip_frechet else frechet_seconds(),
        "note": f"'{ARCH_ONLY}' measures speed only; its features are meaningless",
    }
    out = write("bench_eval_features" + ("" if device.type == "cpu" else f"-{device.type}"), result, args.out)
    print(f"bare img/s {result['bare_images_per_s']} | path img/s {path} -> {out}")


if __name__ == "__main__":
    main()
