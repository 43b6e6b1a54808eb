"""What the CLI says: SIGTERM, errors under torchrun, config fields, --version, progress lines."""

from __future__ import annotations

import ast
import functools
import hashlib
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import tiny_preprocess_config
from tqdm import tqdm

from pipeline.configs import ConfigError
from stages import preprocess_engine
from stages.cli import main as cli
from stages.preprocess import run

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False, env=env)


def shard_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).glob("*/*/shard-*.tar"))}


@pytest.mark.slow
def test_sigterm_logs_one_line_cleans_up_and_exits_143(demo_cache, tmp_path):
    out = tmp_path / "c"
    proc = subprocess.run([sys.executable, str(HERE / "_cli_sigterm.py"), str(out), "20"], cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 143, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "haste preprocess stopped by SIGTERM" in last and "rerun the same command to resume" in last
    assert "Traceback" not in proc.stderr
    assert [p for p in out.rglob(".*") if ".tmp" in p.name] == []  # the abort path ran
    assert not list(out.glob("*/*/manifest.json"))
    assert run(tiny_preprocess_config(out))["status"] == "built"
    assert shard_hashes(out) == shard_hashes(demo_cache)


def test_config_error_is_printed_by_rank_zero_only(tmp_path, restore_logging):
    bad = ["preprocess", "--set", "resolution=50", "--set", f"out={tmp_path}"]
    res = invoke(*bad, env={"RANK": "0"})
    assert res.exit_code == 1 and res.stderr.startswith("Error: ConfigError: config field 'resolution'")
    assert len(res.stderr.strip().splitlines()) == 1
    for rank in ("1", "7"):
        res = invoke(*bad, env={"RANK": rank})
        assert res.exit_code == 1 and res.stderr == "", res.stderr
    res = invoke("train", "--set", "no_such_field=1", env={"RANK": "3"})
    assert res.exit_code == 1 and res.stderr == ""
    # an error that may be one rank's own (its disk, its inputs) is still printed by that rank
    res = invoke("preprocess", "--set", f"source={tmp_path / 'missing'}", "--set", f"out={tmp_path / 'o'}",
                 env={"RANK": "1"})
    assert res.exit_code == 1 and "Error: SourceError: source not found" in res.stderr


def test_teacher_layer_out_of_range_names_teacher_layers(tmp_path, restore_logging):
    with pytest.raises(ConfigError, match=r"config field 'teacher_layers': layers \[12, 13\] out of range"):
        run(tiny_preprocess_config(tmp_path / "o", teacher_layers=(8, 12, 13)))
    res = invoke("preprocess", "--dry-run", "--set", "teacher=random:tiny", "--set", "teacher_layers=[11,12]",
                 "--set", f"out={tmp_path / 'o'}", "--set", "source=synthetic:8")
    assert res.exit_code == 1
    assert "config field 'teacher_layers'" in res.stderr and "codec" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_version(restore_logging):
    from importlib.metadata import version

    res = invoke("--version")
    assert res.exit_code == 0
    assert res.stdout.startswith(f"haste {version('haste-pipeline')} (git ") and "torch" in res.stdout


def _user_facing_strings(path: Path):
    """String constants of a module that are not docstrings (messages, help texts, log formats)."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            yield node.lineno, node.value


def test_no_message_cites_a_document_users_do_not_have():
    cites = [f"{p.relative_to(REPO)}:{line}: {text[:80]!r}"
             for pkg in ("pipeline", "trainer", "stages") for p in sorted((REPO / pkg).rglob("*.py"))
             for line, text in _user_facing_strings(p) if "SPEC" in text or "§" in text or "STYLE" in text]
    assert cites == []
    found = list(_user_facing_strings(REPO / "pipeline" / "cache" / "schema.py"))  # the scan sees messages
    assert any("re-run `haste preprocess`" in text for _, text in found)


def test_fresh_run_says_nothing_about_earlier_shards(demo_cache, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="stages.preprocess_engine"):
        run(tiny_preprocess_config(tmp_path / "fresh", source="synthetic:16"))
    assert not [r for r in caplog.records if "earlier shard" in r.getMessage()]
    out = Path(shutil.copytree(demo_cache, tmp_path / "resumed"))
    for m in out.glob("*/*/manifest.json"):
        m.unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="stages.preprocess_engine"):
        run(tiny_preprocess_config(out))
    assert [r.getMessage() for r in caplog.records if "earlier shard" in r.getMessage()] == \
        ["rank 0: checked 6 of 6 earlier shard(s)"]


def test_progress_bar_draws_100_percent_once(tmp_path, monkeypatch, capfd):
    # mininterval=0: every update draws, so the count below does not depend on timing
    monkeypatch.setattr(preprocess_engine, "tqdm", functools.partial(tqdm, mininterval=0, miniters=1))
    run(tiny_preprocess_config(tmp_path / "o", source="synthetic:16"))
    err = capfd.readouterr().err
    frames = [f for f in err.replace("\r", "\n").splitlines() if f.startswith("preprocess:")]
    assert sum("100%" in f for f in frames) == 1, frames
    assert frames[-1].startswith("preprocess: 100%") and "16/16" in frames[-1]
