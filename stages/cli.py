"""The ``haste`` command line: one thin click command per stage (parse, build config, call run).

    haste preprocess --config configs/demo.yaml --set out=cache [--dry-run]
    haste train --config configs/demo.yaml      haste eval --config configs/demo.yaml --set run_dir=runs/demo
    haste train --config configs/demo.yaml --probe-only runs/demo/checkpoints/step-0000250.pt
    haste cache info cache/        haste cache verify cache/
    haste synth out_dir --count 64 --classes 4 --size 256
"""

from __future__ import annotations

import json
import logging
import os

# OpenMP reads its wait policy once, when torch loads it. Threads that spin while they wait waste
# the cores of a busy machine (README "Training": threads); an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click  # noqa: E402

from pipeline import configs, dist  # noqa: E402
from stages.cli_common import (  # noqa: E402
    ActionableError,
    HasteGroup,
    config_option,
    dry_run_option,
    load_config_guarded,
    run_guarded,
    run_stage,
    set_option,
    setup_logging,
)
from stages.import_export_cli import export, import_  # noqa: E402

log = logging.getLogger("haste")


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from pipeline.cache.groups import git_sha

    def pkg(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    click.echo(f"haste {pkg('haste-pipeline')} (git {git_sha()}), torch {pkg('torch')}, "
               f"python {platform.python_version()}")
    ctx.exit()


@click.group(cls=HasteGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Print the package version, git commit, torch and python versions, then exit.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """HASTE pipeline: preprocess -> train -> eval, with a cached DINOv2 teacher."""
    setup_logging(verbose)


@main.command()
@config_option
@set_option
@click.option("--dry-run", is_flag=True, help="Print the resolved config, output groups and projected size; exit.")
def preprocess(config_path: str | None, overrides: tuple[str, ...], dry_run: bool) -> None:
    """Encode images into SD-VAE moments + DINOv2 targets (rerun to resume)."""
    from stages.preprocess import PreprocessConfig, run

    cfg = load_config_guarded(configs.load, PreprocessConfig, config_path, overrides, section="preprocess")
    result = run_guarded(run, cfg, dry_run=dry_run)
    dist.shutdown()
    if dry_run or int(os.environ.get("RANK", "0")) == 0:
        click.echo(json.dumps(result, indent=2))




@main.command()
@config_option
@set_option
@dry_run_option
@click.option("--probe-only", "probe_ckpt", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Do not train: compute the termination probe (gradient angle, align.stop or the paper's "
                   "settings) on this checkpoint (ours or an official HASTE/REPA one) with the config's cache.")
@click.option("--probe-out", type=click.Path(dir_okay=False), default=None,
              help="JSON file for --probe-only (default: <checkpoint>-probe.json next to it).")
def train(config_path: str | None, overrides: tuple[str, ...], dry_run: bool, probe_ckpt: str | None,
          probe_out: str | None) -> None:
    """Train SiT on a cache: Phase I with cached teacher targets, Phase II denoising only."""
    from stages.train import run
    from trainer.config import load_train_config

    if probe_ckpt is not None:
        from stages.probe_only import run as probe

        result = run_stage(load_train_config, lambda cfg: probe(cfg, probe_ckpt, probe_out), config_path,
                           overrides, dry_run)
        if result is not None:
            click.echo(result["summary"])
        return
    result = run_stage(load_train_config, run, config_path, overrides, dry_run)
    if result is not None:
        click.echo(json.dumps(result))


@main.command("eval")
@config_option
@set_option
@dry_run_option
def eval_(config_path: str | None, overrides: tuple[str, ...], dry_run: bool) -> None:
    """Sample a checkpoint into a resumable zarr store, export npz + grid, compute FID/IS/P/R/KID."""
    from stages.evaluate import load_eval_config, run

    result = run_stage(load_eval_config, run, config_path, overrides, dry_run)
    if result is not None:
        click.echo(json.dumps({k: v for k, v in result.items() if k != "summary"}, indent=2))
        if "summary" in result:
            click.echo(result["summary"])


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--count", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--classes", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--size", type=click.IntRange(min=8), default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["folder", "wds"]), default="folder", show_default=True)
def synth(out: str, count: int, classes: int, size: int, seed: int, fmt: str) -> None:
    """Write the deterministic synthetic dataset as an image folder tree or wds shards."""
    from pathlib import Path

    from pipeline.inputs.synth import write_image_folder, write_wds_shards

    if fmt == "folder":
        paths = write_image_folder(Path(out), count, classes, size, seed=seed)
    else:
        paths = write_wds_shards(Path(out), count, classes, size, seed=seed)
    click.echo(f"wrote {len(paths)} {'images' if fmt == 'folder' else 'shards'} under {out}")


@main.group()
def cache() -> None:
    """Inspect and verify a preprocess cache."""


@cache.command("info")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def cache_info(path: str, as_json: bool) -> None:
    """Fields, bytes per sample, counts and totals of every group."""
    from stages.cache_tools import format_info, info

    result = run_guarded(info, path)
    click.echo(json.dumps(result, indent=2) if as_json else format_info(result))


@cache.command("verify")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--samples", type=click.IntRange(min=0), default=8, show_default=True,
              help="Samples per group to decode and (when the models load) recompute.")
@click.option("--no-models", is_flag=True, help="Skip the fresh teacher/VAE comparison.")
@click.option("--fidelity", is_flag=True,
              help="Also measure the teacher codec against an exact teacher on --samples images "
                   "(KL, loss error, gradient cosine at sharpness x1/x5/x20; feature cosine error); "
                   "recorded in the teacher manifest.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON instead of the summary.")
def cache_verify(path: str, samples: int, no_models: bool, fidelity: bool, as_json: bool) -> None:
    """sha256, sample count and keys of every shard, index.json runs, decode of samples,
    fresh-model comparison, codec fidelity. A bar over the bytes hashed (on a terminal), then a summary."""
    from stages.cache_checks import format_verify
    from stages.cache_tools import verify

    report = run_guarded(verify, path, samples=samples, with_models=not no_models, fidelity=fidelity, progress=None)
    click.echo(json.dumps(report, indent=2) if as_json else format_verify(report))
    if not report["ok"]:
        raise ActionableError("cache verification FAILED (see the report above)")


main.add_command(import_)
main.add_command(export)

if __name__ == "__main__":
    main()
