"""Teacher codecs: bytes per image vs measured fidelity, encode/decode speed, ImageNet projection.

The DINOv2-B architecture at random init (no weights can be downloaded), 256 px synthetic
images, the 4 HASTE layers 8-11. For every attention codec: bytes per image, encode (device-side
cast/pack + the writer thread's encode, one image) and decode images/s, and pipeline.cache.fidelity's
metrics against the exact fp32 teacher at sharpness x1/x5/x20 (a random-init teacher attends far
more uniformly than a trained one; sharper softmaxes amplify logit errors).

Stress tests, each the worst case over the same x1/x5/x20 sweep, one input for every codec:
- flat spectrum: i.i.d. Gaussian qkv input tokens x and projections W (zero bias), scaled to the
  teacher's logit scale, so q = x Wᵀ, k are i.i.d. Gaussian too: no low-rank structure at all
  (the worst case for lowrank-*), and nothing for tokens-* to exploit either;
- channel outliers (reported, not part of the rule): the same with 4 of the 768 token channels
  x20, as LayerNorm outputs of trained ViTs can have; per-token int8 rows of x (tokens-int8) then
  spend their range on those channels, while qk-int8 rows see them mixed by W.
The default is the smallest (attention + features) pair whose worst case over the teacher sweep
AND the flat-spectrum stress keeps gradient cosine >= 0.999, with mean feature cosine error
<= 1e-3. Last, the Phase I loader with that default is timed against a CPU training step that
decodes it (SiT-B/2, as bench-train).

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
from pipeline.cache import fidelity  # noqa: E402
from pipeline.cache.codecs import AttnCodec, decode_features, encode_features, get_codec  # noqa: E402
from pipeline.cache.codecs_tokens import qk_from_tokens, tokens_codec  # noqa: E402
from pipeline.cache.schema import TEACHER, TeacherSpec, bytes_per_sample  # noqa: E402
from pipeline.encoders.teacher import load_teacher  # noqa: E402
from pipeline.inputs.synth import synth_image  # noqa: E402

IMAGENET_N = 1_281_167
ATTN_CODECS = ("qk-fp32", "qk-fp16", "logits-fp16", "qk-int8", "lowrank-r48-fp16", "lowrank-r32-fp16",
               "lowrank-r24-fp16", "lowrank-r16-fp16", "lowrank-r48-int8", "lowrank-r32-int8", "lowrank-r24-int8",
               "lowrank-r16-int8", "lowrank-r8-int8", "tokens-int8")
FEAT_CODECS = (("plain", "float32"), ("plain", "float16"), ("int8", "float16"))
# Variants measured for the record, not candidates: (codec, the registered name with the same bytes).
ABLATIONS = {"tokens-int8 without the fixed basis": (tokens_codec("int8", fixed_basis=False), "tokens-int8")}
log = logging.getLogger("bench_codecs")


Source = dict[str, torch.Tensor]  # q, k (N, L, H, T, hd), x (N, L, T, D), qk_weight, qk_bias: what codecs encode


def teacher_batch(n: int, device: torch.device) -> tuple[TeacherSpec, torch.Tensor, Source]:
    """Exact fp32 teacher outputs of n synthetic 256 px images, and the matching spec."""
    teacher, _ = load_teacher("random:base", layers=(8, 9, 10, 11), resolution=256, device=device,
                              capture=("q", "k", "x"))
    imgs = torch.stack([torch.from_numpy(synth_image(i, 8, 256)[0]) for i in range(n)]).permute(0, 3, 1, 2)
    out = teacher(imgs.contiguous(), "fp32")
    spec = TeacherSpec(layers=(8, 9, 10, 11), num_heads=teacher.num_heads, head_dim=teacher.head_dim,
                       embed_dim=teacher.embed_dim, grid=teacher.grid, num_prefix_tokens=teacher.num_prefix_tokens,
                       scale=teacher.scale)
    src = {"q": out.q.cpu(), "k": out.k.cpu(), "x": out.x.cpu(),
           **{n: torch.from_numpy(a) for n, a in teacher.qk_params().items()}}
    return spec, out.feat.cpu(), src


def stress_source(spec: TeacherSpec, n: int, target_std: float, outliers: int = 0) -> Source:
    """Gaussian tokens x and projections W (zero bias) with exact q, k, at the teacher's logit std;
    ``outliers`` token channels are scaled x20 (see the module docstring)."""
    g = torch.Generator().manual_seed(0)
    layers, heads, hd, d = len(spec.layers), spec.num_heads, spec.head_dim, spec.embed_dim
    x = torch.randn(n, layers, spec.num_tokens, d, generator=g)
    x[..., :outliers] *= 20
    w = torch.randn(layers, 2, heads, hd, d, generator=g) / d ** 0.5
    b = torch.zeros(layers, 2, heads, hd)
    q, k = qk_from_tokens(x, w, b)
    w = w * (target_std / float(_logits(q, k, spec.scale).std())) ** 0.5  # logits scale with W²
    q, k = qk_from_tokens(x, w, b)
    return {"q": q, "k": k, "x": x, "qk_weight": w, "qk_bias": b}


def attn_bytes(spec: TeacherSpec, codec: str) -> int:
    return sum(v for k, v in _tar_fields(spec, codec=codec).items() if not k.startswith("feat"))


def _tar_fields(spec: TeacherSpec, **change) -> dict[str, int]:
    """Tar footprint per member (header + 512-padded payload) of one sample."""
    s = TeacherSpec(**{**spec.__dict__, **change})
    bps = bytes_per_sample(TEACHER, s)
    return {k.removeprefix("field:"): 512 + -(-v // 512) * 512 for k, v in bps.items() if k.startswith("field:")}


def _logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    return get_codec("qk-fp32").decode({"q": q, "k": k}, scale)


def encode_one(codec: AttnCodec, src: Source, i: int, scale: float) -> dict[str, np.ndarray]:
    """Image i as the writer stores it: the codec's inputs cast/packed (on the device), then encoded."""
    return codec.encode(*(codec.on_device(src[n][i]).numpy() for n in codec.inputs), scale)


