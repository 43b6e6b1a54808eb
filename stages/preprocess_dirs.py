"""Group directories of a preprocess run: created and probed for writability before any rank
writes, and cleared of the temp files a killed run left (cache root, groups, progress, codec)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pipeline import dist
from pipeline.cache import groups
from pipeline.cache.schema import CODEC_DIR
from pipeline.cache.shards import remove_stale_temps
from stages.preprocess_engine import PreprocessError

log = logging.getLogger(__name__)


def remove_temps(root: Path | None, plans: list) -> list[Path]:
    """Remove the temp files a killed run left in the cache root and in the plans' group directories."""
    removed = groups.remove_index_temps(root) if root is not None else []
    for p in plans:
        for folder in (p.dir, p.dir / "progress", p.dir / CODEC_DIR):
            removed += remove_stale_temps(folder) if folder.is_dir() else []
    for stale in removed:
        log.info("removed %s left by an interrupted run", stale)
    return removed


def prepare_dirs(d: dist.DistInfo, pending: list, root: Path | None = None,
                 plans: list | None = None) -> None:
    """Create the pending groups' directories; rank 0 removes the temp files a killed run left in
    the cache ``root`` and in every group of ``plans`` (default: the pending ones)."""
    _make_dirs(pending)
    if d.is_main:  # before any rank writes: a temp file from a killed run must not outlive the rerun
        remove_temps(root, plans if plans is not None else pending)
    dist.barrier()


def _make_dirs(plans: list) -> None:
    for p in plans:
        try:
            (p.dir / "progress").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PreprocessError(f"cannot create the cache directory {p.dir}: {e.strerror or e}") from None
        if not dist_writable(p.dir):
            raise PreprocessError(f"cache directory {p.dir} is not writable")


def dist_writable(path: Path) -> bool:
    probe = path / f".write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False
