"""Stage 2: teacher-free two-phase training from a preprocess cache (``haste train``)."""

from __future__ import annotations

from typing import Any

from trainer.config import TrainConfig
from trainer.loop import train


def run(cfg: TrainConfig) -> dict[str, Any]:
    return train(cfg)
