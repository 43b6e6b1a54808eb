"""``haste import edm2|repae`` and ``haste export edm2``: thin click commands over ``stages.import_export``.

    haste import edm2 data/ --vae stabilityai/sd-vae-ft-ema --config C --set out=cache
    haste import repae data/ --vae stabilityai/sd-vae-ft-ema --latents-name sdvae --set out=cache
    haste import uvit coco256_features/train --vae stabilityai/sd-vae-ft-ema [--images coco/train2014]
    haste export edm2 cache/ out/          # writes out/images/ + out/vae-sd/ (edm2 convert + encode)

Teacher, shard size, dtypes, workers and the cache root come from the ``preprocess:`` section of
``--config`` plus ``--set`` overrides, exactly as for ``haste preprocess``.
"""

from __future__ import annotations

import json
import os

import click

from pipeline import dist
from stages.cli_common import config_option, run_guarded, set_option


@click.group("import")
def import_() -> None:
    """Bring a dataset preprocessed by another codebase into the cache (rerun to resume)."""


@click.group("export")
def export() -> None:
    """Write a cache group in another codebase's layout."""


vae_option = click.option("--vae", default="", metavar="NAME",
                          help="VAE the moments were encoded with (e.g. stabilityai/sd-vae-ft-ema); required.")
dry_run_option = click.option("--dry-run", is_flag=True, help="Print the plan (groups, sizes) and exit.")


def _run_import(fmt: str, src: str, vae: str, config_path: str | None, overrides: tuple[str, ...],
                dry_run: bool, **paths: str) -> None:
    from stages.import_export import load_import_config, run_import

    cfg = run_guarded(load_import_config, fmt, src, vae, config_path, overrides, **paths)
    result = run_guarded(run_import, cfg, dry_run=dry_run)
    dist.shutdown()
    if dry_run or int(os.environ.get("RANK", "0")) == 0:
        click.echo(json.dumps(result, indent=2))


@import_.command("edm2")
@click.argument("src", type=click.Path(file_okay=False), required=False, default="")
@vae_option
@click.option("--images", default="", help="images folder or .zip (default: SRC/images[.zip]).")
@click.option("--moments", default="", help="moments folder or .zip (default: SRC/vae-sd[.zip]).")
@config_option
@set_option
@dry_run_option
def import_edm2(src: str, vae: str, images: str, moments: str, config_path: str | None,
                overrides: tuple[str, ...], dry_run: bool) -> None:
    """edm2/REPA/HASTE layout: SRC/images + SRC/vae-sd (folders or zips with dataset.json)."""
    _run_import("edm2", src, vae, config_path, overrides, dry_run, images=images, moments=moments)


@import_.command("repae")
@click.argument("src", type=click.Path(file_okay=False))
@vae_option
@click.option("--latents-name", default="", help="NAME of SRC/NAME.h5 (default: the only .h5 besides images.h5).")
@config_option
@set_option
@dry_run_option
def import_repae(src: str, vae: str, latents_name: str, config_path: str | None, overrides: tuple[str, ...],
                 dry_run: bool) -> None:
    """REPA-E layout: SRC/images.h5 + images_h5.json, SRC/NAME.h5 + NAME_h5.json."""
    _run_import("repae", src, vae, config_path, overrides, dry_run, latents_name=latents_name)


@import_.command("uvit")
@click.argument("src", type=click.Path(file_okay=False))
@vae_option
@click.option("--images", default="", help="the COCO split folder the features came from (train2014/ or val2014/ with "
              "annotations/ beside it): keys = image ids, caption strings, and the teacher from the originals "
              "(needed when HASTE's PNGs are clipped).")
@config_option
@set_option
@dry_run_option
def import_uvit(src: str, vae: str, images: str, config_path: str | None, overrides: tuple[str, ...],
                dry_run: bool) -> None:
    """U-ViT/HASTE coco256_features: SRC/{i}.npy (mean ++ logvar), SRC/{i}_{k}.npy, empty_context.npy[, {i}.png]."""
    from stages.import_uvit import load_uvit_config, run_import_uvit

    cfg = run_guarded(load_uvit_config, src, vae, images, config_path, overrides)
    result = run_guarded(run_import_uvit, cfg, dry_run=dry_run)
    dist.shutdown()
    if dry_run or int(os.environ.get("RANK", "0")) == 0:
        click.echo(json.dumps(result, indent=2))


@export.command("edm2")
@click.argument("cache", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--latents", default="", help="latents group key (default: the newest run's).")
@click.option("--source", default="", metavar="PATH",
              help="the dataset preprocess read, if it moved (default: the location in the manifest).")
@click.option("--images/--no-images", default=True, show_default=True,
              help="also write OUT/images/ (re-cropped from the source, exactly as preprocess did).")
@click.option("--workers", type=click.IntRange(min=0), default=4, show_default=True,
              help="processes reading shards and writing files.")
def export_edm2(cache: str, out: str, latents: str, source: str, images: bool, workers: int) -> None:
    """Write OUT/images/ + OUT/vae-sd/ as edm2's dataset_tool.py convert + encode would (sorted source order)."""
    from stages.export_edm2 import ExportConfig, run_export

    cfg = run_guarded(ExportConfig, cache=cache, out=out, latents=latents, source=source, images=images,
                      num_workers=workers)
    click.echo(json.dumps(run_guarded(run_export, cfg), indent=2))
