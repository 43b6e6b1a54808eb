"""``haste import`` / ``haste export``: other codebases' preprocessed datasets in, ours out.

Import (edm2/REPA/HASTE ``images/`` + ``vae-sd/``, or REPA-E ``images.h5`` + ``<name>.h5``) builds
the usual pair of aligned cache groups, so the cache serves Phase I training as is:

- ``teacher/<key>``: the preprocess engine's own teacher pass over the foreign images;
- ``latents/<key>``: the foreign moments, cast to the cache dtype. No VAE runs: the group's identity
  (``imported_from``), its settings (``imported_from``, ``precision: imported``) and its model record
  (``source: imported``) say so. The VAE is named by the user (``--vae``); it fixes the latent space
  and the scale the trainer applies, so an absent or unknown name is an error.

Teacher shards are written first; latents shard k then holds the same keys minus the images the
teacher pass had to skip, so the groups stay aligned. Like preprocess: atomic shards, progress
records, manifests last; rerun the same command to resume, and a finished import is a no-op.

Export (``stages.export_edm2``) writes a latents group back in edm2's layout.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline import configs, dist
from pipeline.cache import groups
from pipeline.cache.reader import open_cache
from pipeline.cache.schema import LATENTS, SD_VAE_SCALE, TEACHER, LatentSpec
from pipeline.cache.shards import atomic_write_json
from pipeline.configs import ConfigError, check
from pipeline.encoders import weights
from pipeline.encoders.vae import RANDOM_PRESETS as VAE_PRESETS
from pipeline.inputs.prepared import EDM2, REPAE, PreparedDataset, find_edm2_parts, open_edm2, open_repae
from pipeline.inputs.prepared_formats import (
    check_moments_item,
    raise_problems,
    read_moments,
)
from stages.preprocess import (
    GroupPlan,
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

log = logging.getLogger(__name__)

# Hub VAEs whose posterior moments we accept by name, with their latent scale. Both share the SD-VAE
# encoder (SPEC §4: ft-mse and ft-ema differ only in the decoder).
KNOWN_VAES: dict[str, float] = {"stabilityai/sd-vae-ft-ema": SD_VAE_SCALE, "stabilityai/sd-vae-ft-mse": SD_VAE_SCALE}


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------

def vae_scale(name: str) -> float:
    """Latent scale of the VAE the moments came from; absent or unknown names raise naming the field."""
    if not name:
        raise ConfigError("config field 'vae': name the VAE the moments were encoded with (e.g. --vae "
                          "stabilityai/sd-vae-ft-ema); it fixes the latent space and scale used in training")
    if name in KNOWN_VAES:
        return KNOWN_VAES[name]
    if name.startswith("random:") and name.split(":", 1)[1] in VAE_PRESETS:
        return float(VAE_PRESETS[name.split(":", 1)[1]]["scaling_factor"])
    path = Path(name).expanduser()
    for cfg_file in (path / "config.json", path / "vae" / "config.json"):
        if cfg_file.is_file():
            try:
                scale = json.loads(cfg_file.read_text()).get("scaling_factor")
            except (ValueError, AttributeError, RecursionError) as e:
                raise ConfigError(f"config field 'vae': {cfg_file} is not a JSON object ({e})") from None
            check(isinstance(scale, (int, float)), "vae", f"{cfg_file} has no numeric scaling_factor")
            return float(scale)
    raise ConfigError(f"config field 'vae': unknown VAE {name!r} (known: {', '.join(KNOWN_VAES)}, "
                      f"random:<{'|'.join(VAE_PRESETS)}>, or a local diffusers AutoencoderKL directory)")


@dataclass(frozen=True, kw_only=True)
class ImportConfig:
    fmt: Literal["edm2", "repae"]
    src: str = ""                 # edm2: dir with images/ + vae-sd/ (or .zip); repae: dir with images.h5 + <name>.h5
    vae: str = ""                 # the VAE the moments were encoded with (never run; names the latent space)
    images: str = ""              # edm2: images folder/zip (default <src>/images[.zip])
    moments: str = ""             # edm2: moments folder/zip (default <src>/vae-sd[.zip])
    latents_name: str = ""        # repae: <name> of <name>.h5 (default: the only one besides images.h5)
    preprocess: PreprocessConfig  # cache root, shard size, teacher, dtypes, workers; its source/vae are unused

    def __post_init__(self) -> None:
        check(self.fmt in (EDM2, REPAE), "fmt", f"must be {EDM2!r} or {REPAE!r}")
        vae_scale(self.vae)
        if self.fmt == EDM2:
            check(bool(self.src) or bool(self.images and self.moments), "src",
                  "give the dataset dir, or both images and moments")
        else:
            check(bool(self.src), "src", "give the REPA-E data dir (holding images.h5 and <name>.h5)")
            check(not (self.images or self.moments), "images", "only for the edm2 format")
        check(not (self.latents_name and self.fmt == EDM2), "latents_name", "only for the repae format")


def load_import_config(fmt: str, src: str, vae: str, config_path: str | None, overrides: tuple[str, ...],
                       **paths: str) -> ImportConfig:
    """``--config`` (its ``preprocess:`` section) + ``--set`` overrides + the import's own arguments."""
    pcfg = configs.load(PreprocessConfig, config_path, overrides, section="preprocess")
    return ImportConfig(fmt=fmt, src=src, vae=vae, preprocess=pcfg, **paths)


