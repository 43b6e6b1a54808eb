"""What a run logs: loss accumulators between log lines (``Meter``) and ``stats.jsonl`` (``StatsWriter``).

Both survive kills: the meter's partial interval travels in each checkpoint, so a resume from a
step that is not on a log boundary writes the same records as an uninterrupted run; the stats
file is appended one whole line per write, read back tolerating a torn last line, and rewritten
on resume only atomically.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.cache.shards import atomic_write_bytes
from trainer.checkpoint import TrainingError, disk_full_named

log = logging.getLogger(__name__)


class Meter:
    """Accumulates losses on the device; syncs only at log time. Remembers the first non-finite step."""

    def __init__(self, device: torch.device):
        self.device, self.sums, self.counts = device, {}, {}
        self.bad_step = torch.tensor(-1, device=device)
        self.t0, self.steps_since = time.perf_counter(), 0

    def start(self) -> None:
        """Start the clock of samples/s at the first step (not at setup, resume or preview repair)."""
        self.t0, self.steps_since = time.perf_counter(), 0

    def add(self, losses: dict[str, torch.Tensor], step: int) -> None:
        for k, v in losses.items():  # per-key counts: an interval may span tau (feat/attn on only part of it)
            self.sums[k] = self.sums.get(k, 0) + v.float()
            self.counts[k] = self.counts.get(k, 0) + 1
        finite = torch.isfinite(losses["loss"])
        # new_full is a fill kernel; torch.tensor(step, device=cuda) would be a blocking copy (a host sync per step)
        self.bad_step = torch.where((self.bad_step < 0) & ~finite, self.bad_step.new_full((), step), self.bad_step)
        self.steps_since += 1

    def raise_if_nonfinite(self) -> None:
        bad = self.bad_step.clone()
        if torch.distributed.is_initialized():  # on the device: nccl cannot reduce CPU tensors
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        bad = int(bad.item())
        if bad >= 0:  # bad is the 0-based step index; logs and checkpoints count completed steps
            raise TrainingError(f"non-finite loss at step {bad + 1}; stopping. The last good checkpoint (step <= {bad}) "
                                "is kept; lower lr, check the data, or use precision=fp32 to investigate.")

    def flush(self, step: int, phase_name: str, global_batch: int) -> dict[str, Any]:
        """The record of the interval that ends at ``step`` (losses averaged over steps and ranks)."""
        self.raise_if_nonfinite()
        means = {k: v / self.counts[k] for k, v in self.sums.items()}
        if torch.distributed.is_initialized():  # SUM / world: gloo has no ReduceOp.AVG
            world = torch.distributed.get_world_size()
            for v in means.values():
                torch.distributed.all_reduce(v, op=torch.distributed.ReduceOp.SUM)
                v.div_(world)
        dt = time.perf_counter() - self.t0
        record = {"step": step, "phase": phase_name, **{k: round(float(v), 6) for k, v in means.items()},
                  "samples_per_s": round(global_batch * self.steps_since / max(dt, 1e-9), 2),
                  "mem_gb": round(memory_gb(self.device), 3)}
        self.sums, self.counts, self.t0, self.steps_since = {}, {}, time.perf_counter(), 0
        return record

    def state_dict(self) -> dict[str, Any]:
        """The partial interval of every rank (a collective under torchrun: call it on all ranks).

        {"sums": {key: (world,) float32}, "counts": {key: int}}: each rank's sums, exact.
        """
        keys = sorted(self.sums)
        if not keys:
            return {"sums": {}, "counts": {}}
        mine = torch.stack([torch.as_tensor(self.sums[k], device=self.device).float() for k in keys])  # (K,)
        if torch.distributed.is_initialized():
            gathered = [torch.empty_like(mine) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(gathered, mine)
        else:
            gathered = [mine]
        every = torch.stack(gathered, dim=1).cpu()  # (K, world)
        return {"sums": {k: every[i].clone() for i, k in enumerate(keys)}, "counts": {k: self.counts[k] for k in keys}}

    def load_state_dict(self, state: dict[str, Any], rank: int, world_size: int) -> None:
        """Continue a partial interval. Another world size takes the mean over the saved ranks (the
        data order differs then anyway); timing restarts (samples/s counts this process only)."""
        self.sums, self.counts = {}, dict(state.get("counts", {}))
        for k, per_rank in state.get("sums", {}).items():
            v = per_rank[rank] if per_rank.numel() == world_size else per_rank.mean()
            self.sums[k] = v.to(self.device)


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux -> GB


class StatsWriter:
    """Appends one JSON object per log interval to ``stats.jsonl`` (what tests and plots read)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.path = Path(run_dir) / "stats.jsonl"
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with disk_full_named(self.path), open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")  # one write: a kill can tear only this last line

    def read(self) -> list[dict[str, Any]]:
        return self._read()[0]

    def _read(self) -> tuple[list[dict[str, Any]], bool]:
        """(records, clean): unreadable lines (a line torn by a kill) are skipped with a warning."""
        if not self.path.is_file():
            return [], True
        records, clean = [], True
        text = self.path.read_text(errors="replace")
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                    raise ValueError("not a stats record")
                records.append(rec)
            except ValueError:
                clean = False
                log.warning("%s line %d is unreadable (torn by a kill?); skipping it", self.path, i)
        return records, clean and (not text or text.endswith("\n"))

    def truncate_after(self, step: int) -> None:
        """On resume, drop records logged after the checkpoint we restart from, and torn lines.

        Rewritten atomically (temp + rename), and only when something is dropped: a kill during
        the rewrite leaves the old file, never a truncated history.
        """
        if not (self.enabled and self.path.is_file()):
            return
        records, clean = self._read()
        keep = [r for r in records if r["step"] <= step]
        if clean and len(keep) == len(records):
            return
        with disk_full_named(self.path):
            atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in keep).encode())
        if not clean:
            log.warning("repaired %s: kept %d records up to step %d", self.path, len(keep), step)
