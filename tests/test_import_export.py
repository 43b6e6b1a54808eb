"""Import of edm2/REPA/HASTE and REPA-E preprocessed datasets, export to edm2's layout.

The foreign datasets are written here the way the tools write them (edm2 ``dataset_tool.py``
convert/encode, SPEC §4; REPA-E ``preprocessing.py``/``cache_latents.py``), independently of the
readers under test. Images are 32 px, so the tiny random teacher runs in well under a second.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_preprocess_config
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.cache.reader import Requirements, check_cache, index_shard, open_cache, read_sample
from pipeline.cache.schema import LATENTS, TEACHER, decode_members
from pipeline.configs import ConfigError
from pipeline.encoders.teacher import load_teacher
from pipeline.inputs.prepared import open_repae
from pipeline.inputs.prepared_formats import PreparedFormatError
from stages import import_export as foreign
from stages.cli import main as cli
from stages.export_edm2 import ExportConfig, run_export
from stages.import_export import ImportConfig, run_import

RES, COUNT, CLASSES = 32, 10, 3
VAE = "stabilityai/sd-vae-ft-ema"


# ----------------------------------------------------------------------------------------------
# writing the foreign layouts, as the tools do


def make_items(seed: int = 0) -> list[tuple[np.ndarray, int, np.ndarray]]:
    """(image uint8 (R, R, 3), label, moments float32 (8, R/8, R/8)) per index."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(COUNT):
        img = rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)
        mean = rng.standard_normal((4, RES // 8, RES // 8)).astype(np.float32) * 3
        std = rng.uniform(0.01, 1.0, (4, RES // 8, RES // 8)).astype(np.float32)
        out.append((img, (i * 7 + 1) % CLASSES, np.concatenate([mean, std])))
    return out


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="png", compress_level=0, optimize=False)  # edm2 convert
    return buf.getvalue()


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)  # edm2 encode
    return buf.getvalue()


def names(i: int) -> tuple[str, str]:
    s = f"{i:08d}"
    return f"{s[:5]}/img{s}.png", f"{s[:5]}/img-mean-std-{s}.npy"


def write_part(dest: Path, files: dict[str, bytes], labels: list[list], as_zip: bool) -> None:
    """An edm2 archive: files + dataset.json, as a folder or a ZIP_STORED zip (edm2 open_dest)."""
    meta = json.dumps({"labels": labels}).encode()
    if as_zip:
        with zipfile.ZipFile(dest.with_suffix(".zip"), "w", compression=zipfile.ZIP_STORED) as zf:
            for name, data in {**files, "dataset.json": meta}.items():
                zf.writestr(name, data)
        return
    for name, data in {**files, "dataset.json": meta}.items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(data)


def write_edm2(root: Path, items, as_zip: bool = False, shuffle_seed: int = 1) -> Path:
    """images/ + vae-sd/; the dataset.json entries are shuffled (pairing must be by name)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(shuffle_seed)
    img_labels = [[names(i)[0], lab] for i, (_, lab, _) in enumerate(items)]
    mom_labels = [[names(i)[1], lab] for i, (_, lab, _) in enumerate(items)]
    rng.shuffle(img_labels)
    rng.shuffle(mom_labels)
    write_part(root / "images", {names(i)[0]: png_bytes(im) for i, (im, _, _) in enumerate(items)}, img_labels, as_zip)
    write_part(root / "vae-sd", {names(i)[1]: npy_bytes(m) for i, (_, _, m) in enumerate(items)}, mom_labels, as_zip)
    return root


def h5_put(h5f, full_path: str, data) -> None:
    """REPA-E create_dataset_in_group: nested groups from the '/' in the name."""
    *parents, leaf = full_path.strip("/").split("/")
    grp = h5f
    for part in parents:
        grp = grp[part] if part in grp else grp.create_group(part)
    grp.create_dataset(leaf, data=data)


def write_repae(root: Path, items, latents_name: str = "sdvae") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with h5py.File(root / "images.h5", "w") as f:  # preprocessing.py
        meta = []
        for i, (img, lab, _) in enumerate(items):
            h5_put(f, names(i)[0], np.array(png_bytes(img), dtype="S"))
            meta.append([names(i)[0], lab])
        h5_put(f, "dataset.json", np.array(json.dumps({"labels": meta[::-1]}).encode(), dtype="S"))
    keys: list[str] = []
    with h5py.File(root / "images.h5", "r") as f:
        f.visititems(lambda name, obj: keys.append(name))
    (root / "images_h5.json").write_text(json.dumps(keys, indent=2))
    with h5py.File(root / f"{latents_name}.h5", "w") as f:  # cache_latents.py
        meta = []
        for i, (_, lab, mom) in enumerate(items):
            h5_put(f, names(i)[1], mom)
            meta.append((names(i)[1], lab))
        h5_put(f, "dataset.json", np.array(json.dumps({"labels": meta}).encode("utf-8"), dtype="S"))
    (root / f"{latents_name}_h5.json").write_text(json.dumps([n for n, _ in meta] + ["dataset.json"], indent=2))
    return root


# ----------------------------------------------------------------------------------------------
# helpers


def import_cfg(src: Path, out: Path, fmt: str = "edm2", vae: str = VAE, **pre) -> ImportConfig:
    base = dict(resolution=RES, shard_size=4, batch_size=4, teacher_layers=(10, 11))
    return ImportConfig(fmt=fmt, src=str(src), vae=vae, preprocess=tiny_preprocess_config(out, **{**base, **pre}))


def cached(root: Path, kind: str = LATENTS) -> dict[str, dict]:
    """key -> decoded members of every sample of the newest run's group."""
    c = open_cache(root, need_teacher=kind == TEACHER)
    m = c.latents if kind == LATENTS else c.teacher
    out = {}
    for i in range(len(m.shards)):
        p = c.shard_path(kind, i)
        for entry in index_shard(p):
            out[entry[0]] = decode_members(kind, m.spec, read_sample(p, entry), entry[0])
    return out


def shard_hashes(root: Path, kind: str) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((root / kind).glob("*/shard-*.tar"))}


def all_files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def items():
    return make_items()


@pytest.fixture(scope="module")
def edm2_import(tmp_path_factory, items):
    """(edm2 dataset dir, cache root) of one complete import with the tiny teacher."""
    base = tmp_path_factory.mktemp("edm2")
    src = write_edm2(base / "data", items)
    run_import(import_cfg(src, base / "cache"))
    return src, base / "cache"


# ----------------------------------------------------------------------------------------------
# edm2 import


def test_edm2_import_pairs_by_name_and_keeps_moments(edm2_import, items):
    src, root = edm2_import
    lat = cached(root)
    assert list(lat) == [names(i)[0][:-4] for i in range(COUNT)]  # keys in image-name order
    for i, (_, label, mom) in enumerate(items):
        got = lat[names(i)[0][:-4]]
        assert got["label"] == label
        np.testing.assert_array_equal(got["moments"], mom.astype(np.float16))


def test_edm2_teacher_sees_the_image_of_each_key(edm2_import, items):
    src, root = edm2_import
    tea = cached(root, TEACHER)
    teacher, _ = load_teacher("random:tiny", arch="vit_base_patch14_dinov2", layers=(10, 11), resolution=RES, seed=0)
    images = torch.from_numpy(np.stack([im for im, _, _ in items])).permute(0, 3, 1, 2)
    fresh = teacher(images, "fp32")
    for i in range(COUNT):
        got = tea[names(i)[0][:-4]]
        np.testing.assert_allclose(got["feat"].astype(np.float32), fresh.feat[i].numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(got["q"].astype(np.float32), fresh.q[i].numpy(), rtol=2e-3, atol=2e-3)


def test_edm2_manifest_records_the_import(edm2_import):
    _, root = edm2_import
    c = open_cache(root)
    m = c.latents
    assert m.identity["imported_from"]["format"] == "edm2" and m.identity["vae"] == {"name": VAE}
    assert m.settings["imported_from"]["vae_run"] is False and m.settings["precision"] == "imported"
    assert m.models["vae"]["source"] == "imported" and m.models["vae"]["name"] == VAE
    assert m.spec.scale == pytest.approx(0.18215) and m.num_samples == c.teacher.num_samples == COUNT
    assert c.teacher.models["teacher"]["name"] == "random:tiny"
    check_cache(c, Requirements(latent_size=RES // 8, latent_channels=4, num_classes=CLASSES, teacher_layers=(10, 11),
                                num_tokens=4, feat_dim=96, need_features=True, need_attention=True))  # Phase I-ready
    assert not [p for p in root.rglob(".*") if ".tmp" in p.name]


def test_verify_says_why_imported_latents_are_not_recomputed(edm2_import):
    from stages.cache_tools import verify

    _, root = edm2_import
    report = verify(root, samples=2)
    latents = next(g for name, g in report["groups"].items() if name.startswith("latents/"))
    assert report["ok"] and "imported from precomputed moments" in json.dumps(latents)


def test_rerun_is_a_noop(edm2_import, tmp_path):
    src, root = edm2_import
    before = all_files(root)
    assert run_import(import_cfg(src, root))["status"] == "up-to-date"
    assert all_files(root) == before


def test_rerun_after_a_kill_before_the_index_write_records_the_groups(edm2_import, tmp_path):
    """Complete groups that index.json misses (killed between the manifests and the index) are recorded
    by the rerun, with nothing recomputed; the cache then opens as before."""
    import shutil

    from pipeline.cache.reader import open_cache

    src, original = edm2_import
    root = tmp_path / "copy"
    shutil.copytree(original, root)
    index = json.loads((root / "index.json").read_text())
    (root / "index.json").unlink()
    (root / ".index.json.tmp123").write_text("{")  # the interrupted write
    shards = {p: p.stat().st_mtime_ns for p in root.glob("*/*/*.tar")}
    assert run_import(import_cfg(src, root))["status"] == "repaired"
    assert json.loads((root / "index.json").read_text())["runs"][-1] == index["runs"][-1]
    assert not (root / ".index.json.tmp123").exists()
    assert {p: p.stat().st_mtime_ns for p in root.glob("*/*/*.tar")} == shards
    assert open_cache(root).latents.key == open_cache(original).latents.key
    assert run_import(import_cfg(src, root))["status"] == "up-to-date"


def test_zip_import_equals_folder_import(edm2_import, items, tmp_path):
    _, root = edm2_import
    src = write_edm2(tmp_path / "data", items, as_zip=True, shuffle_seed=7)
    run_import(import_cfg(src, tmp_path / "cache", num_workers=2))
    for kind in (LATENTS, TEACHER):
        assert shard_hashes(tmp_path / "cache", kind) == shard_hashes(root, kind)


def test_interrupted_import_resumes_to_the_same_bytes(edm2_import, monkeypatch, tmp_path):
    src, root = edm2_import
    calls = {"n": 0}
    original = foreign.read_moments

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # inside the second latents shard
            raise OSError("disk unplugged")
        return original(*args, **kwargs)

    monkeypatch.setattr(foreign, "read_moments", failing)
    with pytest.raises(OSError, match="disk unplugged"):
        run_import(import_cfg(src, tmp_path / "cache"))
    lat_dirs = list((tmp_path / "cache" / LATENTS).iterdir())
    assert len(lat_dirs) == 1 and not (lat_dirs[0] / "manifest.json").exists()
    assert not [p for p in tmp_path.rglob(".*") if ".tmp" in p.name]
    monkeypatch.setattr(foreign, "read_moments", original)
    assert run_import(import_cfg(src, tmp_path / "cache"))["status"] == "built"
    for kind in (LATENTS, TEACHER):
        assert shard_hashes(tmp_path / "cache", kind) == shard_hashes(root, kind)


# ----------------------------------------------------------------------------------------------
# errors: one line, naming the files



def cli_import(src: Path, out: Path, *extra: str):
    sets = ["--set", f"out={out}", "--set", f"resolution={RES}", "--set", "shard_size=4", "--set", "teacher=none",
            "--set", "device=cpu", "--set", "num_workers=0"]
    return CliRunner().invoke(cli, ["import", "edm2", str(src), *extra, *sets], catch_exceptions=False)


def test_pairing_mismatches_are_named_in_one_error(items, tmp_path, restore_logging):
    src = write_edm2(tmp_path / "data", items)
    meta = json.loads((src / "vae-sd" / "dataset.json").read_text())
    labels = {n: lab for n, lab in meta["labels"]}
    del labels[names(2)[1]]                                  # image 2 without moments
    labels[names(5)[1]] = (labels[names(5)[1]] + 1) % CLASSES  # label disagreement
    labels["00000/img-mean-std-00000042.npy"] = 0            # moments without image
    (src / "vae-sd" / "dataset.json").write_text(json.dumps({"labels": [[n, v] for n, v in labels.items()]}))
    r = cli_import(src, tmp_path / "cache", "--vae", VAE)
    assert r.exit_code == 1
    lines = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "3 problem(s)" in lines[0]
    for name in (names(2)[0], names(5)[0], "img-mean-std-00000042.npy"):
        assert name in lines[0]
    assert not (tmp_path / "cache").exists()


def test_bad_moments_are_named(items, tmp_path):
    src = write_edm2(tmp_path / "data", items)
    (src / "vae-sd" / names(3)[1]).write_bytes(npy_bytes(items[3][2].astype(np.float16)))
    (src / "vae-sd" / names(7)[1]).write_bytes(npy_bytes(items[7][2][:4]))
    with pytest.raises(PreparedFormatError) as e:
        run_import(import_cfg(src, tmp_path / "cache"))
    msg = str(e.value)
    assert "2 problem(s)" in msg and "float16" in msg and "[4, 4, 4]" in msg
    assert names(3)[1] in msg and names(7)[1] in msg


@pytest.mark.parametrize("vae, needle", [("", "name the VAE"), ("someone/custom-vae", "unknown VAE")])
def test_absent_or_unknown_vae_is_an_error(items, tmp_path, vae, needle, restore_logging):
    src = write_edm2(tmp_path / "data", items)
    r = cli_import(src, tmp_path / "cache", *(["--vae", vae] if vae else []))
    assert r.exit_code == 1 and "config field 'vae'" in r.output and needle in r.output


def test_missing_dataset_json_and_wrong_resolution(items, tmp_path):
    src = write_edm2(tmp_path / "data", items)
    with pytest.raises(ConfigError, match="config field 'resolution'.*set resolution=32"):
        run_import(import_cfg(src, tmp_path / "cache", resolution=64))
    (src / "images" / "dataset.json").unlink()
    with pytest.raises(PreparedFormatError, match=r"images/dataset\.json not found"):
        run_import(import_cfg(src, tmp_path / "cache"))
    shutil.rmtree(src / "vae-sd")
    with pytest.raises(PreparedFormatError, match="neither vae-sd/ nor vae-sd.zip"):
        run_import(import_cfg(src, tmp_path / "cache"))


def test_cli_import_happy_path(items, tmp_path, restore_logging):
    src = write_edm2(tmp_path / "data", items)
    r = cli_import(src, tmp_path / "cache", "--vae", "random:tiny")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output[r.output.index("{"):])["status"] == "built"
    assert open_cache(tmp_path / "cache", need_teacher=False).latents.identity["vae"]["name"] == "random:tiny"


# ----------------------------------------------------------------------------------------------
# REPA-E HDF5


def test_repae_h5_import_with_two_workers(items, tmp_path):
    src = write_repae(tmp_path / "data", items)
    run_import(import_cfg(src, tmp_path / "cache", fmt="repae", num_workers=2))
    lat = cached(tmp_path / "cache")
    for i, (_, label, mom) in enumerate(items):
        got = lat[names(i)[0][:-4]]
        assert got["label"] == label
        np.testing.assert_array_equal(got["moments"], mom.astype(np.float16))
    assert open_cache(tmp_path / "cache").teacher.num_samples == COUNT


class _WhoReads(Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        self.ds.source.load(self.ds.source.items[i], RES, 1 << 30)
        store = self.ds.source.store
        return os.getpid(), store._pid, id(store.handle())


def test_h5_handles_are_opened_per_worker(items, tmp_path):
    ds = open_repae(write_repae(tmp_path / "data", items))
    assert ds.source.store._handle is None and ds.moments._handle is None  # the parent holds none after listing
    ds.source.load(ds.source.items[0], RES, 1 << 30)                       # ... even if it reads one itself
    parent_handle = ds.source.store._handle
    seen = list(DataLoader(_WhoReads(ds), batch_size=None, num_workers=2))
    assert {pid for pid, _, _ in seen} - {os.getpid()} and all(pid == opened for pid, opened, _ in seen)
    assert ds.source.store._handle is parent_handle and ds.source.store._pid == os.getpid()


def test_repae_missing_key_list_and_label(items, tmp_path):
    src = write_repae(tmp_path / "data", items)
    keys = json.loads((src / "sdvae_h5.json").read_text())
    with h5py.File(src / "sdvae.h5", "a") as f:
        meta = json.loads(f["dataset.json"][()].decode())
        meta["labels"] = [e for e in meta["labels"] if e[0] != names(4)[1]]
        del f["dataset.json"]
        f.create_dataset("dataset.json", data=np.array(json.dumps(meta).encode(), dtype="S"))
    with pytest.raises(PreparedFormatError, match=f"{names(4)[1]} is in the key list but has no label"):
        open_repae(src)
    (src / "sdvae_h5.json").unlink()
    with pytest.raises(PreparedFormatError, match="sdvae_h5.json not found"):
        open_repae(src)
    assert len(keys) == COUNT + 1


# ----------------------------------------------------------------------------------------------
# export -> re-import


def test_export_then_reimport_round_trip(edm2_import, items, tmp_path):
    src, root = edm2_import
    out = tmp_path / "exported"
    result = run_export(ExportConfig(cache=str(root), out=str(out), num_workers=0))
    assert result["status"] == "built" and result["images"] is True
    vae_sd = out / "vae-sd"
    meta = json.loads((vae_sd / "dataset.json").read_text())
    assert meta["labels"] == [[names(i)[1], lab] for i, (_, lab, _) in enumerate(items)]
    assert json.loads((out / "images" / "dataset.json").read_text())["labels"] == \
        [[names(i)[0], lab] for i, (_, lab, _) in enumerate(items)]
    for i, (img, _, mom) in enumerate(items):
        arr = np.load(vae_sd / names(i)[1], allow_pickle=False)
        assert arr.dtype == np.float32 and arr.shape == (8, RES // 8, RES // 8)
        np.testing.assert_array_equal(arr, mom.astype(np.float16).astype(np.float32))
        assert (out / "images" / names(i)[0]).read_bytes() == png_bytes(img)   # edm2 convert's exact bytes
    before = all_files(out)
    assert run_export(ExportConfig(cache=str(root), out=str(out)))["status"] == "up-to-date"
    assert all_files(out) == before
    run_import(import_cfg(out, tmp_path / "cache2", teacher="none"))         # images/ + vae-sd/ as exported
    assert shard_hashes(tmp_path / "cache2", LATENTS) == shard_hashes(root, LATENTS)


def test_export_refuses_a_foreign_directory(edm2_import, tmp_path):
    _, root = edm2_import
    (tmp_path / "out" / "vae-sd").mkdir(parents=True)
    (tmp_path / "out" / "vae-sd" / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="not an export of this cache"):
        run_export(ExportConfig(cache=str(root), out=str(tmp_path / "out")))
    assert (tmp_path / "out" / "vae-sd" / "notes.txt").read_text() == "mine"
