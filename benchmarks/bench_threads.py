"""CPU training throughput vs intra-op threads and OpenMP wait policy, optionally beside busy processes.

Each measurement is a fresh process (OpenMP reads OMP_WAIT_POLICY once, when torch loads) that
trains the demo config (configs/demo.yaml) for --steps steps and reports the median samples/s of
its log intervals (the first one, with warm-up, left out). Settings are interleaved rep by rep so
that the load of other programs on a shared machine hits all of them alike; each run is cut at
--cap seconds (a collapsed setting then reports what it managed). ``--busy K`` starts K
``while True: pass`` processes for the whole benchmark: a laptop with something else running.

    python benchmarks/bench_threads.py [--busy 1] [--reps 3] [--steps 60] [--cap 150]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEMO = REPO / "configs" / "demo.yaml"


def child(args: argparse.Namespace) -> None:
    """One training run (not through stages.cli, which would set the wait policy itself)."""
    from trainer.config import load_train_config
    from trainer.loop import train

    train(load_train_config(DEMO, (
        f"run_dir={args.run_dir}", f"data.cache={args.cache}", f"total_steps={args.steps}",
        f"align.stop_step={args.steps // 2}", "log_every=5", f"ckpt_every={10**9}", f"sample_every={10**9}",
        f"threads={args.threads}")))


def measure(cache: Path, threads: int, wait: str, steps: int, cap: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if wait != "default":
        env["OMP_WAIT_POLICY"] = wait
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        try:
            subprocess.run([sys.executable, __file__, "--child", "--cache", str(cache), "--run-dir", str(run),
                            "--threads", str(threads), "--steps", str(steps)], env=env, timeout=cap,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            pass
        wall = time.perf_counter() - t0
        path = run / "stats.jsonl"
        recs = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    rates = [r["samples_per_s"] for r in recs[1:]]
    return {"threads": threads, "wait": wait, "load_before": round(load, 2), "wall_s": round(wall, 1),
            "steps_done": recs[-1]["step"] if recs else 0,
            "median_samples_per_s": statistics.median(rates) if rates else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busy", type=int, default=1, help="busy-loop processes beside the runs")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--cap", type=float, default=150.0, help="seconds per run")
    ap.add_argument("--cache", default="", help="a demo cache (default: preprocess one into a temp dir)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", default="", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    from benchmarks.common import write

    cores = len(os.sched_getaffinity(0))
    settings = [(1, "default"), (1, "PASSIVE"), (cores, "default"), (cores, "PASSIVE")]
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache) if args.cache else Path(tmp) / "cache"
        if not args.cache:
            subprocess.run([sys.executable, "-m", "stages.cli", "preprocess", "--config", str(DEMO), "--set",
                            f"out={cache}"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
        runs = []
        try:
            for rep in range(args.reps):
                for threads, wait in settings:
                    runs.append({"rep": rep, **measure(cache, threads, wait, args.steps, args.cap)})
                    print(json.dumps(runs[-1]), flush=True)
        finally:
            for p in busy:
                p.kill()
    summary = {f"threads={t} wait={w}": statistics.median(
        [r["median_samples_per_s"] or 0.0 for r in runs if (r["threads"], r["wait"]) == (t, w)]) for t, w in settings}
    result = {"benchmark": "threads", "cores": cores, "busy_processes": args.busy, "steps": args.steps,
              "cap_s": args.cap, "config": "configs/demo.yaml", "median_samples_per_s": summary, "runs": runs,
              "note": "a run that hit the cap before its second log interval counts as 0 samples/s"}
    print(json.dumps(summary, indent=2))
    print(f"wrote {write('threads-cpu', result, args.out)}")


if __name__ == "__main__":
    main()
