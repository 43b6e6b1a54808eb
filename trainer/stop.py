"""When alignment stops: a fixed step (the official τ) or a trigger decided from probes during training.

``align.stop`` is one of

    stop: {step: 250000}                   # StepStop: Phase II from step τ on (null = never; 0 = vanilla)
    stop: {trigger: grad-angle}            # TriggerStop with the paper's values (App. A.2), or override:
    stop: {trigger: grad-angle, start: 50000, every: 10000, samples: 2048, times: [0.02, 0.1, 0.5, 0.8],
           block: 4, threshold: -0.05, max_step: null, batch_size: 32}

``align.stop_step: N`` (the original field) stays accepted as a legacy alias of ``stop: {step: N}``,
in YAML, in ``--set`` and in the configs saved by older runs (``normalise_saved_config``), so those
runs resume without a spurious "config changed" refusal.

The grad-angle trigger (paper App. A.2; SPEC §6, "Other ablations"; no public code implements it):
after completing step s, with s = start, start + every, ..., the probe (``trainer/probe.py``)
measures, for each t in ``times``, the cosine between the gradients of the denoising loss and of the
alignment loss with respect to the parameters of block ``block`` (0-based: 4 = "the 5th block"),
summed over ``samples`` cached training samples. The trigger fires when the mean cosine over the
times is below ``threshold``: steps [0, s) were Phase I, Phase II starts at s. ``max_step`` bounds
it: if it has not fired by then, Phase II starts at ``max_step`` (null: alignment may run to the end).

Triggers are data: ``TRIGGERS`` maps a name to the decision over the probe history, so another rule
(e.g. a patience over several probes, or another threshold statistic) is one entry, not a branch.
This module is pure (no torch): config, schedule and decision only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline import configs
from pipeline.configs import ConfigError, check


@dataclass(frozen=True, kw_only=True)
class StepStop:
    step: int | None = 250_000      # tau: alignment for steps [0, tau); None = never stop; 0 = no alignment

    def __post_init__(self) -> None:
        check(self.step is None or self.step >= 0, "align.stop.step", "must be >= 0 or null")


@dataclass(frozen=True, kw_only=True)
class ProbeRecord:
    """One probe: cosine per t (in ``times`` order) and their mean. NaN when a gradient was zero."""

    step: int
    times: tuple[float, ...]
    cos: tuple[float, ...]
    mean: float

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "times": list(self.times), "cos": list(self.cos), "mean": self.mean}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ProbeRecord:
        return cls(step=int(d["step"]), times=tuple(d["times"]), cos=tuple(d["cos"]), mean=float(d["mean"]))


Decision = Callable[["TriggerStop", Sequence[ProbeRecord]], bool]


def grad_angle_fires(stop: TriggerStop, history: Sequence[ProbeRecord]) -> bool:
    """The paper's rule: the newest probe's mean cosine over the times is below the threshold."""
    mean = history[-1].mean
    return not math.isnan(mean) and mean < stop.threshold


# name -> decision over the probe history (oldest first, newest last). Add a rule here.
TRIGGERS: dict[str, Decision] = {
    "grad-angle": grad_angle_fires,
}


@dataclass(frozen=True, kw_only=True)
class TriggerStop:
    trigger: str = "grad-angle"
    start: int = 50_000             # first probe after this many completed steps
    every: int = 10_000             # then every this many steps
    samples: int = 2048             # cached training samples per probe (split over ranks)
    times: tuple[float, ...] = (0.02, 0.1, 0.5, 0.8)
    block: int = 4                  # 0-based block whose parameters' gradients are compared (paper: 5th)
    threshold: float = -0.05        # fires when the mean cosine over the times is below this
    max_step: int | None = None     # Phase II from here if the trigger has not fired; None = never forced
    batch_size: int = 32            # probe samples per forward/backward on one rank (memory only)

    def __post_init__(self) -> None:
        check(self.trigger in TRIGGERS, "align.stop.trigger",
              f"unknown trigger {self.trigger!r} (known: {', '.join(TRIGGERS)})")
        check(self.start >= 1, "align.stop.start", "must be >= 1 (probes run after a completed step)")
        check(self.every >= 1, "align.stop.every", "must be >= 1")
        check(self.samples >= 1, "align.stop.samples", "must be >= 1")
        check(len(self.times) > 0 and all(0.0 < t < 1.0 for t in self.times), "align.stop.times",
              f"must be a non-empty list of times in (0, 1), got {list(self.times)}")
        check(len(set(self.times)) == len(self.times), "align.stop.times", "must be distinct")
        check(self.block >= 0, "align.stop.block", "must be >= 0 (0-based)")
        check(-1.0 <= self.threshold <= 1.0, "align.stop.threshold", "must be a cosine in [-1, 1]")
        check(self.max_step is None or self.max_step > self.start, "align.stop.max_step",
              f"must be > start={self.start} (or null)")
        check(self.batch_size >= 1, "align.stop.batch_size", "must be >= 1")

    def due(self, step: int) -> bool:
        """Whether a probe runs after completing ``step`` steps (while the trigger has not fired)."""
        in_window = self.max_step is None or step < self.max_step
        return step >= self.start and (step - self.start) % self.every == 0 and in_window

    def fires(self, history: Sequence[ProbeRecord]) -> bool:
        return bool(history) and TRIGGERS[self.trigger](self, history)


StopConfig = StepStop | TriggerStop

# Fields of a trigger that only change memory use, never the result (beyond float summation order).
STOP_RESUME_SAFE = frozenset({"align.stop.batch_size"})


def parse_stop(raw: Any) -> StopConfig:
    """``{step: N}`` -> StepStop, ``{trigger: ...}`` -> TriggerStop (a built one passes through)."""
    if isinstance(raw, (StepStop, TriggerStop)):
        return raw
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config field 'align.stop': expected {{step: N}} or {{trigger: NAME, ...}}, got {raw!r}")
    if "trigger" in raw and "step" in raw:
        raise ConfigError("config field 'align.stop': give either 'step' (a fixed tau) or 'trigger', not both")
    cls = TriggerStop if "trigger" in raw else StepStop
    return configs.build(cls, raw, prefix="align.stop.")


def normalise_align(section: Mapping[str, Any] | None) -> dict[str, Any]:
    """An ``align:`` section with the legacy ``stop_step`` mapped to ``stop`` and ``stop`` parsed."""
    section = dict(section or {})
    if "stop_step" in section:
        if "stop" in section:
            raise ConfigError("config fields 'align.stop_step' and 'align.stop': stop_step is the legacy form of "
                              "stop: {step: N}; give one of them")
        section["stop"] = {"step": section.pop("stop_step")}
    if "stop" in section:
        section["stop"] = parse_stop(section["stop"])
    return section


def normalise_saved_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A saved config dict (config.json, checkpoint sidecar) in today's form: ``align.stop_step: N``
    becomes ``align.stop: {step: N}``, so a run saved before ``align.stop`` existed compares equal."""
    out = dict(cfg)
    align = dict(out.get("align") or {})
    if "stop_step" in align and "stop" not in align:
        align["stop"] = {"step": align.pop("stop_step")}
        out["align"] = align
    return out


def phase_two_start(stop: StopConfig, fired_step: int | None) -> int | None:
    """The first step of Phase II: τ, the step the trigger fired at, else its max_step (None = not yet/never)."""
    if isinstance(stop, StepStop):
        return stop.step
    return fired_step if fired_step is not None else stop.max_step


def check_trigger_fits(stop: StopConfig, *, depth: int, feat_weight: float, attn_weight: float,
                       feature_block: int, student_blocks: Sequence[int]) -> None:
    """A trigger needs alignment to stop and an alignment gradient at its block (else the cosine is 0/0)."""
    if not isinstance(stop, TriggerStop):
        return
    check(stop.block < depth, "align.stop.block", f"must be in [0, {depth}) for a depth-{depth} model")
    deepest = max([feature_block] * (feat_weight > 0) + list(student_blocks) * (attn_weight > 0), default=-1)
    check(deepest >= 0, "align.stop", "a trigger needs alignment (feat_weight or attn_weight > 0)")
    check(stop.block <= deepest, "align.stop.block",
          f"block {stop.block} gets no alignment gradient: the deepest aligned block is {deepest}")
