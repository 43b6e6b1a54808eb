"""Teacher codecs: bytes per image vs measured fidelity, encode/decode speed, ImageNet projection.

The DINOv2-B architecture at random init (no weights can be downloaded), 256 px synthetic
images, the 4 HASTE layers 8-11. For every attention codec: bytes per image, encode and decode
images/s, and pipeline.fidelity's metrics against the exact fp32 teacher at sharpness x1/x5/x20
(a random-init teacher attends far more uniformly than a trained one; sharper softmaxes amplify
logit errors). A "flat spectrum" stress column repeats the sweep on i.i.d. Gaussian q, k with the
teacher's logit scale: no low-rank structure at all, the worst case for the lowrank codecs.
The default is the smallest (attention + features) pair whose worst case over the teacher sweep
keeps gradient cosine >= 0.999 and mean feature cosine error <= 1e-3. Last, the Phase I loader
with that default is timed against a CPU training step that decodes it (SiT-B/2, as bench-train).

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

from benchmarks.common import RESULTS, environment, interleaved_medians, write  # noqa: E402
from pipeline import fidelity  # noqa: E402
from pipeline.codecs import decode_features, encode_features, get_codec  # noqa: E402
from pipeline.schema import TEACHER, TeacherSpec, bytes_per_sample  # noqa: E402
from pipeline.synth import synth_image  # noqa: E402
from pipeline.teacher import load_teacher  # noqa: E402

IMAGENET_N = 1_281_167
ATTN_CODECS = ("qk-fp32", "qk-fp16", "logits-fp16", "qk-int8", "lowrank-r48-fp16", "lowrank-r32-fp16",
               "lowrank-r24-fp16", "lowrank-r16-fp16", "lowrank-r48-int8", "lowrank-r32-int8", "lowrank-r24-int8",
               "lowrank-r16-int8", "lowrank-r8-int8")
FEAT_CODECS = (("plain", "float32"), ("plain", "float16"), ("int8", "float16"))
log = logging.getLogger("bench_codecs")


def teacher_batch(n: int, device: torch.device):
    """Exact fp32 teacher outputs of n synthetic 256 px images, and the matching spec."""
    teacher, _ = load_teacher("random:base", layers=(8, 9, 10, 11), resolution=256, device=device)
    imgs = torch.stack([torch.from_numpy(synth_image(i, 8, 256)[0]) for i in range(n)]).permute(0, 3, 1, 2)
    out = teacher(imgs.contiguous(), "fp32")
    spec = TeacherSpec(layers=(8, 9, 10, 11), num_heads=teacher.num_heads, head_dim=teacher.head_dim,
                       embed_dim=teacher.embed_dim, grid=teacher.grid, num_prefix_tokens=teacher.num_prefix_tokens,
                       scale=teacher.scale)
    return spec, out.feat.cpu(), out.q.cpu(), out.k.cpu()


def attn_bytes(spec: TeacherSpec, codec: str) -> int:
    return sum(v for k, v in _tar_fields(spec, codec=codec).items() if not k.startswith("feat"))


def _tar_fields(spec: TeacherSpec, **change) -> dict[str, int]:
    """Tar footprint per member (header + 512-padded payload) of one sample."""
    s = TeacherSpec(**{**spec.__dict__, **change})
    bps = bytes_per_sample(TEACHER, s)
    return {k.removeprefix("field:"): 512 + -(-v // 512) * 512 for k, v in bps.items() if k.startswith("field:")}


def _logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    return get_codec("qk-fp32").decode({"q": q, "k": k}, scale)


def attention_row(spec: TeacherSpec, name: str, q: torch.Tensor, k: torch.Tensor, exact: torch.Tensor,
                  stress: tuple[torch.Tensor, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Bytes and fidelity of one attention codec (teacher sweep and flat-spectrum stress), and its
    encoded batch (for the decode timing)."""
    codec = get_codec(name)

    def encoded(qs: torch.Tensor, ks: torch.Tensor) -> dict[str, torch.Tensor]:
        dt = getattr(torch, codec.qk_dtype)  # what the writer hands over
        enc = [codec.encode(a, b, spec.scale) for a, b in zip(qs.to(dt).numpy(), ks.to(dt).numpy())]
        return {m: torch.from_numpy(np.stack([e[m] for e in enc])) for m in enc[0]}

    batch = encoded(q, k)
    fid = fidelity.measure(exact, codec.decode(batch, spec.scale), torch.zeros(1, 1, 1), torch.zeros(1, 1, 1))
    sq, sk = stress
    s_fid = fidelity.measure(_logits(sq, sk, spec.scale), codec.decode(encoded(sq, sk), spec.scale),
                             torch.zeros(1, 1, 1), torch.zeros(1, 1, 1))
    row = {"codec": name, "attn_bytes": attn_bytes(spec, name), "error_bound": codec.error_bound,
           "sharpness": fid["sharpness"], "worst": {k: v for k, v in fid["worst"].items() if not k.startswith("feat")},
           "stress_grad_cos_min": s_fid["worst"]["grad_cos_min"]}
    return row, batch


