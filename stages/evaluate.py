"""Stage 3: sample a trained SiT (or text-to-image MM-DiT) into a resumable zarr store, export, and score.

    haste eval --config configs/imagenet-haste-sit-xl.yaml --set checkpoint=runs/xl/checkpoints/ema-4000000.pt
    torchrun --nproc-per-node 8 -m stages.cli eval ...      # ranks split the chunks
    haste eval --set checkpoint=0250000.pt --set prompts=coco:/data/coco/val2014 --set sampler.preset=paper-t2i

Text-to-image (``prompts`` set; ``stages.eval_text``): image i is sampled from prompt i with CFG
against the empty-caption encoding; the prompts are stored beside the images (``samples.zarr``
``prompts``, ``samples.npz`` ``arr_1``) and label the grid; metrics add the CLIP score.

Outputs under ``out`` (default ``<run_dir>/eval/<tag>``): ``samples.zarr`` (the store, see
pipeline/metrics/sample_store.py), ``samples.npz`` (ADM evaluator layout), ``grid.png`` and
``metrics.json``. Rerunning the same command samples only the missing chunks; a finished store
goes straight to the metrics. Everything the metrics need (Inception weights and their sha256,
the reference) is checked before the first image is sampled; temp files a killed run left in
``out`` are removed by the next run (rank 0). The one-line summary is the caller's to print
(``haste eval`` prints it once, after the JSON result).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from pipeline import configs, dist
from pipeline.cache.shards import atomic_write_json, remove_stale_temps
from pipeline.configs import ConfigError, check
from pipeline.encoders.vae import DEFAULT_VAE, decode_latents, load_vae
from pipeline.metrics.reference import load_reference
from pipeline.metrics.sample_store import SampleStore, export_npz, npz_matches, open_store, write_grid
from pipeline.metrics.scores import (
    MetricsConfig,
    MetricsError,
    Preflight,
    compute_metrics,
    preflight,
    summary_line,
)
from stages.eval_text import TextSide, caption_reference, clip_tokenizer, is_caption_source, prepare_text
from trainer import checkpoint
from trainer.generate import LoadedModel, generate_latents, image_labels, image_seeds, load_model
from trainer.models.mmdit import MMDiTConfig
from trainer.models.sit import ModelConfig
from trainer.sampling import SamplerConfig

log = logging.getLogger(__name__)

# The paper's evaluation (SPEC §5.3, Table 15): SDE Euler–Maruyama, 250 steps; with CFG 1.65 on t ∈ [0, 0.72].
# Text-to-image (SPEC §8, HASTE README generate_t2i.py): SDE 250 steps, CFG 2.25 on all of [0, 1].
SAMPLER_PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(mode="sde", num_steps=250, cfg_scale=1.0),
    "paper-cfg": dict(mode="sde", num_steps=250, cfg_scale=1.65, guidance_low=0.0, guidance_high=0.72),
    "paper-t2i": dict(mode="sde", num_steps=250, cfg_scale=2.25, guidance_low=0.0, guidance_high=1.0),
    "ode-heun-50": dict(mode="ode", num_steps=50, heun=True, cfg_scale=1.0),
}
DEFAULT_SAMPLES = {"class": 50_000, "text": 30_000}  # ADM's ImageNet protocol; U-ViT's COCO protocol
SD_VAE_SCALE = 0.18215


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    checkpoint: str | None = None      # ema-*.pt / step-*.pt / an official HASTE or REPA .pt; or
    run_dir: str | None = None         # a training run: its newest complete checkpoint's EMA export
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig/MMDiTConfig fields (+ `preset`), official files
    out: str | None = None             # default: <run_dir>/eval/<tag> (<checkpoint dir>/../eval/<tag>)
    num_samples: int | None = None     # default 50,000 (ImageNet, ADM); 30,000 with prompts (COCO, U-ViT)
    # Text-to-image (MM-DiT): prompt of image i = entry i (mod the count) of a caption source or prompt file
    prompts: str | None = None         # coco:<root>/val2014 | file:<prompts.txt> | captions:<dir|tars> | synthetic-captions:<n>
    caption: Literal["random", "first"] = "random"   # which caption of an image: seeded per image (official: random)
    text_encoder: str | None = None    # default: the checkpoint's record, else openai/clip-vit-large-patch14
    text_precision: Literal["fp32", "bf16"] = "fp32"  # U-ViT encodes in fp32
    batch_size: int = 64               # images per model call on each rank (free to change on resume)
    chunk_size: int = 256              # images per zarr chunk: the unit of resume and of the rank split
    seed: int = 0
    labels: Literal["uniform", "balanced"] = "uniform"   # uniform random = the ADM protocol
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    vae: str | None = None             # default: the VAE the training cache used, else sd-vae-ft-ema
    latent_scale: float | None = None  # default: from the checkpoint's cache record, else 0.18215
    latent_bias: float | None = None
    rounding: Literal["round", "truncate"] = "round"     # truncate = the official generate.py
    precision: Literal["fp32", "bf16"] = "fp32"          # the official sampler runs fp32 (TF32 on)
    tf32: bool = True
    device: str = "auto"
    grid_count: int = 64
    npz: bool = True                   # write samples.npz (arr_0) for the ADM evaluator
    # FID, P/R and KID need `metrics.reference` (ADM's VIRTUAL_imagenet256_labeled.npz); without a
    # metrics section only IS is computed.
    metrics: MetricsConfig = field(default_factory=lambda: MetricsConfig(metrics=("is",)))
    compute: bool = True               # false: sample and export only

    def __post_init__(self) -> None:
        check((self.checkpoint is None) != (self.run_dir is None), "checkpoint",
              "give exactly one of 'checkpoint' (a .pt file) or 'run_dir' (a training run)")
        known = {f.name for c in (ModelConfig, MMDiTConfig) for f in dataclasses.fields(c)} | {"preset"}
        bad = sorted(set(self.model) - known) if isinstance(self.model, dict) else ["(not a mapping)"]
        check(not bad, "model", f"unknown ModelConfig/MMDiTConfig field(s) {bad}; known: {sorted(known)}")
        if self.num_samples is None:
            object.__setattr__(self, "num_samples", DEFAULT_SAMPLES["text" if self.prompts else "class"])
        check(self.num_samples >= 1, "num_samples", "must be >= 1")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.chunk_size >= 1, "chunk_size", "must be >= 1")
        check(0 <= self.seed < 2**32, "seed", "must be in [0, 2**32)")
        check(self.grid_count >= 0, "grid_count", "must be >= 0")
        check(self.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda")


def load_eval_config(path: str | Path | None, overrides: tuple[str, ...] = ()) -> EvalConfig:
    data = configs.load_yaml(path).get("eval", {}) if path else {}
    data = configs.apply_overrides(data or {}, overrides)
    sampler = dict(data.get("sampler") or {})
    preset = sampler.pop("preset", None)
    if preset is not None:
        check(preset in SAMPLER_PRESETS, "sampler.preset", f"unknown preset {preset!r} (known: {', '.join(SAMPLER_PRESETS)})")
        sampler = {**SAMPLER_PRESETS[preset], **sampler}
    data["sampler"] = sampler
    try:
        return configs.build(EvalConfig, data)
    except ConfigError:
        raise
    except ValueError as e:  # SamplerConfig / MetricsConfig name their own fields
        raise ConfigError(str(e)) from None


def resolve_checkpoint(cfg: EvalConfig) -> Path:
    if cfg.checkpoint is not None:
        path = Path(cfg.checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return path
    ckpts = checkpoint.list_checkpoints(cfg.run_dir)
    if not ckpts:
        raise FileNotFoundError(f"no complete checkpoint under {checkpoint.ckpt_dir(cfg.run_dir)} (train first)")
    ema = ckpts[-1].with_name(ckpts[-1].name.replace("step-", "ema-"))
    return ema if ema.is_file() else ckpts[-1]


def sample_tag(cfg: EvalConfig, prompts_sha256: str | None = None) -> str:
    """A directory name that tells sample sets apart: sampler, steps, guidance, seed, count (prompts)."""
    s = cfg.sampler
    mode = f"{s.mode}{'-heun' if s.heun else ''}-{s.num_steps}"
    guide = f"cfg{s.cfg_scale:g}" + (f"-{s.guidance_low:g}-{s.guidance_high:g}" if s.cfg_scale > 1 else "")
    prompts = f"-p{prompts_sha256[:8]}" if prompts_sha256 else ""
    return f"{mode}-{guide}-seed{cfg.seed}-n{cfg.num_samples}{prompts}"


def output_dir(cfg: EvalConfig, ckpt: Path, step: int | None, prompts_sha256: str | None = None) -> Path:
    if cfg.out is not None:
        return Path(cfg.out)
    tag = sample_tag(cfg, prompts_sha256)
    if cfg.run_dir:
        return Path(cfg.run_dir) / "eval" / ((f"step-{step:07d}-" if step is not None else "") + tag)
    return ckpt.parent.parent / "eval" / f"{ckpt.stem}-{tag}"  # two files of one step never collide


def decoding(cfg: EvalConfig, loaded: LoadedModel) -> tuple[str, int, float, float]:
    """(vae name, vae seed, scale, bias): the config's, else the training cache's, else SD defaults."""
    rec = loaded.latents or {}
    vae_rec = rec.get("vae") or {}
    name = cfg.vae or vae_rec.get("name") or DEFAULT_VAE
    seed = int(vae_rec.get("seed", 0)) if name == vae_rec.get("name") else 0
    scale = cfg.latent_scale if cfg.latent_scale is not None else float(rec.get("scale", SD_VAE_SCALE))
    bias = cfg.latent_bias if cfg.latent_bias is not None else float(rec.get("bias", 0.0))
    return name, seed, scale, bias


def store_meta(cfg: EvalConfig, ckpt: Path, loaded: LoadedModel, vae: tuple[str, int, float, float]) -> dict:
    """Everything that determines the pixels; a store made with anything else is refused."""
    st = ckpt.stat()
    return {"checkpoint": str(ckpt.resolve()), "checkpoint_bytes": st.st_size, "checkpoint_mtime_ns": st.st_mtime_ns,
            "step": loaded.step,
            "sampler": configs.to_dict(cfg.sampler), "seed": cfg.seed, "labels": cfg.labels,
            "vae": vae[0], "vae_seed": vae[1], "latent_scale": vae[2], "latent_bias": vae[3],
            "rounding": cfg.rounding, "precision": cfg.precision, "model": dict(cfg.model)}


def _sum_over_ranks(n: int, d: dist.DistInfo) -> int:
    if not d.distributed:
        return n
    t = torch.tensor([n], device=d.device)
    torch.distributed.all_reduce(t)
    return int(t.item())


def _sample_chunks(cfg: EvalConfig, store: SampleStore, pending: list[int], loaded: LoadedModel, vae, scale: float,
                   bias: float, d: dist.DistInfo, text: TextSide | None = None) -> int:
    """Fill this rank's missing chunks; returns how many images it sampled."""
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext()
    done = 0
    bar = tqdm(total=sum(len(store.chunk_range(c)) for c in pending), unit="img", desc="sample",
               disable=not d.is_main, dynamic_ncols=True)
    for c in pending:
        idx = np.asarray(store.chunk_range(c))
        seeds, prompts, null = image_seeds(cfg.seed, idx), None, None
        if text is None:
            labels = cond = image_labels(cfg.seed, idx, loaded.model.cfg.num_classes, cfg.labels)
        else:  # the label column holds the prompt's entry; the condition is its encoding
            labels, prompts, null = text.entries[idx], [text.prompts[i] for i in idx], text.null
            cond = text.contexts(idx, cfg.batch_size)
        parts = []
        for b in range(0, len(idx), cfg.batch_size):
            sl = slice(b, b + cfg.batch_size)
            with autocast:
                z = generate_latents(loaded.model, seeds[sl], cond[sl], cfg.sampler, null_cond=null)
            if not bool(torch.isfinite(z).all()):  # uint8 would turn NaN into silent black images
                raise RuntimeError(f"non-finite latents among images {idx[sl][0]}..{idx[sl][-1]}: the checkpoint "
                                   "diverged, or try precision=fp32")
            parts.append(decode_latents(vae, z, scale, bias, rounding=cfg.rounding).permute(0, 2, 3, 1).cpu().numpy())
            bar.update(len(z))
        extra = {} if prompts is None else {"prompts": prompts}  # class stores keep the four-array call
        store.write_chunk(c, np.concatenate(parts), labels, seeds, **extra)
        done += len(idx)
    bar.close()
    return done


