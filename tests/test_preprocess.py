"""The preprocess stage end to end on tiny CPU configs: resume, reuse, bad inputs, errors, CLI.

The session ``demo_cache`` (synthetic:48, 6 shards of 8, tiny random VAE + DINOv2, qk-fp16) is the
uninterrupted reference run; tests that change a cache work on a copy or a fresh directory.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import tiny_preprocess_config
from PIL import Image

from pipeline.cache.reader import index_shard, open_cache, read_sample
from pipeline.cache.schema import LATENTS, TEACHER, bytes_per_sample, decode_members, read_manifest
from pipeline.encoders.weights import WeightsError
from pipeline.inputs.sources import SourceError, open_source
from pipeline.inputs.synth import synth_image, write_image_folder, write_wds_shards
from stages import preprocess_engine
from stages.cli import main as cli
from stages.preprocess import PreprocessError, plan_groups, run

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


# ----------------------------------------------------------------------------------------------
# helpers


def shard_hashes(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every complete-named shard under a cache root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).glob("*/*/shard-*.tar"))}


def temp_files(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).rglob(".*") if ".tmp" in p.name)


def manifest_records(root: Path) -> dict[str, list[dict]]:
    out = {}
    for m in sorted(Path(root).glob("*/*/manifest.json")):
        out[str(m.parent.relative_to(root))] = json.loads(m.read_text())["shards"]
    return out


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(Path(root).rglob("*")) if p.is_file()}


def copy_cache(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=shutil.copy2)
    return dst


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 3 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def decoded_by_index(root: Path) -> dict[int, dict]:
    """image index -> decoded latents + teacher arrays of every sample in a cache."""
    c = open_cache(root)
    out: dict[int, dict] = {}
    for kind, m in ((LATENTS, c.latents), (TEACHER, c.teacher)):
        for i in range(len(m.shards)):
            p = c.shard_path(kind, i)
            for entry in index_shard(p):
                idx = int(entry[0].rsplit("_", 1)[-1].rsplit("/", 1)[-1])
                out.setdefault(idx, {}).update(decode_members(kind, m.spec, read_sample(p, entry), entry[0]))
    return out



def cli_sets(out: Path, **overrides) -> list[str]:
    cfg = tiny_preprocess_config(out, **overrides)
    args = []
    for k in ("source", "synthetic_classes", "out", "resolution", "shard_size", "vae", "teacher", "batch_size",
              "num_workers", "device", "codec", "max_skip_fraction", "max_pixels"):
        v = getattr(cfg, k)
        args += ["--set", f"{k}={v}"]
    return args


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


# ----------------------------------------------------------------------------------------------
# rerun, reuse


def test_demo_cache_is_complete_and_consistent(demo_cache):
    idx = json.loads((demo_cache / "index.json").read_text())
    assert len(idx["runs"]) == 1
    lat = read_manifest(demo_cache / LATENTS / idx["runs"][0]["latents"])
    tea = read_manifest(demo_cache / TEACHER / idx["runs"][0]["teacher"])
    assert lat.num_samples == tea.num_samples == 48 and len(lat.shards) == len(tea.shards) == 6
    for a, b in zip(lat.shards, tea.shards):
        assert (a.count, a.first_key, a.last_key) == (b.count, b.first_key, b.last_key)
    for m in (lat, tea):
        for rec in m.shards:
            p = demo_cache / m.kind / m.key / rec.name
            assert p.stat().st_size == rec.bytes and hashlib.sha256(p.read_bytes()).hexdigest() == rec.sha256
    assert temp_files(demo_cache) == []
    assert lat.models["vae"]["name"] == "random:tiny" and tea.models["teacher"]["codec"] == "qk-fp16"
    assert lat.spec.scale == pytest.approx(0.18215)


def test_second_run_is_a_noop(demo_cache, tmp_path, caplog):
    out = copy_cache(demo_cache, tmp_path / "c")
    before = mtimes(out)
    with caplog.at_level(logging.INFO, logger="stages.preprocess"):
        result = run(tiny_preprocess_config(out))
    assert result["status"] == "up-to-date"
    assert set(result["groups"]) == {LATENTS, TEACHER}
    assert mtimes(out) == before
    assert any("nothing to do" in r.getMessage() for r in caplog.records)


def test_codec_change_reuses_latents(demo_cache, tmp_path, monkeypatch):
    out = copy_cache(demo_cache, tmp_path / "c")
    before = mtimes(out)
    old = {kind: next((out / kind).iterdir()).name for kind in (LATENTS, TEACHER)}

    def no_vae(*a, **k):
        raise AssertionError("the VAE must not be loaded when only the teacher group is new")

    monkeypatch.setattr(preprocess_engine, "load_vae", no_vae)
    result = run(tiny_preprocess_config(out, codec="logits-fp16"))
    assert result["status"] == "built" and result["samples"] == {TEACHER: 48}
    assert Path(result["groups"][LATENTS]).name == old[LATENTS]
    assert Path(result["groups"][TEACHER]).name != old[TEACHER]
    # every file that existed is untouched (latents group and the old teacher group)
    after = mtimes(out)
    assert {k: after[k] for k in before if k != "index.json"} == {k: v for k, v in before.items() if k != "index.json"}
    assert sorted(p.name for p in (out / LATENTS).iterdir()) == [old[LATENTS]]
    assert len(list((out / TEACHER).iterdir())) == 2
    # the reader opens the newest pair: same latents, logits codec, same keys in the same order
    c = open_cache(out)
    assert c.latents.key == old[LATENTS] and c.teacher.spec.codec == "logits-fp16"
    for a, b in zip(c.latents.shards, c.teacher.shards):
        assert (a.count, a.first_key, a.last_key) == (b.count, b.first_key, b.last_key)
    # decoded logits agree with the qk-fp16 group's up to fp16 rounding
    ref = open_cache(out, teacher=old[TEACHER])
    p_new, p_old = c.shard_path(TEACHER, 2), ref.shard_path(TEACHER, 2)
    e_new, e_old = index_shard(p_new)[3], index_shard(p_old)[3]
    assert e_new[0] == e_old[0]
    import torch
    new = decode_members(TEACHER, c.teacher.spec, read_sample(p_new, e_new), "new")
    olds = decode_members(TEACHER, ref.teacher.spec, read_sample(p_old, e_old), "old")
    # decoded arrays are read-only views of the shard bytes: copy before handing them to torch
    l_new = c.teacher_logits({"logits": torch.tensor(new["logits"])})
    l_old = ref.teacher_logits({"q": torch.tensor(olds["q"]), "k": torch.tensor(olds["k"])})
    torch.testing.assert_close(l_new, l_old, rtol=0, atol=2e-3 * float(l_old.abs().max()))


def test_other_settings_make_new_groups(tmp_path):
    """The content address covers everything that changes the bytes (and nothing else)."""
    src = open_source("synthetic:16", synthetic_classes=4)
    base = {p.kind: p.key for p in plan_groups(tiny_preprocess_config(tmp_path, source="synthetic:16"), src)}
    same = {p.kind: p.key for p in plan_groups(
        tiny_preprocess_config(tmp_path / "elsewhere", source="synthetic:16", batch_size=3, num_workers=2,
                               max_skip_fraction=0.5), src)}
    assert same == base
    for change, new_lat, new_teacher in [
            (dict(codec="qk-fp32"), False, True), (dict(teacher_layers=(9, 10)), False, True),
            (dict(feat_dtype="float32"), False, True), (dict(teacher_precision="bf16"), False, True),
            (dict(vae_precision="bf16"), True, False), (dict(latent_dtype="float32"), True, False),
            (dict(vae="random:sd"), True, False), (dict(max_pixels=10_000), True, True),
            (dict(seed=1), True, True), (dict(shard_size=4), True, True), (dict(resolution=128), True, True),
            (dict(synthetic_seed=1), True, True)]:
        keys = {p.kind: p.key for p in plan_groups(tiny_preprocess_config(tmp_path, source="synthetic:16", **change),
                                                   open_source("synthetic:16", synthetic_classes=4,
                                                               synthetic_seed=change.get("synthetic_seed", 0)))}
        assert (keys[LATENTS] != base[LATENTS]) == new_lat, change
        assert (keys[TEACHER] != base[TEACHER]) == new_teacher, change


# ----------------------------------------------------------------------------------------------
# resume


@pytest.mark.slow
def test_kill_and_rerun_gives_identical_shards(demo_cache, tmp_path):
    out = tmp_path / "killed"
    # 8 samples per shard: the 20th teacher sample is in the middle of teacher shard 2
    proc = subprocess.run([sys.executable, str(HERE / "_preprocess_killed.py"), str(out), "20"], cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == -9, proc.stdout + proc.stderr[-3000:]
    ref = shard_hashes(demo_cache)
    partial = shard_hashes(out)
    # only complete shards carry the final name, and each is already byte-identical to the reference
    assert sorted(k for k in partial if k.startswith(TEACHER)) == \
        sorted(k for k in ref if k.startswith(TEACHER) and k.endswith(("000000.tar", "000001.tar")))
    assert all(ref[name] == h for name, h in partial.items()), "a complete-looking shard differs"
    tmps = temp_files(out)
    assert any(p.name.startswith(".shard-000002.tar.tmp") and p.parent.parent.name == TEACHER for p in tmps), tmps
    assert all(p.name.startswith(".shard-") for p in tmps)
    assert not list(out.glob("*/*/manifest.json"))

    result = run(tiny_preprocess_config(out))
    assert result["status"] == "built"
    assert shard_hashes(out) == ref
    assert manifest_records(out) == manifest_records(demo_cache)
    assert temp_files(out) == []


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_crash_then_corrupt_shard_is_detected_and_rewritten(demo_cache, tmp_path, monkeypatch, caplog):
    out = tmp_path / "c"
    original = preprocess_engine._ShardSink.commit
    commits = []
    lock = threading.Lock()

    def crashing_commit(self, shard):
        with lock:  # writer threads may commit concurrently
            if len(commits) >= 5:
                raise RuntimeError("simulated crash")
            commits.append((self.plan.kind, shard))
        original(self, shard)

    monkeypatch.setattr(preprocess_engine._ShardSink, "commit", crashing_commit)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tiny_preprocess_config(out))
    monkeypatch.setattr(preprocess_engine._ShardSink, "commit", original)
    gc.collect()  # an aborted writer must not leave a tar stream that flushes into a closed file at GC
    assert temp_files(out) == []                       # the error path removes partial files
    assert not list(out.glob("*/*/manifest.json"))
    ref = shard_hashes(demo_cache)
    partial = shard_hashes(out)
    assert len(partial) == 5 and all(ref[k] == v for k, v in partial.items())

    victim = out / sorted(partial)[1]    # a completed shard with a progress record
    flip_byte(victim)
    stamp = victim.stat().st_mtime_ns
    with caplog.at_level(logging.WARNING):
        result = run(tiny_preprocess_config(out))
    assert result["status"] == "built"
    assert shard_hashes(out) == ref
    assert manifest_records(out) == manifest_records(demo_cache)
    assert victim.stat().st_mtime_ns != stamp
    assert any(f"{victim} does not match its progress record" in r.getMessage() for r in caplog.records)


def test_missing_shard_of_partial_group_is_rewritten(demo_cache, tmp_path):
    """A progress record whose shard file is gone (or truncated) does not count as done."""
    out = copy_cache(demo_cache, tmp_path / "c")
    for m in out.glob("*/*/manifest.json"):
        m.unlink()
    lat = next((out / LATENTS).iterdir())
    (lat / "shard-000004.tar").unlink()
    tea = next((out / TEACHER).iterdir())
    t = tea / "shard-000002.tar"
    t.write_bytes(t.read_bytes()[:-512])
    # a kill can land inside any atomic write: a shard's, or its progress record's (CI hit the latter)
    (lat / ".shard-000004.tar.tmp999").write_bytes(b"partial")
    (lat / "progress" / ".shard-000004.tar.json.tmp999").write_bytes(b"{")
    (tea / "progress" / ".models.json.tmp998").write_bytes(b"")
    run(tiny_preprocess_config(out))
    assert shard_hashes(out) == shard_hashes(demo_cache)
    assert manifest_records(out) == manifest_records(demo_cache)
    assert temp_files(out) == []


# ----------------------------------------------------------------------------------------------
# inputs


def test_folder_and_wds_sources_equal_synthetic(demo_cache, tmp_path):
    write_image_folder(tmp_path / "folder", 48, 4, 64, fmt="png")
    write_wds_shards(tmp_path / "wds", 48, 4, 64, per_shard=20, ext="png")
    run(tiny_preprocess_config(tmp_path / "out_folder", source=str(tmp_path / "folder")))
    run(tiny_preprocess_config(tmp_path / "out_wds", source=str(tmp_path / "wds")))
    ref = decoded_by_index(demo_cache)
    folder = decoded_by_index(tmp_path / "out_folder")
    wds = decoded_by_index(tmp_path / "out_wds")
    assert sorted(ref) == sorted(folder) == sorted(wds) == list(range(48))
    for i in range(48):
        assert ref[i]["label"] == folder[i]["label"] == wds[i]["label"] == i % 4
        for name in ("moments", "feat", "q", "k"):
            assert ref[i][name].tobytes() == folder[i][name].tobytes() == wds[i][name].tobytes(), (i, name)
    # the folder source keys are the relative paths (extension dropped), labels from sorted class dirs
    src = open_source(str(tmp_path / "folder"))
    assert src.kind == "folder" and src.classes == ("class_000", "class_001", "class_002", "class_003")
    assert src.items[0].key == "class_000/img_000000" and src.items[1].key == "class_000/img_000004"
    wsrc = open_source(str(tmp_path / "wds"))
    assert [it.key for it in wsrc.items] == [f"{i:08d}" for i in range(48)]


def test_folder_keys_must_be_unique(tmp_path):
    write_image_folder(tmp_path, 2, 1, 32)
    shutil.copy(tmp_path / "class_000" / "img_000000.png", tmp_path / "class_000" / "img_000000.jpg")
    with pytest.raises(SourceError, match="same sample key 'class_000/img_000000'"):
        open_source(str(tmp_path))


def _bad_input_folder(root: Path) -> dict[str, str]:
    """24 good synthetic images plus one of each bad input class; returns key -> expected reason."""
    write_image_folder(root, 24, 4, 64, fmt="png")
    (root / "class_000" / "zz_empty.png").write_bytes(b"")
    (root / "class_001" / "zz_garbage.jpg").write_bytes(b"this is not an image at all" * 10)
    buf = io.BytesIO()
    Image.fromarray(synth_image(99, 4, 64)[0]).save(buf, format="JPEG", quality=95)
    (root / "class_002" / "zz_truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(buf, format="PNG")  # 40k px > max_pixels
    (root / "class_003" / "zz_bomb.png").write_bytes(buf.getvalue())
    return {"class_000/zz_empty": "empty", "class_001/zz_garbage": "cannot identify image",
            "class_002/zz_truncated": "truncated", "class_003/zz_bomb": "decompression bomb"}


def test_bad_inputs_are_skipped_listed_and_logged(tmp_path, caplog):
    expected = _bad_input_folder(tmp_path / "images")
    cfg = tiny_preprocess_config(tmp_path / "out", source=str(tmp_path / "images"), max_pixels=100 * 100,
                                 max_skip_fraction=0.2)
    with caplog.at_level(logging.WARNING):
        result = run(cfg)
    assert result["samples"] == {LATENTS: 24, TEACHER: 24}
    for kind in (LATENTS, TEACHER):
        m = read_manifest(Path(result["groups"][kind]))
        skipped = dict(m.skipped)
        assert set(skipped) == set(expected)
        for key, why in expected.items():
            assert why in skipped[key], (key, skipped[key])
        assert m.source["count"] == 28 and m.num_samples == 24
        manifest = json.loads((Path(result["groups"][kind]) / "manifest.json").read_text())
        assert {s["key"] for s in manifest["skipped"]} == set(expected)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping input")]
    assert len(lines) == 4
    for key in expected:
        assert sum(key in line for line in lines) == 1
    # every kept image is in the cache, none of the skipped ones
    c = open_cache(tmp_path / "out")
    keys = [e[0] for i in range(c.num_shards) for e in index_shard(c.shard_path(LATENTS, i))]
    assert len(keys) == 24 and not set(keys) & set(expected)


def test_too_many_bad_inputs_fail_the_stage(tmp_path, restore_logging):
    _bad_input_folder(tmp_path / "images")
    out = tmp_path / "out"
    cfg = tiny_preprocess_config(out, source=str(tmp_path / "images"), max_pixels=100 * 100)
    with pytest.raises(PreprocessError) as e:
        run(cfg)
    msg = str(e.value)
    assert "4 of 28 inputs" in msg and "max_skip_fraction=0.001" in msg and "re-run" in msg
    assert "\n" not in msg
    assert not list(out.glob("*/*/manifest.json"))
    # the finished shards are kept: raising the threshold and re-running only writes the manifests
    before = {k: v for k, v in mtimes(out).items() if k.endswith(".tar")}
    result = run(tiny_preprocess_config(out, source=str(tmp_path / "images"), max_pixels=100 * 100,
                                        max_skip_fraction=0.5))
    assert result["status"] == "built"
    assert {k: v for k, v in mtimes(out).items() if k.endswith(".tar")} == before
    # and through the CLI it is one line, exit 1
    res = invoke("preprocess", *cli_sets(tmp_path / "out2", source=str(tmp_path / "images"), max_pixels=10_000))
    assert res.exit_code == 1
    assert res.stderr.strip().splitlines()[-1].startswith("Error: PreprocessError: 4 of 28 inputs")
    assert "Traceback" not in res.output


# ----------------------------------------------------------------------------------------------
# errors: one clear line each


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as c
    import huggingface_hub.utils._cache_manager as cm

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    for mod, name, value in ((c, "HF_HOME", str(home)), (c, "HF_HUB_CACHE", str(home / "hub")),
                             (cm, "HF_HUB_CACHE", str(home / "hub")), (c, "HF_HUB_OFFLINE", True)):
        monkeypatch.setattr(mod, name, value)
    return home


def _error_cases(tmp_path: Path) -> dict[str, tuple[dict, type, str]]:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    return {
        "missing input": (dict(source=str(tmp_path / "no_such_images")), SourceError, "source not found"),
        "missing tar": (dict(source=str(tmp_path / "shards-{000..003}.tar")), SourceError, "tar shard not found"),
        "unwritable out": (dict(out=str(blocker / "cache")), PreprocessError, "cannot create the cache directory"),
        "missing vae offline": (dict(vae="acme/no-such-vae"), WeightsError, "HF_HUB_OFFLINE"),
        "missing teacher offline": (dict(teacher="timm/no-such-dinov2"), WeightsError, "HF_HUB_OFFLINE"),
        "missing local weights": (dict(teacher=str(tmp_path / "dinov2.safetensors")), WeightsError, "not found"),
    }


@pytest.mark.parametrize("case", ["missing input", "missing tar", "unwritable out", "missing vae offline",
                                  "missing teacher offline", "missing local weights"])
def test_clear_errors(case, tmp_path, empty_hf_cache, restore_logging):
    overrides, exc, text = _error_cases(tmp_path)[case]
    out = Path(overrides.pop("out", tmp_path / "out"))
    with pytest.raises(exc, match=text) as e:
        run(tiny_preprocess_config(out, **overrides))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists(), "nothing may be created before inputs and weights are known usable"
    res = invoke("preprocess", *cli_sets(out, **overrides))
    assert res.exit_code == 1, res.output
    err = res.stderr.strip().splitlines()[-1]   # earlier lines, if any, are the stage's INFO log
    assert err.startswith(f"Error: {exc.__name__}: ") and text in err
    assert "Traceback" not in res.output


def test_config_errors_name_the_field(tmp_path, restore_logging):
    res = invoke("preprocess", "--set", "resolution=50", "--set", f"out={tmp_path}")
    assert res.exit_code == 1 and "config field 'resolution'" in res.stderr and "Traceback" not in res.output
    res = invoke("preprocess", "--set", "codec=qk-int4")
    assert res.exit_code == 1 and "config field 'codec'" in res.stderr
    res = invoke("preprocess", "--set", "no_such_field=1")
    assert res.exit_code == 1 and "unknown config field 'no_such_field'" in res.stderr


# ----------------------------------------------------------------------------------------------
# CLI: dry run, cache info / verify


def test_dry_run_projects_sizes_and_writes_nothing(tmp_path, demo_cache, restore_logging):
    out = tmp_path / "never"
    res = invoke("preprocess", "--dry-run", *cli_sets(out))
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert not out.exists()
    assert report["source"]["count"] == 48 and report["num_shards"] == 6
    assert report["config"]["codec"] == "qk-fp16" and report["config"]["out"] == str(out)
    plans = {p.kind: p for p in plan_groups(tiny_preprocess_config(out), open_source("synthetic:48",
                                                                                      synthetic_classes=4))}
    for kind in (LATENTS, TEACHER):
        g = report["groups"][kind]
        bps = bytes_per_sample(kind, plans[kind].spec)
        assert g["bytes_per_sample"] == bps
        assert g["projected_bytes"] == bps["tar"] * 48
        assert g["status"] == "new" and g["dir"] == str(plans[kind].dir)
        # the projection is the real size up to each tar's end-of-archive padding
        real = read_manifest(next((demo_cache / kind).iterdir()))
        total = sum(s.bytes for s in real.shards)
        assert 0 <= total - g["projected_bytes"] <= len(real.shards) * 10240
    assert report["groups"][TEACHER]["bytes_per_sample"]["field:q.npy"] == 4 * 12 * 16 * 8 * 2 + 128
    # on a built cache the same command reports the groups as complete
    res = invoke("preprocess", "--dry-run", *cli_sets(demo_cache))
    assert {g["status"] for g in json.loads(res.stdout)["groups"].values()} == {"complete"}


def test_cache_info_and_verify_cli(demo_cache, tmp_path, restore_logging):
    res = invoke("cache", "info", str(demo_cache))
    assert res.exit_code == 0
    assert "moments.npy" in res.stdout and "q.npy" in res.stdout and "samples 48" in res.stdout
    info = json.loads(invoke("cache", "info", "--json", str(demo_cache)).stdout)
    assert {g["kind"] for g in info["groups"]} == {LATENTS, TEACHER}

    out = copy_cache(demo_cache, tmp_path / "c")
    res = invoke("cache", "verify", "--json", str(out))
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["ok"] is True
    for g in report["groups"].values():
        assert g["errors"] == [] and g["decoded"] == 8 and g["fresh"]["ok"] and g["fresh"]["weights_match"]

    victim = next((out / TEACHER).iterdir()) / "shard-000003.tar"
    flip_byte(victim, offset=victim.stat().st_size // 2)
    res = invoke("cache", "verify", "--no-models", "--json", str(out))
    assert res.exit_code == 1
    assert "cache verification FAILED" in res.stderr and "Traceback" not in res.output
    report = json.loads(res.stdout)
    assert report["ok"] is False
    errors = [e for g in report["groups"].values() for e in g["errors"]]
    assert any(str(victim) in e and "sha256" in e for e in errors)


def test_verify_detects_wrong_values_with_right_hashes(demo_cache, tmp_path, restore_logging):
    """A cache whose bytes match its manifest but whose values are wrong fails the fresh-model check."""
    out = copy_cache(demo_cache, tmp_path / "c")
    lat_dir = next((out / LATENTS).iterdir())
    m = read_manifest(lat_dir)
    # rewrite shard 0 with every moment doubled, and fix up the records so only the values are wrong
    from pipeline.cache.schema import encode_latent_sample
    from pipeline.cache.shards import ShardWriter, atomic_write_json, iter_samples
    samples = list(iter_samples(lat_dir / "shard-000000.tar"))
    w = ShardWriter(lat_dir / "shard-000000.tar", 0)
    for key, members in samples:
        d = decode_members(LATENTS, m.spec, members, key)
        w.add(key, encode_latent_sample(m.spec, d["label"], d["moments"].astype(np.float32) * 2))
    rec = w.commit()
    manifest = json.loads((lat_dir / "manifest.json").read_text())
    manifest["shards"][0] = {**manifest["shards"][0], "bytes": rec.bytes, "sha256": rec.sha256}
    atomic_write_json(lat_dir / "manifest.json", manifest)
    res = invoke("cache", "verify", "--samples", "48", "--json", str(out))
    assert res.exit_code == 1
    report = json.loads(res.stdout)
    lat = report["groups"][f"{LATENTS}/{m.key}"]
    assert lat["errors"] == [] and lat["fresh"]["ok"] is False and lat["fresh"]["max_rel_error"]["moments"] > 0.1
    assert all(g["ok"] for k, g in report["groups"].items() if k.startswith(TEACHER))


def test_env_is_offline():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_cli_error_from_a_dataloader_worker_is_one_line():
    """A worker's re-raised exception embeds its traceback; the CLI keeps only the original line."""
    from pipeline.cache.schema import CacheFormatError
    from stages.cli_common import _message

    wrapped = CacheFormatError(
        "Caught CacheFormatError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    raise CacheFormatError("shard missing: /c/s.tar")\n'
        "pipeline.cache.schema.CacheFormatError: shard missing: /c/s.tar\n")
    assert _message(wrapped) == "shard missing: /c/s.tar"
    assert _message(ValueError("plain message")) == "plain message"
