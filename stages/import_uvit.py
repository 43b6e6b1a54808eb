"""``haste import uvit``: U-ViT / HASTE ``coco256_features`` into latents + text (+ teacher) groups.

No VAE and no text encoder run: the latents group takes U-ViT's moments (logvar turned into our std,
``pipeline.inputs.uvit``), the text group its CLIP contexts and ``empty_context.npy``; both record
that they were imported. The teacher group is the preprocess engine's own pass over images:

- ``--images <coco>/train2014`` (the COCO split the features came from, annotations beside it):
  the original images with U-ViT's crop, sample keys = COCO image ids, caption strings from the
  annotations (U-ViT's feature i is the i-th image id in sorted order, its ``{i}_{k}`` the k-th
  caption in file order);
- otherwise HASTE's ``{i}.png`` files, keys ``0..N-1``, caption strings unknown (null). HASTE's
  extract script saves them from [-1, 1] without rescaling (SPEC §7.16); when a sample of them
  shows that clipping, the import stops and says so: pass ``--images`` (or ``--set teacher=none``).

Like every import: teacher shards first, then latents and text shards with the same keys minus what
the teacher pass skipped; atomic shards, progress records, manifests last; rerun to resume.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline import configs, dist
from pipeline.cache import groups
from pipeline.cache.reader import open_cache
from pipeline.cache.schema import LATENTS, TEACHER, TEXT, LatentSpec, TextSpec
from pipeline.cache.shards import atomic_write_json
from pipeline.configs import ConfigError, check
from pipeline.encoders import weights
from pipeline.encoders.text import DEFAULT_TEXT_ENCODER
from pipeline.inputs.captions import CaptionedSource, open_input
from pipeline.inputs.prepared_formats import raise_problems
from pipeline.inputs.sources import Item
from pipeline.inputs.uvit import UViTFeatures, header_problem, logvar_to_std, open_uvit, png_check, read_array
from stages.import_export import KNOWN_VAES, vae_scale
from stages.preprocess import (
    PreprocessConfig,
    PreprocessError,
    check_weights,
    common_identity,
    done_record,
    dry_run_report,
    make_plan,
    model_identities,
    prepare_dirs,
    teacher_plan,
    write_manifests,
)
from stages.preprocess_engine import _union_over_ranks, encode_shards, shard_sink
from stages.preprocess_text import (
    dry_run_entry,
    image_skips,
    one_minus_cos,
    stats_path,
    text_settings,
    write_null,
)

log = logging.getLogger(__name__)
PNG_SAMPLE = 64  # PNGs checked for save_image clipping, spread over the set


@dataclass(frozen=True, kw_only=True)
class UViTImportConfig:
    src: str                      # coco256_features/train (or val): {i}.npy, {i}_{k}.npy[, {i}.png]
    vae: str = ""                 # the VAE the moments came from (U-ViT: SD KL-f8 = the SD-VAE encoder)
    images: str = ""              # the COCO split folder the features came from (optional, see above)
    preprocess: PreprocessConfig  # cache root, shard size, teacher, dtypes, workers; its source/vae unused

    def __post_init__(self) -> None:
        check(bool(self.src), "src", "give the U-ViT features folder (coco256_features/train or val)")
        vae_scale(self.vae)


def load_uvit_config(src: str, vae: str, images: str, config_path: str | None,
                     overrides: tuple[str, ...]) -> UViTImportConfig:
    pcfg = configs.load(PreprocessConfig, config_path, overrides, section="preprocess")
    return UViTImportConfig(src=src, vae=vae, images=images, preprocess=pcfg)


# ----------------------------------------------------------------------------------------------
# Sources and plans
# ----------------------------------------------------------------------------------------------

def image_source(cfg: UViTImportConfig, feats: UViTFeatures) -> tuple[CaptionedSource, list[tuple]]:
    """The teacher's images (COCO originals or the PNGs) aligned with feature i, and each item's K captions
    (strings from the annotations when they agree with U-ViT's count, else None)."""
    no_ctx = {i for i, k in enumerate(feats.counts) if k == 0}
    if cfg.images:
        src = open_input(cfg.images if cfg.images.startswith("coco:") else f"coco:{cfg.images}")
        if len(src.items) != feats.count:
            raise PreprocessError(f"{cfg.images} lists {len(src.items)} images but {feats.root} holds {feats.count} "
                                  "U-ViT features: pass the COCO split the features were extracted from")
        caps = [c if len(c) == k else (None,) * k for c, k in zip(src.captions, feats.counts)]
        differ = sum(len(c) != k for c, k in zip(src.captions, feats.counts) if k)
        if differ:
            log.warning("%d image(s) have another caption count in the annotations than in the U-ViT features; "
                        "their caption strings are recorded as unknown (null)", differ)
    else:
        items = tuple(Item(key=str(i), label=0, path=str(feats.png(i))) for i in range(feats.count))
        src = CaptionedSource("uvit-png", f"uvit:{feats.root.resolve()}", (), items)
        caps = [(None,) * k for k in feats.counts]
    # the source's own reasons win, so a COCO source keeps its identity (and shares preprocess's teacher group)
    uncaptioned = {**{src.items[i].key: f"no U-ViT contexts ({i}_*.npy)" for i in no_ctx}, **src.uncaptioned}
    return dataclasses.replace(src, uncaptioned=uncaptioned), caps


def plans_for(cfg: UViTImportConfig, feats: UViTFeatures, source: CaptionedSource, caps: list[tuple]) -> list:
    p = cfg.preprocess
    common = common_identity(p, source)
    vae = {"name": cfg.vae} if cfg.vae in KNOWN_VAES else weights.parse(cfg.vae).descriptor(p.seed)
    lat = make_plan(p, LATENTS, {**common, "vae": vae, "latent_dtype": p.latent_dtype, "imported_from": feats.identity()},
                    LatentSpec(channels=4, size=feats.resolution // 8, dtype=p.latent_dtype, scale=vae_scale(cfg.vae)))
    h = CaptionedSource.captions_sha256(dataclasses.replace(source, captions=tuple(caps)))
    txt = make_plan(p, TEXT, {**common, "imported_from": feats.identity(), "captions_sha256": h,
                              "text_encoder": {"name": DEFAULT_TEXT_ENCODER, "run": False}, "text_dtype": p.text_dtype},
                    TextSpec(max_length=feats.context_shape[0], dim=feats.context_shape[1], dtype=p.text_dtype))
    return [lat] + ([teacher_plan(p, source)] if p.wants_teacher else []) + [txt]


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

def run_import_uvit(cfg: UViTImportConfig, dry_run: bool = False) -> dict:
    p, d = cfg.preprocess, dist.init(cfg.preprocess.device)
    feats = open_uvit(cfg.src)
    if p.resolution != feats.resolution:
        raise ConfigError(f"config field 'resolution': {p.resolution}, but the U-ViT moments are for "
                          f"{feats.resolution}x{feats.resolution} images; set resolution={feats.resolution}")
    source, caps = image_source(cfg, feats)
    plans = plans_for(cfg, feats, source, caps)
    lat, txt = plans[0], plans[-1]
    tea = plans[1] if len(plans) == 3 else None
    pngs = tea is not None and not cfg.images
    if dry_run:
        report = dry_run_report(p, source, plans)
        report["groups"][TEXT] = dry_run_entry(txt, source, caps)
        return {**report, "import": {**feats.identity(), "src": str(feats.root), "vae": cfg.vae,
                                     "teacher_images": "PNGs" if pngs else (cfg.images or None),
                                     **({"png_check": _png_check(feats)} if pngs else {})}}
    pending = [g for g in plans if not groups.is_complete(g.dir)]
    if not pending:
        repaired = d.is_main and groups.ensure_indexed(Path(p.out), lat.key, tea.key if tea else None,
                                                       _index_summary(source, feats), text_key=txt.key)
        log.info("import is complete, nothing to do: %s", ", ".join(str(g.dir) for g in plans))
        return {"status": "repaired" if repaired else "up-to-date", "groups": {g.kind: str(g.dir) for g in plans}}
    if lat in pending or txt in pending:
        check_headers(feats, d)
    if tea in pending and pngs:
        check_pngs(feats)
    check_weights(p, [g for g in pending if g.kind == TEACHER])
    prepare_dirs(d, pending)
    num_shards = math.ceil(feats.count / p.shard_size)
    if tea in pending:
        encode_shards(p, d, source, [tea], num_shards)
        dist.barrier()
    write_shards(cfg, d, feats, source, caps, [g for g in (lat, txt) if g in pending], tea, num_shards)
    dist.barrier()
    if d.is_main:
        _finish(cfg, feats, source, plans, pending, num_shards)
    dist.barrier()
    return {"status": "built", "groups": {g.kind: str(g.dir) for g in plans}, "samples": feats.count}


def _png_check(feats: UViTFeatures) -> dict:
    picks = sorted({int(i) for i in np.linspace(0, feats.count - 1, min(PNG_SAMPLE, feats.count))})
    missing = [str(feats.png(i)) for i in picks if not feats.png(i).is_file()]
    if missing:
        raise PreprocessError(f"{missing[0]} not found ({len(missing)} of {len(picks)} sampled PNGs missing): the "
                              "teacher needs images; pass --images <coco>/<split> or --set teacher=none")
    return png_check([feats.png(i) for i in picks])


def check_pngs(feats: UViTFeatures) -> None:
    """Refuse PNGs that HASTE's extract script clipped (SPEC §7.16): the teacher would see half the image black."""
    result = _png_check(feats)
    log.info("PNG check: %s", result)
    if result["clipped"]:
        raise PreprocessError(
            f"the PNGs in {feats.root} are clipped: {result['zero_fraction']:.0%} of the channel values of "
            f"{result['pngs_checked']} sampled PNGs are 0 (natural images: a few %). HASTE's "
            "extract_mscoco_feature.py saves the [-1, 1] images with save_image without rescaling, which turns "
            "everything darker than mid-grey black. Compute the teacher from the COCO originals: "
            "--images <coco>/train2014 (or val2014), or import without a teacher: --set teacher=none")


def check_headers(feats: UViTFeatures, d: dist.DistInfo) -> None:
    """Every moments and context file's header (shape, dtype) before any write; one error names the bad ones."""
    mshape = (8, feats.resolution // 8, feats.resolution // 8)
    mine = range(d.rank, feats.count, d.world_size)
    problems = [msg for i in tqdm(mine, unit="img", desc="check features", disable=not d.is_main)
                for msg in [header_problem(feats.moments(i), mshape)] +
                [header_problem(feats.context(i, k), feats.context_shape) for k in range(feats.counts[i])] if msg]
    raise_problems(sorted(_union_over_ranks({"p": problems}, d)["p"]), f"checking the U-ViT features in {feats.root}")


class _Shards(Dataset):
    """Item i = one shard: (shard, keys, std moments (n, 8, h, w) f32, per-image stored contexts, fp16 stats)."""

    def __init__(self, feats: UViTFeatures, source: CaptionedSource, shard_size: int, shards: list[int],
                 skipped: dict[int, tuple], dtype: str):
        self.feats, self.source, self.size, self.shards, self.skipped = feats, source, shard_size, shards, skipped
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, i: int):
        s, f = self.shards[i], self.feats
        skip = {k for k, _ in self.skipped[s]}
        rows = [j for j in range(s * self.size, min((s + 1) * self.size, f.count)) if self.source.items[j].key not in skip]
        mshape = (8, f.resolution // 8, f.resolution // 8)
        moments = np.stack([logvar_to_std(read_array(f.moments(j), mshape)) for j in rows]) if rows else None
        texts, err_max, err_sum, ncap = [], 0.0, 0.0, 0
        for j in rows:
            ctx = np.stack([read_array(f.context(j, k), f.context_shape) for k in range(f.counts[j])])
            stored = ctx.astype(self.dtype)
            err = one_minus_cos(torch.from_numpy(ctx), torch.from_numpy(stored.astype(np.float32)))
            err_max, err_sum, ncap = max(err_max, float(err.max())), err_sum + float(err.sum()), ncap + len(ctx)
            texts.append(stored)
        stats = {"images": len(rows), "captions": ncap, "truncated": 0, "tokens": ncap * f.context_shape[0],
                 "one_minus_cos_max": err_max, "one_minus_cos_sum": err_sum,
                 "max_captions": max((len(t) for t in texts), default=0)}
        return s, rows, moments, texts, stats


def write_shards(cfg: UViTImportConfig, d: dist.DistInfo, feats: UViTFeatures, source: CaptionedSource,
                 caps: list[tuple], plans: list, teacher, num_shards: int) -> None:
    """This rank's missing latents/text shards (every world_size-th), keys aligned with the teacher group."""
    p = cfg.preprocess
    todo = [s for s in range(d.rank, num_shards, d.world_size) if any(done_record(g, s, p.resume_verify) is None
                                                                      for g in plans)]
    by_kind = {g.kind: g for g in plans}
    _write_models(cfg, by_kind, d)
    if TEXT in by_kind:
        write_null(by_kind[TEXT], read_array(feats.empty_context, feats.context_shape))
    if not todo:
        return
    skipped = {s: image_skips(teacher, s) if teacher else _uncaptioned(source, s, p.shard_size) for s in todo}
    loader = DataLoader(_Shards(feats, source, p.shard_size, todo, skipped, p.text_dtype), batch_size=None,
                        collate_fn=_as_is, num_workers=min(p.num_workers, len(todo)))
    sinks = {k: shard_sink(g) for k, g in by_kind.items()}
    with tqdm(total=len(todo), unit="shard", desc="import uvit", disable=not d.is_main) as bar:
        try:
            for s, rows, moments, texts, stats in loader:
                keys = [source.items[j].key for j in rows]
                if LATENTS in sinks:
                    sinks[LATENTS].add(s, keys, (np.zeros(len(rows), np.int64), moments) if rows else (), list(skipped[s]))
                    sinks[LATENTS].commit(s)
                if TEXT in sinks:
                    atomic_write_json(stats_path(by_kind[TEXT], s), stats)
                    sinks[TEXT].add(s, keys, (texts, [caps[j] for j in rows]), list(skipped[s]))
                    sinks[TEXT].commit(s)
                bar.update(1)
        except BaseException:
            for sink in sinks.values():
                sink.abort()
            raise


def _as_is(x):
    return x


def _uncaptioned(source: CaptionedSource, shard: int, size: int) -> tuple[tuple[str, str], ...]:
    keys = (it.key for it in source.items[shard * size:(shard + 1) * size])
    return tuple((k, source.uncaptioned[k]) for k in keys if k in source.uncaptioned)


def _write_models(cfg: UViTImportConfig, by_kind: dict, d: dist.DistInfo) -> None:
    if not d.is_main:
        return
    p = cfg.preprocess
    common = {"source": "imported", "format": "uvit", "weights_sha256": None, "precision": "imported"}
    if LATENTS in by_kind:
        atomic_write_json(by_kind[LATENTS].dir / "progress" / "models.json", {"vae": {
            "name": cfg.vae, **common, "scaling_factor": by_kind[LATENTS].spec.scale, "stored_dtype": p.latent_dtype,
            "converted": "std = exp(0.5 * clamp(logvar, -30, 20))"}})
    if TEXT in by_kind:
        atomic_write_json(by_kind[TEXT].dir / "progress" / "models.json", {"text_encoder": {
            "name": DEFAULT_TEXT_ENCODER, **common, "output": "last_hidden_state", "stored_dtype": p.text_dtype}})


def _index_summary(source: CaptionedSource, feats: UViTFeatures) -> dict:
    return {"source": source.location, "resolution": feats.resolution, "imported": "uvit"}


def _finish(cfg: UViTImportConfig, feats: UViTFeatures, source: CaptionedSource, plans: list, pending: list,
            num_shards: int) -> None:
    p = cfg.preprocess
    lat, txt = plans[0], plans[-1]
    tea = plans[1] if len(plans) == 3 else None
    imported = {**feats.identity(), "src": str(feats.root), "images": cfg.images or "PNGs", "vae": cfg.vae,
                "vae_run": False}
    extra = {LATENTS: {"imported_from": imported, "precision": "imported"}}
    if txt in pending:
        extra[TEXT] = text_settings(p, source, txt, num_shards, imported={**imported, "text_encoder_run": False})
    write_manifests(p, source, pending, model_identities(pending), num_shards, extra_settings=extra)
    root = Path(p.out)
    groups.update_index(root, lat.key, tea.key if tea else None, _index_summary(source, feats), text_key=txt.key)
    open_cache(root, latents=lat.key, teacher=tea.key if tea else None, need_teacher=tea is not None,
               text=txt.key)  # aligned?
    log.info("imported %d U-ViT samples into %s", feats.count, root)
