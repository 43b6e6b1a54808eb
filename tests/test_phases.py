"""Phases as data: the boundary at exactly tau, vanilla / REPA / HASTE as configurations of one
trainer, and the alignment presets validated against the model and the cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from trainutil import load_ckpt, stats, tiny_cfg

import trainer.engine
from pipeline.cache.reader import CacheMismatchError
from pipeline.configs import ConfigError
from trainer.config import AlignConfig, load_train_config
from trainer.loop import train
from trainer.phases import build_phases, phase_at
from trainer.stop import StepStop

# ----------------------------------------------------------------------------------------------
# Pure phase logic


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("tau", [1, 3, 250_000])
def test_phase_at_boundary(tau: int) -> None:
    phases = build_phases(AlignConfig(stop=StepStop(step=tau)))
    assert [p.name for p in phases] == ["I", "II"]
    assert phase_at(0, phases).name == "I"
    assert phase_at(tau - 1, phases).name == "I"          # the tau-th step (index tau-1) still aligns
    assert phase_at(tau, phases).name == "II"             # exactly tau steps use the alignment losses
    assert phase_at(tau + 1, phases).name == "II"
    assert phase_at(10 * tau + 7, phases).name == "II"
    assert sum(phase_at(s, phases).needs_teacher for s in range(tau + 5)) == tau
    p1, p2 = phases
    assert (p1.feat_weight, p1.attn_weight, p1.needs_teacher) == (0.5, 0.5, True)
    assert (p2.feat_weight, p2.attn_weight, p2.needs_teacher) == (0.0, 0.0, False)


def test_phase_at_rejects_negative_step() -> None:
    with pytest.raises(ValueError, match="no phase covers step -1"):
        phase_at(-1, build_phases(AlignConfig(stop=StepStop(step=3))))


@pytest.mark.parametrize("align", [
    dict(stop=StepStop(step=0)),                          # vanilla via tau = 0
    dict(feat_weight=0.0, attn_weight=0.0, stop=StepStop(step=5)),  # vanilla via zero weights
])
def test_vanilla_is_one_denoise_phase(align: dict) -> None:
    phases = build_phases(AlignConfig(**align))
    assert [p.name for p in phases] == ["denoise"]
    assert all(not phase_at(s, phases).needs_teacher for s in (0, 1, 5, 10**6))


def test_repa_only_never_terminates() -> None:
    phases = build_phases(AlignConfig(attn_weight=0.0, stop=StepStop(step=None)))
    assert [p.name for p in phases] == ["I"]
    p = phase_at(10**9, phases)
    assert p.needs_features and not p.needs_attention


# ----------------------------------------------------------------------------------------------
# Presets and validation


def test_haste_sit_b_preset_resolves() -> None:
    cfg = load_train_config(None, ("model.preset=SiT-B/2", "align.preset=haste-sit-b"))
    a = cfg.align
    assert a.feature_block == 4                           # official encoder_depth 5 (1-based)
    assert a.student_blocks == (2, 3, 4) and a.teacher_layers == (7, 9, 11)
    assert a.student_heads == tuple(range(12)) == a.teacher_heads
    assert a.stop == StepStop(step=100_000) and a.feat_weight == a.attn_weight == 0.5
    assert (cfg.model.depth, cfg.model.hidden_size, cfg.model.num_heads) == (12, 768, 12)
    # A field given next to the preset overrides it.
    cfg = load_train_config(None, ("align.preset=haste-sit-b", "align.stop_step=7"))  # the legacy alias
    assert cfg.align.stop == StepStop(step=7) and cfg.align.teacher_layers == (7, 9, 11)


@pytest.mark.parametrize("sets, field", [
    (("model.depth=4",), "align.feature_block"),                          # block 4 needs depth >= 5
    (("model.depth=4", "align.feat_weight=0"), "align.student_blocks"),   # attention pairs 2,3,4
    (("model.depth=12", "model.num_heads=6", "model.hidden_size=384"), "align.student_heads"),
    (("model.depth=5", "model.z_dim=0"), "model.z_dim"),                  # the projector is needed
])
def test_haste_sit_b_validates_against_model(sets: tuple[str, ...], field: str) -> None:
    with pytest.raises(ConfigError, match=f"'{field}'"):
        load_train_config(None, ("align.preset=haste-sit-b", *sets))
    load_train_config(None, ("align.preset=haste-sit-b", "model.depth=5"))  # just deep enough


def test_unknown_align_preset_names_field() -> None:
    with pytest.raises(ConfigError, match="'align.preset'.*haste-sit-b"):
        load_train_config(None, ("align.preset=haste-sit-xxl",))


def test_alignment_pairs_must_match_up() -> None:
    with pytest.raises(ConfigError, match="'align.student_blocks'"):
        AlignConfig(student_blocks=(4, 5), teacher_layers=(8, 9, 10))


def test_haste_sit_b_checked_against_cache_before_training(demo_cache: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo cache stores teacher layers 8-11: layer 7 of the B recipe is missing -> refused up front."""
    calls = []
    monkeypatch.setattr("trainer.loop.train_step", lambda *a, **k: calls.append(1))
    cfg = tiny_cfg(demo_cache, tmp_path / "run", {"align.preset": "haste-sit-b", "align.stop_step": 3})
    with pytest.raises(CacheMismatchError, match=r"teacher layers \[7\] are not cached"):
        train(cfg)
    assert not calls


