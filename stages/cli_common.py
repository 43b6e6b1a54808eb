"""What every ``haste`` command shares: logging setup, one-line errors, SIGTERM, common options.

Imports no stage, so ``stages.cli`` and the command modules it gathers (``stages.import_export_cli``)
both build on it without importing each other.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator

import click

from pipeline import dist
from pipeline.configs import ConfigError

log = logging.getLogger("haste")


def setup_logging(verbose: bool = False) -> None:
    """Configured once here (never at import). Non-zero torchrun ranks log warnings only."""
    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING)
    fmt = "[%(asctime)s] %(levelname).1s %(name)s: %(message)s" if rank == 0 else f"[rank{rank}] %(levelname).1s %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    for noisy in ("PIL", "urllib3", "huggingface_hub", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class ActionableError(click.ClickException):
    """One message, exit status 1, no traceback. An error every rank hits alike (a bad config) is
    printed by rank 0 only; the other ranks exit with the same status, quietly."""

    def __init__(self, message: str, same_on_every_rank: bool = False):
        super().__init__(message)
        self.same_on_every_rank = same_on_every_rank

    def show(self, file=None) -> None:
        if not (self.same_on_every_rank and _rank() != 0):
            super().show(file)


# OSError covers missing files, permissions and a full disk: all user-fixable, all one line.
EXPECTED_ERRORS: tuple[type[Exception], ...] = (ValueError, RuntimeError, OSError)


def run_guarded(fn, *args, **kwargs):
    """Turn our own error types into one actionable line (tracebacks with HASTE_DEBUG=1)."""
    if os.environ.get("HASTE_DEBUG"):
        return fn(*args, **kwargs)
    try:
        return fn(*args, **kwargs)
    except EXPECTED_ERRORS as e:
        raise ActionableError(f"{type(e).__name__}: {_message(e)}", same_on_every_rank=isinstance(e, ConfigError)) \
            from None


def load_config_guarded(load, *args, **kwargs):
    """``run_guarded`` for building a config: whatever fails there fails alike on every rank."""
    try:
        return run_guarded(load, *args, **kwargs)
    except ActionableError as e:
        e.same_on_every_rank = True
        raise


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

    cfg = load_config_guarded(load, config_path, overrides)
    if dry_run:
        click.echo(json.dumps(to_dict(cfg), indent=2))
        return None
    result = run_guarded(run, cfg)
    dist.shutdown()
    return result if int(os.environ.get("RANK", "0")) == 0 else None


dry_run_option = click.option("--dry-run", is_flag=True, help="Print the resolved config and exit.")


# ----------------------------------------------------------------------------------------------
# SIGTERM (a scheduler's preemption, torchrun's shutdown, `kill`): an exception, not a silent death
# ----------------------------------------------------------------------------------------------

class Terminated(KeyboardInterrupt):
    """SIGTERM raised in the main thread, so ``finally`` blocks and abort paths run (temp files are
    removed) as on Ctrl-C. A KeyboardInterrupt, so DataLoader workers treat it as their parent's stop."""


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM during cleanup ends the process at once
    if os.getpid() != _owner_pid:  # a forked child (DataLoader worker): end as SIGTERM always did
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise Terminated()


_owner_pid = os.getpid()


@contextlib.contextmanager
def sigterm_as_exception() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` in the main thread (elsewhere: a no-op)."""
    global _owner_pid
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _owner_pid = os.getpid()
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class HasteGroup(click.Group):
    """The ``haste`` group: a SIGTERM ends any command with one line and exit status 143 (128 + 15)."""

    def invoke(self, ctx: click.Context):
        with sigterm_as_exception():
            try:
                return super().invoke(ctx)
            except Terminated:
                if _rank() == 0:
                    log.warning("haste %s stopped by SIGTERM: finished work is kept and nothing half-written "
                                "remains; rerun the same command to resume", ctx.invoked_subcommand or "")
                ctx.exit(143)
