"""The text group of ``haste preprocess``: every caption of every image through the text encoder.

It runs after the image groups (``stages.preprocess_engine``) and reuses their machinery: the same
shard numbering, the shard writer and progress journal (``shard_sink``, ``done_record``), the
manifests (``stages.preprocess.write_manifests``). Shard k of the text group holds exactly the keys
of latents shard k: the items of the shard minus those the image pass skipped (read from the
latents group's record of that shard), so no image is decoded for text and the groups stay aligned
whichever group is rebuilt. Captions are encoded in fixed chunks of ``text_batch_size`` starting at
each shard's first caption, so a shard's bytes do not depend on the rank or rerun that wrote it.

Under torchrun each rank writes the missing shards ``s`` with ``s % world == rank``. Per shard, a
small ``progress/<shard>.text.json`` (written before the shard is committed) keeps the caption
counts, truncations and the fp16 error (1 - cos per token against the fp32 encoding); rank 0
sums them into the manifest (``settings.captions``, ``settings.fp16_error``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.cache import groups
from pipeline.cache.schema import ShardRecord, TextSpec, read_manifest
from pipeline.cache.shards import atomic_write_bytes, atomic_write_json, shard_name
from pipeline.cache.text import FP16_COS_BOUND, load_null, null_bytes, null_path, text_bytes
from pipeline.configs import ConfigError
from pipeline.dist import DistInfo
from pipeline.encoders import weights
from pipeline.encoders.text import TextEncoder, load_text_encoder, text_dim, tokenizer_descriptor
from pipeline.inputs.captions import CaptionedSource
from stages.preprocess_engine import PreprocessError, _drain, done_record, shard_sink

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------

def text_spec(cfg) -> TextSpec:
    try:
        dim = text_dim(cfg.text_encoder)
    except weights.WeightsError as e:
        raise ConfigError(f"config field 'text_encoder': {e}") from None
    return TextSpec(max_length=cfg.text_max_length, dim=dim, dtype=cfg.text_dtype)


def text_identity(cfg, source: CaptionedSource, common: dict) -> dict:
    """What decides the text group's bytes: the aligned listing, the captions, encoder, tokenizer, length, dtype."""
    return {**common, "captions_sha256": source.captions_sha256(),
            "text_encoder": weights.parse(cfg.text_encoder).descriptor(cfg.seed),
            "tokenizer": tokenizer_descriptor(cfg.text_encoder), "max_length": cfg.text_max_length,
            "text_dtype": cfg.text_dtype, "text_precision": cfg.text_precision}


def log_dropped(source: CaptionedSource) -> None:
    """One line per caption dropped at listing (rank 0 only: every rank opens the source)."""
    for where, why in source.dropped:
        log.warning("dropping caption %s: %s", where, why)
    if source.dropped or source.uncaptioned:
        log.info("%d caption(s) dropped, %d image(s) without a usable caption (skipped in every group)",
                 len(source.dropped), len(source.uncaptioned))


def dry_run_entry(plan, source: CaptionedSource, captions=None) -> dict:
    """The text group's line of ``--dry-run``: caption counts, bytes per caption and projected size
    (``captions``: per item, default the source's; None strings count as 60 characters)."""
    spec, captions = plan.spec, source.captions if captions is None else captions
    counts = Counter(len(c) for c in captions if c)
    n_caps = sum(k * n for k, n in counts.items())
    chars = sum(60 if c is None else len(c) for caps in captions for c in caps) / max(1, n_caps)
    total = sum(n * text_bytes(spec, k, round(chars))["tar"] for k, n in counts.items())
    images = sum(counts.values())
    status = "complete" if groups.is_complete(plan.dir) else ("partial" if plan.dir.exists() else "new")
    return {"dir": str(plan.dir), "status": status, "spec": vars(spec), "images_with_captions": images,
            "uncaptioned_images": len(source.uncaptioned), "dropped_captions": len(source.dropped),
            "captions": n_caps, "captions_per_image": round(n_caps / max(1, images), 4),
            "bytes_per_caption": text_bytes(spec, 1)["per_caption"],
            "bytes_per_image": round(total / max(1, images)), "projected_bytes": total,
            "projected_gb": round(total / 1e9, 3),
            "fp16_error_bound": {"one_minus_cos_per_token": FP16_COS_BOUND} if spec.dtype == "float16" else None}


# ----------------------------------------------------------------------------------------------
# The pass
# ----------------------------------------------------------------------------------------------

def image_skips(latents_plan, shard: int) -> tuple[tuple[str, str], ...]:
    """Inputs the image pass skipped in ``shard`` (the text shard skips the same ones)."""
    rec = done_record(latents_plan, shard, "size")
    if rec is None and groups.is_complete(latents_plan.dir):
        rec = read_manifest(latents_plan.dir).shards[shard]
    if rec is None:
        raise PreprocessError(f"{latents_plan.dir}: latents shard {shard} is not complete; re-run the same command")
    return rec.skipped


