"""Teacher codecs: bytes per image vs measured fidelity, encode/decode cost, ImageNet projection.

Every attention codec is measured on the same sources (``benchmarks/codecs_sources.py``): bytes
per image (tar footprint, DINOv2-B, layers 8-11, 256 px), encode (the writer's device step and
encode, one image) and batched decode images/s on the CPU, decode GFLOP per image, the zstd
ratio of its stored bytes, and pipeline.cache.fidelity's metrics against exact fp32 targets:

- teacher sweep: the random-init DINOv2-B on synthetic images, logits sharpened x1/x5/x20 (a
  random-init teacher attends far more uniformly than a trained one; sharper softmaxes amplify
  logit errors). Its LayerScale is 1e-5, so its blocks 8-11 barely act: see the stresses.
- flat-spectrum stress: a stack of random DINOv2-shaped blocks with LayerScale 1 on i.i.d.
  Gaussian residual streams (q, k, x then i.i.d. too: nothing low-rank, nothing structured), at
  the teacher's logit scale, sharpened x1/x5/x20 inside every block (for stream-* the error then
  passes through sharp softmaxes; for the other codecs this is the same as sharpening afterwards);
- channel-outlier stress: the same with 4 of the 768 stream channels x20, as trained ViTs have.

The default is the smallest (attention + features) pair whose worst case over the teacher sweep,
the flat-spectrum stress AND the channel-outlier stress keeps gradient cosine >= 0.999, with mean
feature cosine error <= 1e-3 (stream-* derive the features: their worst error over all sources).
Last, the Phase I loader with that default is timed against a CPU SiT-B/2 training step that
decodes it (as bench-train), and the decode set against an XL/2 step.

    python benchmarks/bench_codecs.py [--images 8] [--device cuda] [--skip-loader]
Writes benchmarks/results/codecs-<device>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.codecs_sources import (  # noqa: E402
    Source,
    decoded,
    encode_one,
    encoded_batch,
    stored_params,
    stress_source,
    teacher_source,
)
from benchmarks.common import RESULTS, environment, interleaved_medians, write  # noqa: E402
from pipeline.cache import fidelity  # noqa: E402
from pipeline.cache.codecs import AttnCodec, decode_features, encode_features, get_codec  # noqa: E402
from pipeline.cache.codecs_stream import decode_gflop, stream_codec  # noqa: E402
from pipeline.cache.codecs_tokens import tokens_codec  # noqa: E402
from pipeline.cache.schema import TEACHER, TeacherSpec, bytes_per_sample  # noqa: E402

IMAGENET_N = 1_281_167
ATTN_CODECS = ("qk-fp32", "qk-fp16", "logits-fp16", "qk-int8", "lowrank-r48-fp16", "lowrank-r32-fp16",
               "lowrank-r24-fp16", "lowrank-r16-fp16", "lowrank-r48-int8", "lowrank-r32-int8", "lowrank-r24-int8",
               "lowrank-r16-int8", "lowrank-r8-int8", "tokens-int8", "stream-fp16", "stream-int12", "stream-int10",
               "stream-int8")
FEAT_CODECS = (("plain", "float32"), ("plain", "float16"), ("int8", "float16"))
# Variants measured for the record, not candidates: (codec, the registered name with the same bytes, or None).
ABLATIONS = {"tokens-int8 without the fixed basis": (tokens_codec("int8", fixed_basis=False), "tokens-int8"),
             "stream-int8 without the fixed basis": (stream_codec("int8", fixed_basis=False), "stream-int8"),
             "stream-int6 (packs, not registered)": (stream_codec("int6"), None),
             # the decode precisions (DECODE_COMPUTE): fp16 autocast on CUDA, bf16-mixed on CPUs (the main rows
             # decode on --device); fp32 and bf16 autocast for contrast
             "stream-int10 computed in fp32": (stream_codec("int10", compute="fp32"), "stream-int10"),
             "stream-int10 computed in bf16-mixed (CPU)": (stream_codec("int10", compute="bf16-mixed"), "stream-int10"),
             "stream-int10 computed in fp16 (CUDA)": (stream_codec("int10", compute="fp16"), "stream-int10"),
             "stream-int10 computed in bf16": (stream_codec("int10", compute="bf16"), "stream-int10")}
SHARPNESS = fidelity.SHARPNESS
XL2_OVER_B2_FLOPS = 118.64 / 23.01  # SiT/DiT forward Gflops, XL/2 over B/2 (SPEC §9; DiT Table 4)
XL2_STEP_GFLOP = 2 * 355.0          # SiT-XL/2 forward + backward per sample, SPEC §9 (355 GMAC)
log = logging.getLogger("bench_codecs")


def attn_bytes(spec: TeacherSpec, codec: str) -> int:
    return sum(v for k, v in _tar_fields(spec, codec=codec).items() if not k.startswith("feat"))


def _tar_fields(spec: TeacherSpec, **change) -> dict[str, int]:
    """Tar footprint per member (header + 512-padded payload) of one sample."""
    s = TeacherSpec(**{**spec.__dict__, **change})
    bps = bytes_per_sample(TEACHER, s)
    return {k.removeprefix("field:"): 512 + -(-v // 512) * 512 for k, v in bps.items() if k.startswith("field:")}


def codec_gflop(spec: TeacherSpec, codec: AttnCodec) -> float:
    """Decode GFLOP per image: what the trainer computes from the stored members (matmuls only)."""
    layers, heads, t, hd, d = len(spec.layers), spec.num_heads, spec.num_tokens, spec.head_dim, spec.embed_dim
    logits = 2 * layers * heads * t * t * hd / 1e9               # scale · q kᵀ
    if codec.derives_features:
        return decode_gflop(TeacherSpec(**{**spec.__dict__, "codec": codec.name}))
    if codec.name.startswith("tokens"):
        return logits + 2 * layers * t * d * 2 * heads * hd / 1e9  # q, k = x Wᵀ + b first
    if codec.rank is not None:
        return logits * codec.rank / hd
    return 0.0 if codec.name.startswith(("logits", "none")) else logits


def zstd_ratio(batch: dict[str, torch.Tensor]) -> float:
    """Compressed / raw bytes of the stored members at zstd level 3 (how much entropy coding would save)."""
    import zstandard

    raw = b"".join(t.numpy().tobytes() for t in batch.values())
    return round(len(zstandard.ZstdCompressor(level=3).compress(raw)) / len(raw), 3)


def _fid(exact: Source, feat: torch.Tensor | None, logits: torch.Tensor, sharpness) -> dict:
    return fidelity.measure(exact.logits, logits, exact.feat, exact.feat if feat is None else feat,
                            sharpness=sharpness)


def attention_row(spec: TeacherSpec, name: str, teacher: Source, stresses: dict[str, list[Source]],
                  codec: AttnCodec | None = None, bytes_as: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Bytes and fidelity of one attention codec on the teacher sweep and each stress (worst over its
    internal sharpnesses), and its encoded teacher batch (for the timings). ``codec``/``bytes_as``:
    an unregistered variant (ABLATIONS)."""
    codec = codec or get_codec(name)
    batch = encoded_batch(codec, spec, teacher)
    feat, logits = decoded(codec, spec, teacher, batch)
    fid = _fid(teacher, feat, logits, SHARPNESS)
    feat_errs = [fid["worst"]["feat_cos_err_mean"]]
    nbytes = attn_bytes(spec, bytes_as) if bytes_as else sum(512 + -(-(a.nbytes + 128) // 512) * 512
                                                                for a in encode_one(codec, teacher, 0, spec.scale).values())
    row = {"codec": name, "attn_bytes": nbytes, "error_bound": codec.error_bound,
           "derives_features": codec.derives_features, "decode_gflop": round(codec_gflop(spec, codec), 2),
           "zstd_ratio": zstd_ratio(batch), "sharpness": fid["sharpness"],
           "worst": {k: v for k, v in fid["worst"].items() if not k.startswith("feat")}}
    for label, sources in stresses.items():
        per = {}
        for src in sources:
            f = _fid(src, *decoded(codec, spec, src), sharpness=(1.0,))
            per[f"{src.info['sharpness']:g}"] = {"grad_cos_min": f["worst"]["grad_cos_min"],
                                                 "kl_max": f["worst"]["kl_max"],
                                                 "feat_cos_err_mean": f["worst"]["feat_cos_err_mean"]}
            feat_errs.append(f["worst"]["feat_cos_err_mean"])
        row[f"{label}_by_sharpness"] = per
        row[f"{label}_grad_cos_min"] = min(r["grad_cos_min"] for r in per.values())
    if codec.derives_features:  # the REPA targets come out of the same decode: worst over every source
        row["feat_cos_err_mean"] = max(feat_errs)
    return row, batch


def speeds(spec: TeacherSpec, rows: list[dict], batches: dict[str, dict], src: Source,
           device: torch.device, reps: int) -> None:
    """Encode (one image: the device-side step, then the writer thread's encode; both on the CPU here)
    and batched decode (on ``device``, group arrays already there as the trainer keeps them; stream-*
    decode the features too) images/s, timed round-robin so that machine noise hits all alike."""
    enc_fns, dec_fns = {}, {}
    for r in rows:
        codec = get_codec(r["codec"])
        enc_fns[r["codec"]] = lambda c=codec: encode_one(c, src, 0, spec.scale)
        on_dev = {m: t.to(device) for m, t in batches[r["codec"]].items()}
        params = {n: t.to(device) for n, t in (stored_params(codec, spec, src) or {}).items()}
        s = TeacherSpec(**{**spec.__dict__, "codec": codec.name})
        dec_fns[r["codec"]] = (lambda c=codec, b=on_dev, p=params, s=s: c.targets(b, s, p, None, True, True)) \
            if codec.derives_features else (lambda c=codec, b=on_dev, p=params: c.decode(b, spec.scale, p))
    enc = interleaved_medians(enc_fns, reps, 1, torch.device("cpu"))
    dec = interleaved_medians(dec_fns, reps, 1, device)
    for r in rows:
        r["encode_img_per_s"] = round(1 / enc[r["codec"]], 1)
        r["decode_img_per_s"] = round(src.n / dec[r["codec"]], 1)


def feature_row(spec: TeacherSpec, feat_codec: str, feat_dtype: str, feat: torch.Tensor) -> dict:
    t0 = time.perf_counter()
    arrays = [encode_features(f, feat_codec, feat_dtype) for f in feat.numpy()]
    enc_s = (time.perf_counter() - t0) / len(arrays)
    dec = decode_features({m: np.stack([a[m] for a in arrays]) for m in arrays[0]})
    err = fidelity.feature_cosine_error(feat, dec)
    fields = _tar_fields(spec, feat_codec=feat_codec, feat_dtype=feat_dtype)
    return {"feat": f"{feat_codec}-{feat_dtype}" if feat_codec == "plain" else feat_codec,
            "feat_codec": feat_codec, "feat_dtype": feat_dtype,
            "feat_bytes": sum(v for k, v in fields.items() if k.startswith("feat")),
            "encode_img_per_s": round(1 / enc_s, 1), "cos_err_mean": float(err.mean()), "cos_err_max": float(err.max())}


def choose_default(attn: list[dict], feats: list[dict]) -> dict:
    """Smallest (attention, features) pair meeting the bar in the worst case of the teacher sweep, the
    flat-spectrum stress AND the channel-outlier stress (a trained teacher's spectrum, sharpness and
    channel statistics are unknown here). stream-* pair with their own derived features only."""
    bar = fidelity.GRAD_COS_MIN
    derived = {"feat": "derived", "feat_codec": "derived", "feat_dtype": None, "feat_bytes": 0}
    pairs = []
    for a in attn:
        for f in ([{**derived, "cos_err_mean": a["feat_cos_err_mean"]}] if a["derives_features"] else feats):
            pairs.append({"codec": a["codec"], "feat": f["feat"], "feat_codec": f["feat_codec"],
                          "feat_dtype": f["feat_dtype"], "bytes_per_image": a["attn_bytes"] + f["feat_bytes"],
                          "grad_cos_min": a["worst"]["grad_cos_min"], "feat_cos_err_mean": f["cos_err_mean"],
                          "stress_grad_cos_min": a["stress_grad_cos_min"],
                          "outlier_grad_cos_min": a["outlier_grad_cos_min"], "decode_gflop": a["decode_gflop"]})
    for p in pairs:
        p["meets_sweep"] = p["grad_cos_min"] >= bar and p["feat_cos_err_mean"] <= fidelity.FEAT_COS_ERR_MAX
        p["meets_bar"] = p["meets_sweep"] and min(p["stress_grad_cos_min"], p["outlier_grad_cos_min"]) >= bar
        p["imagenet_gb"] = round(p["bytes_per_image"] * IMAGENET_N / 1e9, 1)
    ok = sorted((p for p in pairs if p["meets_bar"]), key=lambda p: p["bytes_per_image"])
    sweep_ok = sorted((p for p in pairs if p["meets_sweep"]), key=lambda p: p["bytes_per_image"])
    return {"rule": "smallest bytes whose worst case over the sharpness sweep, the flat-spectrum stress AND the "
                    "channel-outlier stress keeps grad_cos >= 0.999, with mean feature cos err <= 1e-3",
            "default": ok[0] if ok else None, "smallest_sweep_only": sweep_ok[0] if sweep_ok else None,
            "passing": ok}


def loader_vs_step(default: dict, decode: dict, args) -> dict:
    """Phase I loader samples/s with the default codec (and qk-fp16) vs a CPU SiT-B/2 step decoding it,
    and the default's decode set against an XL/2 step (CPU: the B/2 step scaled by the FLOP ratio)."""
    from benchmarks.bench_train import loader_speed, overrides, step_fn
    from pipeline.cache.loader import CacheStream
    from pipeline.cache.reader import open_cache
    from stages.preprocess import PreprocessConfig, run
    from trainer.config import load_train_config
    from trainer.phases import build_phases

    bargs = SimpleNamespace(device="cpu", model="SiT-B/2", batch=args.batch, precision="bf16", compile=False)
    phase = build_phases(load_train_config(None, overrides(bargs)).align)[0]
    out: dict = {"model": "SiT-B/2", "batch": args.batch, "device": "cpu", "precision": "bf16"}
    steps, loaders = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for codec, fc in (("qk-fp16", "plain"), (default["codec"], default["feat_codec"])):
            fc = "plain" if fc == "derived" else fc  # stream-*: the features come from the decode
            root = Path(tmp) / codec  # one cache per codec: loader_speed opens the newest pair
            run(PreprocessConfig(source=f"synthetic:{args.batch * 4}", synthetic_classes=8, out=str(root),
                                 resolution=256, shard_size=args.batch, vae="random:tiny", teacher="random:base",
                                 batch_size=args.batch, num_workers=0, device="cpu", codec=codec, feat_codec=fc))
            cache = open_cache(root)
            batch = next(iter(CacheStream(cache, with_teacher=True, batch_size=args.batch, seed=0)))
            name = f"{codec}+{fc}"
            steps[name] = step_fn(bargs, cache, batch, phase, z_dim=768)
            loaders[name] = loader_speed(root, args.batch, args.loader_samples)["phase1_samples_per_s"]
        secs = interleaved_medians(steps, reps=args.step_reps, warmup=1, device=torch.device("cpu"))
    for name, sec in secs.items():
        out[name] = {"loader_samples_per_s": loaders[name], "step_samples_per_s": round(args.batch / sec, 3),
                     "loader_over_step": round(loaders[name] * sec / args.batch, 1)}
    out["default"] = {"codec": default["codec"], **out[name]}  # the last one timed: the default's pair
    b2 = min(secs.values()) / args.batch                     # s per sample of the B/2 step
    xl2 = b2 * XL2_OVER_B2_FLOPS                             # estimated: same machine, FLOP-scaled
    dec = 1 / decode["decode_img_per_s"]
    out["decode_vs_step"] = {
        "codec": decode["codec"], "decode_img_per_s_cpu": decode["decode_img_per_s"],
        "decode_gflop_per_img": decode["decode_gflop"], "b2_step_s_per_img_cpu": round(b2, 3),
        "xl2_step_s_per_img_cpu_est": round(xl2, 3), "decode_share_b2_cpu": round(dec / (dec + b2), 3),
        "decode_share_xl2_cpu_est": round(dec / (dec + xl2), 3),
        "decode_over_xl2_step_flops": round(decode["decode_gflop"] / XL2_STEP_GFLOP, 4),
        "note": "CPU: the decode runs as bf16-mixed (q, k and logits in fp32), the step in bf16 (AMX), so the "
                "CPU share overstates a GPU's, where the decode runs under fp16 autocast; XL/2 CPU step = measured "
                "B/2 step x "
                f"{XL2_OVER_B2_FLOPS:.2f} (forward FLOP ratio)"}
    return out


def headline(result: dict) -> dict:
    """The default's numbers for benchmarks/report.py (codec-independent labels)."""
    d = result["choice"]["default"] or {}
    out = {"default codec, gradient cosine on the channel-outlier stress": d.get("outlier_grad_cos_min"),
           "default codec, REPA feature 1-cos (mean, worst source)": d.get("feat_cos_err_mean")}
    dv = result.get("loader_vs_step", {}).get("decode_vs_step")
    if dv:
        out["default codec decode / SiT-XL/2 training step (FLOPs)"] = dv["decode_over_xl2_step_flops"]
    return {k: v for k, v in out.items() if v is not None}


def markdown(result: dict) -> str:
    sh = ("1", "5", "20")
    lines = ["| attention codec | bytes/image | " + " | ".join(f"grad cos x{s}" for s in sh)
             + " | flat-spectrum grad cos | channel-outlier grad cos | derived feat 1-cos | decode GFLOP | zstd ratio"
             " | encode img/s | decode img/s |", "|---|---:|" + "---:|" * (len(sh) + 8)]

    def row(r: dict, timed: bool) -> str:
        cells = " | ".join(f"{r['sharpness'][s]['grad_cos_min']:.6f}" for s in sh)
        feat = f"{r['feat_cos_err_mean']:.1e}" if r["derives_features"] else "-"
        speed = f"{r['encode_img_per_s']} | {r['decode_img_per_s']}" if timed else " | "
        return (f"| {r['codec']} | {r['attn_bytes']:,} | {cells} | {r['stress_grad_cos_min']:.6f} | "
                f"{r['outlier_grad_cos_min']:.6f} | {feat} | {r['decode_gflop']} | {r['zstd_ratio']} | {speed} |")

    lines += [row(r, True) for r in result["attention"]]
    lines += [row({**r, "codec": f"*{r['codec']}*"}, False) for r in result.get("ablation", [])]
    lines += ["", "Stress stacks by internal sharpness (grad cos; stream-* and the ablations):", "",
              "| codec | flat x1 | flat x5 | flat x20 | outlier x1 | outlier x5 | outlier x20 |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["attention"] + result.get("ablation", []):
        if r["derives_features"]:
            cells = [f"{r[f'{k}_by_sharpness'][s]['grad_cos_min']:.6f}" for k in ("stress", "outlier") for s in sh]
            lines.append(f"| {r['codec']} | " + " | ".join(cells) + " |")
    lines += ["", "| features | bytes/image | cos err mean | cos err max | encode img/s |", "|---|---:|---:|---:|---:|"]
    for f in result["features"]:
        lines.append(f"| {f['feat']} | {f['feat_bytes']:,} | {f['cos_err_mean']:.1e} | {f['cos_err_max']:.1e} | "
                     f"{f['encode_img_per_s']} |")
    lines += ["", f"Rule: {result['choice']['rule']}.", "",
              "| passing pair (attention + features) | bytes/image | ImageNet GB | worst grad cos | flat-spectrum "
              "| channel-outlier | feat 1-cos | decode GFLOP |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in result["choice"]["passing"][:10]:
        lines.append(f"| {p['codec']} + {p['feat']} | {p['bytes_per_image']:,} | {p['imagenet_gb']} | "
                     f"{p['grad_cos_min']:.6f} | {p['stress_grad_cos_min']:.6f} | {p['outlier_grad_cos_min']:.6f} | "
                     f"{p['feat_cos_err_mean']:.1e} | {p['decode_gflop']} |")
    lv = result.get("loader_vs_step")
    if lv:
        d = lv["decode_vs_step"]
        lines += ["", "| Phase I (CPU, SiT-B/2, batch 4) | loader samples/s | step samples/s | loader / step |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {k} | {v['loader_samples_per_s']:.0f} | {v['step_samples_per_s']} | {v['loader_over_step']} |"
                  for k, v in lv.items() if isinstance(v, dict) and "loader_samples_per_s" in v and k != "default"]
        lines += ["", f"Decode of {d['codec']}: {d['decode_img_per_s_cpu']} images/s on this CPU "
                      f"({d['decode_gflop_per_img']} GFLOP/image); SiT-B/2 step {d['b2_step_s_per_img_cpu']} s/image "
                      f"(decode share {d['decode_share_b2_cpu']:.1%}), SiT-XL/2 step ~{d['xl2_step_s_per_img_cpu_est']} "
                      f"s/image (estimated; decode share {d['decode_share_xl2_cpu_est']:.1%}); by FLOPs the decode is "
                      f"{d['decode_over_xl2_step_flops']:.1%} of an XL/2 training step. {d['note']}."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    rows = result["attention"]
    xs = [r["attn_bytes"] / 1e6 for r in rows]
    for s, marker in (("1", "o"), ("5", "s"), ("20", "^")):
        ax.scatter(xs, [max(1e-9, 1 - r["sharpness"][s]["grad_cos_min"]) for r in rows], marker=marker,
                   label=f"teacher logits x{s}")
    ax.scatter(xs, [max(1e-9, 1 - r["stress_grad_cos_min"]) for r in rows], marker="x", c="grey",
               label="flat-spectrum stress stack (worst of x1/x5/x20 inside)")
    ax.scatter(xs, [max(1e-9, 1 - r["outlier_grad_cos_min"]) for r in rows], marker="+", c="k",
               label="channel-outlier stress stack (worst of x1/x5/x20 inside)")
    for r in rows:
        worst = min(r["worst"]["grad_cos_min"], r["stress_grad_cos_min"], r["outlier_grad_cos_min"])
        ax.annotate(r["codec"], (r["attn_bytes"] / 1e6, max(1e-9, 1 - worst)), fontsize=7,
                    xytext=(3, 3), textcoords="offset points", rotation=20)
    ax.axhline(1 - fidelity.GRAD_COS_MIN, color="k", ls="--", lw=0.8, label="bar: grad cos 0.999")
    ax.set(xscale="log", yscale="log", xlabel="attention bytes per image (MB, 4 layers, 256 px; stream-*: features included)",
           ylabel="1 - gradient cosine (worst over images)", title="Teacher attention codecs: size vs fidelity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="decode device")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--stress-images", type=int, default=2, help="images per stress stack and sharpness")
    p.add_argument("--reps", type=int, default=3, help="timing repetitions (interleaved medians)")
    p.add_argument("--batch", type=int, default=4, help="loader/step batch (as bench-train)")
    p.add_argument("--step-reps", type=int, default=4)
    p.add_argument("--loader-samples", type=int, default=64)
    p.add_argument("--skip-loader", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    device = torch.device(args.device)
    spec, src = teacher_source(args.images, device)
    target = float(src.logits.std())  # the stress stacks get the teacher's logit scale
    stresses = {label: [stress_source(spec, args.stress_images, s, target, outliers) for s in SHARPNESS]
                for label, outliers in (("stress", 0), ("outlier", 4))}
    attn, batches = [], {}
    for name in ATTN_CODECS:
        row, batches[name] = attention_row(spec, name, src, stresses)
        attn.append(row)
        log.info("%-18s %9d B  worst grad cos %.6f  stress %.6f  outliers %.6f", name, row["attn_bytes"],
                 row["worst"]["grad_cos_min"], row["stress_grad_cos_min"], row["outlier_grad_cos_min"])
    speeds(spec, attn, batches, src, device, args.reps)
    ablation = [attention_row(spec, label, src, stresses, codec, bytes_as)[0]
                for label, (codec, bytes_as) in ABLATIONS.items()]
    feats = [feature_row(spec, fc, fd, src.feat) for fc, fd in FEAT_CODECS]
    choice = choose_default(attn, feats)
    result = {"benchmark": "codecs", "env": environment(device), "teacher": "random:base (DINOv2-B arch)",
              "layers": list(spec.layers), "images": args.images, "stress_images": args.stress_images,
              "imagenet_images": IMAGENET_N,
              "teacher_entropy": {s: r["teacher_entropy"] for s, r in attn[0]["sharpness"].items()},
              "stress_entropy": {label: {f"{x.info['sharpness']:g}": float(fidelity.entropy_rows(x.logits).mean())
                                         for x in xs} for label, xs in stresses.items()},
              "attention": attn, "ablation": ablation, "features": feats, "choice": choice}
    if not args.skip_loader and choice["default"] is not None:
        decode = next(r for r in attn if r["codec"] == choice["default"]["codec"])
        result["loader_vs_step"] = loader_vs_step(choice["default"], decode, args)
    result["headline"] = headline(result)
    name = f"codecs-{device.type}"
    path = write(name, result, None)
    (RESULTS / f"{name}.md").write_text(markdown(result))
    plot(result, RESULTS / f"{name}.png")
    log.info("\n%s", markdown(result))
    log.info("default: %s\nloader vs step: %s\n-> %s", choice["default"], result.get("loader_vs_step"), path)


if __name__ == "__main__":
    main()
