"""Helper for test_preprocess: run the tiny preprocess and SIGKILL this process mid-shard.

    python tests/_preprocess_killed.py OUT KILL_AFTER [key=value ...]

``ShardWriter.add`` is wrapped so that the process kills itself (no cleanup, no finally blocks)
right after the KILL_AFTER-th sample written to the teacher group, i.e. while a teacher shard
is half written (the latents writer is wherever its own thread got to). With KILL_AFTER
``index`` it dies inside the index.json write instead: the temp file written, not yet renamed.
Nothing in the pipeline is aware of this: it is the same as a ``kill -9`` at that moment.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]  # this checkout

from conftest import tiny_preprocess_config  # noqa: E402

from pipeline.cache import groups, shards  # noqa: E402
from stages.preprocess import run  # noqa: E402


def main() -> None:
    out, where = sys.argv[1], sys.argv[2]
    overrides = {k: json.loads(v) for k, v in (a.split("=", 1) for a in sys.argv[3:])}
    if where == "index":
        def write_then_die(path, data):
            path = Path(path)
            path.with_name(f".{path.name}.tmp{os.getpid()}").write_text(json.dumps(data))
            os.kill(os.getpid(), signal.SIGKILL)

        groups.atomic_write_json = write_then_die
        run(tiny_preprocess_config(Path(out), **overrides))
        print("finished without being killed", flush=True)
        return
    kill_after = int(where)
    original = shards.ShardWriter.add
    lock = threading.Lock()
    count = 0

    def add(self, key, members):
        nonlocal count
        original(self, key, members)
        if self.path.parent.parent.name != "teacher":
            return
        with lock:  # writer threads may run concurrently; count teacher samples only
            count += 1
            if count == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

    shards.ShardWriter.add = add
    run(tiny_preprocess_config(Path(out), **overrides))
    print("finished without being killed", flush=True)


if __name__ == "__main__":
    main()
