"""Text-to-image training: an MM-DiT through the same loop, engine, phases, probe and checkpoints as SiT.

The condition is one cached caption encoding per image, drawn per step from the micro-batch's text
generator and replaced by the cached empty-caption encoding with p = caption_dropout_prob; Phase I
reads latents + teacher + text, Phase II latents + text and never the teacher group. Runs use the
``caption_cache`` fixture (48 synthetic-captions images, tiny CLIP text model: 8 tokens x 32 dims).
"""

from __future__ import annotations

import builtins
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from trainutil import (
    TINY_MMDIT,
    Killed,
    assert_tree_equal,
    ckpt_steps,
    copy_cache,
    kill_at,
    load_ckpt,
    loss_records,
    overrides,
    tiny_t2i_cfg,
)

import pipeline.cache.loader
import trainer.engine
import trainer.loop
import trainer.preview
from pipeline.cache.loader import CacheStream
from pipeline.cache.reader import CacheMismatchError, index_shard, open_cache, read_sample
from pipeline.cache.schema import TEXT, decode_members
from pipeline.configs import ConfigError
from trainer.conditioning import pick_captions, training_condition
from trainer.config import load_train_config, normalise_saved_config
from trainer.engine import step_generator
from trainer.generate import load_model
from trainer.loop import train
from trainer.models.mmdit import MMDiT, MMDiTConfig
from trainer.models.sit import ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread", "no_loss_plot")


def cached_captions(cache_root: Path) -> dict[str, tuple[list[str], np.ndarray]]:
    """Every sample's captions and encodings, read straight from the text shards."""
    cache = open_cache(cache_root, need_teacher=False, need_text=True)
    out = {}
    for s in range(cache.num_shards):
        path = cache.shard_path(TEXT, s)
        for entry in index_shard(path):
            m = decode_members(TEXT, cache.text.spec, read_sample(path, entry), where=str(path))
            out[entry[0]] = (m["captions"], m["text"])
    return out


# ----------------------------------------------------------------------------------------------
# Config: model.arch selects the network; saved SiT configs without arch stay SiT


@pytest.mark.parametrize("sets, arch", [
    ((), "sit"),
    (("model.preset=SiT-B/2",), "sit"),
    (("model.preset=MMDiT-24/2",), "mmdit"),                       # the preset names its arch
    (("model.arch=mmdit",), "mmdit"),
    (("model.arch=mmdit", "model.preset=MMDiT-24/2", "model.caption_dropout_prob=0.2"), "mmdit"),
])
def test_model_arch_selects_the_config(sets: tuple[str, ...], arch: str) -> None:
    cfg = load_train_config(None, sets)
    assert cfg.model.arch == arch and isinstance(cfg.model, MMDiTConfig if arch == "mmdit" else ModelConfig)
    assert cfg.text_conditioned == (arch == "mmdit")
    if "model.caption_dropout_prob=0.2" in sets:
        assert cfg.model.caption_dropout_prob == 0.2 and cfg.model.num_heads == 24 and cfg.model.context_dim == 768