# ----------------------------------------------------------------------------------------------
# The trainer honours the boundary


def _spy_micro_loss(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Record, per micro-batch, the phase, the loss keys and what the step inputs carried."""
    seen: list[dict] = []
    real = trainer.engine.micro_loss

    def spy(net, model, cfg, phase, inp, g):
        losses = real(net, model, cfg, phase, inp, g)
        seen.append({"phase": phase.name, "keys": set(losses), "feat_in": inp.teacher_feat is not None,
                     "logits_in": inp.teacher_logits is not None,
                     "trainable_projector": any(p.requires_grad for p in model.projectors.parameters())})
        return losses

    monkeypatch.setattr(trainer.engine, "micro_loss", spy)
    return seen


def test_exactly_tau_steps_align(demo_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _spy_micro_loss(monkeypatch)
    run = tmp_path / "run"
    out = train(tiny_cfg(demo_cache, run, {"align.stop_step": 3, "total_steps": 6, "ckpt_every": 100}))
    assert out == {"step": 6, "phase": "II", "run_dir": str(run)}
    assert [s["phase"] for s in seen] == ["I", "I", "I", "II", "II", "II"]
    aligned = {"loss", "denoise", "feat", "attn"}
    assert [s["keys"] for s in seen] == [aligned] * 3 + [{"loss", "denoise"}] * 3
    # Phase II: no teacher targets are even loaded, and the projector is out of the step.
    assert [s["feat_in"] and s["logits_in"] for s in seen] == [True] * 3 + [False] * 3
    assert [s["trainable_projector"] for s in seen] == [True] * 3 + [False] * 3
    recs = stats(run)
    assert [(r["step"], r["phase"]) for r in recs] == [(1, "I"), (2, "I"), (3, "I"), (4, "II"), (5, "II"), (6, "II")]
    assert all("feat" in r and "attn" in r for r in recs[:3])
    assert not any("feat" in r or "attn" in r for r in recs[3:])
    assert all(r["loss"] == pytest.approx(r["denoise"]) for r in recs[3:])
    # Entering Phase II is an explicit event that checkpoints at tau; the projector is frozen after it.
    at_tau, final = load_ckpt(run, 3), load_ckpt(run, 6)
    proj = [k for k in final["model"] if k.startswith("projectors.")]
    assert proj and all(torch.equal(at_tau["model"][k], final["model"][k]) for k in proj)
    assert not torch.equal(at_tau["model"]["final_layer.linear.weight"], final["model"]["final_layer.linear.weight"])


@pytest.mark.parametrize("changes, phases, keys", [
    ({"align.stop_step": 0}, ["denoise"] * 3, {"loss", "denoise"}),
    ({"align.feat_weight": 0.0, "align.attn_weight": 0.0}, ["denoise"] * 3, {"loss", "denoise"}),
    ({"align.preset": "repa", "align.stop_step": None}, ["I"] * 3, {"loss", "denoise", "feat"}),
    ({"align.feat_weight": 0.0, "align.stop_step": None}, ["I"] * 3, {"loss", "denoise", "attn"}),
], ids=["vanilla-tau0", "vanilla-weights0", "repa", "attention-only"])
def test_other_methods_are_configurations(demo_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          changes: dict, phases: list[str], keys: set[str]) -> None:
    seen = _spy_micro_loss(monkeypatch)
    run = tmp_path / "run"
    train(tiny_cfg(demo_cache, run, {"total_steps": 3, "ckpt_every": 100, **changes}))
    assert [s["phase"] for s in seen] == phases
    assert all(s["keys"] == keys for s in seen)
    assert all(s["trainable_projector"] == ("feat" in keys) for s in seen)
    assert [r["phase"] for r in stats(run)] == phases


def test_tau_on_a_checkpoint_interval_saves_once(demo_cache: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """tau % ckpt_every == 0 (the defaults: 250K, 10K): the interval save at tau is the phase-switch
    checkpoint; writing the same multi-GB checkpoint a second time would be pure waste."""
    import trainer.checkpoint

    saved: list[int] = []
    real = trainer.checkpoint.save

    def spy(run_dir, step, payload, meta, keep):
        saved.append(step)
        return real(run_dir, step, payload, meta, keep)

    monkeypatch.setattr(trainer.checkpoint, "save", spy)
    run = tmp_path / "run"
    train(tiny_cfg(demo_cache, run, {"align.stop_step": 3, "total_steps": 6, "ckpt_every": 3}))
    assert saved == [3, 6]
    assert load_ckpt(run, 3)["train_state"]["phase"] == "I"


def test_overrides_read_exponent_floats_and_reject_words() -> None:
    """YAML 1.1 reads `1e-3` (no dot) as a string; a float field takes it anyway."""
    assert load_train_config(None, ("lr=1e-3",)).lr == 1e-3
    with pytest.raises(ConfigError, match="'lr'"):
        load_train_config(None, ("lr=fast",))
