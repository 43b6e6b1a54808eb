"""`haste eval` for text-to-image: MM-DiT checkpoints (official format and ours, per the contract in
trainer/generate.py), prompts stored beside the images, the captioned grid, resume, refusals.

A random-init tiny MM-DiT (8x8x4 latents -> 64 px with the random:tiny VAE) conditioned on the
random:tiny CLIP text tower (77 x 32) stands in for a trained model; sampling is 3 SDE steps with CFG.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline.metrics.sample_store
from pipeline.encoders.text import load_text_encoder
from pipeline.inputs.prompts import open_prompts, select_prompts
from pipeline.metrics.sample_store import SampleStoreError
from stages.evaluate import load_eval_config, run
from trainer import checkpoint
from trainer.generate import load_model
from trainer.models.mmdit import MMDiT, MMDiTConfig

CFG = MMDiTConfig(depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=8, context_len=77, context_dim=32,
                  z_dim=0)
SAMPLER = ["sampler.mode=sde", "sampler.num_steps=3", "sampler.cfg_scale=2.25"]
PROMPTS = "a red square\n\na blue circle on a green background\nthree cats on a sofa\n"


def tiny_mmdit(z_dim: int = 0, seed: int = 0) -> MMDiT:
    torch.manual_seed(seed)
    return MMDiT(dataclasses.replace(CFG, z_dim=z_dim))


@pytest.fixture(scope="module")
def encoder_sha() -> str:
    return load_text_encoder("random:tiny")[1]["weights_sha256"]


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory, encoder_sha: str) -> Path:
    """Our EMA export of an MM-DiT, as the trainer will write it (trainer/generate.py docstring)."""
    path = tmp_path_factory.mktemp("t2i") / "checkpoints" / "ema-0000005.pt"
    path.parent.mkdir()
    torch.save({"ema": tiny_mmdit().state_dict(), "steps": 5, "model_arch": "mmdit",
                "model_config": dataclasses.asdict(CFG), "latents": None,
                "text": {"encoder": "random:tiny", "seed": 0, "max_length": 77, "dim": 32, "dtype": "float16",
                         "weights_sha256": encoder_sha}}, path)
    (path.parent.parent / "prompts.txt").write_text(PROMPTS)
    return path


def cfg_for(ckpt: Path, out: Path, *extra: str):
    prompts = ckpt.parent.parent / "prompts.txt"
    sets = [f"checkpoint={ckpt}", f"out={out}", f"prompts=file:{prompts}", "num_samples=5", "batch_size=2",
            "chunk_size=2", "device=cpu", "vae=random:tiny", "grid_count=5", "compute=false", *SAMPLER, *extra]
    return load_eval_config(None, tuple(sets))


def npz(out: Path):
    return np.load(out / "samples.npz", allow_pickle=False)


# ----------------------------------------------------------------------------------------------
# Loading


def test_official_t2i_checkpoint_loads_and_samples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train_t2i.py's file: ema + model + opt + pickled args (loaded weights_only, Namespace allow-listed)."""
    ema = tiny_mmdit(z_dim=768, seed=3)                   # projector of --enc-type dinov2-vit-b: dropped
    args = argparse.Namespace(resolution=64, enc_type="dinov2-vit-b", encoder_depth=2, qk_norm=False,
                              fused_attn=True, exp_name="t2i_haste", cfg_prob=0.1)
    path = tmp_path / "checkpoints" / "0150000.pt"
    path.parent.mkdir()
    torch.save({"model": tiny_mmdit(z_dim=768, seed=4).state_dict(), "ema": ema.state_dict(), "opt": {},
                "args": args, "steps": 150000}, path)
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    seen = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: (seen.append(k.get("weights_only")), real_load(*a, **k))[1])
    with pytest.raises(RuntimeError, match="weights do not fit"):     # the args alone say MMDiT-24/2
        load_model(path)
    small = {"depth": 2, "hidden_size": 32, "num_heads": 2, "context_dim": 32}
    loaded = load_model(path, overrides=small)
    assert seen and all(w is True for w in seen)
    assert (loaded.source, loaded.arch, loaded.step, loaded.conditioning) == ("official", "mmdit", 150000, "text")
    assert loaded.model.cfg == dataclasses.replace(CFG, z_dim=0)
    assert loaded.text.encoder is None and loaded.text.dtype == "float32" and loaded.text_null is None
    for k, v in ema.state_dict().items():
        if not k.startswith("projectors."):
            assert torch.equal(loaded.model.state_dict()[k], v), k
    monkeypatch.setattr(torch, "load", real_load)
    result = run(cfg_for(path, tmp_path / "e", "text_encoder=random:tiny", *[f"model.{k}={v}" for k, v in small.items()]))
    assert result["checkpoint_source"] == "official" and result["text_null"] == "encoded"
    assert npz(tmp_path / "e")["arr_0"].shape == (5, 64, 64, 3)


