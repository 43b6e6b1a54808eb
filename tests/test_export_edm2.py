"""``haste export edm2``: images/ and vae-sd/ that the official loaders pair correctly.

The official HASTE/REPA ``CustomDataset`` (``dataset.py``) and edm2's ``dataset_tool.py convert``
are written out here independently of the code under test; every check goes through them:
CustomDataset's item p (image, moments, label) must be one cache sample's moments with the very
image preprocess encoded for it, and images/ must equal what convert makes from the same folder.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner
from conftest import tiny_preprocess_config

from pipeline.cache.reader import index_shard, open_cache, read_sample
from pipeline.cache.schema import LATENTS, decode_members
from pipeline.inputs.synth import synth_image
from stages import export_edm2
from stages.cli import main as cli
from stages.export_edm2 import ExportConfig, ExportError, export_order, key_stem, run_export
from stages.preprocess import run as preprocess

RES = 32


# ----------------------------------------------------------------------------------------------
# The official tools, written out


def custom_dataset(data_dir: Path) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """HASTE dataset.py CustomDataset: two sorted os.walk listings zipped by position, labels from vae-sd."""
    PIL.Image.init()
    exts = set(PIL.Image.EXTENSION) | {".npy"}

    def listing(d: Path) -> list[str]:
        names = {os.path.relpath(os.path.join(r, f), start=d) for r, _, files in os.walk(d) for f in files}
        return sorted(n for n in names if os.path.splitext(n)[1].lower() in exts)

    images, feats = listing(data_dir / "images"), listing(data_dir / "vae-sd")
    labels = dict(json.loads((data_dir / "vae-sd" / "dataset.json").read_text())["labels"])
    assert len(images) == len(feats)
    return [(np.array(PIL.Image.open(data_dir / "images" / i)), np.load(data_dir / "vae-sd" / f), labels[f])
            for i, f in zip(images, feats)]


def dhariwal_crop(img: PIL.Image.Image, size: int) -> np.ndarray:
    """dataset_tool.py center_crop_imagenet (ADM)."""
    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=PIL.Image.Resampling.BOX)
    scale = size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=PIL.Image.Resampling.BICUBIC)
    arr = np.array(img)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y:y + size, x:x + size]


def edm2_convert(source: Path, dest: Path, size: int) -> None:
    """dataset_tool.py convert --transform=center-crop-dhariwal for a folder (labels from top-level dirs)."""
    found: list[str] = []

    def recurse(root: str) -> None:
        with os.scandir(root) as it:
            for e in it:
                if e.is_file():
                    found.append(os.path.join(root, e.name))
                elif e.is_dir():
                    recurse(os.path.join(root, e.name))

    recurse(str(source))
    PIL.Image.init()
    files = sorted(f for f in found if "." + f.split(".")[-1].lower() in PIL.Image.EXTENSION)
    rel = {f: os.path.relpath(f, source) for f in files}
    tops = sorted({r.split("/")[0] for r in rel.values()})
    labels = []
    for idx, f in enumerate(files):
        s = f"{idx:08d}"
        name = f"{s[:5]}/img{s}.png"
        buf = io.BytesIO()
        PIL.Image.fromarray(dhariwal_crop(PIL.Image.open(f).convert("RGB"), size)).save(
            buf, format="png", compress_level=0, optimize=False)
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(buf.getvalue())
        labels.append([name, tops.index(rel[f].split("/")[0])])
    (dest / "dataset.json").write_text(json.dumps({"labels": labels}))


# ----------------------------------------------------------------------------------------------
# helpers


def build_cache(source: str, out: Path, **kw) -> Path:
    preprocess(tiny_preprocess_config(out, source=source, resolution=RES, teacher="none", shard_size=4, **kw))
    return out


def cache_samples(root: Path) -> list[tuple[str, np.ndarray, int]]:
    """(key, fp32 moments, label) in cache order."""
    c = open_cache(root, need_teacher=False)
    out = []
    for s in range(len(c.latents.shards)):
        p = c.shard_path(LATENTS, s)
        for e in index_shard(p):
            d = decode_members(LATENTS, c.latents.spec, read_sample(p, e), e[0])
            out.append((e[0], d["moments"].astype(np.float32), d["label"]))
    return out


def assert_pairs(data_dir: Path, cache: Path, image_of) -> list[str]:
    """Every CustomDataset item is one cache sample with its own image and label; returns the keys in order."""
    samples = cache_samples(cache)
    keys = []
    for img, mom, label in custom_dataset(data_dir):
        hits = [(k, lab) for k, m, lab in samples if np.array_equal(m, mom)]
        assert len(hits) == 1, "moments do not identify one cache sample"
        key, want_label = hits[0]
        assert label == want_label, key
        np.testing.assert_array_equal(img, image_of(key), err_msg=key)
        keys.append(key)
    assert sorted(keys) == sorted(k for k, _, _ in samples)
    return keys


def image_crop(path: Path) -> np.ndarray:
    return dhariwal_crop(PIL.Image.open(path).convert("RGB"), RES)


# ----------------------------------------------------------------------------------------------
# pairing, per source kind


def test_synthetic_source_pairs_by_sorted_position(tmp_path):
    cache = build_cache("synthetic:10", tmp_path / "cache", synthetic_classes=3)
    result = run_export(ExportConfig(cache=str(cache), out=str(tmp_path / "data"), num_workers=2))
    assert result["status"] == "built" and result["images"] is True

    def synth(key: str) -> np.ndarray:
        return synth_image(int(key.rsplit("_", 1)[1]), 3, RES)[0]

    keys = assert_pairs(tmp_path / "data", cache, synth)
    cache_order = [k for k, _, _ in cache_samples(cache)]
    assert keys == sorted(cache_order) != cache_order          # class_000/img_000000, class_000/img_000003, ...


def test_wds_source_pairs_by_sorted_member_names(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "wds"
    src.mkdir()
    members: dict[str, bytes] = {}
    for j, stem in enumerate(["n02/b", "n01/z", "n02/a", "n01/a-2", "n01/a"]):          # tar order, unsorted
        buf = io.BytesIO()
        PIL.Image.fromarray(rng.integers(0, 256, (40 + 8 * j, 48, 3), dtype=np.uint8)).save(buf, format="png")
        members[stem] = buf.getvalue()
    with tarfile.open(src / "shard-0.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for stem, data in members.items():
            for name, payload in ((f"{stem}.png", data), (f"{stem}.cls", str(len(stem) % 2).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    cache = build_cache(str(src), tmp_path / "cache")
    run_export(ExportConfig(cache=str(cache), out=str(tmp_path / "data"), num_workers=0))
    keys = assert_pairs(tmp_path / "data", cache, lambda k: dhariwal_crop(
        PIL.Image.open(io.BytesIO(members[k])).convert("RGB"), RES))
    assert [f"{k}.png" for k in keys] == sorted(f"{k}.png" for k in members)


def test_folder_export_equals_edm2_convert_and_resumes(tmp_path, monkeypatch):
    """File names whose sort needs the extension (a.png / a.b.png) and '%'/'-' escapes included."""
    rng = np.random.default_rng(1)
    src = tmp_path / "folder"
    for j, rel in enumerate(["cat/a.png", "cat/a.b.png", "cat/a-b.png", "cat/50%.png", "dog/x.jpg", "dog/x_1.png",
                             "dog/deep/y.png"]):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(rng.integers(0, 256, (36 + 4 * j, 44, 3), dtype=np.uint8)).save(
            src / rel, quality=95) if rel.endswith(".jpg") else \
            PIL.Image.fromarray(rng.integers(0, 256, (36 + 4 * j, 44, 3), dtype=np.uint8)).save(src / rel)
    cache = build_cache(str(src), tmp_path / "cache")
    edm2_convert(src, tmp_path / "convert" / "images", RES)

    calls = {"n": 0}
    real = export_edm2.write_file

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk unplugged")
        return real(*a, **k)

    monkeypatch.setattr(export_edm2, "write_file", dying)
    out = tmp_path / "data"
    with pytest.raises(OSError, match="disk unplugged"):
        run_export(ExportConfig(cache=str(cache), out=str(out), num_workers=0))
    assert not (out / "vae-sd" / "dataset.json").exists()           # incomplete: nothing pairs yet
    monkeypatch.setattr(export_edm2, "write_file", real)
    assert run_export(ExportConfig(cache=str(cache), out=str(out), num_workers=0))["status"] == "built"
    ours = {p.relative_to(out / "images"): p.read_bytes() for p in (out / "images").rglob("*") if p.is_file()}
    theirs = {p.relative_to(tmp_path / "convert" / "images"): p.read_bytes()
              for p in (tmp_path / "convert" / "images").rglob("*") if p.is_file()}
    assert ours == theirs                                             # byte for byte, dataset.json included
    assert not [p for p in out.rglob(".*") if ".tmp" in p.name]
    assert_pairs(out, cache, lambda k: image_crop(next(src.glob(f"{key_stem(k)}.*"))))


# ----------------------------------------------------------------------------------------------
# the source gone, moved, or different


def test_without_the_source_vae_sd_is_written_and_the_way_to_images_is_named(tmp_path):
    src = tmp_path / "folder"
    for j, rel in enumerate(["b/one.png", "a/two.png", "a/three.png"]):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(np.full((RES, RES, 3), 40 * j, np.uint8)).save(src / rel)
    cache = build_cache(str(src), tmp_path / "cache")
    moved = src.rename(tmp_path / "moved")
    out = tmp_path / "data"
    r = CliRunner().invoke(cli, ["export", "edm2", str(cache), str(out), "--workers", "0"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["images"] is False and not (out / "images").exists()
    hint = result["images_hint"]
    assert "--source PATH" in hint and f"dataset_tool.py convert --source={src}" in hint and "not available" in hint
    assert len(json.loads((out / "vae-sd" / "dataset.json").read_text())["labels"]) == 3

    with pytest.raises(ExportError, match="nowhere.*not available"):  # a --source that is not there
        run_export(ExportConfig(cache=str(cache), out=str(out), source=str(tmp_path / "nowhere"), num_workers=0))
    (tmp_path / "other" / "a").mkdir(parents=True)                   # another dataset is refused
    PIL.Image.fromarray(np.zeros((RES, RES, 3), np.uint8)).save(tmp_path / "other" / "a" / "x.png")
    with pytest.raises(ExportError, match="lists other images than preprocess read"):
        run_export(ExportConfig(cache=str(cache), out=str(out), source=str(tmp_path / "other"), num_workers=0))

    before = (out / "vae-sd" / "00000" / "img-mean-std-00000000.npy").stat().st_mtime_ns
    r = run_export(ExportConfig(cache=str(cache), out=str(out), source=str(moved), num_workers=0))
    assert r["status"] == "built" and r["images"] is True
    assert (out / "vae-sd" / "00000" / "img-mean-std-00000000.npy").stat().st_mtime_ns == before   # kept
    assert_pairs(out, cache, lambda k: image_crop(next(moved.glob(f"{k}.*"))))


def test_an_export_numbered_in_cache_order_is_replaced(tmp_path):
    cache = build_cache("synthetic:6", tmp_path / "cache", synthetic_classes=3)
    out = tmp_path / "data"
    run_export(ExportConfig(cache=str(cache), out=str(out), images=False, num_workers=0))
    marker = out / "vae-sd" / "haste-export.json"
    old = json.loads(marker.read_text())
    del old["order"]                                                 # what the previous version wrote
    marker.write_text(json.dumps(old))
    (out / "vae-sd" / "00000" / "img-mean-std-00000000.npy").write_bytes(b"stale moments of another sample")
    assert run_export(ExportConfig(cache=str(cache), out=str(out), num_workers=0))["status"] == "built"
    assert_pairs(out, cache, lambda k: synth_image(int(k.rsplit("_", 1)[1]), 3, RES)[0])


# ----------------------------------------------------------------------------------------------
# the order rule


def test_export_order_is_the_sorted_source_path_order():
    rng = np.random.default_rng(0)
    alphabet = list("ab-_.%/0")
    for _ in range(200):
        paths = set()
        while len(paths) < 6:
            stem = "".join(rng.choice(alphabet, rng.integers(1, 6))).strip("/").replace("//", "/")
            if stem and not stem.endswith(".") and "/." not in stem and not stem.startswith("."):
                paths.add(f"{stem}.{rng.choice(['png', 'jpg', 'JPEG'])}")
        stems = [p.rsplit(".", 1)[0] for p in paths]
        if len(set(stems)) < len(stems):
            continue
        keys = {p.rsplit(".", 1)[0].replace("%", "%25").replace(".", "%2E"): p for p in paths}
        want = [k for k, _ in sorted(keys.items(), key=lambda kv: kv[1])]
        assert export_order(list(keys), keys) == want
        try:
            assert export_order(list(keys), None) == want             # keys alone, when they decide
        except ExportError as e:
            assert "pass --source" in str(e)
            assert any(s.startswith(t + ".") for s in stems for t in stems)


def test_uncompressed_pngs_of_one_size_have_one_length():
    """A resumed export keeps files of the exact expected size; for PNGs that needs this."""
    from stages.export_edm2 import png_file

    rng = np.random.default_rng(0)
    for size in (32, 256):
        lengths = {len(png_file(img)) for img in (np.zeros((size, size, 3), np.uint8),
                                                  np.full((size, size, 3), 255, np.uint8),
                                                  rng.integers(0, 256, (size, size, 3), dtype=np.uint8))}
        assert len(lengths) == 1
