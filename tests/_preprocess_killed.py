"""Helper for test_preprocess: run the tiny preprocess and SIGKILL this process mid-shard.

    python tests/_preprocess_killed.py OUT KILL_AFTER_ADDS [key=value ...]

``ShardWriter.add`` is wrapped so that the process kills itself (no cleanup, no finally blocks)
right after its KILL_AFTER_ADDS-th sample, i.e. while a shard is half written. Nothing in the
pipeline is aware of this: it is the same as a ``kill -9`` at that moment.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import tiny_preprocess_config  # noqa: E402

from pipeline import shards  # noqa: E402
from stages.preprocess import run  # noqa: E402


def main() -> None:
    out, kill_after = sys.argv[1], int(sys.argv[2])
    overrides = {k: json.loads(v) for k, v in (a.split("=", 1) for a in sys.argv[3:])}
    original = shards.ShardWriter.add
    count = 0

    def add(self, key, members):
        nonlocal count
        original(self, key, members)
        count += 1
        if count == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    shards.ShardWriter.add = add
    run(tiny_preprocess_config(Path(out), **overrides))
    print("finished without being killed", flush=True)


if __name__ == "__main__":
    main()
