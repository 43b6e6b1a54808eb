"""The termination trigger: ``align.stop`` config (and its legacy alias), schedule, decision, the
cosine, the probe set, and the probe itself against a straightforward per-sample ``.backward()``
computation on a copy of the model; the probe leaves training state (RNG, grads, weights) alone."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from trainutil import TINY, overrides

import trainer.probe
from pipeline.cache.loader import CacheStream
from pipeline.cache.reader import open_cache
from pipeline.configs import ConfigError, to_dict
from pipeline.dist import DistInfo
from trainer.config import config_diff, load_train_config
from trainer.engine import build_model
from trainer.phases import build_phases, phase_at, phase_two_boundary
from trainer.probe import cosines, run_probe
from trainer.probe_data import probe_set, rank_share, read_batches, sample_generator
from trainer.stop import (
    TRIGGERS,
    ProbeRecord,
    StepStop,
    TriggerStop,
    normalise_saved_config,
)

NO_STOP_STEP = {k: v for k, v in TINY.items() if k != "align.stop_step"}
CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


pytestmark = pytest.mark.usefixtures("one_thread")


def trigger_cfg(cache: Path | str, run_dir: Path | str, stop: dict, changes: dict | None = None):
    """The tiny config with ``align.stop`` = a trigger (the tiny config's legacy stop_step dropped)."""
    sets = [s for s in overrides(cache, run_dir, changes) if not s.startswith("align.stop_step=")]
    return load_train_config(None, (*sets, *(f"align.stop.{k}={v}" for k, v in stop.items())))


# ----------------------------------------------------------------------------------------------
# Config


def test_stop_step_is_an_alias_of_stop_step_dict() -> None:
    legacy = load_train_config(None, ("align.stop_step=7",))
    new = load_train_config(None, ("align.stop.step=7",))
    assert legacy == new and legacy.align.stop == StepStop(step=7)
    assert to_dict(legacy)["align"]["stop"] == {"step": 7} and "stop_step" not in to_dict(legacy)["align"]
    assert load_train_config(None, ("align.stop_step=null",)).align.stop == StepStop(step=None)
    # the preset's stop is replaced by the section's, in either spelling
    assert load_train_config(None, ("align.preset=haste-sit-b", "align.stop_step=9")).align.stop == StepStop(step=9)
    cfg = load_train_config(None, ("align.preset=haste-sit-b", "align.stop.trigger=grad-angle"))
    assert cfg.align.stop == TriggerStop() and cfg.align.teacher_layers == (7, 9, 11)


def test_paper_preset_values() -> None:
    s = load_train_config(None, ("align.stop.trigger=grad-angle",)).align.stop
    assert (s.start, s.every, s.samples, s.times, s.block, s.threshold, s.max_step) == (
        50_000, 10_000, 2048, (0.02, 0.1, 0.5, 0.8), 4, -0.05, None)


def test_saved_legacy_config_compares_equal() -> None:
    """A run saved with align.stop_step resumes under today's config without a spurious diff."""
    now = to_dict(load_train_config(None, ("align.stop_step=5",)))
    saved = copy.deepcopy(now)
    saved["align"].pop("stop")
    saved["align"]["stop_step"] = 5
    assert config_diff(saved, now)                        # raw: differs
    assert config_diff(normalise_saved_config(saved), now) == {}
    now_trigger = to_dict(load_train_config(None, ("align.stop.trigger=grad-angle",)))
    assert set(config_diff(normalise_saved_config(saved), now_trigger)) >= {"align.stop.step", "align.stop.trigger"}


@pytest.mark.parametrize("sets, field", [
    (("align.stop_step=5", "align.stop.step=5"), "align.stop_step"),
    (("align.stop.step=5", "align.stop.trigger=grad-angle"), "align.stop"),
    (("align.stop.trigger=nope",), "align.stop.trigger"),
    (("align.stop.trigger=grad-angle", "align.stop.times=[0.5, 1.0]"), "align.stop.times"),
    (("align.stop.trigger=grad-angle", "align.stop.times=[]"), "align.stop.times"),
    (("align.stop.trigger=grad-angle", "align.stop.start=0"), "align.stop.start"),
    (("align.stop.trigger=grad-angle", "align.stop.max_step=50000"), "align.stop.max_step"),
    (("align.stop.trigger=grad-angle", "align.stop.threshold=-2"), "align.stop.threshold"),
    (("align.stop.trigger=grad-angle", "align.stop.block=28"), "align.stop.block"),           # XL depth 28
    (("align.stop.trigger=grad-angle", "align.stop.block=9"), "align.stop.block"),            # deepest aligned: 7
    (("align.preset=vanilla", "align.stop.trigger=grad-angle"), "align.stop"),                # nothing to stop
    (("align.stop.trigger=grad-angle", "align.stop.wat=1"), "align.stop.wat"),
])
def test_bad_stop_configs_name_the_field(sets: tuple[str, ...], field: str) -> None:
    with pytest.raises(ConfigError, match=f"'{field}'"):
        load_train_config(None, sets)


def test_unknown_trigger_lists_known() -> None:
    with pytest.raises(ConfigError, match="known: grad-angle"):
        load_train_config(None, ("align.stop.trigger=nope",))


# ----------------------------------------------------------------------------------------------
# Schedule, decision, phases


def test_due_schedule() -> None:
    s = TriggerStop(start=50_000, every=10_000, max_step=100_000)
    assert [k for k in range(0, 130_001, 5_000) if s.due(k)] == [50_000, 60_000, 70_000, 80_000, 90_000]
    s = TriggerStop(start=3, every=4)
    assert [k for k in range(20) if s.due(k)] == [3, 7, 11, 15, 19]


def _rec(mean: float, step: int = 0) -> ProbeRecord:
    return ProbeRecord(step=step, times=(0.5,), cos=(mean,), mean=mean)


def test_grad_angle_decision() -> None:
    s = TriggerStop(threshold=-0.05)
    assert s.fires([_rec(-0.06)]) and not s.fires([_rec(-0.05)]) and not s.fires([_rec(0.3)])
    assert not s.fires([_rec(-0.9), _rec(0.1)])          # the newest probe decides
    assert not s.fires([_rec(math.nan)]) and not s.fires([])


def test_triggers_are_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new rule is a registry entry: here 'two probes in a row below the threshold'."""
    def patience(stop, history):
        return len(history) >= 2 and all(r.mean < stop.threshold for r in history[-2:])

    monkeypatch.setitem(TRIGGERS, "grad-angle-x2", patience)
    s = load_train_config(None, ("align.stop.trigger=grad-angle-x2",)).align.stop
    assert not s.fires([_rec(-0.5)]) and s.fires([_rec(-0.5), _rec(-0.5)]) and not s.fires([_rec(-0.5), _rec(0.1)])


def test_phases_follow_the_fired_step() -> None:
    align = load_train_config(None, ("align.stop.trigger=grad-angle", "align.stop.max_step=300000")).align
    assert [(p.name, p.start, p.end) for p in build_phases(align)] == [("I", 0, 300_000), ("II", 300_000, None)]
    fired = build_phases(align, fired_step=80_000)
    assert phase_at(79_999, fired).name == "I" and phase_at(80_000, fired).name == "II"
    assert phase_two_boundary(fired) == 80_000
    never = load_train_config(None, ("align.stop.trigger=grad-angle",)).align
    assert [p.name for p in build_phases(never)] == ["I"] and phase_two_boundary(build_phases(never)) is None


# ----------------------------------------------------------------------------------------------
# The cosine and the probe set


def test_cosines_on_hand_built_gradients() -> None:
    g = torch.randn(5, 1000)
    h = torch.randn(5, 1000)
    den = torch.stack([g[0], g[1], g[2], torch.zeros(1000), g[4]])
    align = torch.stack([-3 * g[0], 2 * g[1], h[2], g[3], 0.5 * g[4] - 0.5 * h[4]])
    cos, norms = cosines(den, align)
    assert cos[0].item() == pytest.approx(-1.0, abs=1e-12) and cos[1].item() == pytest.approx(1.0, abs=1e-12)
    ref = F.cosine_similarity(g[2].double(), h[2].double(), dim=0).item()
    assert cos[2].item() == pytest.approx(ref, abs=1e-12)
    assert math.isnan(cos[3].item())                       # a zero gradient has no angle
    assert cos.dtype == torch.float64 and norms.shape == (2, 5)
    assert norms[1, 0].item() == pytest.approx(3 * g[0].double().norm().item())


def test_probe_set_is_fixed_and_split() -> None:
    counts = [8, 8, 5, 8]
    a = probe_set(counts, 12, seed=3)
    assert a == probe_set(counts, 12, seed=3) and a != probe_set(counts, 12, seed=4)
    assert [s.index for s in a] == sorted({s.index for s in a}) and len(a) == 12
    starts = [0, 8, 16, 21]
    assert all(starts[s.shard] + s.offset == s.index and 0 <= s.offset < counts[s.shard] for s in a)
    shares = [rank_share(a, r, 3) for r in range(3)]
    assert sorted(s.index for sh in shares for s in sh) == [s.index for s in a]
    with pytest.raises(ValueError, match="align.stop.samples=30"):
        probe_set(counts, 30, seed=0)


def test_probe_reads_the_same_samples_as_the_training_stream(demo_cache: Path) -> None:
    cache = open_cache(demo_cache)
    stream = iter(CacheStream(cache, with_teacher=True, batch_size=1, seed=0, shuffle=False))
    by_key = {}
    for _ in range(sum(s.count for s in cache.latents.shards)):
        b = next(stream)
        by_key[b["key"][0]] = b
    batch = next(read_batches(cache, probe_set([s.count for s in cache.latents.shards], 6, 0), 6))
    for i, key in enumerate(batch["key"]):
        for name, value in batch.items():
            if name != "key":
                assert torch.equal(value[i], by_key[key][name][0]), (key, name)


# ----------------------------------------------------------------------------------------------
# The probe vs a straightforward computation


def _reference_probe(model, cfg, stop: TriggerStop, cache, step: int) -> list[float]:
    """Per sample, per t: losses written out, .backward() on a copy, block gradients summed, cosine."""
    ref = copy.deepcopy(model).float()
    a, spec = cfg.align, cache.latents.spec
    samples = probe_set([s.count for s in cache.latents.shards], stop.samples, cfg.seed)
    params = list(ref.blocks[stop.block].parameters())
    sums = {(kind, t): [torch.zeros_like(p, dtype=torch.float64) for p in params]
            for kind in ("den", "align") for t in stop.times}
    for s in samples:
        b = next(read_batches(cache, [s], 1))
        mean, std = b["moments"].float().chunk(2, dim=1)
        g = sample_generator(cfg.seed, step, s.index)
        x0 = (mean + std * torch.randn(mean.shape[1:], generator=g)) * spec.scale + spec.bias
        noises = [torch.randn(mean.shape[1:], generator=g) for _ in stop.times]
        ts = cache.teacher.spec
        idx = [ts.layers.index(layer) for layer in a.teacher_layers]
        t_logits = cache.teacher_logits({k: b[k][:, idx] for k in ("q", "k")}, idx)  # (1, P, H, T, T)
        t_feat = b["feat"].float()
        for t, eps in zip(stop.times, noises):
            x_t = (1 - t) * x0 + t * eps
            out = ref(x_t, torch.tensor([t]), b["label"], attn_blocks=a.student_blocks, feature_block=a.feature_block)
            den = ((out.out - (eps - x0)) ** 2).mean()
            feat = -F.cosine_similarity(out.features, t_feat, dim=-1).mean()
            ce = [-(t_logits[:, p].softmax(-1) * out.attn_logits[blk][:, list(a.student_heads)].log_softmax(-1))
                  .sum(-1).mean() for p, blk in enumerate(a.student_blocks)]
            align = a.feat_weight * feat + a.attn_weight * torch.stack(ce).mean()
            for kind, loss in (("den", den), ("align", align)):
                ref.zero_grad()
                loss.backward(retain_graph=True)
                for acc, p in zip(sums[(kind, t)], params):
                    acc += p.grad.double()
    out = []
    for t in stop.times:
        d = torch.cat([x.flatten() for x in sums[("den", t)]])
        al = torch.cat([x.flatten() for x in sums[("align", t)]])
        out.append((d @ al / (d.norm() * al.norm())).item())
    return out


@pytest.mark.slow
def test_probe_matches_straightforward_computation(demo_cache: Path, tmp_path: Path) -> None:
    cfg = trigger_cfg(demo_cache, tmp_path, {"trigger": "grad-angle", "start": 1, "samples": 6, "batch_size": 4})
    model, _ = build_model(cfg, torch.device("cpu"))
    with torch.no_grad():  # away from the zero-init start, so every term has a gradient at block 4
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    cache = open_cache(demo_cache)
    got = run_probe(model, cfg, cfg.align.stop, cache, step=7, d=CPU)
    want = _reference_probe(model, cfg, cfg.align.stop, cache, step=7)
    assert got.samples == 6 and got.record.times == cfg.align.stop.times
    assert list(got.record.cos) == pytest.approx(want, abs=2e-5)
    assert got.record.mean == pytest.approx(sum(want) / len(want), abs=2e-5)
    assert len({round(c, 3) for c in want}) > 1            # a non-degenerate case: the times differ
    # the batch size only changes the summation order
    other = run_probe(model, cfg, dataclasses.replace(cfg.align.stop, batch_size=1), cache, step=7, d=CPU)
    assert list(other.record.cos) == pytest.approx(list(got.record.cos), abs=1e-6)


def test_probe_touches_no_training_state(demo_cache: Path, tmp_path: Path) -> None:
    cfg = trigger_cfg(demo_cache, tmp_path, {"trigger": "grad-angle", "start": 1, "samples": 4, "times": "[0.5]"})
    model, _ = build_model(cfg, torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    result = run_probe(model, cfg, cfg.align.stop, open_cache(demo_cache), step=1, d=CPU)
    assert torch.equal(torch.get_rng_state(), rng)          # the global (training) RNG is untouched
    assert all(p.grad is None for p in model.parameters())  # autograd.grad: no .grad written
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert len(result.record.cos) == 1


@pytest.mark.parametrize("factor, fires", [(-1.0, True), (2.0, False)])
def test_constructed_sign(demo_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          factor: float, fires: bool) -> None:
    """Alignment loss constructed as factor x the denoising loss: cos = sign(factor) at every t, and the
    paper's rule (mean < -0.05) fires exactly for the opposed gradients."""
    real = trainer.probe.loss_terms

    def constructed(*args, **kwargs):
        terms = real(*args, **kwargs)
        return {"denoise": terms["denoise"], "feat": factor / 0.5 * terms["denoise"]}  # λ_R = 0.5

    monkeypatch.setattr(trainer.probe, "loss_terms", constructed)
    cfg = trigger_cfg(demo_cache, tmp_path, {"trigger": "grad-angle", "start": 1, "samples": 4, "batch_size": 3})
    model, _ = build_model(cfg, torch.device("cpu"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    result = run_probe(model, cfg, cfg.align.stop, open_cache(demo_cache), step=1, d=CPU)
    assert result.record.cos == pytest.approx([math.copysign(1.0, factor)] * 4, abs=1e-6)
    assert cfg.align.stop.fires([result.record]) is fires


def test_resume_check_normalises_and_allows_probe_batch(tmp_path: Path) -> None:
    from trainer.loop import TrainingError, check_resume

    legacy = to_dict(load_train_config(None, ("align.stop_step=5",)))
    legacy["align"]["stop_step"] = legacy["align"].pop("stop")["step"]     # as a run saved before align.stop
    check_resume(legacy, to_dict(load_train_config(None, ("align.stop.step=5",))), tmp_path)
    base = ("align.stop.trigger=grad-angle",)
    saved = to_dict(load_train_config(None, base))
    check_resume(saved, to_dict(load_train_config(None, (*base, "align.stop.batch_size=8"))), tmp_path)  # memory only
    with pytest.raises(TrainingError, match="align.stop.threshold: -0.05 \\(checkpoint\\) -> -0.1 \\(now\\)"):
        check_resume(saved, to_dict(load_train_config(None, (*base, "align.stop.threshold=-0.1"))), tmp_path)


def test_demo_trigger_config_is_the_demo_with_a_trigger() -> None:
    from pipeline.configs import load_yaml

    root = Path(__file__).resolve().parents[1] / "configs"
    demo, trig = load_train_config(root / "demo.yaml"), load_train_config(root / "demo-trigger.yaml")
    assert demo.align.stop == StepStop(step=500)                            # the demo keeps the fixed step
    assert trig.align.stop == TriggerStop(start=100, every=50, samples=64, max_step=700)
    assert set(config_diff(to_dict(demo), to_dict(trig))) == {
        "run_dir", "align.stop.step", "align.stop.trigger", "align.stop.start", "align.stop.every",
        "align.stop.samples", "align.stop.times", "align.stop.block", "align.stop.threshold",
        "align.stop.max_step", "align.stop.batch_size"}
    a, b = load_yaml(root / "demo.yaml"), load_yaml(root / "demo-trigger.yaml")
    assert a["preprocess"] == b["preprocess"] and a["eval"] == b["eval"]    # the same cache serves both