def test_training_checkpoint_with_sidecar_and_preset(tmp_path: Path, encoder_sha: str) -> None:
    """step-*.pt + .json: the architecture in config.model.arch, fields over a preset, text at the top level."""
    ckpt = tmp_path / "checkpoints" / "step-0000004.pt"
    ckpt.parent.mkdir()
    model = tiny_mmdit()
    null = torch.randn(77, 32)
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "train_state": {"step": 4}, "steps": 4,
                "text_null": null}, ckpt)
    fields = {"arch": "mmdit", "preset": "MMDiT-15/2", "depth": 2, "hidden_size": 32, "num_heads": 2,
              "input_size": 8, "context_dim": 32, "z_dim": 16}
    checkpoint.atomic_write_json(ckpt.with_suffix(".json"), {"config": {"model": fields},
                                                             "text": {"name": "random:tiny", "hidden_size": 32}})
    loaded = load_model(ckpt)
    assert (loaded.source, loaded.arch) == ("checkpoint", "mmdit") and loaded.model.cfg == CFG
    assert loaded.text.encoder == "random:tiny" and torch.equal(loaded.text_null, null)
    bad = {"config": {"model": fields}, "text": {"encoder": "random:tiny", "dim": 48}}
    checkpoint.atomic_write_json(ckpt.with_suffix(".json"), bad)
    with pytest.raises(RuntimeError, match="77x48 encodings, the model takes 77x32"):
        load_model(ckpt)


def test_contract_errors_are_one_line(tmp_path: Path, export: Path) -> None:
    p = tmp_path / "ema-0000001.pt"
    torch.save({"ema": tiny_mmdit().state_dict(), "model_arch": "unet", "model_config": {}}, p)
    with pytest.raises(RuntimeError, match="architecture 'unet' is not one of"):
        load_model(p)
    torch.save({"ema": tiny_mmdit().state_dict(), "model_arch": "mmdit", "model_config": dataclasses.asdict(CFG),
                "text_null": torch.zeros(77, 8)}, p)
    with pytest.raises(RuntimeError, match="'text_null' must be a finite float tensor"):
        load_model(p)
    with pytest.raises(ValueError, match="set eval.prompts"):
        run(cfg_for(export, tmp_path / "x", "prompts=null"))


# ----------------------------------------------------------------------------------------------
# The stage


