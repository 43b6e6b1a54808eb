"""``haste cache info`` and ``haste cache verify``: what a cache holds, and whether it is intact.

verify checks every shard's sha256 against its manifest, decodes a spread of samples with the
schema, and, when the recorded models can be loaded, recomputes those samples from the source
images with a fresh VAE/teacher forward and reports the max error of the cached values.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import weights
from pipeline.cache import index_shard, read_sample
from pipeline.groups import group_dir, read_index
from pipeline.schema import (
    LATENTS,
    TEACHER,
    CacheFormatError,
    GroupManifest,
    TeacherSpec,
    decode_members,
    get_codec,
    read_manifest,
)
from pipeline.shards import file_sha256
from pipeline.sources import SourceError, open_source

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
            "source": m.source.get("location"), "classes": len(m.classes),
        })
    return out


def format_info(result: dict[str, Any]) -> str:
    lines = [f"cache {result['root']}"]
    for g in result["groups"]:
        lines.append(f"\n[{g['kind']}] {g['dir']}")
        lines.append(f"  source {g['source']}  classes {g['classes']}  samples {g['num_samples']}  "
                     f"shards {g['num_shards']}  skipped {g['skipped']}")
        lines.append(f"  total {g['total_bytes'] / 1e6:.2f} MB   per sample {g['bytes_per_sample']['tar']} B (tar), "
                     f"{g['bytes_per_sample']['payload']} B (payload)")
        for name, f in g["fields"].items():
            lines.append(f"  field {name:<12} {f['dtype']:<10} {str(tuple(f['shape'])):<22} {f.get('codec', '')}")
        for name, mdl in g["models"].items():
            lines.append(f"  model {name}: {mdl['name']} ({mdl['precision']}) sha256 {str(mdl['weights_sha256'])[:16]}…")
    return "\n".join(lines)


def verify(path: str | Path, samples: int = 8, with_models: bool = True) -> dict[str, Any]:
    root = Path(path)
    report: dict[str, Any] = {"root": str(root), "groups": {}, "ok": True}
    for m in _groups(root):
        g = _verify_group(root, m, samples)
        if with_models:
            g["fresh"] = _fresh_compare(root, m, g.pop("_decoded"))
        else:
            g.pop("_decoded")
        g["ok"] = not g["errors"] and g.get("fresh", {}).get("ok", True)
        report["groups"][f"{m.kind}/{m.key}"] = g
        report["ok"] &= g["ok"]
    return report


def _verify_group(root: Path, m: GroupManifest, samples: int) -> dict[str, Any]:
    gdir = group_dir(root, m.kind, m.key)
    errors: list[str] = []
    for rec in m.shards:
        p = gdir / rec.name
        if not p.is_file():
            errors.append(f"{p}: missing")
        elif p.stat().st_size != rec.bytes or file_sha256(p) != rec.sha256:
            errors.append(f"{p}: size/sha256 differ from the manifest (corrupt or replaced)")
    decoded: list[tuple[str, dict]] = []
    picks = _spread(m, samples)
    for shard, i in picks:
        p = gdir / m.shards[shard].name
        try:
            entry = index_shard(p)[i]
            decoded.append((entry[0], decode_members(m.kind, m.spec, read_sample(p, entry), where=f"{p}:{entry[0]}")))
        except (CacheFormatError, IndexError) as e:
            errors.append(str(e))
    return {"shards": len(m.shards), "samples": m.num_samples, "decoded": len(decoded), "errors": errors,
            "_decoded": decoded}


def _spread(m: GroupManifest, n: int) -> list[tuple[int, int]]:
    """n (shard, position) pairs spread evenly over the whole group."""
    flat = [(s, i) for s, rec in enumerate(m.shards) for i in range(rec.count)]
    if not flat or n == 0:
        return []
    return [flat[j] for j in np.linspace(0, len(flat) - 1, min(n, len(flat))).round().astype(int)]


def _fresh_compare(root: Path, m: GroupManifest, decoded: list[tuple[str, dict]]) -> dict[str, Any]:
    """Recompute decoded samples from the source with freshly loaded models; max errors."""
    if not decoded:
        return {"ok": True, "skipped": "no samples decoded"}
    try:
        src_id = m.identity["source"]
        source = open_source(m.source["location"], synthetic_classes=src_id["num_classes"],
                             synthetic_seed=src_id.get("seed", 0))
        if source.identity()["listing_sha256"] != src_id["listing_sha256"]:
            return {"ok": True, "skipped": "the source on disk differs from the one cached"}
        model = _load_model(m)
    except (SourceError, weights.WeightsError, OSError) as e:
        return {"ok": True, "skipped": f"models or source unavailable: {e}"}
    items = {it.key: it for it in source.items}
    res = m.settings["transform"]["resolution"]
    imgs = np.stack([source.load(items[k], res, 1 << 62) for k, _ in decoded])
    images = torch.from_numpy(imgs).permute(0, 3, 1, 2)
    prec = m.models[("vae" if m.kind == LATENTS else "teacher")].get("precision", "fp32")
    tol = 5e-2 if prec == "bf16" else 1e-2 if _half(m) else 1e-4
    if m.kind == LATENTS:
        from pipeline.vae import encode_moments

        fresh = {"moments": encode_moments(model, images, prec).numpy()}
    else:
        t = model(images, prec)
        fresh = {"feat": t.feat.numpy(),
                 "logits": get_codec("qk-fp32").decode({"q": t.q, "k": t.k}, m.spec.scale).numpy()}
    cached = _cached_arrays(m, decoded)
    errors = {k: _rel_err(cached[k], fresh[k]) for k in fresh if k in cached}
    return {"ok": all(e <= tol for e in errors.values()), "max_rel_error": errors, "tolerance": tol,
            "weights_match": _weights_match(m, model)}


def _cached_arrays(m: GroupManifest, decoded: list[tuple[str, dict]]) -> dict[str, np.ndarray]:
    out = {name: np.stack([d[name] for _, d in decoded]).astype(np.float32)
           for name in decoded[0][1] if name != "label" and name not in ("q", "k", "logits")}
    if m.kind == TEACHER and isinstance(m.spec, TeacherSpec) and m.spec.codec != "none":
        arrays = {n: torch.from_numpy(np.stack([d[n] for _, d in decoded])) for n in ("q", "k", "logits")
                  if n in decoded[0][1]}
        out["logits"] = get_codec(m.spec.codec).decode(arrays, m.spec.scale).numpy()
    return out


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """Max abs error, relative to the reference's max magnitude (scale-free across models)."""
    return float(np.abs(a - b).max() / max(1e-12, float(np.abs(b).max())))


def _half(m: GroupManifest) -> bool:
    spec = m.spec
    return getattr(spec, "dtype", None) == "float16" or getattr(spec, "feat_dtype", None) == "float16" \
        or get_codec(getattr(spec, "codec", "none")).dtype == "float16" and m.kind == TEACHER


def _load_model(m: GroupManifest):
    if m.kind == LATENTS:
        from pipeline.vae import load_vae

        ident = m.identity["vae"]
        return load_vae(ident["name"], seed=int(ident.get("seed", 0)))[0]
    from pipeline.teacher import load_teacher

    ident, spec = m.identity["teacher"], m.spec
    return load_teacher(ident["name"], arch=m.identity["arch"], layers=spec.layers,
                        resolution=m.settings["transform"]["resolution"], seed=int(ident.get("seed", 0)))[0]


def _weights_match(m: GroupManifest, model: Any) -> bool:
    module = model.model if m.kind == TEACHER else model
    recorded = m.models[("vae" if m.kind == LATENTS else "teacher")]["weights_sha256"]
    return weights.state_dict_sha256(module) == recorded
