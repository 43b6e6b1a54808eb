"""The text group: bytes per image, fp16 error against fp32, encoder throughput, import and loader speed.

- sizes: the stored bytes of CLIP ViT-L/14 encodings (77 x 768) per image, fp16 and fp32 (U-ViT's
  files), for MS-COCO 2014 train (82,783 images, 414,113 captions) and a 10M-image web set (1 caption
  each), from the same arithmetic as ``haste preprocess --dry-run``;
- fp16 error: 1 - cos per token between the fp32 encoding and its fp16 copy, CLIP ViT-L/14's text
  tower at random init (``random:l14``; nothing can be downloaded here) on COCO-style captions;
- encoder throughput: captions/s batching ``--batch`` captions per forward against U-ViT's extract
  loop, which calls the encoder once per image with that image's ~5 captions;
- import + loader: a U-ViT-style features folder of ``--images`` images x 5 random CLIP-L contexts,
  ``haste import uvit`` into latents + text (no teacher), then the training stream with and without
  the text group (samples/s, one process, page cache warm).

    python benchmarks/bench_text.py [--device cuda] [--captions 32] [--batch 32] [--images 128]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, interleaved_medians, write  # noqa: E402
from pipeline.cache.loader import CacheStream  # noqa: E402
from pipeline.cache.reader import open_cache  # noqa: E402
from pipeline.cache.schema import TextSpec  # noqa: E402
from pipeline.cache.text import FP16_COS_BOUND, text_bytes  # noqa: E402
from pipeline.encoders.text import load_text_encoder  # noqa: E402
from pipeline.inputs.synth_captions import prompts  # noqa: E402
from stages.import_uvit import UViTImportConfig, run_import_uvit  # noqa: E402
from stages.preprocess import PreprocessConfig  # noqa: E402
from stages.preprocess_text import one_minus_cos  # noqa: E402

COCO_TRAIN = (82_783, 414_113)          # images, captions (captions_train2014.json)
WEB = (10_000_000, 10_000_000)
COCO_STYLE = ["A man with a red helmet on a small moped on a dirt road.", "A woman cutting a large white sheet cake.",
              "A child holding a flowered umbrella and petting a yak.", "A giraffe eating food from the top of the tree.",
              "White vase with different colored flowers sitting inside of it.", "Two dogs playing in the snow."]


def sizes() -> dict:
    out = {}
    for dtype in ("float16", "float32"):
        spec = TextSpec(max_length=77, dim=768, dtype=dtype)
        one = text_bytes(spec, 1)
        per_image = one["tar"] - one["per_caption"]          # headers, npy header, JSON, padding
        for name, (images, caps) in (("coco_train2014", COCO_TRAIN), ("web_10M", WEB)):
            total = images * per_image + caps * one["per_caption"]
            out[f"{name}_{dtype}"] = {"bytes_per_image": round(total / images), "total_gb": round(total / 1e9, 2),
                                      "bytes_per_caption": one["per_caption"]}
    return out


def fp16_error(enc, captions: list[str]) -> dict:
    x = enc(captions)
    err = one_minus_cos(x, x.half())
    rel = ((x.half().float() - x).norm(dim=-1) / x.norm(dim=-1)).max()
    return {"captions": len(captions), "one_minus_cos_max": float(err.max()), "one_minus_cos_mean": float(err.mean()),
            "rel_l2_max": float(rel), "bound": FP16_COS_BOUND, "token_norm_mean": float(x.norm(dim=-1).mean())}


def throughput(enc, captions: list[str], batch: int, reps: int, device: torch.device) -> dict:
    per_image = 5  # U-ViT: clip.encode(captions of one image)
    t = interleaved_medians({"ours": lambda: enc(captions[:batch]), "official": lambda: enc(captions[:per_image])},
                            reps=reps, warmup=1, device=device)
    ours, official = batch / t["ours"], per_image / t["official"]
    return {"batch": batch, "captions_per_s": round(ours, 2), "official_per_image_captions_per_s": round(official, 2),
            "ours_over_official": round(ours / official, 3)}


def import_and_loader(root: Path, images: int, workers: int) -> dict:
    feats = root / "coco256_features" / "train"
    feats.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(images):
        np.save(feats / f"{i}.npy", rng.standard_normal((8, 32, 32)).astype(np.float32))
        for k in range(5):
            np.save(feats / f"{i}_{k}.npy", rng.standard_normal((77, 768)).astype(np.float32))
    np.save(feats.parent / "empty_context.npy", rng.standard_normal((77, 768)).astype(np.float32))
    cfg = PreprocessConfig(out=str(root / "cache"), teacher="none", shard_size=32, num_workers=workers, device="cpu")
    t0 = time.perf_counter()
    run_import_uvit(UViTImportConfig(src=str(feats), vae="stabilityai/sd-vae-ft-ema", preprocess=cfg))
    imported = images / (time.perf_counter() - t0)
    cache = open_cache(root / "cache", need_teacher=False, need_text=True)
    out = {"import_images_per_s": round(imported, 1), "text_bytes_per_image": cache.text.settings["bytes_per_image"]}
    for name, with_text in (("latents_only", False), ("latents_text", True)):
        stream = iter(CacheStream(cache, with_teacher=False, with_text=with_text, batch_size=32, seed=0))
        next(stream)
        t0 = time.perf_counter()
        n = sum(len(next(stream)["key"]) for _ in range(max(1, images // 32)))
        out[f"loader_{name}_samples_per_s"] = round(n / (time.perf_counter() - t0), 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--captions", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    enc, _ = load_text_encoder("random:l14", device=device)
    captions = (COCO_STYLE + prompts(0, held_out=False))[:args.captions]
    result = {"benchmark": "text", "env": environment(device), "encoder": "random:l14 (CLIP ViT-L/14 text tower)",
              "sizes": sizes(), "fp16_error": fp16_error(enc, captions + [""]),
              "throughput": throughput(enc, captions, min(args.batch, len(captions)), args.reps, device)}
    with tempfile.TemporaryDirectory() as tmp:
        result["import_loader"] = import_and_loader(Path(tmp), args.images, args.workers)
    s, e, t = result["sizes"], result["fp16_error"], result["throughput"]
    result["headline"] = {
        "text group, COCO train bytes/image (fp16)": s["coco_train2014_float16"]["bytes_per_image"],
        "text group, fp16 worst 1 - cos per token (CLIP-L, random init)": f"{e['one_minus_cos_max']:.2e}",
        "text encoder, batched / official per-image captions/s": t["ours_over_official"],
    }
    path = write(f"text-{device.type}", result, args.out)
    print(f"COCO {s['coco_train2014_float16']['total_gb']} GB fp16 ({s['coco_train2014_float32']['total_gb']} GB fp32), "
          f"web 10M {s['web_10M_float16']['total_gb']} GB; fp16 1-cos max {e['one_minus_cos_max']:.2e}; "
          f"{t['captions_per_s']} captions/s ({t['ours_over_official']}x official); "
          f"{result['import_loader']} -> {path}")


if __name__ == "__main__":
    main()
