"""The demo chain (`make demo` = preprocess -> train -> eval with configs/demo.yaml) at a smaller size.

Same config file and CLI as the demo; only the sizes are overridden, so a broken demo config,
a stage that cannot read the previous stage's output, or a missing artefact fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from stages.cli import main as cli

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "demo.yaml")


def invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output[-3000:]
    return result.stdout


def sets(**kv) -> list[str]:
    return [a for k, v in kv.items() for a in ("--set", f"{k.replace('__', '.')}={v}")]


@pytest.mark.slow
def test_demo_chain(tmp_path: Path) -> None:
    cache, run = tmp_path / "cache", tmp_path / "run"
    invoke("preprocess", "--config", CONFIG, *sets(out=cache, source="synthetic:64", num_workers=0))
    invoke("train", "--config", CONFIG, *sets(data__cache=cache, run_dir=run, total_steps=8, align__stop_step=4,
                                               log_every=2, ckpt_every=4, sample_every=8, sample_steps=4,
                                               data__num_workers=0))
    out = json.loads(invoke("eval", "--config", CONFIG, *sets(
        run_dir=run, num_samples=16, batch_size=8, sampler__num_steps=4, metrics__reference="synthetic:64",
        metrics__kid_subset_size=8, metrics__is_splits=2)).split("\nFID")[0])

    # preprocess: both groups, with the demo's VAE and scale recorded
    manifests = {p.parent.parent.name: json.loads(p.read_text()) for p in cache.glob("*/*/manifest.json")}
    assert set(manifests) == {"latents", "teacher"} and manifests["latents"]["num_samples"] == 64

    # train: Phase I then Phase II, all three losses in Phase I only, artefacts on disk
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in stats] == ["I", "I", "II", "II"]
    assert all("attn" in r and "feat" in r for r in stats[:2]) and not any("attn" in r for r in stats[2:])
    assert (run / "loss.png").is_file() and (run / "samples" / "step-0000008.png").is_file()
    assert sorted(p.name for p in (run / "checkpoints").glob("ema-*.pt")) == ["ema-0000004.pt", "ema-0000008.pt"]

    # eval: store, npz, grid, metrics with the labelled random extractor against the training images
    result_dir = Path(out["out"])
    assert result_dir.parent == run / "eval" and out["step"] == 8
    arr = np.load(result_dir / "samples.npz")["arr_0"]
    assert arr.shape == (16, 128, 128, 3)
    assert Image.open(result_dir / "grid.png").size == (4 * 128, 4 * 128)
    metrics = json.loads((result_dir / "metrics.json").read_text())["metrics"]
    assert "NOT comparable" in metrics["extractor"]
    assert metrics["fid"] > 0 and 0 <= metrics["precision"] <= 1 and metrics["is_mean"] >= 1


T2I_CONFIG = str(REPO / "configs" / "demo-t2i.yaml")
T2I_PROMPTS = REPO / "configs" / "demo-t2i-prompts.txt"


def test_demo_t2i_prompts_are_seen_then_held_out_rows() -> None:
    """The demo grid's 8 rows: 4 training combinations, then 4 held-out ones, 8 samples each."""
    from pipeline.inputs.synth_captions import caption, combinations

    lines = T2I_PROMPTS.read_text().splitlines()
    rows = [lines[i:i + 8] for i in range(0, len(lines), 8)]
    assert len(rows) == 8 and all(len(set(r)) == 1 for r in rows)
    seen, held = {caption(c) for c in combinations(0)}, {caption(c) for c in combinations(0, held_out=True)}
    assert [r[0] in seen for r in rows] == [True] * 4 + [False] * 4
    assert all(r[0] in held for r in rows[4:])


@pytest.mark.slow
def test_demo_t2i_chain(tmp_path: Path) -> None:
    """`make demo-t2i` at a smaller size: captioned cache -> MM-DiT Phase I -> II -> prompt-labelled grid + FID."""
    cache, run = tmp_path / "cache", tmp_path / "run"
    invoke("preprocess", "--config", T2I_CONFIG, *sets(out=cache, source="synthetic-captions:64", num_workers=0))
    invoke("train", "--config", T2I_CONFIG, *sets(data__cache=cache, run_dir=run, total_steps=8, align__stop_step=4,
                                                   log_every=2, ckpt_every=4, sample_every=8, sample_steps=4,
                                                   data__num_workers=0))
    out = json.loads(invoke("eval", "--config", T2I_CONFIG, *sets(
        run_dir=run, num_samples=16, batch_size=8, sampler__num_steps=4,
        metrics__reference="synthetic-captions:64")).split("\nFID")[0])

    manifests = {p.parent.parent.name: json.loads(p.read_text()) for p in cache.glob("*/*/manifest.json")}
    assert set(manifests) == {"latents", "teacher", "text"} and manifests["text"]["num_samples"] == 64
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in stats] == ["I", "I", "II", "II"]
    assert all("attn" in r for r in stats[:2]) and not any("attn" in r for r in stats[2:])
    assert (run / "samples" / "step-0000008.png").is_file()

    result_dir = Path(out["out"])
    assert out["step"] == 8 and out["conditioning"] == "text" and out["text_null"] == "checkpoint"
    npz = np.load(result_dir / "samples.npz")
    assert npz["arr_0"].shape == (16, 128, 128, 3)
    assert list(npz["arr_1"]) == T2I_PROMPTS.read_text().splitlines()[:16]  # the prompts beside the images
    assert json.loads((result_dir / "metrics.json").read_text())["metrics"]["fid"] > 0
    grid = Image.open(result_dir / "grid.png")
    assert grid.size[0] == 4 * 128 and grid.size[1] > 4 * 128  # caption bands above the rows