def run(cfg: EvalConfig) -> dict[str, Any]:
    """Sample (resuming), export, and compute metrics; returns the summary dict (rank 0)."""
    d = dist.init(cfg.device)
    checked = _metrics_preflight(cfg, d)  # before any sampling: a missing reference must not cost an hour
    torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
    torch.backends.cudnn.allow_tf32 = cfg.tf32
    ckpt = resolve_checkpoint(cfg)
    loaded = load_model(ckpt, overrides=cfg.model, device=d.device)
    text = prepare_text(cfg, loaded, d.device) if loaded.conditioning == "text" or cfg.prompts else None
    vae_name, vae_seed, scale, bias = decoding(cfg, loaded)
    m = loaded.model.cfg
    side = m.input_size * 8
    meta = store_meta(cfg, ckpt, loaded, (vae_name, vae_seed, scale, bias))
    if text is not None:
        meta.update(text.meta(cfg.caption))
    out = output_dir(cfg, ckpt, loaded.step, meta["prompts"]["sha256"] if text else None)
    layout = dict(num_samples=cfg.num_samples, chunk=cfg.chunk_size, shape=(side, side, 3), meta=meta,
                  prompt_width=text.width if text else None)
    if d.is_main:  # rank 0 creates (or validates and cleans) the store; the others open it after the barrier
        _remove_temps(out)
        open_store(out / "samples.zarr", **layout, clean=True)
    dist.barrier()
    store = open_store(out / "samples.zarr", **layout, create=False)
    pending = store.pending(d.rank, d.world_size)
    dist.barrier()  # every rank has read the same done flags before any rank writes one
    t0 = time.perf_counter()
    sampled = 0
    if pending:
        vae = load_vae(vae_name, seed=vae_seed, device=d.device)[0]
        log.info("sampling %d images (%s, NFE %d) into %s", cfg.num_samples, sample_tag(cfg), cfg.sampler.nfe, out)
        sampled = _sample_chunks(cfg, store, pending, loaded, vae, scale, bias, d, text)
    seconds = time.perf_counter() - t0
    sampled = _sum_over_ranks(sampled, d)
    dist.barrier()
    torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's defaults again: metrics must not run in TF32
    torch.backends.cudnn.allow_tf32 = True
    if not d.is_main:
        return {}
    store.check_complete()
    return _finish(cfg, store, out, ckpt, loaded, sampled, seconds, checked, text)


