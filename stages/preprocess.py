"""Stage 1: images -> SD-VAE posterior moments + DINOv2 teacher targets (+ caption encodings for
captioned sources, ``stages.preprocess_text``), as aligned shard groups.

Run it with ``haste preprocess`` (or ``make preprocess``); rerun the same command to resume.
Under ``torchrun --nproc_per_node=N`` each rank writes the shards ``todo[rank::N]``; rank 0
writes the manifests once every rank is done, so the cache equals the single-process one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from pipeline import dist
from pipeline.cache import groups
from pipeline.cache.schema import (
    FEAT_CODECS,
    LATENTS,
    SCHEMA_VERSION,
    TEACHER,
    TEXT,
    CacheFormatError,
    GroupManifest,
    LatentSpec,
    TeacherSpec,
    TextSpec,
    bytes_per_sample,
    codec_file_records,
    get_codec,
)
from pipeline.cache.shards import atomic_write_json
from pipeline.cache.text import null_record
from pipeline.configs import ConfigError, check, to_dict
from pipeline.encoders import weights
from pipeline.encoders.teacher import (
    DEFAULT_ARCH,
    DEFAULT_TEACHER,
    RANDOM_PRESETS,
    Teacher,
    teacher_input_size,
)
from pipeline.encoders.text import DEFAULT_TEXT_ENCODER
from pipeline.encoders.vae import DEFAULT_VAE, latent_scale_bias
from pipeline.inputs.captions import CaptionedSource, open_input
from pipeline.inputs.images import DEFAULT_MAX_PIXELS
from pipeline.inputs.sources import DEFAULT_MAX_FILE_BYTES, Source
from stages.preprocess_dirs import prepare_dirs, remove_temps  # noqa: F401  (prepare_dirs: used by the importers)
from stages.preprocess_engine import (  # noqa: F401  (PreprocessError, done_record: part of this stage's API)
    PreprocessError,
    done_record,
    encode_shards,
    progress_path,
)
from stages.preprocess_text import (
    dry_run_entry,
    encode_text_shards,
    log_dropped,
    text_identity,
    text_settings,
    text_spec,
)

log = logging.getLogger(__name__)
Precision = Literal["fp32", "bf16"]
CROP = "center-crop-dhariwal"
MODEL_OF = {LATENTS: "vae", TEACHER: "teacher", TEXT: "text_encoder"}  # each group's model in models.json


@dataclass(frozen=True, kw_only=True)
class PreprocessConfig:
    # image folder tree | .tar shards (dir, file, {a..b}) | synthetic:<n>; captioned (pipeline.inputs.captions):
    # coco:<root>/train2014 | captions:<folder or tars> | synthetic-captions:<n> (also recognised unprefixed)
    source: str = "synthetic:64"
    out: str = "cache"                    # cache root (Makefile CACHE)
    resolution: int = 256
    shard_size: int = 256                 # samples per shard (both groups share the numbering)
    vae: str = DEFAULT_VAE                # hub id | local diffusers dir | random:tiny | random:sd
    vae_precision: Precision = "fp32"
    latent_dtype: Literal["float16", "float32"] = "float16"
    teacher: str = DEFAULT_TEACHER        # hub id | local .pth/.safetensors | random:tiny | random:base | none
    teacher_arch: str = DEFAULT_ARCH      # timm architecture the weights belong to
    teacher_layers: tuple[int, ...] = (8, 9, 10, 11)
    teacher_precision: Precision = "fp32"
    # Attention codec (pipeline.cache.codecs). The default is the smallest codec whose worst case over the
    # teacher sharpness sweep x1/x5/x20, the flat-spectrum AND the channel-outlier stress stacks keeps the
    # ATTA gradient cosine >= 0.999 and the REPA features' mean 1 - cos <= 1e-3 (benchmarks/bench_codecs.py):
    # stream-int10 stores the residual stream entering the first aligned block, 10 bits per value in a
    # fixed rotation (248 KB/image at 256 px, whatever the number of aligned layers), plus the frozen blocks
    # from there on once per group, and the trainer reruns them for both targets. Check the real teacher
    # with `haste cache verify --fidelity`; stream-int12 (297 KB) and stream-fp16 (396 KB) are the steps
    # up, tokens-int8 (+ int8 features, 989 KB) the previous default.
    codec: str = "stream-int10"
    feat_dtype: Literal["float16", "float32"] = "float16"
    # int8: per-token scale, cosine-preserving (half of fp16). "plain" stays the default here because
    # existing tiny test caches rely on fp16 features; the ImageNet configs set int8. Unused by stream-*
    # codecs, which derive the features from the stored stream.
    feat_codec: Literal["plain", "int8"] = "plain"
    batch_size: int = 32
    num_workers: int = 4
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0                         # seeds random:* model inits
    synthetic_classes: int = 8
    synthetic_seed: int = 0
    max_skip_fraction: float = 0.001
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES  # larger input files (and tar members) are skipped unread
    resume_verify: Literal["sha256", "size"] = "sha256"
    crop: Literal["auto", "center-crop-dhariwal", "center-crop-uvit"] = "auto"  # auto: U-ViT's for captioned sources
    # The text group (captioned sources only): U-ViT's CLIP ViT-L/14 last_hidden_state, 77 x 768 per caption
    text_encoder: str = DEFAULT_TEXT_ENCODER  # hub id | local folder | random:tiny | random:l14 | none
    text_max_length: int = 77
    text_dtype: Literal["float16", "float32"] = "float16"
    text_precision: Precision = "fp32"
    text_batch_size: int = 128            # captions per text-encoder forward

    def __post_init__(self) -> None:
        check(self.resolution >= 32 and self.resolution % 16 == 0, "resolution", "must be a multiple of 16 (>= 32)")
        check(self.shard_size > 0, "shard_size", "must be positive")
        check(self.batch_size > 0, "batch_size", "must be positive")
        check(self.num_workers >= 0, "num_workers", "must be >= 0")
        check(0.0 <= self.max_skip_fraction <= 1.0, "max_skip_fraction", "must be in [0, 1]")
        check(self.max_file_bytes > 0, "max_file_bytes", "must be positive")
        check(len(self.teacher_layers) > 0 and len(set(self.teacher_layers)) == len(self.teacher_layers),
              "teacher_layers", "must be a non-empty list of distinct block indices")
        check(all(layer >= 0 for layer in self.teacher_layers), "teacher_layers", "indices must be >= 0")
        try:
            get_codec(self.codec)
        except ValueError as e:
            raise type(e)(f"config field 'codec': {e}") from None
        check(self.feat_codec in FEAT_CODECS, "feat_codec", f"must be one of {list(FEAT_CODECS)}")
        check(self.text_max_length > 0 and self.text_batch_size > 0, "text_max_length",
              "text_max_length and text_batch_size must be positive")

    @property
    def wants_teacher(self) -> bool:
        return self.teacher != "none"


# ----------------------------------------------------------------------------------------------
# Planning: group identities, specs, status
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GroupPlan:
    kind: str
    key: str
    dir: Path
    identity: dict
    spec: LatentSpec | TeacherSpec


def transform(cfg: PreprocessConfig, source: Source | None = None) -> dict:
    # max_pixels (and max_file_bytes) decide which inputs are skipped, so they are part of what the shards
    # contain; max_file_bytes only when set, so that the keys of groups built before it existed stay put
    base = {"crop": CROP, "resolution": cfg.resolution, "hflip": False, "color": "RGB (alpha dropped)",
            "max_pixels": cfg.max_pixels}
    if cfg.max_file_bytes != DEFAULT_MAX_FILE_BYTES:
        base["max_file_bytes"] = cfg.max_file_bytes
    return {**base, **source.transform} if isinstance(source, CaptionedSource) else base


def teacher_spec(cfg: PreprocessConfig) -> TeacherSpec:
    """Teacher dims from the architecture itself, built on the meta device (no weights needed)."""
    import timm

    preset = RANDOM_PRESETS.get(cfg.teacher.split(":", 1)[1], {}) if cfg.teacher.startswith("random:") else {}
    with torch.device("meta"):
        model = timm.create_model(cfg.teacher_arch, pretrained=False,
                                  img_size=teacher_input_size(cfg.resolution), **preset)
    depth = len(model.blocks)
    bad = [layer for layer in cfg.teacher_layers if layer >= depth]
    if bad:  # before Teacher() below, whose range error would read as the codec's
        raise ConfigError(f"config field 'teacher_layers': layers {bad} out of range: teacher_arch "
                          f"{cfg.teacher_arch!r} has {depth} blocks (0..{depth - 1})")
    try:  # capturing what the codec encodes checks that the architecture suits it (tokens-*: linear q, k)
        t = Teacher(model, cfg.teacher_layers, cfg.resolution, capture=get_codec(cfg.codec).inputs)
    except ValueError as e:
        raise ConfigError(f"config field 'codec': {cfg.codec!r} does not suit teacher_arch "
                          f"{cfg.teacher_arch!r}: {e}") from None
    spec = TeacherSpec(layers=cfg.teacher_layers, num_heads=t.num_heads, head_dim=t.head_dim, embed_dim=t.embed_dim,
                       grid=t.grid, num_prefix_tokens=t.num_prefix_tokens, scale=t.scale,
                       feat_dtype=cfg.feat_dtype, codec=cfg.codec, feat_codec=cfg.feat_codec, depth=t.depth,
                       mlp_dim=t.mlp_dim)
    try:  # a codec can depend on the teacher's dims (a low-rank rank must not exceed head_dim)
        get_codec(cfg.codec).members(spec)
    except ValueError as e:
        raise ConfigError(f"config field 'codec': {e}") from None
    return spec


def common_identity(cfg: PreprocessConfig, source: Source) -> dict:
    """The part of every group key shared by both groups: schema, dataset listing, transform, sharding."""
    return {"schema_version": SCHEMA_VERSION, "source": source.identity(), "transform": transform(cfg, source),
            "shard_size": cfg.shard_size}


def make_plan(cfg: PreprocessConfig, kind: str, identity: dict, spec: LatentSpec | TeacherSpec) -> GroupPlan:
    key = groups.group_key(identity)
    return GroupPlan(kind, key, groups.group_dir(Path(cfg.out), kind, key), identity, spec)


def teacher_plan(cfg: PreprocessConfig, source: Source) -> GroupPlan:
    t_id = {**common_identity(cfg, source), "teacher": weights.parse(cfg.teacher).descriptor(cfg.seed),
            "arch": cfg.teacher_arch, "layers": list(cfg.teacher_layers), "codec": cfg.codec,
            "feat_dtype": cfg.feat_dtype, "teacher_precision": cfg.teacher_precision}
    if cfg.feat_codec != "plain":  # only when set, so the keys of existing plain-feature groups stay put
        t_id["feat_codec"] = cfg.feat_codec
    return make_plan(cfg, TEACHER, t_id, teacher_spec(cfg))


def plan_groups(cfg: PreprocessConfig, source: Source) -> list[GroupPlan]:
    scale, bias = latent_scale_bias(cfg.vae)
    lat_spec = LatentSpec(channels=4, size=cfg.resolution // 8, dtype=cfg.latent_dtype, scale=scale, bias=bias)
    lat_id = {**common_identity(cfg, source), "vae": weights.parse(cfg.vae).descriptor(cfg.seed),
              "vae_precision": cfg.vae_precision, "latent_dtype": cfg.latent_dtype}
    plans = [make_plan(cfg, LATENTS, lat_id, lat_spec)]
    if cfg.wants_teacher:
        plans.append(teacher_plan(cfg, source))
    if isinstance(source, CaptionedSource) and cfg.text_encoder != "none":
        plans.append(make_plan(cfg, TEXT, text_identity(cfg, source, common_identity(cfg, source)), text_spec(cfg)))
    return plans


def dry_run_report(cfg: PreprocessConfig, source: Source, plans: list[GroupPlan]) -> dict:
    n = len(source.items)
    out = {"config": to_dict(cfg), "source": {"kind": source.kind, "count": n, "classes": len(source.classes),
                                              "rejected": source.num_rejected},
           "num_shards": math.ceil(n / cfg.shard_size), "groups": {}}
    for p in plans:
        if p.kind == TEXT:
            out["groups"][TEXT] = dry_run_entry(p, source)
            continue
        bps = bytes_per_sample(p.kind, p.spec)
        status = "complete" if groups.is_complete(p.dir) else ("partial" if p.dir.exists() else "new")
        out["groups"][p.kind] = {"dir": str(p.dir), "status": status, "spec": dataclasses.asdict(p.spec),
                                 "bytes_per_sample": bps, "projected_bytes": bps["tar"] * n,
                                 "projected_gb": round(bps["tar"] * n / 1e9, 3),
                                 "imagenet_1k": imagenet_projection(cfg, p)}
    return out


IMAGENET_1K = 1_281_167  # ImageNet-1k train images


def imagenet_projection(cfg: PreprocessConfig, plan: GroupPlan) -> dict:
    """A group's tar bytes per image and ImageNet-1k total at 256 and 512 px (teacher input 224 / 448:
    256 / 1,024 patch tokens), whatever the configured source and resolution."""
    out = {}
    for res in (256, 512):
        at = dataclasses.replace(cfg, resolution=res)
        spec = teacher_spec(at) if plan.kind != LATENTS else dataclasses.replace(plan.spec, size=res // 8)
        tar = bytes_per_sample(plan.kind, spec)["tar"]
        out[f"{res}px"] = {"bytes_per_image": tar, "total_gb": round(tar * IMAGENET_1K / 1e9, 1)}
    return out


# ----------------------------------------------------------------------------------------------
# Finishing: manifests (rank 0, after every rank is done)
# ----------------------------------------------------------------------------------------------

def write_manifests(cfg: PreprocessConfig, source: Source, plans: list[GroupPlan], models: dict,
                    num_shards: int, extra_settings: dict[str, dict] | None = None) -> list[GroupManifest]:
    """Manifests of the pending groups; ``extra_settings[kind]`` is merged into that group's settings
    (``haste import`` records there that the latents were imported, not encoded)."""
    manifests = []
    for plan in plans:
        if groups.is_complete(plan.dir):
            continue
        records = [done_record(plan, s, "size") for s in range(num_shards)]
        missing = [s for s, r in enumerate(records) if r is None]
        if missing:
            raise PreprocessError(f"{plan.dir}: shards {missing[:5]} are not complete; re-run the same command")
        skipped = [x for r in records for x in r.skipped]
        check_skip_fraction(cfg, source, skipped)
        try:  # the teacher's q/k projections for tokens-*, the text group's "" encoding: hashed here
            files = (codec_file_records(plan.dir, plan.spec) if isinstance(plan.spec, TeacherSpec) else
                     null_record(plan.dir, plan.spec) if isinstance(plan.spec, TextSpec) else {})
        except CacheFormatError as e:
            raise PreprocessError(str(e)) from None
        m = GroupManifest(
            kind=plan.kind, key=plan.key, spec=plan.spec, identity=plan.identity,
            source={"location": source.location, **source.identity(), "shard_size": cfg.shard_size,
                    **({"rejected": [dataclasses.asdict(r) for r in source.rejected]} if source.rejected else {})},
            models={k: v for k, v in models.items() if k == MODEL_OF[plan.kind]},
            producer=groups.producer_info(), shards=tuple(records), classes=source.classes, codec_files=files,
            settings={"transform": transform(cfg, source), "batch_size": cfg.batch_size,
                      "precision": cfg.vae_precision if plan.kind == LATENTS else cfg.teacher_precision,
                      **(extra_settings or {}).get(plan.kind, {})},
        )
        atomic_write_json(plan.dir / "manifest.json", m.to_json())
        manifests.append(m)
    return manifests


def check_skip_fraction(cfg: PreprocessConfig, source: Source, skipped: list[tuple[str, str]]) -> None:
    """Inputs left out while listing (``source.rejected``) plus images skipped while encoding, against
    ``max_skip_fraction``: before any shard is written with ``skipped=[]``, and again before the manifests."""
    bad = len(skipped) + source.num_rejected
    total = len(source.items) + source.num_rejected
    frac = bad / max(1, total)
    if frac > cfg.max_skip_fraction:
        examples = "; ".join(([f"{r.input}: {r.reason}" for r in source.rejected] +
                              [f"{k}: {why}" for k, why in skipped[:3]])[:3])
        raise PreprocessError(
            f"{bad} of {total} inputs ({frac:.2%}) could not be used, more than "
            f"max_skip_fraction={cfg.max_skip_fraction} (e.g. {examples}). Fix the inputs or raise "
            "max_skip_fraction, then re-run the same command (finished shards are kept).")


def model_identities(plans: list[GroupPlan]) -> dict:
    """Read model identities back from the progress directory (written by whichever rank loaded them)."""
    out = {}
    for plan in plans:
        p = plan.dir / "progress" / "models.json"
        if p.is_file():
            out.update(json.loads(p.read_text()))
    return out


def run(cfg: PreprocessConfig, dry_run: bool = False) -> dict:
    """Build (or finish) the cache described by ``cfg``; returns a summary dict."""
    d = dist.init(cfg.device)
    source = open_input(cfg.source, synthetic_classes=cfg.synthetic_classes, synthetic_seed=cfg.synthetic_seed,
                        crop=cfg.crop, max_file_bytes=cfg.max_file_bytes)
    plans = plan_groups(cfg, source)
    if dry_run:
        return dry_run_report(cfg, source, plans)
    num_shards = math.ceil(len(source.items) / cfg.shard_size)
    pending = [p for p in plans if not groups.is_complete(p.dir)]
    if not pending:
        repaired = finish_complete(cfg, d, source, plans)
        if not repaired:
            log.info("cache is complete, nothing to do: %s", ", ".join(str(p.dir) for p in plans))
        return {"status": "repaired" if repaired else "up-to-date", "groups": {p.kind: str(p.dir) for p in plans}}
    for p in plans:
        log.info("%s group %s (%s)", p.kind, p.dir, "complete, reused" if p not in pending else "to build")
    for r in source.rejected if d.is_main else ():
        log.warning("skipping input %s: %s", r.input, r.reason)
    check_skip_fraction(cfg, source, [])  # what the listing already left out, before anything is written
    check_weights(cfg, pending)
    prepare_dirs(d, pending, Path(cfg.out), plans)
    image_groups = [p for p in pending if p.kind != TEXT]
    if image_groups:
        encode_shards(cfg, d, source, image_groups, num_shards)
        dist.barrier()
    text = next((p for p in pending if p.kind == TEXT), None)
    if text is not None:  # after the image pass: its shards' skips decide the text shards' keys
        if d.is_main:
            log_dropped(source)
        encode_text_shards(cfg, d, source, text, plans[0], num_shards)
        dist.barrier()
    manifests: list[GroupManifest] = []
    if d.is_main:
        extra = {TEXT: text_settings(cfg, source, text, num_shards)} if text is not None else None
        manifests = write_manifests(cfg, source, pending, model_identities(pending), num_shards, extra)
        record_in_index(cfg, source, plans)
    dist.barrier()
    return {"status": "built", "groups": {p.kind: str(p.dir) for p in plans},
            "samples": {m.kind: m.num_samples for m in manifests}}


def check_weights(cfg: PreprocessConfig, plans: list[GroupPlan]) -> None:
    """Fail before creating any directory when hub weights are needed but unavailable offline."""
    kinds = {p.kind for p in plans}
    for name, what, needed in ((cfg.vae, "VAE", LATENTS in kinds), (cfg.teacher, "teacher", TEACHER in kinds),
                               (cfg.text_encoder, "text encoder", TEXT in kinds)):
        if needed and weights.parse(name).kind == "hub":
            weights.require_hub(name.removeprefix("hf-hub:"), what)


def record_in_index(cfg: PreprocessConfig, source: Source, plans: list[GroupPlan]) -> None:
    keys = {p.kind: p.key for p in plans}
    groups.update_index(Path(cfg.out), keys[LATENTS], keys.get(TEACHER),
                        {"source": source.location, "resolution": cfg.resolution}, text_key=keys.get(TEXT))


def finish_complete(cfg: PreprocessConfig, d: dist.DistInfo, source: Source, plans: list[GroupPlan]) -> list[str]:
    """Every group is complete: repair what a run killed after its manifests left undone (rank 0).

    A kill around the index.json write leaves complete groups that index.json does not record (so
    no reader finds them) and temp files; return what was repaired (empty when nothing was).
    """
    if not d.is_main:
        return []
    repaired = [str(p) for p in remove_temps(Path(cfg.out), plans)]
    keys = {p.kind: p.key for p in plans}
    if not groups.is_indexed(Path(cfg.out), keys[LATENTS], keys.get(TEACHER), keys.get(TEXT)):
        record_in_index(cfg, source, plans)
        log.info("the groups were complete but not recorded in %s (an earlier run stopped before writing it): "
                 "recorded them", Path(cfg.out) / groups.INDEX)
        repaired.append(str(Path(cfg.out) / groups.INDEX))
    return repaired
