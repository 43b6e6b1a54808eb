"""The integrity half of ``haste cache verify``: what training opens, checked without models.

- ``indexed_groups``: every group index.json records has a readable manifest, every run it lists
  opens as training would open it (both groups present, complete and aligned), and complete
  groups that index.json does not know are reported (``haste preprocess`` records them).
- ``shard_errors``: each shard file's size and sha256 against its manifest record (the bytes
  counted into a progress callback), then its tar index: sample count and first/last key, which
  the trainer's sample order is computed from.
- ``format_verify``: the short human summary the CLI prints (``--json`` prints the report itself).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.cache.groups import group_dir, read_index
from pipeline.cache.reader import CacheMismatchError, index_shard, open_cache
from pipeline.cache.schema import CacheFormatError, GroupManifest, read_manifest
from pipeline.cache.shards import file_sha256


def indexed_groups(root: Path) -> tuple[list[GroupManifest], dict[str, Any]]:
    """Manifests of the groups index.json records, and the index's own report (runs, errors, notes)."""
    index = read_index(root)
    names = sorted(index.get("groups", {}))
    if not names:
        raise CacheFormatError(f"{root}: no groups in index.json (is this a cache root? run `haste preprocess`)")
    manifests, errors = [], []
    for name in names:
        try:
            manifests.append(read_manifest(Path(root) / name))
        except CacheFormatError as e:
            errors.append(f"index.json records group {name}, but {e}")
    runs = index.get("runs", [])
    for run in runs:
        lat, tea = run.get("latents"), run.get("teacher")
        missing = [n for n in (f"latents/{lat}", f"teacher/{tea}" if tea else None) if n and n not in names]
        if missing:
            errors.append(f"index.json run ({lat}, {tea}) refers to {missing[0]}, which index.json does not record")
            continue
        try:
            open_cache(root, latents=lat, teacher=tea, need_teacher=tea is not None)
        except (CacheFormatError, CacheMismatchError) as e:
            errors.append(f"index.json run ({lat}, {tea}) cannot be opened for training: {e}")
    on_disk = sorted(str(p.parent.relative_to(root)) for p in Path(root).glob("*/*/manifest.json"))
    notes = [f"complete group {n} is not recorded in index.json (re-run the `haste preprocess` that built it "
             "to record it)" for n in on_disk if n not in names]
    return manifests, {"runs": len(runs), "errors": errors, "notes": notes}


def shard_errors(root: Path, m: GroupManifest, progress: Callable[[int], object] | None = None) -> list[str]:
    """What differs between a group's shard files and its manifest records (empty: nothing)."""
    gdir = group_dir(root, m.kind, m.key)
    errors: list[str] = []
    for rec in m.shards:
        p = gdir / rec.name
        if not p.is_file():
            errors.append(f"{p}: missing")
            if progress:
                progress(rec.bytes)
            continue
        size = p.stat().st_size
        if size != rec.bytes or file_sha256(p, progress) != rec.sha256:
            errors.append(f"{p}: size/sha256 differ from the manifest (corrupt or replaced)")
            if progress and size != rec.bytes:
                progress(rec.bytes)
            continue
        try:
            keys = [entry[0] for entry in index_shard(p)]
        except CacheFormatError as e:
            errors.append(str(e))
            continue
        if (len(keys), keys[0] if keys else None, keys[-1] if keys else None) != (rec.count, rec.first_key,
                                                                                  rec.last_key):
            errors.append(f"{p}: holds {len(keys)} samples, the manifest records {rec.count} "
                          f"(first/last key {rec.first_key}/{rec.last_key}): the manifest was edited")
    count = m.source.get("count")
    if count is not None and m.num_samples + len(m.skipped) != count:
        errors.append(f"{gdir}/manifest.json: {m.num_samples} samples + {len(m.skipped)} skipped inputs, but the "
                      f"source had {count}: the manifest was edited")
    return errors


def _mb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _group_line(name: str, g: dict[str, Any]) -> list[str]:
    parts = [f"{g['shards']} shards, {g['samples']} samples, {_mb(g['bytes'])}",
             f"{g['decoded']} decoded"]
    fresh = g.get("fresh")
    if fresh and "skipped" in fresh:
        parts.append(f"no fresh recompute ({fresh['skipped']})")
    elif fresh:
        worst = max(fresh["max_rel_error"].values(), default=0.0)
        parts.append(f"fresh recompute max error {worst:.1e} (tolerance {fresh['tolerance']:.0e})")
    fid = g.get("fidelity")
    if fid and fid.get("measured"):
        w = fid["worst"]
        parts.append(f"fidelity: grad cos min {w.get('grad_cos_min', 1.0):.6f}, "
                     f"{'meets' if w['meets_bar'] else 'BELOW'} the default bar (recorded in the manifest)")
    lines = [f"  {name}  {'ok' if g['ok'] else 'FAILED'}: " + "; ".join(parts)]
    lines += [f"    - {e}" for e in g["errors"]]
    if fresh and not fresh.get("ok", True):
        lines.append(f"    - cached values differ from a fresh forward: {fresh['max_rel_error']}")
    return lines


def format_verify(report: dict[str, Any]) -> str:
    """groups, shards, samples, bytes and the verdict, in a few lines."""
    groups = report["groups"]
    lines = [f"cache {report['root']}"]
    for name, g in groups.items():
        lines += _group_line(name, g)
    idx = report["index"]
    lines.append(f"  index.json  {'ok' if not idx['errors'] else 'FAILED'}: {idx['runs']} run(s)"
                 + ("" if idx["errors"] else ", each opens as training opens it"))
    lines += [f"    - {e}" for e in idx["errors"]] + [f"    note: {n}" for n in idx["notes"]]
    shards = sum(g["shards"] for g in groups.values())
    samples = sum(g["samples"] for g in groups.values())
    nbytes = sum(g["bytes"] for g in groups.values())
    problems = sum(len(g["errors"]) + (not g.get("fresh", {}).get("ok", True)) for g in groups.values())
    problems += len(idx["errors"])
    verdict = "OK" if report["ok"] else f"FAILED ({problems} problem(s))"
    lines.append(f"{verdict}: {len(groups)} groups, {shards} shards, {samples} samples, {_mb(nbytes)} checked")
    return "\n".join(lines)