def _metrics_preflight(cfg: EvalConfig, d: dist.DistInfo) -> Preflight | None:
    """Rank 0 checks the metrics inputs (it alone computes them); every rank stops if they are unusable."""
    if not cfg.compute:
        return None
    checked, error = None, None
    if d.is_main:
        try:
            ref = cfg.metrics.reference
            synthetic = bool(ref and ref.startswith("synthetic:"))
            if synthetic:  # generated after sampling; only its spec is checked now
                parse_synthetic(ref)
            if is_caption_source(ref):  # read after sampling; its listing (annotations) is checked now
                caption_reference(ref, 8)
            checked = preflight(cfg.metrics, with_reference=not (synthetic or is_caption_source(ref)))
        except Exception as e:  # noqa: BLE001 - re-raised below; the other ranks must not wait for rank 0 forever
            error = e
    if _sum_over_ranks(int(error is not None), d):
        if error is not None:
            raise error
        raise MetricsError("rank 0 found the metrics inputs unusable before sampling (see its error)")
    return checked


def _remove_temps(out: Path) -> None:
    """Temp files of a killed run in ``out`` (.samples.npz.tmp*, .grid.png.tmp*, ...): only this stage writes there."""
    if out.is_dir():
        for stale in remove_stale_temps(out):
            log.info("removed %s left by an interrupted run", stale)


