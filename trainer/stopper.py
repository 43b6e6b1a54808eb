"""The training loop's side of ``align.stop``: the phase list, probes when due, the fired step's state.

    stopper = StopController(cfg, d, run_dir)
    stopper.load_state_dict(ckpt["train_state"].get("stop"))     # on resume
    phases = stopper.phases()
    ... after completing step s:
    if (record := stopper.after_step(s, model, cache, scaler)) is not None:
        stats.write(record); phases = stopper.phases()             # Phase II from s if it fired

The fired step (and every probe's cosines) live in the checkpoint's ``train_state["stop"]``: a
resumed run takes them from there and never probes or decides again for steps it has done. With
a fixed step (``StepStop``) the controller does nothing but build the phase list. Rank 0 also writes
``stop.json`` (trigger, probes, fired step) and ``probe.png`` (cosine per t and mean vs step) in the
run directory, next to ``loss.png``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.cache.reader import Cache
from pipeline.cache.shards import atomic_write_json
from pipeline.configs import to_dict
from pipeline.dist import DistInfo
from trainer.config import TrainConfig
from trainer.models.sit import SiT
from trainer.phases import Phase, build_phases
from trainer.probe import run_probe
from trainer.stop import ProbeRecord, TriggerStop

log = logging.getLogger(__name__)


class StopController:
    def __init__(self, cfg: TrainConfig, d: DistInfo, run_dir: str | Path):
        self.cfg, self.d, self.run_dir = cfg, d, Path(run_dir)
        self.stop = cfg.align.stop
        self.fired_step: int | None = None
        self.history: list[ProbeRecord] = []

    def phases(self) -> tuple[Phase, ...]:
        return build_phases(self.cfg.align, self.fired_step)

    def state_dict(self) -> dict[str, Any]:
        return {"fired_step": self.fired_step, "probes": [r.to_dict() for r in self.history]}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        fired = state.get("fired_step")
        self.fired_step = None if fired is None else int(fired)
        self.history = [ProbeRecord.from_dict(r) for r in state.get("probes", [])]
        if self.fired_step is not None:
            log.info("the %s trigger fired at step %d (from the checkpoint): Phase II from there",
                     getattr(self.stop, "trigger", "stop"), self.fired_step)

    def after_step(self, step: int, model: SiT, cache: Cache, scaler=None) -> dict[str, Any] | None:
        """Probe after completing ``step`` steps when due; returns the stats.jsonl record (None: no probe).

        ``scaler``: the fp16 GradScaler, whose scale keeps the probe's gradients from underflowing.
        """
        stop = self.stop
        if not isinstance(stop, TriggerStop) or self.fired_step is not None or not stop.due(step):
            return None
        loss_scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        result = run_probe(model, self.cfg, stop, cache, step, self.d, loss_scale)
        self.history.append(result.record)
        fired = stop.fires(self.history)
        if fired:
            self.fired_step = step
        cos = " | ".join(f"t={t:g} {c:+.4f}" for t, c in zip(result.record.times, result.record.cos))
        log.info("step %d: probe (%s, block %d, %d samples, %.1f s): %s | mean %+.4f vs threshold %+.4f: %s",
                 step, stop.trigger, stop.block, result.samples, result.seconds, cos, result.record.mean,
                 stop.threshold, f"FIRED, Phase II from step {step}" if fired else "alignment continues")
        if self.d.is_main:
            atomic_write_json(self.run_dir / "stop.json", {"trigger": to_dict(stop), **self.state_dict()})
            probe_plot(self.history, self.run_dir / "probe.png", stop.threshold, self.fired_step)
        return {"step": step, "probe": {**{k: v for k, v in result.to_dict().items() if k != "step"},
                                        "fired": fired}}


def probe_plot(history: list[ProbeRecord], path: Path, threshold: float, fired_step: int | None) -> Path | None:
    """Cosine per t (thin) and their mean (bold) against the step; threshold and fired step dashed."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r.step for r in history]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for k, t in enumerate(history[0].times):
        ax.plot(steps, [r.cos[k] for r in history], marker=".", lw=1, label=f"t = {t:g}")
    ax.plot(steps, [r.mean for r in history], marker="o", lw=2.2, color="k", label="mean")
    ax.axhline(threshold, color="r", ls="--", lw=0.9, label=f"threshold {threshold:g}")
    ax.axhline(0.0, color="0.6", lw=0.6)
    if fired_step is not None:
        ax.axvline(fired_step, color="k", ls="--", lw=0.8, label=f"fired at {fired_step}")
    ax.set_xlabel("step")
    ax.set_ylabel("cos(∇ denoise, ∇ alignment)")
    ax.set_title("gradient angle at the probe block")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
