"""Training phases as data. HASTE = Phase I (denoise + alignment) until tau, then Phase II.

tau is a fixed step or the step a trigger fired at (``trainer/stop.py``).

The official code tests ``global_step >= early_stop_point`` with the step counted before the
increment (SPEC §2.4), so exactly tau optimizer steps use the alignment losses. ``phase_at``
reproduces that boundary: the step with 0-based index s is in Phase I iff s < tau.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from trainer.config import AlignConfig
from trainer.stop import phase_two_start


@dataclass(frozen=True, kw_only=True)
class Phase:
    name: str
    start: int                     # first step (0-based optimizer step index) of the phase
    end: int | None                # first step after it; None = to the end of training
    feat_weight: float = 0.0
    attn_weight: float = 0.0

    @property
    def needs_features(self) -> bool:
        return self.feat_weight > 0

    @property
    def needs_attention(self) -> bool:
        return self.attn_weight > 0

    @property
    def needs_teacher(self) -> bool:
        return self.needs_features or self.needs_attention


def build_phases(align: AlignConfig, fired_step: int | None = None) -> tuple[Phase, ...]:
    """Phase I [0, tau) with the alignment weights, then Phase II [tau, inf) denoising only.

    tau is ``align.stop``'s fixed step, or for a trigger the step it fired at (``fired_step``, from
    the run's state), else its ``max_step`` (None: Phase I until it fires). A pure function of its
    arguments, so ``phase_at`` stays pure; the loop rebuilds the list when the trigger fires.
    """
    tau = phase_two_start(align.stop, fired_step)
    aligned = align.feat_weight > 0 or align.attn_weight > 0
    if not aligned or tau == 0:
        return (Phase(name="denoise", start=0, end=None),)
    phase1 = Phase(name="I", start=0, end=tau, feat_weight=align.feat_weight, attn_weight=align.attn_weight)
    if tau is None:
        return (phase1,)
    return phase1, Phase(name="II", start=tau, end=None)


def phase_two_boundary(phases: Sequence[Phase]) -> int | None:
    """Where Phase II starts in a phase list (None when it never does): the loss plot's dashed line."""
    return next((p.start for p in phases if p.name == "II"), None)


def phase_at(step: int, phases: Sequence[Phase]) -> Phase:
    """The phase that the optimizer step with 0-based index ``step`` belongs to."""
    for phase in phases:
        if phase.start <= step and (phase.end is None or step < phase.end):
            return phase
    raise ValueError(f"no phase covers step {step}: {phases}")