def stored_params(codec: AttnCodec, spec: TeacherSpec, src: Source) -> dict[str, torch.Tensor]:
    """The group arrays as a cache stores them (tokens-*: W R, b), from the source's W, b."""
    names = codec.params(spec)
    if not names:
        return {}
    return {n: torch.from_numpy(a) for n, a in codec.store_params({n: src[n].numpy() for n in names}).items()}


def _decoded(codec: AttnCodec, spec: TeacherSpec, src: Source) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    enc = [encode_one(codec, src, i, spec.scale) for i in range(src["q"].shape[0])]
    batch = {m: torch.from_numpy(np.stack([e[m] for e in enc])) for m in enc[0]}
    return codec.decode(batch, spec.scale, stored_params(codec, spec, src)), batch


def attention_row(spec: TeacherSpec, name: str, src: Source, exact: torch.Tensor, stresses: dict[str, Source],
                  codec: AttnCodec | None = None, bytes_as: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Bytes and fidelity of one attention codec (teacher sweep and stress tests), and its encoded
    batch (for the decode timing). ``codec``/``bytes_as``: an unregistered variant (ABLATIONS)."""
    codec = codec or get_codec(name)
    none = torch.zeros(1, 1, 1)
    decoded, batch = _decoded(codec, spec, src)
    fid = fidelity.measure(exact, decoded, none, none)
    row = {"codec": name, "attn_bytes": attn_bytes(spec, bytes_as or name), "error_bound": codec.error_bound,
           "sharpness": fid["sharpness"], "worst": {k: v for k, v in fid["worst"].items() if not k.startswith("feat")}}
    for label, s in stresses.items():
        s_fid = fidelity.measure(_logits(s["q"], s["k"], spec.scale), _decoded(codec, spec, s)[0], none, none)
        row[f"{label}_grad_cos_min"] = s_fid["worst"]["grad_cos_min"]
    return row, batch


def speeds(spec: TeacherSpec, rows: list[dict], batches: dict[str, dict], src: Source,
           device: torch.device, reps: int) -> None:
    """Encode (one image: the device-side cast or pack, then the writer thread's encode; both on the
    CPU here) and batched decode (on ``device``, group arrays already there as the trainer keeps
    them) images/s, timed round-robin over all codecs so that machine noise hits all alike."""
    n = src["q"].shape[0]
    enc_fns, dec_fns = {}, {}
    for r in rows:
        codec = get_codec(r["codec"])
        enc_fns[r["codec"]] = lambda c=codec: encode_one(c, src, 0, spec.scale)
        on_dev = {m: t.to(device) for m, t in batches[r["codec"]].items()}
        params = {n: t.to(device) for n, t in stored_params(codec, spec, src).items()}
        dec_fns[r["codec"]] = lambda c=codec, b=on_dev, p=params: c.decode(b, spec.scale, p)
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
    """Smallest (attention, features) pair meeting the bar in the worst case of the teacher sweep
    AND of the flat-spectrum stress (a trained teacher's spectrum is unknown here)."""
    bar = fidelity.GRAD_COS_MIN
    pairs = [{"codec": a["codec"], "feat": f["feat"], "feat_codec": f["feat_codec"], "feat_dtype": f["feat_dtype"],
              "bytes_per_image": a["attn_bytes"] + f["feat_bytes"],
              "grad_cos_min": a["worst"]["grad_cos_min"], "feat_cos_err_mean": f["cos_err_mean"],
              "stress_grad_cos_min": a["stress_grad_cos_min"], "outlier_grad_cos_min": a["outlier_grad_cos_min"]}
             for a in attn for f in feats]
    for p in pairs:
        p["meets_sweep"] = p["grad_cos_min"] >= bar and p["feat_cos_err_mean"] <= fidelity.FEAT_COS_ERR_MAX
        p["meets_bar"] = p["meets_sweep"] and p["stress_grad_cos_min"] >= bar
        p["imagenet_gb"] = round(p["bytes_per_image"] * IMAGENET_N / 1e9, 1)
    ok = sorted((p for p in pairs if p["meets_bar"]), key=lambda p: p["bytes_per_image"])
    sweep_ok = sorted((p for p in pairs if p["meets_sweep"]), key=lambda p: p["bytes_per_image"])
    return {"rule": "smallest bytes whose worst case over the sharpness sweep AND the flat-spectrum stress keeps "
                    "grad_cos >= 0.999, with mean feature cos err <= 1e-3",
            "default": ok[0] if ok else None, "smallest_sweep_only": sweep_ok[0] if sweep_ok else None,
            "passing": ok}


def loader_vs_step(default: dict, args) -> dict:
    """Phase I loader samples/s with the default codec (and qk-fp16) vs a CPU SiT-B/2 step decoding it."""
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
             + " | loss rel err (worst) | flat-spectrum grad cos | channel-outlier grad cos | encode img/s"
             " | decode img/s |",
             "|---|---:|" + "---:|" * (2 * len(sh)) + "---:|---:|---:|---:|---:|"]
    for r in result["attention"]:
        cells = " | ".join(f"{r['sharpness'][s]['kl_max']:.2e} | {r['sharpness'][s]['grad_cos_min']:.6f}" for s in sh)
        lines.append(f"| {r['codec']} | {r['attn_bytes']:,} | {cells} | {r['worst']['loss_rel_err_max']:.1e} | "
                     f"{r['stress_grad_cos_min']:.6f} | {r['outlier_grad_cos_min']:.6f} | {r['encode_img_per_s']} | "
                     f"{r['decode_img_per_s']} |")
    for r in result.get("ablation", []):  # not a candidate: measured to show what a design choice buys
        cells = " | ".join(f"{r['sharpness'][s]['kl_max']:.2e} | {r['sharpness'][s]['grad_cos_min']:.6f}" for s in sh)
        lines.append(f"| *{r['codec']}* | {r['attn_bytes']:,} | {cells} | {r['worst']['loss_rel_err_max']:.1e} | "
                     f"{r['stress_grad_cos_min']:.6f} | {r['outlier_grad_cos_min']:.6f} | | |")
    lines += ["", "| features | bytes/image | cos err mean | cos err max | encode img/s |", "|---|---:|---:|---:|---:|"]
    for f in result["features"]:
        lines.append(f"| {f['feat']} | {f['feat_bytes']:,} | {f['cos_err_mean']:.1e} | {f['cos_err_max']:.1e} | "
                     f"{f['encode_img_per_s']} |")
    lines += ["", f"Rule: {result['choice']['rule']}.", "",
              "| passing pair (attention + features) | bytes/image | ImageNet GB | worst grad cos | flat-spectrum "
              "| channel-outlier |", "|---|---:|---:|---:|---:|---:|"]
    for p in result["choice"]["passing"][:8]:
        lines.append(f"| {p['codec']} + {p['feat']} | {p['bytes_per_image']:,} | {p['imagenet_gb']} | "
                     f"{p['grad_cos_min']:.6f} | {p['stress_grad_cos_min']:.6f} | {p['outlier_grad_cos_min']:.6f} |")
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
    ax.scatter(xs, [max(1e-9, 1 - r["outlier_grad_cos_min"]) for r in result["attention"]], marker="+", c="k",
               label="channel-outlier stress (worst of x1/x5/x20)")
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
    spec, feat, src = teacher_batch(args.images, device)
    exact = _logits(src["q"], src["k"], spec.scale)
    target = float(exact.std())  # the stress inputs get the teacher's logit scale
    stresses = {"stress": stress_source(spec, 2, target), "outlier": stress_source(spec, 2, target, outliers=4)}
    attn, batches = [], {}
    for name in ATTN_CODECS:
        row, batches[name] = attention_row(spec, name, src, exact, stresses)
        attn.append(row)
        log.info("%-18s %9d B  worst grad cos %.6f  stress %.6f  outliers %.6f", name, row["attn_bytes"],
                 row["worst"]["grad_cos_min"], row["stress_grad_cos_min"], row["outlier_grad_cos_min"])
    speeds(spec, attn, batches, src, device, args.reps)
    ablation = [attention_row(spec, label, src, exact, stresses, codec, bytes_as)[0]
                for label, (codec, bytes_as) in ABLATIONS.items()]
    feats = [feature_row(spec, fc, fd, feat) for fc, fd in FEAT_CODECS]
    choice = choose_default(attn, feats)
    result = {"benchmark": "codecs", "env": environment(device), "teacher": "random:base (DINOv2-B arch)",
              "layers": list(spec.layers), "images": args.images, "imagenet_images": IMAGENET_N,
              "teacher_entropy": {s: r["teacher_entropy"] for s, r in attn[0]["sharpness"].items()},
              "attention": attn, "ablation": ablation, "features": feats, "choice": choice}
    if not args.skip_loader and choice["default"] is not None:
        result["loader_vs_step"] = loader_vs_step(choice["default"], args)
    name = f"codecs-{device.type}"
    path = write(name, result, None)
    (RESULTS / f"{name}.md").write_text(markdown(result))
    plot(result, RESULTS / f"{name}.png")
    log.info("\n%s", markdown(result))
    log.info("default: %s\nloader vs step: %s\n-> %s", choice["default"], result.get("loader_vs_step"), path)


if __name__ == "__main__":
    main()
