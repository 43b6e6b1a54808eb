"""Training progress on rank 0: a tqdm bar when stderr is a terminal, plain log lines otherwise.

Every log interval writes one line (step/total, phase, losses, samples/s, ETA, memory); on a
terminal a bar (step/total, phase, samples/s, ETA) stays below those lines. The ETA is the
remaining steps at the mean rate of this process so far (checkpoints and previews included).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

log = logging.getLogger("trainer.loop")  # the training log lines keep their logger name

LOSS_KEYS = ("loss", "denoise", "feat", "attn")


def format_eta(seconds: float | None) -> str:
    """12s, 3m05s, 2h07m; "?" before anything was measured."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """``start(step)`` before the first step, ``update()`` after every step, ``log_interval(record)`` at
    every log line; used as a context manager, so the bar is closed however the run ends."""

    def __init__(self, total: int, enabled: bool, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.total, self.enabled, self.stream, self.clock = total, enabled, stream or sys.stderr, clock
        self.start_step = self.step = 0
        self.t0 = clock()
        self.bar = self._redirect = None
        self.phase, self.samples_per_s = "", 0.0

    def start(self, step: int) -> None:
        self.start_step = self.step = step
        self.t0 = self.clock()
        if self.enabled and step < self.total and self.stream.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=self.total, initial=step, unit="step", desc="train", file=self.stream,
                            dynamic_ncols=True)
            self._redirect = logging_redirect_tqdm()  # log lines print above the bar instead of through it
            self._redirect.__enter__()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self._redirect.__exit__(None, None, None)
            self.bar = None

    def eta_s(self) -> float | None:
        done = self.step - self.start_step
        if done <= 0:
            return None
        return (self.total - self.step) * (self.clock() - self.t0) / done

    def update(self, step: int, phase_name: str) -> None:
        self.step = step
        if self.bar is not None:
            if phase_name != self.phase:
                self.phase = phase_name
                self._postfix()
            self.bar.update(step - self.bar.n)

    def _postfix(self) -> None:
        rate = f", {self.samples_per_s:.0f} samples/s" if self.samples_per_s else ""
        self.bar.set_postfix_str(f"phase {self.phase}{rate}", refresh=False)

    def log_interval(self, record: dict[str, Any]) -> None:
        """The log line of one stats record; on a terminal also the bar's samples/s."""
        losses = " ".join(f"{k} {record[k]:.4f}" for k in LOSS_KEYS if k in record)
        width = len(str(self.total))
        log.info("step %*d/%d | phase %-2s | %s | %.1f samples/s | ETA %s | mem %.2f GB", width, record["step"],
                 self.total, record["phase"], losses, record["samples_per_s"], format_eta(self.eta_s()),
                 record["mem_gb"])
        if self.bar is not None:
            self.phase, self.samples_per_s = record["phase"], record["samples_per_s"]
            self._postfix()
