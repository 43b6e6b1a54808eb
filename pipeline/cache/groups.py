"""Content-addressed cache groups and the top-level ``index.json``.

A group directory is named by a hash of everything that determines its bytes: the latents
group by (dataset, transform, VAE, dtype, shard size), the teacher group by (dataset,
transform, teacher, layers, codec, dtype, shard size). Changing only the teacher codec therefore
reuses the latents; changing the dataset makes new groups of both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.cache.schema import LATENTS, SCHEMA_VERSION, TEACHER, TEXT, CacheFormatError, read_manifest
from pipeline.cache.shards import atomic_write_json, remove_stale_temps

log = logging.getLogger(__name__)

INDEX = "index.json"


def group_key(identity: dict[str, Any]) -> str:
    blob = json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def group_dir(root: Path, kind: str, key: str) -> Path:
    return Path(root) / kind / key


def is_complete(gdir: Path) -> bool:
    """A group is complete once its manifest exists (written last, after every shard)."""
    return (Path(gdir) / "manifest.json").is_file()


def producer_info() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("haste-pipeline")
    except PackageNotFoundError:
        pkg = "unknown"
    return {"package": "haste-pipeline", "version": pkg, "git_sha": git_sha(),
            "created_unix": int(time.time()), "argv": sys.argv[1:], "host": os.uname().nodename}


def git_sha() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def read_index(root: Path) -> dict[str, Any]:
    path = Path(root) / INDEX
    if not path.is_file():
        return {"schema_version": SCHEMA_VERSION, "groups": {}, "runs": []}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CacheFormatError(f"{path} is not valid JSON ({e})") from None


def update_index(root: Path, latents_key: str, teacher_key: str | None, summary: dict[str, Any],
                 text_key: str | None = None) -> None:
    """Record a completed (latents, teacher[, text]) run; the newest is what readers open by default."""
    index = read_index(root)
    for kind, key in ((LATENTS, latents_key), (TEACHER, teacher_key), (TEXT, text_key)):
        if key is None:
            continue
        m = read_manifest(group_dir(root, kind, key))
        index["groups"][f"{kind}/{key}"] = {
            "kind": kind, "num_samples": m.num_samples, "num_shards": len(m.shards),
            "total_bytes": sum(s.bytes for s in m.shards), "source": m.source.get("location"),
            "models": {k: v.get("name") for k, v in m.models.items()},
        }
    run = {"latents": latents_key, "teacher": teacher_key, **({"text": text_key} if text_key else {}), **summary}
    index["runs"] = [r for r in index["runs"]
                     if (r["latents"], r["teacher"], r.get("text")) != (latents_key, teacher_key, text_key)]
    index["runs"].append(run)
    atomic_write_json(Path(root) / INDEX, index)


def ensure_indexed(root: Path, latents_key: str, teacher_key: str | None, summary: dict[str, Any],
                   text_key: str | None = None) -> bool:
    """Record complete groups that index.json misses (a run killed between its manifests and the index
    write); True when it had to. Stale index temp files go too."""
    remove_index_temps(root)
    if is_indexed(root, latents_key, teacher_key, text_key):
        return False
    update_index(root, latents_key, teacher_key, summary, text_key=text_key)
    log.info("the groups were complete but not recorded in %s (an earlier run stopped before writing it): "
             "recorded them", Path(root) / INDEX)
    return True


def is_indexed(root: Path, latents_key: str, teacher_key: str | None, text_key: str | None = None) -> bool:
    """Whether index.json records the groups and their run (a kill before its write leaves them out)."""
    index = read_index(root)
    names = [f"{LATENTS}/{latents_key}"] + ([f"{TEACHER}/{teacher_key}"] if teacher_key else []) + (
        [f"{TEXT}/{text_key}"] if text_key else [])
    return all(n in index.get("groups", {}) for n in names) and any(
        (r.get("latents"), r.get("teacher"), r.get("text")) == (latents_key, teacher_key, text_key)
        for r in index.get("runs", []))


def remove_index_temps(root: Path) -> list[Path]:
    """The ``.index.json.tmp<pid>`` files a run killed inside the index write left in the cache root."""
    return remove_stale_temps(Path(root), INDEX) if Path(root).is_dir() else []
