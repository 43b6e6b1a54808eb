"""``haste cache info`` and ``haste cache verify``: what a cache holds, and whether it is intact.

verify checks what training opens (``stages.cache_checks``: index.json runs, every shard's sha256,
sample count and first/last key against its manifest), decodes a spread of samples with the
schema (and the sha256 of a teacher group's codec files, tokens-*: its q/k projections), and, when
the recorded models can be loaded, recomputes those samples from the source images with a fresh
VAE/teacher forward and reports the max error of the cached values. With
``--fidelity`` it also measures what the teacher codec loses against an exact fp32 teacher
(``pipeline.cache.fidelity``: row KL, attention-loss error, gradient cosine, feature cosine error, at
several teacher sharpnesses) and records the result in the teacher manifest under ``fidelity``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.cache import fidelity
from pipeline.cache.codecs import row_centred
from pipeline.cache.groups import group_dir, read_index
from pipeline.cache.reader import decode_teacher_targets, index_shard, read_sample
from pipeline.cache.schema import (
    CODEC_DIR,
    LATENTS,
    TEACHER,
    TEXT,
    CacheFormatError,
    GroupManifest,
    TeacherSpec,
    bytes_per_sample,
    decode_members,
    encode_teacher_sample,
    get_codec,
    load_codec_params,
    read_manifest,
)
from pipeline.cache.shards import atomic_write_json, file_sha256
from pipeline.cache.text import null_errors
from pipeline.encoders import weights
from pipeline.inputs.captions import open_input
from pipeline.inputs.sources import DEFAULT_MAX_FILE_BYTES, SourceError
from stages.cache_checks import indexed_groups, shard_errors
from stages.preprocess_text import fresh_text_compare, text_info

log = logging.getLogger(__name__)


def _groups(root: Path) -> list[GroupManifest]:
    index = read_index(root)
    names = sorted(index.get("groups", {}))
    if not names:
        raise CacheFormatError(f"{root}: no groups in index.json (is this a cache root? run `haste preprocess`)")
    return [read_manifest(Path(root) / name) for name in names]


def info(path: str | Path) -> dict[str, Any]:
    root = Path(path)
    out: dict[str, Any] = {"root": str(root), "groups": [], "runs": read_index(root).get("runs", [])}
    for m in _groups(root):
        j = m.to_json()
        out["groups"].append({
            "kind": m.kind, "key": m.key, "dir": str(group_dir(root, m.kind, m.key)),
            "num_samples": m.num_samples, "num_shards": len(m.shards), "total_bytes": j["total_bytes"],
            "bytes_per_sample": j["bytes_per_sample"], "fields": j["fields"], "skipped": len(m.skipped),
            "models": {k: {f: v.get(f) for f in ("name", "weights_sha256", "precision")} for k, v in m.models.items()},
            "source": m.source.get("location"), "classes": len(m.classes), "codec_files": m.codec_files,
            **({"text": text_info(m)} if m.kind == TEXT else {}),
        })
    return out


def format_info(result: dict[str, Any]) -> str:
    lines = [f"cache {result['root']}"]
    for g in result["groups"]:
        lines.append(f"\n[{g['kind']}] {g['dir']}")
        lines.append(f"  source {g['source']}  classes {g['classes']}  samples {g['num_samples']}  "
                     f"shards {g['num_shards']}  skipped {g['skipped']}")
        unit = "caption" if "text" in g else "sample"  # a text sample holds K captions
        lines.append(f"  total {g['total_bytes'] / 1e6:.2f} MB   per {unit} {g['bytes_per_sample']['tar']} B (tar), "
                     f"{g['bytes_per_sample']['payload']} B (payload)")
        if "text" in g:
            t, err = g["text"], g["text"].get("fp16_error") or {}
            lines.append(f"  captions {t['captions']} ({t['captions_per_image']} per image, {t['dropped_captions']} "
                         f"dropped, {t['truncated_captions']} truncated)   measured {t['bytes_per_image']} B per image, "
                         f"{t['bytes_per_caption']} B per caption" + ("   (imported)" if t["imported"] else ""))
            if err:
                lines.append(f"  fp16 vs fp32: 1 - cos per token max {err['one_minus_cos_max']:.2e}, "
                             f"mean {err['one_minus_cos_mean']:.2e} (bound {err['bound']:.2e})")
        for name, f in g["fields"].items():
            lines.append(f"  field {name:<12} {f['dtype']:<10} {str(tuple(f['shape'])):<22} {f.get('codec', '')}")
        for name, f in g.get("codec_files", {}).items():  # once per group, not per sample
            lines.append(f"  file  {CODEC_DIR}/{name:<16} {f['dtype']:<10} {str(tuple(f['shape'])):<22} "
                         f"{f['bytes'] / 1e6:.2f} MB sha256 {f['sha256'][:16]}…")
        for name, mdl in g["models"].items():
            lines.append(f"  model {name}: {mdl['name']} ({mdl['precision']}) sha256 {str(mdl['weights_sha256'])[:16]}…")
    return "\n".join(lines)


def verify(path: str | Path, samples: int = 8, with_models: bool = True, fidelity: bool = False,
           progress: bool | None = False) -> dict[str, Any]:
    """Index runs, shard hashes and counts, sample decodes; with models, a fresh recompute; with
    ``fidelity``, the codec's measured error on the teacher group (written into its manifest).
    Fidelity never fails a cache: a lossy codec is a choice, not corruption; its verdict against
    the default bar is reported. ``progress``: a bar over the bytes hashed (None: when on a TTY)."""
    root = Path(path)
    manifests, index_report = indexed_groups(root)
    report: dict[str, Any] = {"root": str(root), "groups": {}, "index": index_report, "ok": not index_report["errors"]}
    bar = tqdm(total=sum(r.bytes for m in manifests for r in m.shards), unit="B", unit_scale=True,
               unit_divisor=1024, desc="verify", leave=False, disable=None if progress is None else not progress)
    with bar:
        for m in manifests:
            report["groups"][f"{m.kind}/{m.key}"] = _verify_group(root, m, samples, bar.update)
    for m in manifests:
        g = report["groups"][f"{m.kind}/{m.key}"]
        decoded = g.pop("_decoded")
        want_fid = fidelity and m.kind == TEACHER
        ref = _reference(m, decoded) if (with_models or want_fid) and decoded and m.kind != TEXT else None
        if with_models and m.kind == TEXT:
            g["fresh"] = fresh_text_compare(m, decoded, group_dir(root, m.kind, m.key))
        elif with_models:
            g["fresh"] = _fresh_compare(root, m, decoded, ref)
        if want_fid:
            g["fidelity"] = _fidelity(root, m, decoded, ref)
        g["ok"] = not g["errors"] and g.get("fresh", {}).get("ok", True)
        report["ok"] &= g["ok"]
    return report


def _verify_group(root: Path, m: GroupManifest, samples: int, progress=None) -> dict[str, Any]:
    gdir = group_dir(root, m.kind, m.key)
    errors = shard_errors(root, m, progress) + _codec_file_errors(gdir, m)
    decoded: list[tuple[str, dict]] = []
    picks = _spread(m, samples)
    for shard, i in picks:
        p = gdir / m.shards[shard].name
        try:
            entry = index_shard(p)[i]
            decoded.append((entry[0], decode_members(m.kind, m.spec, read_sample(p, entry), where=f"{p}:{entry[0]}")))
        except (CacheFormatError, IndexError) as e:
            errors.append(str(e))
    return {"shards": len(m.shards), "samples": m.num_samples, "bytes": sum(r.bytes for r in m.shards),
            "decoded": len(decoded), "errors": errors, "_decoded": decoded}


def _codec_file_errors(gdir: Path, m: GroupManifest) -> list[str]:
    """Each codec file the group's codec needs must exist and match the manifest's sha256."""
    if m.kind == TEXT:
        return null_errors(gdir, m.codec_files)
    if not isinstance(m.spec, TeacherSpec):
        return []
    errors = []
    for name in get_codec(m.spec.codec).params(m.spec):
        fname, p = f"{name}.npy", gdir / CODEC_DIR / f"{name}.npy"
        rec = m.codec_files.get(fname)
        if rec is None:
            errors.append(f"{gdir}/manifest.json: no record of codec file {fname}")
        elif not p.is_file():
            errors.append(f"{p}: missing")
        elif p.stat().st_size != rec["bytes"] or file_sha256(p) != rec["sha256"]:
            errors.append(f"{p}: size/sha256 differ from the manifest (corrupt or replaced)")
    return errors


def _spread(m: GroupManifest, n: int) -> list[tuple[int, int]]:
    """n (shard, position) pairs spread evenly over the whole group."""
    flat = [(s, i) for s, rec in enumerate(m.shards) for i in range(rec.count)]
    if not flat or n == 0:
        return []
    return [flat[j] for j in np.linspace(0, len(flat) - 1, min(n, len(flat))).round().astype(int)]


@dataclass
class _Reference:
    """Freshly loaded models and the source images of the decoded samples."""

    model: Any
    images: torch.Tensor   # (N, 3, R, R) uint8


def _reference(m: GroupManifest, decoded: list[tuple[str, dict]]) -> _Reference | str:
    """The recorded model and the samples' source images, or why they are unavailable."""
    if m.kind == LATENTS and "imported_from" in m.identity:  # `haste import`: no VAE ran, nothing to rerun
        return "latents were imported from precomputed moments (no VAE run to reproduce)"
    try:
        src_id = m.identity["source"]
        source = open_input(m.source["location"], synthetic_classes=src_id["num_classes"],
                            synthetic_seed=src_id.get("seed", 0), crop=m.settings["transform"]["crop"],
                            max_file_bytes=m.settings["transform"].get("max_file_bytes", DEFAULT_MAX_FILE_BYTES))
        if source.identity()["listing_sha256"] != src_id["listing_sha256"]:
            return "the source on disk differs from the one cached"
        model = _load_model(m)
    except (SourceError, weights.WeightsError, OSError) as e:
        return f"models or source unavailable: {e}"
    items = {it.key: it for it in source.items}
    res = m.settings["transform"]["resolution"]
    imgs = np.stack([source.load(items[k], res, 1 << 62) for k, _ in decoded])
    return _Reference(model, torch.from_numpy(imgs).permute(0, 3, 1, 2))