def speeds(spec: TeacherSpec, rows: list[dict], batches: dict[str, dict], q: torch.Tensor, k: torch.Tensor,
           device: torch.device, reps: int) -> None:
    """Encode (one image, on the CPU as the writer does) and batched decode (on ``device``) images/s,
    timed round-robin over all codecs so that machine noise hits all alike."""
    n = q.shape[0]
    enc_fns, dec_fns = {}, {}
    for r in rows:
        codec = get_codec(r["codec"])
        dt = getattr(torch, codec.qk_dtype)
        q0, k0 = q[0].to(dt).numpy(), k[0].to(dt).numpy()
        enc_fns[r["codec"]] = lambda c=codec, a=q0, b=k0: c.encode(a, b, spec.scale)
        on_dev = {m: t.to(device) for m, t in batches[r["codec"]].items()}
        dec_fns[r["codec"]] = lambda c=codec, b=on_dev: c.decode(b, spec.scale)
    enc = interleaved_medians(enc_fns, reps, 1, torch.device("cpu"))
    dec = interleaved_medians(dec_fns, reps, 1, device)
    for r in rows:
        r["encode_img_per_s"] = round(1 / enc[r["codec"]], 1)
        r["decode_img_per_s"] = round(n / dec[r["codec"]], 1)


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
    """Smallest (attention, features) pair meeting the bar in the worst case of the teacher sweep."""
    pairs = [{"codec": a["codec"], "feat": f["feat"], "feat_codec": f["feat_codec"], "feat_dtype": f["feat_dtype"],
              "bytes_per_image": a["attn_bytes"] + f["feat_bytes"],
              "grad_cos_min": a["worst"]["grad_cos_min"], "feat_cos_err_mean": f["cos_err_mean"],
              "stress_grad_cos_min": a["stress_grad_cos_min"]}
             for a in attn for f in feats]
    for p in pairs:
        p["meets_bar"] = p["grad_cos_min"] >= fidelity.GRAD_COS_MIN and p["feat_cos_err_mean"] <= fidelity.FEAT_COS_ERR_MAX
        p["imagenet_gb"] = round(p["bytes_per_image"] * IMAGENET_N / 1e9, 1)
    ok = sorted((p for p in pairs if p["meets_bar"]), key=lambda p: p["bytes_per_image"])
    spectrum_ok = [p for p in ok if p["stress_grad_cos_min"] >= fidelity.GRAD_COS_MIN]
    return {"rule": "smallest bytes with worst-case grad_cos >= 0.999 and mean feature cos err <= 1e-3",
            "default": ok[0] if ok else None, "default_if_flat_spectrum": spectrum_ok[0] if spectrum_ok else None,
            "passing": ok}


def loader_vs_step(default: dict, args) -> dict:
    """Phase I loader samples/s with the default codec (and qk-fp16) vs a CPU SiT-B/2 step decoding it."""
    from benchmarks.bench_train import loader_speed, overrides, step_fn
    from pipeline.cache import open_cache
    from pipeline.loader import CacheStream
    from stages.preprocess import PreprocessConfig, run
    from trainer.config import load_train_config
    from trainer.phases import build_phases

    bargs = SimpleNamespace(device="cpu", model="SiT-B/2", batch=args.batch, precision="bf16", compile=False)
    phase = build_phases(load_train_config(None, overrides(bargs)).align)[0]
    out: dict = {"model": "SiT-B/2", "batch": args.batch, "device": "cpu", "precision": "bf16"}
    steps, loaders = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for codec, fc in (("qk-fp16", "plain"), (default["codec"], default["feat_codec"])):
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
    return out


