"""The 512 px path at tiny size: a 1,024-token teacher grid (512 px -> 448 px DINOv2 input -> 32x32
patches) and a SiT with 32x32 tokens (64x64 latents, patch 2), preprocess -> train across the phase
change (here fired by the trigger), and the real 512 recipe's config resolving to 1,024 tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainutil import single_thread

import trainer.loop
import trainer.preview
from pipeline.cache.reader import CacheMismatchError, open_cache
from trainer.config import load_train_config
from trainer.loop import train

REPO = Path(__file__).resolve().parents[1]
# 2 student heads <- 2 teacher heads, one aligned block: a (1024 x 1024) attention map costs 4 MB per head
# and sample, so the CPU test keeps few of them; the token count is what is under test.
TINY_512 = {
    "model.depth": 4, "model.hidden_size": 32, "model.num_heads": 2, "model.patch_size": 2,
    "model.input_size": 64, "model.num_classes": 4, "model.projector_dim": 32, "model.z_dim": 96,
    "align.feature_block": 3, "align.student_blocks": [3], "align.teacher_layers": [11],
    "align.student_heads": [0, 1], "align.teacher_heads": [0, 1],
    "align.stop.trigger": "grad-angle", "align.stop.start": 1, "align.stop.every": 1, "align.stop.samples": 2,
    "align.stop.times": [0.5], "align.stop.block": 3, "align.stop.threshold": 1.0,
    "global_batch_size": 2, "total_steps": 2, "lr": 3e-4, "precision": "fp32", "tf32": False, "device": "cpu",
    "data.num_workers": 0, "log_every": 1, "ckpt_every": 2, "sample_every": 1000, "sample_steps": 2,
    "sample_count": 2,
}


@pytest.fixture(scope="module")
def cache_512(tmp_path_factory) -> Path:
    from stages.preprocess import PreprocessConfig, run

    out = tmp_path_factory.mktemp("cache512")
    with single_thread():
        run(PreprocessConfig(source="synthetic:8", synthetic_classes=4, out=str(out), resolution=512, shard_size=4,
                             vae="builtin:pool", teacher="random:tiny", teacher_layers=(11,), codec="qk-fp16",
                             batch_size=4, num_workers=0, device="cpu"))
    return out


def _cfg(cache: Path, run: Path, **changes):
    sets = {**TINY_512, "data.cache": str(cache), "run_dir": str(run), **changes}
    return load_train_config(None, tuple(f"{k}={json.dumps(v)}" for k, v in sets.items()))


@pytest.mark.slow
def test_1024_token_path_trains_across_the_phase_change(cache_512: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trainer.preview, "loss_plot", lambda *a, **k: None)
    cache = open_cache(cache_512)
    ts = cache.teacher.spec
    assert (ts.grid, ts.num_tokens, cache.latents.spec.size) == (32, 1024, 64)
    cfg = _cfg(cache_512, tmp_path / "run")
    assert cfg.model.num_tokens == 1024
    with single_thread():
        assert train(cfg) == {"step": 2, "phase": "II", "run_dir": str(tmp_path / "run")}
    records = [json.loads(x) for x in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    probes = [r for r in records if "probe" in r]
    losses = [r for r in records if "probe" not in r]
    assert [(r["step"], r["probe"]["fired"], r["probe"]["samples"]) for r in probes] == [(1, True, 2)]
    assert [r["phase"] for r in losses] == ["I", "II"]
    assert {"feat", "attn"} <= set(losses[0]) and "attn" not in losses[1]


def test_256_token_model_is_refused_by_a_1024_token_cache(cache_512: Path, tmp_path: Path) -> None:
    """The official loss would reshape 1024x1024 logits to rows of 256 (SPEC §7.4); we refuse before step 1."""
    cfg = _cfg(cache_512, tmp_path / "run", **{"model.input_size": 32})
    with pytest.raises(CacheMismatchError, match="1024 patch tokens"):
        train(cfg)


def test_512_recipe_config() -> None:
    from pipeline import configs
    from pipeline.encoders.teacher import teacher_input_size
    from stages.evaluate import load_eval_config
    from stages.preprocess import PreprocessConfig

    path = REPO / "configs" / "imagenet-haste-sit-xl-512.yaml"
    pre = configs.load(PreprocessConfig, path, section="preprocess")
    assert pre.resolution == 512 and teacher_input_size(pre.resolution) == 448     # 448 / 14 = 32 per side
    cfg = load_train_config(path)
    assert (cfg.model.depth, cfg.model.hidden_size, cfg.model.input_size, cfg.model.num_tokens) == (28, 1152, 64, 1024)
    assert cfg.align.stop.step == 300_000 and cfg.align.student_blocks == (4, 5, 6, 7)
    ev = load_eval_config(path, ("run_dir=runs/x",))
    assert (ev.sampler.mode, ev.sampler.num_steps, ev.sampler.cfg_scale) == ("sde", 250, 1.25)
    assert (ev.sampler.guidance_low, ev.sampler.guidance_high) == (0.0, 1.0)                 # no interval