def _fresh_compare(root: Path, m: GroupManifest, decoded: list[tuple[str, dict]],
                   ref: _Reference | str | None) -> dict[str, Any]:
    """Recompute decoded samples with freshly loaded models, through the group's own codecs; max errors.

    Going through the same codec makes this a reproducibility check whatever the codec's loss
    (which ``--fidelity`` measures instead).
    """
    if not decoded:
        return {"ok": True, "skipped": "no samples decoded"}
    if not isinstance(ref, _Reference):
        return {"ok": True, "skipped": ref}
    prec = m.models[("vae" if m.kind == LATENTS else "teacher")].get("precision", "fp32")
    if m.kind == LATENTS:
        from pipeline.encoders.vae import encode_moments

        fresh = {"moments": encode_moments(ref.model, ref.images, prec).numpy()}
    else:
        t = ref.model(ref.images, prec)
        fresh = _cached_arrays(root, m, _through_codec(m, t, [k for k, _ in decoded]))
    cached = _cached_arrays(root, m, decoded)
    errors = {k: _rel_err(cached[k], fresh[k]) for k in fresh if k in cached}
    if isinstance(m.spec, TeacherSpec) and m.codec_files:  # tokens-*, stream-*: the stored arrays are the model's
        stored = load_codec_params(group_dir(root, m.kind, m.key), m.spec, m.codec_files)
        codec = get_codec(m.spec.codec)
        fresh_params = codec.store_params(getattr(ref.model, codec.teacher_arrays)())
        errors.update({f"codec:{n}": _rel_err(a, stored[n]) for n, a in fresh_params.items()})
    tol = _tolerance(m, prec)
    return {"ok": all(e <= tol for e in errors.values()), "max_rel_error": errors, "tolerance": tol,
            "weights_match": _weights_match(m, ref.model)}