def _finish(cfg: EvalConfig, store: SampleStore, out: Path, ckpt: Path, loaded: LoadedModel, sampled: int,
            seconds: float, checked: Preflight | None, text: TextSide | None = None) -> dict[str, Any]:
    """Rank 0: grid, npz, metrics.json; the summary line is in the result (the CLI prints it once)."""
    n_grid = min(cfg.grid_count, store.num_samples)
    prompts = [str(p) for p in store.prompts[:]] if store.prompts is not None else None
    grid = write_grid(store.images[:n_grid], out / "grid.png", captions=prompts[:n_grid] if prompts else None) \
        if cfg.grid_count else None
    npz = out / "samples.npz" if cfg.npz else None
    if npz is not None and not (sampled == 0 and npz_matches(store, npz)):  # 9.8 GB: rewritten only when stale
        export_npz(store, npz)
    result: dict[str, Any] = {
        "out": str(out), "checkpoint": str(ckpt), "checkpoint_source": loaded.source, "step": loaded.step,
        "num_samples": store.num_samples, "sampler": configs.to_dict(cfg.sampler), "nfe": cfg.sampler.nfe,
        "seed": cfg.seed, "store": str(store.path), "grid": str(grid) if grid else None,
        **({"conditioning": "text", "prompts": cfg.prompts, "caption": cfg.caption, "text_null": text.null_from}
           if text else {"labels": cfg.labels}),
        "npz": str(npz) if npz else None,
        "sampling": {"images": sampled, "seconds": round(seconds, 2),
                     "images_per_s": round(sampled / seconds, 3) if sampled else None},
    }
    if cfg.compute:
        assert checked is not None
        mcfg = cfg.metrics
        if mcfg.reference and mcfg.reference.startswith("synthetic:"):
            ref = synthetic_reference(mcfg.reference, loaded.model.cfg.num_classes, store.images.shape[1], out)
            mcfg = dataclasses.replace(mcfg, reference=str(ref))
            checked = dataclasses.replace(checked, reference=load_reference(ref))
        elif is_caption_source(mcfg.reference):
            checked = dataclasses.replace(checked, reference=caption_reference(mcfg.reference, store.images.shape[1]))
        metrics = compute_metrics(store.images, mcfg, progress=True, checked=checked, prompts=prompts,
                                  clip_tokenizer=clip_tokenizer(mcfg.clip_model))
        result["metrics"] = metrics
        result["summary"] = summary_line(metrics)
    atomic_write_json(out / "metrics.json", result)
    return result