@pytest.mark.parametrize("sets, match", [
    (("model.arch=dit",), r"'model.arch': unknown architecture 'dit'"),
    (("model.arch=mmdit", "model.preset=SiT-B/2"), r"'model.preset': unknown mmdit preset 'SiT-B/2'"),
    (("model.arch=mmdit", "model.num_classes=10"), r"unknown config field 'model.num_classes'"),
    (("model.arch=mmdit", "model.caption_dropout_prob=1.5"), r"caption_dropout_prob must be in \[0, 1\]"),
    (("model.arch=sit", "model.preset=MMDiT-24/2"), r"unknown sit preset 'MMDiT-24/2'"),
    (("sample_keys=[a]",), r"'sample_keys'"),                         # a SiT previews labels
    (("model.arch=mmdit", "align.student_heads=[0, 30]", "align.teacher_heads=[0, 1]"), r"\[30\] out of range"),
])
def test_bad_model_configs_name_the_field(sets: tuple[str, ...], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_train_config(None, sets)


def test_mmdit_align_preset_is_the_official_pairing() -> None:
    a = load_train_config(None, ("model.preset=MMDiT-24/2", "align.preset=haste-mmdit")).align
    assert (a.student_blocks, a.teacher_layers, a.feature_block) == ((4, 5, 6, 7), (8, 9, 10, 11), 7)
    assert a.student_heads == a.teacher_heads == tuple(range(12))     # loss.py: the first 12 of 24 heads
    assert a.stop.step == 200_000 and a.attn_weight == 0.5 and a.feat_weight == 0.5


def test_saved_config_without_arch_reads_as_sit() -> None:
    saved = {"model": {"depth": 8}, "align": {"stop_step": 3}}
    assert normalise_saved_config(saved) == {"model": {"arch": "sit", "depth": 8}, "align": {"stop": {"step": 3}}}


@pytest.mark.slow
def test_old_sit_run_resumes(demo_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run saved before model.arch existed (its sidecar and config.json lack it) resumes, not refuses."""
    from trainutil import tiny_cfg

    run = tmp_path / "run"
    train(tiny_cfg(demo_cache, run, {"total_steps": 2, "ckpt_every": 2, "log_every": 2}))
    for path in (run / "config.json", run / "checkpoints" / "step-0000002.json"):
        data = json.loads(path.read_text())
        assert data["config"]["model"].pop("arch") == "sit"
        path.write_text(json.dumps(data))
    assert "arch" not in json.loads((run / "checkpoints" / "step-0000002.json").read_text())["config"]["model"]
    seen = []
    real = trainer.loop.train_step
    monkeypatch.setattr(trainer.loop, "train_step", lambda *a: seen.append(a[8]) or real(*a))
    assert train(tiny_cfg(demo_cache, run, {"total_steps": 3, "ckpt_every": 2, "log_every": 2}))["step"] == 3
    assert seen == [2]


# ----------------------------------------------------------------------------------------------
# The condition: caption pick and the CFG null


def _ragged_batch(counts: list[int], length: int = 3, dim: int = 2) -> dict:
    """Caption rows whose values name (image, caption): row k of image i is filled with 1000·i + k."""
    rows = [torch.full((length, dim), 1000.0 * i + k) for i, c in enumerate(counts)
            for k in range(c)]
    counts_t = torch.tensor(counts)
    return {"text": torch.stack(rows), "text_count": counts_t,
            "text_offsets": torch.cat([torch.zeros(1, dtype=torch.long), counts_t.cumsum(0)])}


def test_caption_pick_is_uniform_and_null_rate_is_p() -> None:
    n = 6000
    batch = _ragged_batch([3] * n)
    null = torch.full((3, 2), -7.0, dtype=torch.float16)  # cast to the rows' dtype
    ctx = pick_captions(batch, null, 0.1, step_generator(0, 5, 1, torch.device("cpu"), stream="text"))
    is_null = (ctx == -7.0).all(dim=(1, 2))
    # Binomial(6000, 0.1): mean 600, sd 23.2; the bounds are 4.3 sd wide
    assert 500 < int(is_null.sum()) < 700
    value = ctx[~is_null, 0, 0].double()
    image, caption = torch.div(value, 1000, rounding_mode="floor"), value % 1000
    assert torch.equal(image, torch.arange(n, dtype=torch.double)[~is_null])   # each image keeps its own captions
    freq = torch.bincount(caption.long(), minlength=3).double() / len(caption)
    assert torch.allclose(freq, torch.full((3,), 1 / 3, dtype=torch.double), atol=0.03)   # sd 0.0064
    assert (ctx[is_null] == null).all()                                          # the null itself, exactly
    again = pick_captions(batch, null, 0.1, step_generator(0, 5, 1, torch.device("cpu"), stream="text"))
    assert torch.equal(ctx, again)                                               # a function of (seed, step, slot)
    other = pick_captions(batch, null, 0.1, step_generator(0, 6, 1, torch.device("cpu"), stream="text"))
    assert not torch.equal(ctx, other)
    for p, nulls in ((0.0, 0), (1.0, n)):
        got = pick_captions(batch, null, p, step_generator(0, 5, 1, torch.device("cpu"), stream="text"))
        assert int((got == -7.0).all(dim=(1, 2)).sum()) == nulls
    # the same picks whatever p: the null draws come after all picks
    p0 = pick_captions(batch, null, 0.0, step_generator(0, 5, 1, torch.device("cpu"), stream="text"))
    assert torch.equal(p0[~is_null], ctx[~is_null])


def test_step_generator_streams() -> None:
    """The default stream is seeded by sha256("seed/step/slot") (SiT's RNG unchanged); "text" is another stream."""
    seed = int.from_bytes(hashlib.sha256(b"3/7/1").digest()[:8], "little") & ((1 << 63) - 1)
    g = step_generator(3, 7, 1, torch.device("cpu"))
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=torch.Generator().manual_seed(seed)))
    a = torch.rand(4, generator=step_generator(3, 7, 1, torch.device("cpu"), stream="text"))
    assert not torch.equal(a, torch.rand(4, generator=step_generator(3, 7, 1, torch.device("cpu"))))


@pytest.mark.slow
def test_training_condition_uses_the_cached_null(caption_cache: Path) -> None:
    cache = open_cache(caption_cache, need_teacher=False, need_text=True)
    null_file = np.load(next((caption_cache / "text").glob("*/codec/empty_caption.npy")), allow_pickle=False)
    batch = next(iter(CacheStream(cache, with_teacher=False, with_text=True, batch_size=16, seed=0)))
    model = MMDiT(MMDiTConfig(**{"depth": 2, "hidden_size": 48, "num_heads": 12, "input_size": 8,
                                 "context_len": 8, "context_dim": 32, "z_dim": 0, "caption_dropout_prob": 1.0}))
    gens = lambda: (torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))  # noqa: E731
    ctx = training_condition(batch, model, cache, torch.device("cpu"), *gens())
    assert ctx.shape == (16, 8, 32) and ctx.dtype == torch.float32
    assert (ctx == torch.from_numpy(null_file).float()).all()
    model.cfg = MMDiTConfig(**{**vars(model.cfg), "caption_dropout_prob": 0.0})
    ctx = training_condition(batch, model, cache, torch.device("cpu"), *gens())
    off = batch["text_offsets"]
    for i in range(16):   # each row is one of that image's own captions
        own = batch["text"][off[i]:off[i + 1]].float()
        assert any(torch.equal(ctx[i], row) for row in own)


