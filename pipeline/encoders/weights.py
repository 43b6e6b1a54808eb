"""Where model weights come from: hub ids, local files/dirs, or seeded random init.

A model is named by one string:
  ``random:<preset>``         seeded random init of the real architecture (tests, bench)
  ``builtin:<name>``          a trivially defined stand-in with the same interface (the offline demo)
  ``/path/to/file_or_dir``    local weights (timm .pth/.safetensors file; diffusers directory)
  ``org/name`` or ``name.tag`` a hub id, resolved from the local Hugging Face cache when present

Offline use must fail fast and clearly: when ``HF_HUB_OFFLINE`` is set and the weights are not
cached, we say so at once instead of letting the hub client retry for a minute.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class WeightsError(RuntimeError):
    """Weights cannot be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class WeightsRef:
    name: str                 # as given by the user
    kind: str                 # "random" | "builtin" | "local" | "hub"
    preset: str = ""          # random: preset name
    path: Path | None = None  # local: file or directory

    def descriptor(self, seed: int) -> dict[str, str]:
        """Cheap identity used in cache keys (no model load): name plus content hash where local."""
        if self.kind == "random":
            return {"name": self.name, "seed": str(seed)}
        if self.kind == "builtin":
            return {"name": self.name}
        if self.kind == "local":
            assert self.path is not None
            return {"name": self.name, "files_sha256": hash_files(weight_files(self.path))}
        return {"name": self.name, "revision": cached_revision(self.name) or remote_revision(self.name) or "unresolved"}


def parse(name: str) -> WeightsRef:
    if name.startswith("random:"):
        return WeightsRef(name, "random", preset=name.split(":", 1)[1])
    if name.startswith("builtin:"):
        return WeightsRef(name, "builtin", preset=name.split(":", 1)[1])
    path = Path(name).expanduser()
    if path.exists():
        return WeightsRef(name, "local", path=path.resolve())
    if name.startswith(("/", "./", "../", "~")) or name.endswith(WEIGHT_SUFFIXES):
        raise WeightsError(f"weights file or directory not found: {name}")
    return WeightsRef(name, "hub")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def cached_revision(repo_id: str) -> str | None:
    """Commit hash of a hub repo in the local HF cache, or None when it was never downloaded."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    repo_id = repo_id.removeprefix("hf-hub:")
    try:
        for repo in scan_cache_dir().repos:
            if repo.repo_id == repo_id and repo.revisions:
                return sorted(repo.revisions, key=lambda r: r.last_modified)[-1].commit_hash
    except CacheNotFound:
        return None
    return None


def remote_revision(repo_id: str) -> str | None:
    """Commit the hub serves for ``repo_id`` now (None offline or for names without an org).

    The cache key must name the same revision before and after the run downloads the weights;
    otherwise the first online run keys its groups "unresolved" and the rerun rebuilds them.
    """
    repo_id = repo_id.removeprefix("hf-hub:")
    if offline() or "/" not in repo_id:
        return None
    from huggingface_hub import HfApi

    try:
        return HfApi().model_info(repo_id, timeout=30).sha
    except Exception as e:  # network, auth, unknown repo: one actionable line
        raise WeightsError(
            f"cannot resolve hub weights {repo_id!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}. "
            "Check the name and the network, or pass a local file/directory "
            "(with HF_HUB_OFFLINE=1 for offline use).") from None


def require_hub(repo_id: str, what: str) -> bool:
    """Check a hub id can be resolved; return True when it is already cached (load offline)."""
    if cached_revision(repo_id) is not None:
        return True
    if offline():
        raise WeightsError(
            f"{what} weights {repo_id!r} are not in the local Hugging Face cache and HF_HUB_OFFLINE is set. "
            f"Download them on a connected machine (`huggingface-cli download {repo_id}`) and copy "
            f"~/.cache/huggingface, or pass a local file/directory instead of the hub id.")
    return False


def weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES or p.name == "config.json")
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise WeightsError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) found under {path}")
    return files


def hash_files(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def state_dict_sha256(module: torch.nn.Module) -> str:
    """Content hash of the loaded weights (names, dtypes, shapes, values), format-independent."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def build_random(ref: WeightsRef, presets: dict, seed: int, build, what: str) -> torch.nn.Module:
    """Seeded random init of a named preset; the global RNG is left untouched."""
    if ref.preset not in presets:
        raise WeightsError(f"unknown random {what} preset {ref.preset!r} (known: {list(presets)})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(**presets[ref.preset])