# ----------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------

def open_dataset(cfg: ImportConfig) -> PreparedDataset:
    if cfg.fmt == REPAE:
        return open_repae(cfg.src, cfg.latents_name or None)
    images, moments = (cfg.images, cfg.moments) if cfg.images and cfg.moments else find_edm2_parts(cfg.src)
    return open_edm2(cfg.images or images, cfg.moments or moments)


def latents_plan(cfg: ImportConfig, ds: PreparedDataset) -> GroupPlan:
    p = cfg.preprocess
    spec = LatentSpec(channels=4, size=ds.resolution // 8, dtype=p.latent_dtype, scale=vae_scale(cfg.vae))
    # known hub ids are recorded by name only: the VAE is never loaded, so its revision is not resolved
    vae = {"name": cfg.vae} if cfg.vae in KNOWN_VAES else weights.parse(cfg.vae).descriptor(p.seed)
    identity = {**common_identity(p, ds.source), "vae": vae, "latent_dtype": p.latent_dtype,
                "imported_from": ds.identity()}
    return make_plan(p, LATENTS, identity, spec)


def run_import(cfg: ImportConfig, dry_run: bool = False) -> dict:
    """Import (or finish importing) a foreign dataset into ``cfg.preprocess.out``; returns a summary."""
    p, d = cfg.preprocess, dist.init(cfg.preprocess.device)
    ds = open_dataset(cfg)
    if p.resolution != ds.resolution:
        r = ds.resolution
        raise ConfigError(f"config field 'resolution': {p.resolution}, but the imported images are {r}x{r} "
                          f"(moments [8, {r // 8}, {r // 8}]); set resolution={r}")
    plans = [latents_plan(cfg, ds)] + ([teacher_plan(p, ds.source)] if p.wants_teacher else [])
    if dry_run:
        return {**dry_run_report(p, ds.source, plans), "import": {**ds.identity(), **ds.locations, "vae": cfg.vae}}
    pending = [g for g in plans if not groups.is_complete(g.dir)]
    if not pending:
        lat, tea = plans[0], (plans[1] if len(plans) > 1 else None)
        repaired = d.is_main and groups.ensure_indexed(Path(p.out), lat.key, tea.key if tea else None,
                                                       _index_summary(ds))
        log.info("import is complete, nothing to do: %s", ", ".join(str(g.dir) for g in plans))
        return {"status": "repaired" if repaired else "up-to-date", "groups": {g.kind: str(g.dir) for g in plans}}
    log.info("%s dataset: %d images of %dx%d, %d classes (%s)", ds.fmt, len(ds.source.items), ds.resolution,
             ds.resolution, len(ds.source.classes), ", ".join(f"{k} {v}" for k, v in ds.locations.items()))
    for g in plans:
        log.info("%s group %s (%s)", g.kind, g.dir, "to build" if g in pending else "complete, reused")
    lat, tea = plans[0], (plans[1] if len(plans) > 1 else None)
    if lat in pending:
        check_all_moments(ds, d)
    check_weights(p, [g for g in pending if g.kind == TEACHER])
    prepare_dirs(d, pending)
    num_shards = math.ceil(len(ds.source.items) / p.shard_size)
    if tea in pending:
        ds.close()  # the engine's DataLoader workers open their own handles
        encode_shards(p, d, ds.source, [tea], num_shards)
        dist.barrier()
    if lat in pending:
        write_latent_shards(cfg, d, ds, lat, tea, num_shards)
        dist.barrier()
    if d.is_main:
        _finish(cfg, ds, plans, pending, num_shards)
    dist.barrier()
    return {"status": "built", "groups": {g.kind: str(g.dir) for g in plans}, "samples": len(ds.source.items)}


def check_all_moments(ds: PreparedDataset, d: dist.DistInfo) -> None:
    """Every moments item's header (shape, dtype) before any compute: one error names the bad files."""
    names = ds.moment_names[d.rank::d.world_size]
    problems = [msg for n in tqdm(names, unit="file", desc="check moments", disable=not d.is_main)
                if (msg := check_moments_item(ds.moments, n, ds.resolution))]
    problems = _union_over_ranks({"p": problems}, d)["p"]
    ds.close()
    raise_problems(sorted(problems), "checking the imported moments")


def _index_summary(ds: PreparedDataset) -> dict:
    return {"source": ds.source.location, "resolution": ds.resolution, "imported": ds.fmt}


def _finish(cfg: ImportConfig, ds: PreparedDataset, plans: list[GroupPlan], pending: list[GroupPlan],
            num_shards: int) -> None:
    lat, tea = plans[0], (plans[1] if len(plans) > 1 else None)
    imported = {"imported_from": {**ds.identity(), **ds.locations, "vae": cfg.vae, "vae_run": False},
                "precision": "imported"}
    write_manifests(cfg.preprocess, ds.source, pending, model_identities(pending), num_shards,
                    extra_settings={LATENTS: imported})
    root = Path(cfg.preprocess.out)
    groups.update_index(root, lat.key, tea.key if tea else None, _index_summary(ds))
    open_cache(root, latents=lat.key, teacher=tea.key if tea else None, need_teacher=tea is not None)  # aligned?
    log.info("imported %d %s samples into %s", len(ds.source.items), ds.fmt, root)


# ----------------------------------------------------------------------------------------------
# The latents pass: foreign moments -> latents shards (no VAE)
# ----------------------------------------------------------------------------------------------

class _MomentShards(Dataset):
    """Item i = one whole shard: (shard, keys, labels, float32 moments (n, 8, h, w)), read in a worker."""

    def __init__(self, ds: PreparedDataset, shard_size: int, shards: list[int], skipped: dict[int, tuple]):
        self.ds, self.shard_size, self.shards, self.skipped = ds, shard_size, shards, skipped

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, i: int):
        shard, items = self.shards[i], self.ds.source.items
        skip = {key for key, _ in self.skipped[shard]}
        idx = [j for j in range(shard * self.shard_size, min((shard + 1) * self.shard_size, len(items)))
               if items[j].key not in skip]
        res = self.ds.resolution
        moments = [read_moments(self.ds.moments, self.ds.moment_names[j], res) for j in idx]
        arr = np.stack(moments) if moments else np.zeros((0, 8, res // 8, res // 8), np.float32)
        return shard, [items[j].key for j in idx], np.array([items[j].label for j in idx], np.int64), arr


def _as_is(x):
    return x


def write_latent_shards(cfg: ImportConfig, d: dist.DistInfo, ds: PreparedDataset, plan: GroupPlan,
                        teacher: GroupPlan | None, num_shards: int) -> None:
    """This rank's missing latents shards (every world_size-th), keys aligned with the teacher group."""
    p = cfg.preprocess
    todo = [s for s in range(d.rank, num_shards, d.world_size) if done_record(plan, s, p.resume_verify) is None]
    if d.is_main:
        vae = {"name": cfg.vae, "source": "imported", "format": ds.fmt, "weights_sha256": None,
               "precision": "imported", "scaling_factor": plan.spec.scale, "stored_dtype": p.latent_dtype}
        atomic_write_json(plan.dir / "progress" / "models.json", {"vae": vae})
    if not todo:
        return
    skipped = {s: _teacher_skips(teacher, s) for s in todo}
    ds.close()
    loader = DataLoader(_MomentShards(ds, p.shard_size, todo, skipped), batch_size=None, collate_fn=_as_is,
                        num_workers=min(p.num_workers, len(todo)))
    sink = shard_sink(plan)
    total = sum(min(p.shard_size, len(ds.source.items) - s * p.shard_size) for s in todo)
    with tqdm(total=total, unit="img", desc="import latents", disable=not d.is_main) as bar:
        try:
            for shard, keys, labels, moments in loader:
                sink.add(shard, keys, (labels, moments), list(skipped[shard]))
                sink.commit(shard)
                bar.update(len(keys) + len(skipped[shard]))
        except BaseException:
            sink.abort()
            raise


def _teacher_skips(teacher: GroupPlan | None, shard: int) -> tuple[tuple[str, str], ...]:
    """Inputs the teacher pass skipped in ``shard`` (the latents shard must skip them too)."""
    if teacher is None:
        return ()
    rec = done_record(teacher, shard, "size")
    if rec is None:
        raise PreprocessError(f"{teacher.dir}: teacher shard {shard} is not complete; re-run the same command")
    return rec.skipped
