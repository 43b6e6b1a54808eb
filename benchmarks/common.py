"""Shared helpers for the benchmarks: timing by interleaved medians, JSON output, environment."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(fns: dict[str, Callable[[], None]], reps: int, warmup: int,
                        device: torch.device) -> dict[str, float]:
    """Median seconds per call of each fn, measured round-robin so machine noise hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def step_peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes of tensor memory one call allocates above what was allocated when it began.

    CUDA: the caching allocator's peak statistic. CPU, which keeps no such statistic: the
    profiler's allocation events (every allocation and free through PyTorch's CPU allocator,
    signed sizes), replayed in time order. Allocations outside that allocator (e.g. oneDNN
    scratch space) are not seen.
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    now = peak = 0
    for _, _, nbytes in sorted((e.start_ns(), i, e.nbytes()) for i, e in enumerate(events)):
        now += nbytes
        peak = max(peak, now)
    return peak


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a storage shared by views counts once)."""
    storages = {}
    for t in tensors:
        s = t.untyped_storage()
        storages[(s.device, s.data_ptr())] = s.nbytes()
    return sum(storages.values())


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "load_avg": [round(x, 2) for x in os.getloadavg()]}  # 1/5/15 min: above ~1.5 on 2 cores = busy
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def write(name: str, result: dict, out: str | None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