def encode_text_shards(cfg, d: DistInfo, source: CaptionedSource, plan, latents_plan, num_shards: int) -> None:
    """Write this rank's missing text shards (every world_size-th), aligned with the latents group."""
    todo = [s for s in range(d.rank, num_shards, d.world_size) if done_record(plan, s, cfg.resume_verify) is None]
    if not todo and null_path(plan.dir).is_file():
        return
    encoder, ident = load_text_encoder(cfg.text_encoder, seed=cfg.seed, device=d.device,
                                       max_length=cfg.text_max_length)
    if encoder.dim != plan.spec.dim:
        raise PreprocessError(f"text encoder {cfg.text_encoder!r} has width {encoder.dim}, its config says "
                              f"{plan.spec.dim}: the weights and config.json disagree")
    models = plan.dir / "progress" / "models.json"
    if d.is_main or not models.exists():
        atomic_write_json(models, {"text_encoder": {**ident, "precision": cfg.text_precision,
                                                    "stored_dtype": cfg.text_dtype}})
    empty = encoder([""], cfg.text_precision)[0].cpu().numpy()
    write_null(plan, empty)
    sink, pool, pending = shard_sink(plan), ThreadPoolExecutor(max_workers=1), []
    total = sum(len(_shard_rows(source, s, cfg.shard_size, ())) for s in todo)
    with tqdm(total=total, unit="img", desc="text", disable=not d.is_main) as bar:
        try:
            for s in todo:
                skipped = image_skips(latents_plan, s)
                rows = _shard_rows(source, s, cfg.shard_size, skipped)
                per_image, stats = encode_captions(encoder, [source.captions[i] for i in rows], plan.spec, cfg)
                atomic_write_json(stats_path(plan, s), stats)  # before the commit: a done shard has its stats
                keys = [source.items[i].key for i in rows]
                pending.append(pool.submit(sink.add, s, keys, (per_image, [source.captions[i] for i in rows]),
                                           list(skipped)))
                pending.append(pool.submit(sink.commit, s))
                pending = _drain(pending, keep=4)
                bar.update(len(rows))
            _drain(pending, keep=0)
        except BaseException:
            for f in pending:
                f.cancel()
            pool.shutdown(wait=True)
            sink.abort()
            raise
        finally:
            pool.shutdown(wait=True)


def _shard_rows(source: CaptionedSource, shard: int, size: int, skipped) -> list[int]:
    skip = {key for key, _ in skipped}
    return [i for i in range(shard * size, min((shard + 1) * size, len(source.items))) if source.items[i].key not in skip]


def stats_path(plan, shard: int) -> Path:
    return plan.dir / "progress" / f"{shard_name(shard)}.text.json"


@torch.no_grad()
def encode_captions(encoder: TextEncoder, captions: list[tuple[str, ...]], spec: TextSpec, cfg) -> tuple[list, dict]:
    """Per image (K, L, D) arrays in the stored dtype, and this shard's caption statistics."""
    flat = [c for caps in captions for c in caps]
    chunks, truncated, cos_max, cos_sum = [], 0, 0.0, 0.0
    for start in range(0, len(flat), cfg.text_batch_size):
        ids, cut = encoder.tokenize(flat[start:start + cfg.text_batch_size])
        x = encoder.encode_ids(ids, cfg.text_precision)                       # (n, L, D) fp32
        stored = x.to(getattr(torch, spec.dtype))
        err = one_minus_cos(x, stored)                                         # (n, L) float64
        cos_max, cos_sum = max(cos_max, float(err.max())), cos_sum + float(err.sum())
        truncated += int(cut.sum())
        chunks.append(stored.cpu().numpy())
    enc = np.concatenate(chunks) if chunks else np.zeros((0, spec.max_length, spec.dim), spec.dtype)
    bounds = np.cumsum([0] + [len(c) for c in captions])
    stats = {"images": len(captions), "captions": len(flat), "truncated": truncated, "tokens": len(flat) * spec.max_length,
             "one_minus_cos_max": cos_max, "one_minus_cos_sum": cos_sum,
             "max_captions": max((len(c) for c in captions), default=0)}
    return [enc[a:b] for a, b in zip(bounds[:-1], bounds[1:])], stats


def one_minus_cos(exact: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """1 - cos per token (..., D) -> (...), in float64: fp16's ~1e-8 is below fp32's resolution near 1."""
    a, b = exact.double(), stored.double()
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-300)
    return (1.0 - cos).clamp_min(0.0)