def _through_codec(m: GroupManifest, t: Any, keys: list[str]) -> list[tuple[str, dict]]:
    """What the writer would store for teacher outputs ``t`` (it casts or packs on the device, then encodes)."""
    spec = m.spec
    assert isinstance(spec, TeacherSpec)
    codec = get_codec(spec.codec)
    feat = t.feat.to(getattr(torch, spec.feat_dtype)).numpy()
    inputs = {n: codec.on_device(getattr(t, n)).numpy() for n in codec.inputs}
    out = []
    for i, key in enumerate(keys):
        members = encode_teacher_sample(spec, feat[i], **{n: a[i] for n, a in inputs.items()})
        out.append((key, decode_members(TEACHER, spec, members, where=key)))
    return out


def _cached_arrays(root: Path, m: GroupManifest, decoded: list[tuple[str, dict]]) -> dict[str, np.ndarray]:
    """Decoded samples as float arrays: ``moments``, or ``feat`` (magnitudes restored) and row-centred ``logits``."""
    if m.kind == LATENTS:
        return {"moments": np.stack([d["moments"] for _, d in decoded]).astype(np.float32)}
    feat, logits = decode_teacher_targets(root, m, _batch(decoded), attention=m.spec.codec != "none")
    out = {"feat": feat.numpy()}
    if logits is not None:
        out["logits"] = row_centred(logits).numpy()
    return out


