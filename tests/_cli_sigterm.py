"""Helper for test_cli_messages: ``haste preprocess`` (tiny config) through the real CLI entry
point, sent SIGTERM by the process itself while a teacher shard is half written.

    python tests/_cli_sigterm.py OUT KILL_AFTER

``ShardWriter.add`` is wrapped so that after the KILL_AFTER-th teacher sample the process
signals itself (from the writer thread, as an outside ``kill`` would land at any point); the
CLI must turn it into one log line, clean up and exit 143.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # this checkout

from conftest import tiny_preprocess_config  # noqa: E402

from pipeline.cache import shards  # noqa: E402
from stages.cli import main as cli  # noqa: E402


def main() -> None:
    out, kill_after = sys.argv[1], int(sys.argv[2])
    original = shards.ShardWriter.add
    lock = threading.Lock()
    count = 0

    def add(self, key, members):
        nonlocal count
        original(self, key, members)
        if self.path.parent.parent.name != "teacher":
            return
        with lock:
            count += 1
            if count == kill_after:
                os.kill(os.getpid(), signal.SIGTERM)

    shards.ShardWriter.add = add
    cfg = tiny_preprocess_config(Path(out))
    sets = [f"{k}={getattr(cfg, k)}" for k in ("source", "synthetic_classes", "out", "resolution", "shard_size",
                                                 "vae", "teacher", "batch_size", "num_workers", "device", "codec")]
    cli(["preprocess", *[a for s in sets for a in ("--set", s)]])


if __name__ == "__main__":
    main()