# ----------------------------------------------------------------------------------------------
# Training runs


@pytest.fixture(scope="module")
def t2i_runs(caption_cache: Path, tmp_path_factory) -> dict[str, Path]:
    """Two 6-step runs across tau = 3: HASTE with attention alignment, and the released recipe (attn_weight 0)."""
    root = tmp_path_factory.mktemp("t2i")
    attn_calls: dict[str, int] = {}
    runs = {}
    for name, attn in (("haste", 0.5), ("released", 0.0)):
        real = trainer.engine.attention_alignment_loss
        calls = []
        trainer.engine.attention_alignment_loss = lambda *a, c=calls, f=real, **k: c.append(1) or f(*a, **k)
        try:
            runs[name] = root / name
            train(tiny_t2i_cfg(caption_cache, runs[name], {"align.attn_weight": attn, "sample_every": 3}))
        finally:
            trainer.engine.attention_alignment_loss = real
        attn_calls[name] = len(calls)
    runs["attn_calls"] = attn_calls  # type: ignore[assignment]
    return runs


@pytest.mark.slow
def test_attention_alignment_on_and_off(t2i_runs) -> None:
    assert t2i_runs["attn_calls"] == {"haste": 3, "released": 0}    # Phase I steps only; none when zeroed
    on, off = loss_records(t2i_runs["haste"]), loss_records(t2i_runs["released"])
    assert [r["phase"] for r in on] == [r["phase"] for r in off] == ["I"] * 3 + ["II"] * 3
    for r in on[:3]:
        assert r["loss"] == pytest.approx(r["denoise"] + 0.5 * r["feat"] + 0.5 * r["attn"], rel=1e-5)
    for r in off[:3]:
        assert "attn" not in r and r["loss"] == pytest.approx(r["denoise"] + 0.5 * r["feat"], rel=1e-5)
    assert all(set(r) >= {"denoise"} and "feat" not in r and "attn" not in r for r in on[3:] + off[3:])
    a, b = load_ckpt(t2i_runs["haste"], 3), load_ckpt(t2i_runs["released"], 3)
    assert not torch.equal(a["model"]["joint_blocks.4.x_block.attn.qkv.weight"],
                           b["model"]["joint_blocks.4.x_block.attn.qkv.weight"])


@pytest.mark.slow
def test_checkpoint_records_what_eval_needs(t2i_runs, caption_cache: Path) -> None:
    run = t2i_runs["haste"]
    meta = json.loads((run / "checkpoints" / "step-0000006.json").read_text())
    cache = open_cache(caption_cache, need_teacher=False, need_text=True)
    assert meta["conditioning"] == "text" and meta["config"]["model"]["arch"] == "mmdit"
    assert meta["cache"]["text"] == cache.text.key
    assert meta["text"] == {"group": cache.text.key, "encoder": "random:tiny", "seed": 0,
                            "weights_sha256": cache.text.models["text_encoder"]["weights_sha256"],
                            "tokenizer": cache.text.identity["tokenizer"], "max_length": 8, "dim": 32,
                            "dtype": "float16", "precision": "fp32",
                            "null_sha256": cache.text.codec_files["empty_caption.npy"]["sha256"]}
    ema = torch.load(run / "checkpoints" / "ema-0000006.pt", weights_only=True)
    assert set(ema) == {"ema", "steps", "model_config", "latents", "conditioning", "text", "text_null"}
    assert torch.equal(ema["text_null"], cache.text_null()) and ema["text"] == meta["text"]
    assert torch.equal(load_ckpt(run, 6)["text_null"], cache.text_null())
    model = MMDiT(MMDiTConfig(**ema["model_config"]))
    model.load_state_dict(ema["ema"], strict=True)
    # eval's reader takes both files as they are: the same net, the recorded encoder, the cached null
    for path in (run / "checkpoints" / "ema-0000006.pt", run / "checkpoints" / "step-0000006.pt"):
        loaded = load_model(path)
        assert loaded.arch == "mmdit" and loaded.text.encoder == "random:tiny" and loaded.text.dtype == "float16"
        assert loaded.text.weights_sha256 == meta["text"]["weights_sha256"]
        assert torch.equal(loaded.text_null, cache.text_null().float())
        assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), model.state_dict().values()))