def parse_synthetic(spec: str) -> tuple[int, int]:
    """``synthetic:<n>[:<seed>]`` -> (n, seed), or a ConfigError naming metrics.reference."""
    parts = spec.split(":")
    try:
        n, seed = int(parts[1]), int(parts[2]) if len(parts) > 2 else 0
    except (IndexError, ValueError):
        raise ConfigError(f"config field 'metrics.reference': {spec!r} is not synthetic:<n>[:<seed>]") from None
    check(n >= 1 and len(parts) <= 3, "metrics.reference", f"{spec!r} is not synthetic:<n>[:<seed>] with n >= 1")
    return n, seed


def synthetic_reference(spec: str, num_classes: int, size: int, out: Path) -> Path:
    """``synthetic:<n>[:<seed>]``: the demo's training images as a reference batch (``arr_0``).

    The synthetic dataset is deterministic, so the images the demo trained on are regenerated
    (ADM-cropped to the sample size, exactly as preprocess saw them) instead of shipped.
    """
    from PIL import Image

    from pipeline.inputs.images import center_crop_adm
    from pipeline.inputs.synth import synth_image

    n, seed = parse_synthetic(spec)
    path = out / f"reference-synthetic-{n}-{num_classes}cls-seed{seed}-{size}px.npz"
    if not path.is_file():
        images = np.stack([np.asarray(center_crop_adm(Image.fromarray(synth_image(i, num_classes, size, seed)[0]), size))
                           for i in range(n)])
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # a killed run's is removed by the next (_remove_temps)
        with open(tmp, "wb") as f:
            np.savez(f, arr_0=images)
        tmp.replace(path)
    return path