def test_t2i_outputs_prompts_in_store_npz_and_grid(export: Path, tmp_path: Path) -> None:
    a = run(cfg_for(export, tmp_path / "b2"))
    source = open_prompts(f"file:{export.parent.parent / 'prompts.txt'}")
    want, entries = select_prompts(source, 0, range(5))
    assert want[:3] == ["a red square", "a blue circle on a green background", "three cats on a sofa"]
    z = npz(tmp_path / "b2")
    assert z["arr_0"].shape == (5, 64, 64, 3) and z["arr_1"].dtype.kind == "U" and z["arr_1"].tolist() == want
    import zarr

    g = zarr.open_group(str(tmp_path / "b2" / "samples.zarr"), mode="r")
    assert g["prompts"][:].tolist() == want and g["labels"][:].tolist() == entries.tolist()
    meta = g.attrs["haste"]
    assert meta["conditioning"] == "text" and meta["text_encoder"]["name"] == "random:tiny"
    assert meta["text_encoder"]["fp16_rounding"] is True and meta["text_null"]["from"] == "encoded"
    assert a["conditioning"] == "text" and json.loads((tmp_path / "b2" / "metrics.json").read_text())["prompts"]
    grid = Image.open(a["grid"])
    assert grid.size[0] == 3 * 64 and grid.size[1] > 2 * 64          # a caption band above each row
    b = run(cfg_for(export, tmp_path / "b1", "batch_size=1", "chunk_size=3"))
    diff = np.abs(npz(tmp_path / "b1")["arr_0"].astype(int) - z["arr_0"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3                 # per-image seeds: batch-size free
    assert b["sampling"]["images"] == 5


def test_t2i_killed_run_resumes_to_the_uninterrupted_store(export: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    run(cfg_for(export, tmp_path / "ref"))
    real = pipeline.metrics.sample_store.SampleStore.write_chunk
    calls = []

    def dying(self, c, imgs, labels, seeds, prompts=None):
        calls.append(c)
        if len(calls) == 2:  # killed after chunk 1's images and prompts are on disk, before its done flag
            self.images[c * self.chunk:c * self.chunk + len(imgs)] = imgs
            self.prompts[c * self.chunk:c * self.chunk + len(imgs)] = prompts
            raise KeyboardInterrupt
        real(self, c, imgs, labels, seeds, prompts)

    monkeypatch.setattr(pipeline.metrics.sample_store.SampleStore, "write_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        run(cfg_for(export, tmp_path / "killed"))
    monkeypatch.setattr(pipeline.metrics.sample_store.SampleStore, "write_chunk", real)
    import zarr

    assert list(zarr.open_group(str(tmp_path / "killed" / "samples.zarr"), mode="r")["done"][:]) == [1, 0, 0]
    assert not (tmp_path / "killed" / "samples.npz").exists()
    result = run(cfg_for(export, tmp_path / "killed"))
    assert result["sampling"]["images"] == 3                             # chunks 1 and 2 only
    ref, got = npz(tmp_path / "ref"), npz(tmp_path / "killed")
    assert np.array_equal(got["arr_0"], ref["arr_0"]) and np.array_equal(got["arr_1"], ref["arr_1"])
    g = zarr.open_group(str(tmp_path / "killed" / "samples.zarr"), mode="r+")  # a crash that kept a flag but lost
    g["prompts"][2:4] = ""                                                      # a chunk of prompts
    again = run(cfg_for(export, tmp_path / "killed"))
    assert again["sampling"]["images"] == 2 and np.array_equal(npz(tmp_path / "killed")["arr_1"], ref["arr_1"])


def test_other_prompts_or_encoder_are_refused(export: Path, tmp_path: Path) -> None:
    out = tmp_path / "e"
    run(cfg_for(export, out))
    other = export.parent.parent / "other.txt"
    other.write_text("a green triangle\n")
    with pytest.raises(SampleStoreError, match="prompts: store has"):
        run(cfg_for(export, out, f"prompts=file:{other}"))
    with pytest.raises(SampleStoreError, match="prompts: store has"):
        run(cfg_for(export, out, "caption=first"))  # one caption per line: the same strings, but the caption
    # rule is part of the record; the default output dir tells prompt sets apart by their hash
    default = load_eval_config(None, (f"checkpoint={export}", f"prompts=file:{other}", "device=cpu",
                                      "compute=false", "num_samples=2", "vae=random:tiny", *SAMPLER))
    assert "-p" in Path(run(default)["out"]).name


def test_text_encoder_mismatch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "ema-0000001.pt"
    path.parent.mkdir()
    torch.save({"ema": tiny_mmdit().state_dict(), "steps": 1, "model_arch": "mmdit",
                "model_config": dataclasses.asdict(CFG),
                "text": {"encoder": "random:tiny", "seed": 0, "weights_sha256": "0" * 64}}, path)
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    with pytest.raises(ValueError, match="trained with text encoder random:tiny"):
        run(cfg_for(path, tmp_path / "e"))
    # chosen on purpose: a warning, and the run goes on
    assert run(cfg_for(path, tmp_path / "e", "text_encoder=random:tiny"))["num_samples"] == 5


def test_t2i_metrics_with_clip_and_a_caption_source_reference(export: Path, tmp_path: Path) -> None:
    result = run(cfg_for(export, tmp_path / "m", "compute=true", "metrics.extractor=random-init-convnet",
                         "metrics.metrics=[fid,clip]", "metrics.clip_model=random:tiny", "metrics.save_cpu_ram=true",
                         "metrics.fid_method=eigh", "metrics.reference=synthetic-captions:6"))
    m = result["metrics"]
    assert m["reference_fid_stats"] == "computed from 6 reference images" and m["fid"] > 0
    assert 0 <= m["clip_score"] <= 100 and m["skipped"] == {}
    assert "FID" in result["summary"] and "CLIP score" in result["summary"]


def test_class_conditional_checkpoint_refuses_prompts(tmp_path: Path) -> None:
    from trainer.models.sit import ModelConfig, SiT

    mcfg = ModelConfig(depth=1, hidden_size=32, num_heads=2, patch_size=2, input_size=8, num_classes=4, z_dim=0)
    path = tmp_path / "checkpoints" / "ema-0000001.pt"
    path.parent.mkdir()
    torch.save({"ema": SiT(mcfg).state_dict(), "steps": 1, "model_config": dataclasses.asdict(mcfg)}, path)
    (tmp_path / "prompts.txt").write_text(PROMPTS)
    with pytest.raises(ValueError, match="class-conditional sit"):
        run(cfg_for(path, tmp_path / "e"))
    c = load_eval_config(None, (f"checkpoint={path}", "prompts=file:x.txt"))
    assert c.num_samples == 30_000 and load_eval_config(None, (f"checkpoint={path}",)).num_samples == 50_000
    assert load_eval_config(None, (f"checkpoint={path}", "sampler.preset=paper-t2i")).sampler.cfg_scale == 2.25


def test_grid_labels_a_row_once_or_each_cell(tmp_path: Path) -> None:
    from pipeline.metrics.grid import write_grid

    images = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    plain = np.asarray(Image.open(write_grid(images, tmp_path / "plain.png", cols=3)))
    assert plain.shape == (128, 192, 3) and np.array_equal(plain[64:128, 64:128], images[4])   # no captions: as before
    sheet = np.asarray(Image.open(write_grid(images, tmp_path / "cap.png", cols=3,
                                             captions=["cat"] * 3 + ["dog", "owl", "eel"])))
    band = (sheet.shape[0] - 128) // 2
    assert band > 0 and np.array_equal(sheet[band:band + 64, :64], images[0])
    dark = sheet.min(axis=2) < 128
    row0, row1 = dark[:band], dark[band + 64:2 * band + 64]
    assert row0[:, :64].any() and not row0[:, 64:].any()                 # one label for the row
    assert all(row1[:, c * 64:(c + 1) * 64].any() for c in range(3))     # one label per cell
    with pytest.raises(ValueError, match="captions for"):
        write_grid(images, tmp_path / "bad.png", captions=["x"])


def test_cli_errors_are_one_line_before_sampling(export: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from stages.cli import main as cli

    def invoke(*sets: str):
        base = [f"checkpoint={export}", f"out={tmp_path / 'e'}", "device=cpu", "compute=false", "vae=random:tiny",
                "num_samples=2", *SAMPLER, *sets]
        return CliRunner().invoke(cli, ["eval", *[a for s in base for a in ("--set", s)]])

    for sets, message in ((["prompts=file:/nonexistent/prompts.txt"], "prompt file /nonexistent/prompts.txt"),
                          ([f"prompts=file:{export.parent.parent / 'prompts.txt'}",
                            "text_encoder=openai/clip-vit-large-patch14"], "openai/clip-vit-large-patch14")):
        result = invoke(*sets)
        lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
        assert result.exit_code == 1 and len(lines) == 1 and message in lines[0], result.output
        assert "Traceback" not in result.output and not (tmp_path / "e" / "samples.zarr").exists()


def test_text_records_old_and_malformed(tmp_path: Path) -> None:
    """Records as training writes them, as early MM-DiT runs wrote them (the group's encoder identity as a
    mapping), and malformed ones: one RuntimeError naming the file."""
    from trainer.generate import _text_record
    from trainer.models.mmdit import MMDiTConfig

    cfg, path = MMDiTConfig(context_len=8, context_dim=32), tmp_path / "ema-0000006.pt"
    new = _text_record(path, {"encoder": "random:tiny", "seed": 3, "max_length": 8, "dim": 32, "dtype": "float16",
                              "weights_sha256": "ab"}, cfg)
    old = _text_record(path, {"encoder": {"name": "random:tiny", "seed": "3"}, "max_length": 8, "dim": 32,
                              "dtype": "float16", "weights_sha256": "ab"}, cfg)
    assert new == old and new.encoder == "random:tiny" and new.seed == 3
    for bad, match in (({"encoder": "random:tiny", "seed": None}, "malformed seed"),
                       ({"encoder": 5}, "not a string"), ({"max_length": 16}, "16x32 encodings")):
        with pytest.raises(RuntimeError, match=match) as err:
            _text_record(path, bad, cfg)
        assert str(path) in str(err.value)