@pytest.mark.slow
def test_previews_show_cached_prompts(t2i_runs, caption_cache: Path) -> None:
    samples = t2i_runs["haste"] / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["prompts.json", "step-0000003.png", "step-0000006.png"]
    prompts = json.loads((samples / "prompts.json").read_text())["prompts"]
    captions = cached_captions(caption_cache)
    first = [e[0] for e in index_shard(open_cache(caption_cache, need_teacher=False).shard_path("latents", 0))]
    assert [p["key"] for p in prompts] == first[:4]                      # the first sample_count of the cache
    assert [p["caption"] for p in prompts] == [captions[k][0][0] for k in first[:4]]


@pytest.mark.slow
def test_preview_sample_keys(caption_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = sorted(cached_captions(caption_cache))[-2:]
    run = tmp_path / "run"
    drawn = []
    real = trainer.preview.sample_grid
    monkeypatch.setattr(trainer.preview, "sample_grid", lambda *a, **k: drawn.append(k) or real(*a, **k))
    train(tiny_t2i_cfg(caption_cache, run, {"total_steps": 1, "align.stop_step": 1, "sample_keys": keys}))
    prompts = json.loads((run / "samples" / "prompts.json").read_text())["prompts"]
    assert [p["key"] for p in prompts] == keys
    table = drawn[0]["contexts"]
    captions = cached_captions(caption_cache)
    cache = open_cache(caption_cache, need_teacher=False, need_text=True)
    assert table.shape == (3, 8, 32) and torch.equal(table[-1], cache.text_null().float())   # the CFG null row
    assert all(torch.equal(table[i], torch.tensor(captions[k][1][0]).float()) for i, k in enumerate(keys))
    with pytest.raises(CacheMismatchError, match=r"'sample_keys': \['nope'\] not in"):
        train(tiny_t2i_cfg(caption_cache, tmp_path / "bad", {"total_steps": 1, "sample_keys": ["nope"]}))
    assert ckpt_steps(tmp_path / "bad") == []


@pytest.mark.slow
@pytest.mark.parametrize("stop, kill, resumed_phase", [(5, 4, "I"), (3, 5, "II")],
                         ids=["cross-tau-after-resume", "resume-at-tau"])
def test_kill_and_rerun_is_bitwise_identical(caption_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             stop: int, kill: int, resumed_phase: str) -> None:
    """Captions and nulls are drawn per (seed, step, slot): a run killed after its step-3 checkpoint and
    rerun ends bitwise where an uninterrupted one does, across tau, previews included."""
    changes = {"align.stop_step": stop, "sample_every": 3, "data.num_workers": 2}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(tiny_t2i_cfg(caption_cache, straight, changes))
    with monkeypatch.context() as m:
        kill_at(m, kill)
        with pytest.raises(Killed):
            train(tiny_t2i_cfg(caption_cache, resumed, changes))
    seen = []
    real = trainer.loop.train_step
    monkeypatch.setattr(trainer.loop, "train_step", lambda *a: seen.append((a[8], a[5].name)) or real(*a))
    train(tiny_t2i_cfg(caption_cache, resumed, changes))
    assert seen[0] == (3, resumed_phase) and [s for s, _ in seen] == [3, 4, 5]
    a, b = load_ckpt(straight, 6), load_ckpt(resumed, 6)
    for key in ("model", "ema", "opt", "train_state", "rng", "text_null"):
        assert_tree_equal(a[key], b[key], key)
    assert loss_records(straight) == loss_records(resumed)
    png = "samples/step-0000006.png"
    assert (straight / png).read_bytes() == (resumed / png).read_bytes()


@pytest.mark.slow
def test_phase_two_never_opens_the_teacher(caption_cache: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """After the last Phase I step every teacher file is overwritten with zeros and every access under
    teacher/ is recorded: Phase II trains on (latents + text) without one."""
    cache = copy_cache(caption_cache, tmp_path / "cache")
    touched: list[str] = []
    real_step, real_open = trainer.loop.train_step, builtins.open
    real_index, real_shard = pipeline.cache.loader.index_shard, pipeline.cache.loader._open_shard

    def spy(fn):
        def wrapped(path, *a, **k):
            if str(path).startswith(str(cache / "teacher")):
                touched.append(str(path))
            return fn(path, *a, **k)
        return wrapped

    def step(*a):
        out = real_step(*a)
        if a[8] == 2:  # the last Phase I step (tau = 3) is done: ruin the teacher group, then watch it
            for f in (cache / "teacher").rglob("*"):
                if f.is_file():
                    f.write_bytes(bytes(f.stat().st_size))
            for mod, name, fn in ((builtins, "open", real_open), (pipeline.cache.loader, "index_shard", real_index),
                                  (pipeline.cache.loader, "_open_shard", real_shard)):
                monkeypatch.setattr(mod, name, spy(fn))
        return out

    monkeypatch.setattr(trainer.loop, "train_step", step)
    out = train(tiny_t2i_cfg(cache, tmp_path / "run", {"align.stop_step": 3, "total_steps": 6}))
    assert out["phase"] == "II" and out["step"] == 6 and touched == []
    assert [r["phase"] for r in loss_records(tmp_path / "run")] == ["I"] * 3 + ["II"] * 3


@pytest.mark.slow
def test_text_model_needs_a_text_group(demo_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(CacheMismatchError, match="no text group recorded"):
        train(tiny_t2i_cfg(demo_cache, tmp_path / "run"))
    assert ckpt_steps(tmp_path / "run") == []


@pytest.mark.slow
def test_trigger_probe_on_mmdit_and_probe_only(caption_cache: Path, tmp_path: Path, restore_logging) -> None:
    """The gradient-angle probe on the joint block of a text model; --probe-only reproduces it exactly."""
    from click.testing import CliRunner

    from stages.cli import main as cli

    stop = {"trigger": "grad-angle", "start": 2, "every": 2, "samples": 8, "batch_size": 4, "threshold": -1.0}
    run = tmp_path / "run"
    sets = [s for s in overrides(caption_cache, run, {"total_steps": 2, "ckpt_every": 2}, TINY_MMDIT)
            if not s.startswith("align.stop_step=")] + [f"align.stop.{k}={v}" for k, v in stop.items()]
    train(load_train_config(None, tuple(sets)))
    probes = [r["probe"] for r in loss_records(run) if "probe" in r]
    assert len(probes) == 1 and probes[0]["samples"] == 8 and all(np.isfinite(probes[0]["cos"]))
    assert all(n > 0 for n in probes[0]["align_norm"] + probes[0]["denoise_norm"])
    res = CliRunner().invoke(cli, ["train", *[a for kv in sets for a in ("--set", kv)],
                                   "--probe-only", str(run / "checkpoints" / "step-0000002.pt")])
    assert res.exit_code == 0, res.output
    got = json.loads((run / "checkpoints" / "step-0000002-probe.json").read_text())
    assert got["cos"] == probes[0]["cos"]


@pytest.mark.slow
def test_cache_fixture_has_several_captions(caption_cache: Path) -> None:
    """Guards the tests above: some images have more than one caption, so the pick matters."""
    counts = [len(c) for c, _ in cached_captions(caption_cache).values()]
    assert max(counts) >= 2 and min(counts) >= 1 and len(counts) == 48


def test_coco_recipe_is_the_papers() -> None:
    """configs/coco-haste-mmdit.yaml: MMDiT-24/2, batch 256, tau 200K of 250K, AdamW 1e-4, EMA 0.9999, ATTA on."""
    root = Path(__file__).resolve().parents[1]
    cfg = load_train_config(root / "configs" / "coco-haste-mmdit.yaml")
    m, a = cfg.model, cfg.align
    assert isinstance(m, MMDiTConfig) and (m.depth, m.hidden_size, m.num_heads, m.patch_size) == (24, 768, 24, 2)
    assert (m.context_len, m.context_dim, m.z_dim, m.caption_dropout_prob) == (77, 768, 768, 0.1)
    assert (cfg.global_batch_size, cfg.total_steps, a.stop.step, cfg.lr, cfg.ema_decay) == (256, 250_000, 200_000,
                                                                                         1e-4, 0.9999)
    assert a.attn_weight == 0.5 and a.student_heads == tuple(range(12)) and a.feature_block == 7
