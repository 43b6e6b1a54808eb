"""Training configs: typed, frozen, validated at build time; presets are plain data.

A YAML ``train:`` section (plus ``--set a.b=v`` overrides) builds a ``TrainConfig``. The
``model`` and ``align`` sections may name a ``preset`` whose fields the section then overrides:

    train:
      model: {preset: SiT-B/2}
      align: {preset: haste-sit-b}      # student 2,3,4 <- teacher 7,9,11, depth 5, tau 100K
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline import configs
from pipeline.configs import ConfigError, check
from trainer.models.sit import SIT_PRESETS, ModelConfig
from trainer.stop import StepStop, StopConfig, check_trigger_fits, normalise_align

# Alignment recipes (SPEC §2.3, §2.4, Paper Table 16). Block/layer indices are 0-based.
ALIGN_PRESETS: dict[str, dict[str, Any]] = {
    # L/XL (and the defaults): feature depth 8, student 4-7 <- teacher 8-11, heads 0-11, tau 250K.
    "haste": dict(feat_weight=0.5, attn_weight=0.5, feature_block=7, student_blocks=(4, 5, 6, 7),
                  teacher_layers=(8, 9, 10, 11), student_heads=tuple(range(12)), teacher_heads=tuple(range(12)),
                  stop=StepStop(step=250_000)),
    # The paper's SiT-B recipe, not expressible in the released code: depth 5, 2,3,4 <- 7,9,11, tau 100K.
    "haste-sit-b": dict(feat_weight=0.5, attn_weight=0.5, feature_block=4, student_blocks=(2, 3, 4),
                        teacher_layers=(7, 9, 11), student_heads=tuple(range(12)), teacher_heads=tuple(range(12)),
                        stop=StepStop(step=100_000)),
    # REPA: feature alignment only, never terminated.
    "repa": dict(feat_weight=0.5, attn_weight=0.0, feature_block=7, student_blocks=(), teacher_layers=(),
                 student_heads=(), teacher_heads=(), stop=StepStop(step=None)),
    # Vanilla SiT: denoising loss only from step 0.
    "vanilla": dict(feat_weight=0.0, attn_weight=0.0, student_blocks=(), teacher_layers=(), student_heads=(),
                    teacher_heads=(), stop=StepStop(step=0)),
}


@dataclass(frozen=True, kw_only=True)
class AlignConfig:
    feat_weight: float = 0.5                        # lambda_R (REPA cosine)
    attn_weight: float = 0.5                        # lambda_A (HASTE attention CE)
    feature_block: int = 7                          # 0-based block whose output feeds the projector
    student_blocks: tuple[int, ...] = (4, 5, 6, 7)  # paired index-wise with teacher_layers
    teacher_layers: tuple[int, ...] = (8, 9, 10, 11)
    student_heads: tuple[int, ...] = tuple(range(12))  # paired index-wise with teacher_heads
    teacher_heads: tuple[int, ...] = tuple(range(12))
    stop: StopConfig = StepStop(step=250_000)       # tau (or a trigger, trainer/stop.py); legacy: stop_step

    def __post_init__(self) -> None:
        check(self.feat_weight >= 0, "align.feat_weight", "must be >= 0")
        check(self.attn_weight >= 0, "align.attn_weight", "must be >= 0")
        if self.attn_weight > 0:
            check(len(self.student_blocks) == len(self.teacher_layers) > 0, "align.student_blocks",
                  f"needs one teacher layer per student block (got {self.student_blocks} vs {self.teacher_layers})")
            check(len(self.student_heads) == len(self.teacher_heads) > 0, "align.student_heads",
                  f"needs one teacher head per student head (got {self.student_heads} vs {self.teacher_heads})")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    cache: str = "cache"          # preprocess cache root
    latents: str = ""             # latents group key ("" = newest pair in index.json)
    teacher: str = ""             # teacher group key ("" = newest pair)
    num_workers: int = 2
    shuffle: bool = True
    verify_shards: bool = True    # sha256 of each shard against its manifest when a loader worker first opens it

    def __post_init__(self) -> None:
        check(self.num_workers >= 0, "data.num_workers", "must be >= 0")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    run_dir: str = "runs/demo"
    model: ModelConfig = field(default_factory=ModelConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0
    global_batch_size: int = 256
    grad_accum: int = 1
    total_steps: int = 400_000
    lr: float = 1e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    path: Literal["linear", "cosine"] = "linear"
    time_sampling: Literal["uniform", "lognormal"] = "uniform"
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    tf32: bool = True
    compile: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Literal["auto"] | int = "auto"  # CPU intra-op threads (see engine.choose_threads)
    log_every: int = 100
    ckpt_every: int = 10_000
    keep_ckpts: int = 3
    sample_every: int = 20_000
    sample_steps: int = 50            # preview: Euler ODE steps
    sample_cfg: float = 4.0           # preview CFG scale (official preview setting)
    sample_count: int = 16

    def __post_init__(self) -> None:
        check(self.global_batch_size > 0, "global_batch_size", "must be positive")
        check(self.grad_accum > 0, "grad_accum", "must be positive")
        check(self.global_batch_size % self.grad_accum == 0, "grad_accum",
              f"must divide global_batch_size={self.global_batch_size}")
        check(self.total_steps >= 0, "total_steps", "must be >= 0")
        check(self.lr > 0, "lr", "must be positive")
        check(0.0 <= self.ema_decay < 1.0, "ema_decay", "must be in [0, 1)")
        check(self.threads == "auto" or self.threads > 0, "threads", "must be 'auto' or a positive integer")
        for name in ("log_every", "ckpt_every", "keep_ckpts", "sample_every", "sample_steps", "sample_count"):
            check(getattr(self, name) > 0, name, "must be positive")
        self._check_alignment()

    def _check_alignment(self) -> None:
        a, m = self.align, self.model
        if a.feat_weight > 0:
            check(m.z_dim > 0, "model.z_dim", "must be > 0 (the projector) when align.feat_weight > 0")
            check(0 <= a.feature_block < m.depth, "align.feature_block", f"must be in [0, {m.depth}) for depth {m.depth}")
        if a.attn_weight > 0:
            bad = [b for b in a.student_blocks if not 0 <= b < m.depth]
            check(not bad, "align.student_blocks", f"{bad} out of range for a depth-{m.depth} model")
            bad = [h for h in a.student_heads if not 0 <= h < m.num_heads]
            check(not bad, "align.student_heads", f"{bad} out of range for {m.num_heads} heads")
        check_trigger_fits(a.stop, depth=m.depth, feat_weight=a.feat_weight, attn_weight=a.attn_weight,
                           feature_block=a.feature_block, student_blocks=a.student_blocks)

    def per_rank_batch(self, world_size: int) -> int:
        if self.global_batch_size % (world_size * self.grad_accum):
            raise ConfigError(f"config field 'global_batch_size': {self.global_batch_size} is not divisible by "
                              f"world size {world_size} x grad_accum {self.grad_accum}")
        return self.global_batch_size // world_size


# Fields that may change between a run and its resumption without altering the math.
RESUME_SAFE = frozenset({"run_dir", "total_steps", "log_every", "ckpt_every", "keep_ckpts", "sample_every",
                         "sample_steps", "sample_cfg", "sample_count", "compile", "data.cache", "device",
                         "data.verify_shards", "threads"})


def _with_preset(section: dict[str, Any], presets: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    section = dict(section or {})
    preset = section.pop("preset", None)
    if preset is None:
        return section
    if preset not in presets:
        raise ConfigError(f"config field '{name}.preset': unknown preset {preset!r} (known: {', '.join(presets)})")
    return {**presets[preset], **section}


def load_train_config(path: str | Path | None, overrides: tuple[str, ...] = ()) -> TrainConfig:
    data = configs.load_yaml(path).get("train", {}) if path else {}
    data = configs.apply_overrides(data or {}, overrides)
    data["model"] = _with_preset(data.get("model", {}), SIT_PRESETS, "model")
    data["align"] = _with_preset(normalise_align(data.get("align")), ALIGN_PRESETS, "align")
    try:
        return configs.build(TrainConfig, data)
    except ValueError as e:  # ModelConfig raises plain ValueErrors naming ModelConfig.<field>
        raise ConfigError(str(e)) from None


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Flattened {field: (old, new)} of differing leaves between two config dicts."""
    out: dict[str, tuple[Any, Any]] = {}
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(config_diff(a, b, f"{prefix}{k}."))
        elif a != b:
            out[f"{prefix}{k}"] = (a, b)
    return out