def write_null(plan, encoding: np.ndarray) -> None:
    """``codec/empty_caption.npy`` before any shard; one already there is kept if it matches (up to
    the rounding another device may do), else the group is refused rather than mixed."""
    data = null_bytes(plan.spec, encoding)
    path = null_path(plan.dir)
    path.parent.mkdir(exist_ok=True)
    if not path.exists():
        atomic_write_bytes(path, data)
        return
    old = load_null(plan.dir, plan.spec, {path.name: {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()}})
    new = encoding.astype(np.float32)
    if not np.allclose(old.astype(np.float32), new, rtol=1e-2, atol=1e-2 * max(1.0, float(np.abs(new).max()))):
        raise PreprocessError(f"{path} differs from this encoder's empty-caption encoding (another encoder or "
                              f"damaged) and earlier shards may match it: delete {plan.dir} and re-run")


# ----------------------------------------------------------------------------------------------
# Finishing: the text manifest's settings
# ----------------------------------------------------------------------------------------------

def text_settings(cfg, source: CaptionedSource, plan, num_shards: int, imported: dict | None = None) -> dict:
    """What ``write_manifests`` merges into the text manifest's settings (rank 0, all shards done)."""
    stats = [json.loads(stats_path(plan, s).read_text()) for s in range(num_shards)]
    caps = sum(s["captions"] for s in stats)
    images = sum(s["images"] for s in stats)
    recs = [done_record(plan, s, "size") for s in range(num_shards)]
    nbytes = sum(r.bytes for r in recs if isinstance(r, ShardRecord))
    out = {"precision": "imported" if imported else cfg.text_precision, "max_length": plan.spec.max_length,
           "batch_size": cfg.text_batch_size,
           "captions": {"total": caps, "per_image": round(caps / max(1, images), 4),
                        "max_per_image": max((s["max_captions"] for s in stats), default=0),
                        "truncated": sum(s["truncated"] for s in stats),
                        "dropped": [list(x) for x in source.dropped]},
           "bytes_per_image": round(nbytes / max(1, images)), "bytes_per_caption": round(nbytes / max(1, caps)),
           "source_details": source.details}
    if cfg.text_dtype == "float16":
        tokens = sum(s["tokens"] for s in stats)
        out["fp16_error"] = {"one_minus_cos_max": max((s["one_minus_cos_max"] for s in stats), default=0.0),
                             "one_minus_cos_mean": sum(s["one_minus_cos_sum"] for s in stats) / max(1, tokens),
                             "bound": FP16_COS_BOUND, "against": "the fp32 encoding, per token"}
    if imported:
        out["imported_from"] = imported
    return out


# ----------------------------------------------------------------------------------------------
# `haste cache info` / `verify` for a text group
# ----------------------------------------------------------------------------------------------

def text_info(m) -> dict:
    """The text group's caption counts, measured bytes per image and fp16 error (from its manifest)."""
    s = m.settings
    caps = s.get("captions", {})
    return {"captions": caps.get("total"), "captions_per_image": caps.get("per_image"),
            "dropped_captions": len(caps.get("dropped", [])), "truncated_captions": caps.get("truncated"),
            "bytes_per_image": s.get("bytes_per_image"), "bytes_per_caption": s.get("bytes_per_caption"),
            "fp16_error": s.get("fp16_error"), "imported": "imported_from" in s}


def fresh_text_compare(m, decoded: list[tuple[str, dict]], gdir: Path) -> dict:
    """Re-encode the decoded samples' captions (and "") with the recorded encoder; max relative errors."""
    if not decoded:
        return {"ok": True, "skipped": "no samples decoded"}
    if "imported_from" in m.settings:
        return {"ok": True, "skipped": "encodings were imported (no encoder run to reproduce)"}
    if any(c is None for _, d in decoded for c in d["captions"]):
        return {"ok": True, "skipped": "caption strings unknown"}
    ident, spec = m.models["text_encoder"], m.spec
    try:
        enc, fresh_ident = load_text_encoder(ident["name"], seed=int(m.identity["text_encoder"].get("seed", 0)),
                                             max_length=spec.max_length)
    except (weights.WeightsError, OSError) as e:
        return {"ok": True, "skipped": f"text encoder unavailable: {e}"}
    prec = ident.get("precision", "fp32")
    errors = {"text": max(_rel_err(d["text"], enc(d["captions"], prec).to(getattr(torch, spec.dtype)).numpy())
                          for _, d in decoded),
              "empty_caption": _rel_err(load_null(gdir, spec, m.codec_files),
                                        enc([""], prec)[0].to(getattr(torch, spec.dtype)).numpy())}
    tol = 5e-2 if prec == "bf16" else (1e-2 if spec.dtype == "float16" else 1e-4)
    return {"ok": all(e <= tol for e in errors.values()), "max_rel_error": errors, "tolerance": tol,
            "weights_match": fresh_ident["weights_sha256"] == ident["weights_sha256"]}


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float32), b.astype(np.float32)
    return float(np.abs(a - b).max() / max(1e-12, float(np.abs(b).max())))