def _batch(decoded: list[tuple[str, dict]]) -> dict[str, torch.Tensor]:
    return {n: torch.from_numpy(np.stack([d[n] for _, d in decoded])) for n in decoded[0][1] if n != "label"}


def _fidelity(root: Path, m: GroupManifest, decoded: list[tuple[str, dict]], ref: _Reference | str | None) -> dict:
    """Decoded targets vs an exact fp32 teacher forward (pipeline.cache.fidelity); stored in the manifest."""
    spec = m.spec
    assert isinstance(spec, TeacherSpec)
    if not isinstance(ref, _Reference):
        why = ref or "no samples decoded"
        log.warning("fidelity not measured for teacher group %s: %s (no exact reference; manifest unchanged)",
                    m.key, why)
        return {"measured": False, "reason": f"{why}; without the teacher there is no exact reference, so "
                                             "fidelity was not measured and the manifest is unchanged"}
    t = ref.model(ref.images, "fp32")  # the exact reference: no autocast, no codec
    batch = _batch(decoded)
    attn = spec.codec != "none"
    exact = get_codec("qk-fp32").decode({"q": t.q, "k": t.k}, spec.scale) if attn else None
    feat, logits = decode_teacher_targets(root, m, batch, attention=attn)  # stream-*: both from one decode
    result = fidelity.measure(exact, logits, t.feat, feat)
    result.update(measured=True, codec=spec.codec, feat_codec=spec.feat_codec, feat_dtype=spec.feat_dtype,
                  bytes_per_sample=bytes_per_sample(TEACHER, spec)["tar"], keys=[k for k, _ in decoded],
                  reference={"teacher": m.identity["teacher"].get("name"), "precision": "fp32",
                             "cache_precision": m.models["teacher"].get("precision", "fp32"),
                             "weights_match": _weights_match(m, ref.model)},
                  student="N(0, 1) logits, seed 0", measured_unix=int(time.time()))
    path = group_dir(root, m.kind, m.key) / "manifest.json"
    data = json.loads(path.read_text())
    data["fidelity"] = result
    atomic_write_json(path, data)  # readers see the old or the new manifest, never half of one
    return result


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """Max abs error, relative to the reference's max magnitude (scale-free across models)."""
    return float(np.abs(a - b).max() / max(1e-12, float(np.abs(b).max())))


def _tolerance(m: GroupManifest, prec: str) -> float:
    """Max relative error allowed between cached and recomputed values: the recorded precision's
    run-to-run noise, plus one rounding step where a codec rounds coarsely (a value near a rounding
    boundary may land on either side when the forward differs in the last bits)."""
    if prec == "bf16":
        return 5e-2
    spec = m.spec
    if isinstance(spec, TeacherSpec):
        codec = get_codec(spec.codec)
        if codec.dtype in ("int8", "uint8") or codec.rank is not None or spec.feat_codec == "int8":
            return 2e-2
        if codec.dtype == "float16" and codec.name != "none" or spec.feat_dtype == "float16":
            return 1e-2
        return 1e-4
    return 1e-2 if getattr(spec, "dtype", None) == "float16" else 1e-4


def _load_model(m: GroupManifest):
    if m.kind == LATENTS:
        from pipeline.encoders.vae import load_vae

        ident = m.identity["vae"]
        return load_vae(ident["name"], seed=int(ident.get("seed", 0)))[0]
    from pipeline.encoders.teacher import load_teacher

    ident, spec = m.identity["teacher"], m.spec
    capture = {"q", "k", *get_codec(spec.codec).inputs}  # q, k: the exact reference; the rest: the fresh recompute
    return load_teacher(ident["name"], arch=m.identity["arch"], layers=spec.layers,
                        resolution=m.settings["transform"]["resolution"], seed=int(ident.get("seed", 0)),
                        capture=capture)[0]


def _weights_match(m: GroupManifest, model: Any) -> bool:
    module = model.model if m.kind == TEACHER else model
    recorded = m.models[("vae" if m.kind == LATENTS else "teacher")]["weights_sha256"]
    return weights.state_dict_sha256(module) == recorded
