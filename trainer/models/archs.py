"""The networks the trainer builds, by name: the ``arch`` of a ``model:`` config section.

    sit     SiT (class-conditional): ModelConfig, SIT_PRESETS; conditioned on class labels
    mmdit   MM-DiT (text-conditional): MMDiTConfig, MMDIT_PRESETS; conditioned on caption encodings

Everything else (loop, engine, phases, checkpoints, probe) is shared; what differs by arch is the
config class, its presets, the module and the conditioning kind, which this table holds as data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn as nn

from trainer.models.mmdit import MMDIT_PRESETS, MMDiT, MMDiTConfig
from trainer.models.sit import SIT_PRESETS, ModelConfig, SiT

AnyModelConfig = ModelConfig | MMDiTConfig
Network = SiT | MMDiT
Conditioning = Literal["class", "text"]


@dataclass(frozen=True)
class Arch:
    config: type[AnyModelConfig]
    presets: dict[str, dict]
    network: type[nn.Module]
    conditioning: Conditioning   # what the forward's third argument is: labels (N,) or context (N, L, D)
    blocks: str                  # the ModuleList of transformer blocks (the probe's block index)


ARCHS: dict[str, Arch] = {
    "sit": Arch(ModelConfig, SIT_PRESETS, SiT, "class", "blocks"),
    "mmdit": Arch(MMDiTConfig, MMDIT_PRESETS, MMDiT, "text", "joint_blocks"),
}


def arch_of(cfg: AnyModelConfig) -> Arch:
    return ARCHS[cfg.arch]


def build_network(cfg: AnyModelConfig) -> Network:
    """The module of ``cfg`` (initialised from the global RNG, as each network's constructor does)."""
    return arch_of(cfg).network(cfg)


def transformer_blocks(model: Network) -> nn.ModuleList:
    """The model's transformer blocks, 0-based as ``align.*`` counts them (MM-DiT: the joint blocks)."""
    return getattr(model, arch_of(model.cfg).blocks)


def arch_for_preset(preset: str | None) -> str:
    """The arch whose presets hold ``preset`` (preset names are unique across archs); "sit" otherwise."""
    return next((name for name, a in ARCHS.items() if preset in a.presets), "sit")
