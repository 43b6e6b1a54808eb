"""What every ``haste`` command shares: logging setup, one-line errors, common options.

Imports no stage, so ``stages.cli`` and the command modules it gathers (``stages.import_export_cli``)
both build on it without importing each other.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import click

from pipeline import dist

log = logging.getLogger("haste")


def setup_logging(verbose: bool = False) -> None:
    """Configured once here (never at import). Non-zero torchrun ranks log warnings only."""
    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING)
    fmt = "[%(asctime)s] %(levelname).1s %(name)s: %(message)s" if rank == 0 else f"[rank{rank}] %(levelname).1s %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    for noisy in ("PIL", "urllib3", "huggingface_hub", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class ActionableError(click.ClickException):
    """One message, exit status 1, no traceback."""


# OSError covers missing files, permissions and a full disk: all user-fixable, all one line.
EXPECTED_ERRORS: tuple[type[Exception], ...] = (ValueError, RuntimeError, OSError)


def run_guarded(fn, *args, **kwargs):
    """Turn our own error types into one actionable line (tracebacks with HASTE_DEBUG=1)."""
    if os.environ.get("HASTE_DEBUG"):
        return fn(*args, **kwargs)
    try:
        return fn(*args, **kwargs)
    except EXPECTED_ERRORS as e:
        raise ActionableError(f"{type(e).__name__}: {_message(e)}") from None


def _message(e: Exception) -> str:
    """The error's own message; a DataLoader worker's re-raise embeds the worker traceback,
    of which only the last line (the original exception) is kept."""
    text = str(e)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                             help="YAML config (sections: preprocess, train, eval).")
set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Override a config field, e.g. --set batch_size=64 (repeatable).")


def run_stage(load, run, config_path: str | None, overrides: tuple[str, ...], dry_run: bool) -> dict | None:
    """Build the config (or print it with --dry-run), run the stage; rank 0 gets the result."""
    from pipeline.configs import to_dict

    cfg = run_guarded(load, config_path, overrides)
    if dry_run:
        click.echo(json.dumps(to_dict(cfg), indent=2))
        return None
    result = run_guarded(run, cfg)
    dist.shutdown()
    return result if int(os.environ.get("RANK", "0")) == 0 else None


dry_run_option = click.option("--dry-run", is_flag=True, help="Print the resolved config and exit.")