def markdown(result: dict) -> str:
    sh = ("1", "5", "20")
    lines = ["| attention codec | bytes/image | " + " | ".join(f"KL max x{s} | grad cos x{s}" for s in sh)
             + " | loss rel err (worst) | flat-spectrum grad cos | encode img/s | decode img/s |",
             "|---|---:|" + "---:|" * (2 * len(sh)) + "---:|---:|---:|---:|"]
    for r in result["attention"]:
        cells = " | ".join(f"{r['sharpness'][s]['kl_max']:.2e} | {r['sharpness'][s]['grad_cos_min']:.6f}" for s in sh)
        lines.append(f"| {r['codec']} | {r['attn_bytes']:,} | {cells} | {r['worst']['loss_rel_err_max']:.1e} | "
                     f"{r['stress_grad_cos_min']:.6f} | {r['encode_img_per_s']} | {r['decode_img_per_s']} |")
    lines += ["", "| features | bytes/image | cos err mean | cos err max | encode img/s |", "|---|---:|---:|---:|---:|"]
    for f in result["features"]:
        lines.append(f"| {f['feat']} | {f['feat_bytes']:,} | {f['cos_err_mean']:.1e} | {f['cos_err_max']:.1e} | "
                     f"{f['encode_img_per_s']} |")
    lines += ["", "| passing pair (attention + features) | bytes/image | ImageNet GB | worst grad cos | flat-spectrum |",
              "|---|---:|---:|---:|---:|"]
    for p in result["choice"]["passing"][:8]:
        lines.append(f"| {p['codec']} + {p['feat']} | {p['bytes_per_image']:,} | {p['imagenet_gb']} | "
                     f"{p['grad_cos_min']:.6f} | {p['stress_grad_cos_min']:.6f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for s, marker in (("1", "o"), ("5", "s"), ("20", "^")):
        xs = [r["attn_bytes"] / 1e6 for r in result["attention"]]
        ys = [max(1e-9, 1 - r["sharpness"][s]["grad_cos_min"]) for r in result["attention"]]
        ax.scatter(xs, ys, marker=marker, label=f"teacher logits x{s}")
    xs = [r["attn_bytes"] / 1e6 for r in result["attention"]]
    ax.scatter(xs, [max(1e-9, 1 - r["stress_grad_cos_min"]) for r in result["attention"]], marker="x", c="grey",
               label="flat-spectrum stress (worst of x1/x5/x20)")
    for r in result["attention"]:
        ax.annotate(r["codec"], (r["attn_bytes"] / 1e6, max(1e-9, 1 - r["worst"]["grad_cos_min"])), fontsize=7,
                    xytext=(3, 3), textcoords="offset points", rotation=20)
    ax.axhline(1 - fidelity.GRAD_COS_MIN, color="k", ls="--", lw=0.8, label="bar: grad cos 0.999")
    ax.set(xscale="log", yscale="log", xlabel="attention bytes per image (MB, 4 layers, 256 px)",
           ylabel="1 - gradient cosine (worst over images)", title="Teacher attention codecs: size vs fidelity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="decode device")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--reps", type=int, default=3, help="timing repetitions (interleaved medians)")
    p.add_argument("--batch", type=int, default=4, help="loader/step batch (as bench-train)")
    p.add_argument("--step-reps", type=int, default=4)
    p.add_argument("--loader-samples", type=int, default=64)
    p.add_argument("--skip-loader", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    device = torch.device(args.device)
    spec, feat, q, k = teacher_batch(args.images, device)
    exact = _logits(q, k, spec.scale)
    g = torch.Generator().manual_seed(0)
    sq, sk = (torch.randn(q[:2].shape, generator=g) for _ in range(2))
    gain = (exact.std() / _logits(sq, sk, spec.scale).std()).sqrt()  # match the teacher's logit scale
    attn, batches = [], {}
    for name in ATTN_CODECS:
        row, batches[name] = attention_row(spec, name, q, k, exact, (sq * gain, sk * gain))
        attn.append(row)
        log.info("%-18s %9d B  worst grad cos %.6f", name, row["attn_bytes"], row["worst"]["grad_cos_min"])
    speeds(spec, attn, batches, q, k, device, args.reps)
    feats = [feature_row(spec, fc, fd, feat) for fc, fd in FEAT_CODECS]
    choice = choose_default(attn, feats)
    result = {"benchmark": "codecs", "env": environment(device), "teacher": "random:base (DINOv2-B arch)",
              "layers": list(spec.layers), "images": args.images, "imagenet_images": IMAGENET_N,
              "teacher_entropy": {s: r["teacher_entropy"] for s, r in attn[0]["sharpness"].items()},
              "attention": attn, "features": feats, "choice": choice}
    if not args.skip_loader and choice["default"] is not None:
        result["loader_vs_step"] = loader_vs_step(choice["default"], args)
    name = f"codecs-{device.type}"
    path = write(name, result, None)
    (RESULTS / f"{name}.md").write_text(markdown(result))
    plot(result, RESULTS / f"{name}.png")
    print(markdown(result))
    print(f"default: {choice['default']}\nloader vs step: {result.get('loader_vs_step')}\n-> {path}")


if __name__ == "__main__":
    main()
