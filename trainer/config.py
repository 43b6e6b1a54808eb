"""Training configs: typed, frozen, validated at build time; presets are plain data.

A YAML ``train:`` section (plus ``--set a.b=v`` overrides) builds a ``TrainConfig``. The
``model`` and ``align`` sections may name a ``preset`` whose fields the section then overrides:

    train:
      model: {preset: SiT-B/2}
      align: {preset: haste-sit-b}      # student 2,3,4 <- teacher 7,9,11, depth 5, tau 100K

``model.arch`` selects the network (``trainer/models/archs.py``): ``sit`` (the default, class labels)
or ``mmdit`` (text: caption encodings from the cache's text group). It may be left out when the
preset names it (``model: {preset: MMDiT-24/2}``); every other field belongs to that arch's config:

    train:
      model: {arch: mmdit, preset: MMDiT-24/2, caption_dropout_prob: 0.1}
      align: {preset: haste-mmdit}      # student 4-7 <- teacher 8-11, first 12 of 24 heads, tau 200K

Saved configs (config.json, checkpoint sidecars) from before ``arch`` existed describe a SiT;
``normalise_saved_config`` reads them that way, so such runs resume unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline import configs
from pipeline.cache.reader import Requirements
from pipeline.configs import ConfigError, check
from trainer import stop as stop_config
from trainer.models.archs import ARCHS, AnyModelConfig, arch_for_preset, arch_of
from trainer.models.sit import ModelConfig
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
    # MM-DiT on COCO (Paper §4.2, Table 2; SPEC §8): the official loss.py pairs (its ATTA takes the FIRST 12
    # of the student's 24 heads of dim 32, head h <-> teacher head h), image-token logits only, feature
    # block 7 (encoder_depth 8), tau 200K. The released train_t2i.py zeroes ATTA (SPEC §7.15): attn_weight 0.
    "haste-mmdit": dict(feat_weight=0.5, attn_weight=0.5, feature_block=7, student_blocks=(4, 5, 6, 7),
                        teacher_layers=(8, 9, 10, 11), student_heads=tuple(range(12)), teacher_heads=tuple(range(12)),
                        stop=StepStop(step=200_000)),
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
    # stream-* teacher decode precision: auto = fp16 autocast on CUDA, bf16-mixed on CPUs with native bf16,
    # else fp32 (pipeline/cache/codecs_stream.py DECODE_COMPUTE); fp32 | fp16 | bf16-mixed | bf16 to force one
    teacher_decode: Literal["auto", "fp32", "fp16", "bf16-mixed", "bf16"] = "auto"

    def __post_init__(self) -> None:
        check(self.num_workers >= 0, "data.num_workers", "must be >= 0")

    @property
    def decode_compute(self) -> str | None:
        """``teacher_decode`` as the cache reader takes it: None = the device's default."""
        return None if self.teacher_decode == "auto" else self.teacher_decode


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    run_dir: str = "runs/demo"
    model: AnyModelConfig = field(default_factory=ModelConfig)  # SiT or MM-DiT (model.arch)
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
    # Text models: cache keys whose first caption the previews draw (the trainer has no text encoder, so
    # previews use cached encodings; one sample each); empty = the first sample_count samples of the cache.
    sample_keys: tuple[str, ...] = ()

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
        check(not self.sample_keys or self.text_conditioned, "sample_keys",
              "names cached captions for the previews of a text model (model.arch: mmdit); a SiT previews labels")
        self._check_alignment()

    @property
    def text_conditioned(self) -> bool:
        """MM-DiT: the forward's condition is a caption encoding (the cache's text group), not a label."""
        return arch_of(self.model).conditioning == "text"

    def cache_requirements(self, *, features: bool, attention: bool) -> Requirements:
        """What a phase of this run needs from the cache, checked before its first step."""
        m, a, text = self.model, self.align, self.text_conditioned
        return Requirements(
            latent_size=m.input_size, latent_channels=m.in_channels, num_classes=None if text else m.num_classes,
            teacher_layers=a.teacher_layers, teacher_heads=a.teacher_heads, num_tokens=m.num_tokens, feat_dim=m.z_dim,
            need_features=features, need_attention=attention,
            text_dim=m.context_dim if text else None, text_length=m.context_len if text else None)

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
                         "data.verify_shards", "threads", "sample_keys"})


def _with_preset(section: dict[str, Any], presets: dict[str, dict[str, Any]], name: str, kind: str = "") -> dict[str, Any]:
    section = dict(section or {})
    preset = section.pop("preset", None)
    if preset is None:
        return section
    if preset not in presets:
        raise ConfigError(f"config field '{name}.preset': unknown {kind}preset {preset!r} (known: {', '.join(presets)})")
    return {**presets[preset], **section}


def parse_model(section: Any) -> AnyModelConfig:
    """A ``model:`` section -> the config of its arch (named, implied by the preset, or "sit")."""
    if isinstance(section, tuple(a.config for a in ARCHS.values())):
        return section
    if section is not None and not isinstance(section, dict):
        raise ConfigError(f"config section 'model' must be a mapping, got {section!r}")
    section = dict(section or {})
    arch = section.pop("arch", None) or arch_for_preset(section.get("preset"))
    if arch not in ARCHS:
        raise ConfigError(f"config field 'model.arch': unknown architecture {arch!r} (known: {', '.join(ARCHS)})")
    section = _with_preset(section, ARCHS[arch].presets, "model", kind=f"{arch} ")
    try:
        return configs.build(ARCHS[arch].config, {**section, "arch": arch}, prefix="model.")
    except ValueError as e:  # the model configs raise plain ValueErrors naming <Class>.<field>
        raise ConfigError(str(e) if isinstance(e, ConfigError) else f"config section 'model' ({arch}): {e}") from None


def load_train_config(path: str | Path | None, overrides: tuple[str, ...] = ()) -> TrainConfig:
    data = configs.load_yaml(path).get("train", {}) if path else {}
    data = configs.apply_overrides(data or {}, overrides)
    data["model"] = parse_model(data.get("model"))
    data["align"] = _with_preset(normalise_align(data.get("align")), ALIGN_PRESETS, "align")
    try:
        return configs.build(TrainConfig, data)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def normalise_saved_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A saved config dict in today's form: ``align.stop_step`` as ``align.stop`` (trainer/stop.py) and
    ``model.arch`` filled in as "sit" (configs saved before it existed), so older runs compare equal."""
    out = stop_config.normalise_saved_config(cfg)
    if isinstance(out.get("model"), dict) and "arch" not in out["model"]:
        out["model"] = {"arch": "sit", **out["model"]}
    return out


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
