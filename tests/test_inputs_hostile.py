"""Hostile and damaged inputs: odd file names, symlink loops, FIFOs, devices, huge files,
truncated tars and keys that would escape a tar. Each is left out with one message naming it
and counted against ``max_skip_fraction``; nothing hangs, loops or grows without bound."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import threading
from pathlib import Path

import pytest
from conftest import tiny_preprocess_config

from pipeline.cache.reader import index_shard, open_cache
from pipeline.cache.schema import LATENTS, CacheFormatError, unsafe_key_reason
from pipeline.cache.shards import ShardWriter
from pipeline.inputs.images import list_image_folder
from pipeline.inputs.sources import SourceError, open_source, read_input
from pipeline.inputs.synth import encode_image, synth_image, write_image_folder, write_wds_shards
from stages.preprocess import PreprocessError, run


def manifest_source(out: Path) -> dict:
    return json.loads(next((out / LATENTS).glob("*/manifest.json")).read_text())["source"]


def cached_keys(out: Path) -> list[str]:
    c = open_cache(out, need_teacher=False)
    return [e[0] for i in range(c.num_shards) for e in index_shard(c.shard_path(LATENTS, i))]


# ----------------------------------------------------------------------------------------------
# folder sources


def test_non_utf8_file_name_is_skipped_naming_the_path(tmp_path, caplog, restore_logging):
    images = tmp_path / "images"
    write_image_folder(images, 8, 2, 32)
    bad = os.path.join(os.fsencode(images / "class_001"), b"caf\xe9.png")
    with open(bad, "wb") as f:
        f.write(encode_image(synth_image(1, 2, 32)[0], "png"))
    shown = repr(bad)  # b'.../class_001/caf\xe9.png'
    src = open_source(str(images))
    assert len(src.items) == 8 and [(r.input, r.count) for r in src.rejected] == [(shown, 1)]
    # counted like any skipped input: over max_skip_fraction the stage stops, naming it, before writing
    with pytest.raises(PreprocessError, match="1 of 9 inputs") as e:
        run(tiny_preprocess_config(tmp_path / "strict", source=str(images), shard_size=4))
    assert shown in str(e.value) and not (tmp_path / "strict").exists()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        result = run(tiny_preprocess_config(tmp_path / "out", source=str(images), shard_size=4,
                                            max_skip_fraction=0.2))
    assert result["samples"] == {LATENTS: 8, "teacher": 8}
    assert [r.getMessage() for r in caplog.records if shown in r.getMessage()] == \
        [f"skipping input {shown}: file name is not valid UTF-8 (rename it)"]
    assert manifest_source(tmp_path / "out")["rejected"] == [
        {"input": shown, "reason": "file name is not valid UTF-8 (rename it)", "count": 1}]


def test_non_utf8_class_folder_is_refused_by_name(tmp_path):
    write_image_folder(tmp_path, 4, 2, 32)
    os.rename(tmp_path / "class_001", os.path.join(os.fsencode(tmp_path), b"cl\xffss"))
    with pytest.raises(SourceError, match=r"class folder name b'.*cl\\xffss' is not valid UTF-8"):
        open_source(str(tmp_path))


def test_directory_symlinks_are_followed_once_and_never_loop(tmp_path):
    root = tmp_path / "images"
    write_image_folder(root, 8, 2, 32)
    outside = tmp_path / "elsewhere"
    write_image_folder(outside, 2, 1, 32)  # elsewhere/class_000/img_000000.png, img_000001.png
    (root / "class_000" / "loop").symlink_to("..", target_is_directory=True)          # the root again
    (root / "class_000" / "self").symlink_to(".", target_is_directory=True)           # the class again
    (root / "class_000" / "other").symlink_to("../class_001", target_is_directory=True)  # another class
    (root / "class_001" / "extra").symlink_to(outside / "class_000", target_is_directory=True)  # followed
    (root / "class_001" / "extra2").symlink_to(outside / "class_000", target_is_directory=True)  # once
    classes, items = list_image_folder(root)
    assert classes == ["class_000", "class_001"]
    assert items == sorted([(f"class_{i % 2:03d}/img_{i:06d}.png", i % 2) for i in range(8)] +
                           [("class_001/extra/img_000000.png", 1), ("class_001/extra/img_000001.png", 1)])


def test_class_folder_linking_to_the_root_gets_no_images(tmp_path):
    write_image_folder(tmp_path / "r", 4, 2, 32)
    (tmp_path / "r" / "class_002").symlink_to(".", target_is_directory=True)
    classes, items = list_image_folder(tmp_path / "r")
    assert classes == ["class_000", "class_001", "class_002"] and len(items) == 4
    assert {label for _, label in items} == {0, 1}


def test_fifo_device_and_huge_files_are_skipped_not_read(tmp_path):
    root = tmp_path / "images"
    write_image_folder(root, 8, 2, 32)
    os.mkfifo(root / "class_000" / "zz_fifo.png")
    (root / "class_001" / "zz_zero.png").symlink_to("/dev/zero")
    with open(root / "class_001" / "zz_huge.png", "wb") as f:  # sparse: no disk, but past the cap
        f.truncate(600 * 2**20)
    src = open_source(str(root))
    items = {it.key: it for it in src.items}
    reasons = {}

    def load_all():
        for key in ("class_000/zz_fifo", "class_001/zz_zero", "class_001/zz_huge"):
            try:
                src.load(items[key], 32, 10**8)
            except Exception as e:  # noqa: BLE001 (the reason is what is checked)
                reasons[key] = str(e)

    t = threading.Thread(target=load_all, daemon=True)
    t.start()
    t.join(timeout=20)
    if t.is_alive():  # unblock a reader stuck on the FIFO, so the test ends
        fd = os.open(root / "class_000" / "zz_fifo.png", os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    assert not t.is_alive(), "reading a FIFO input blocked"
    assert reasons == {"class_000/zz_fifo": "not a regular file (a FIFO)",
                       "class_001/zz_zero": "not a regular file (a character device)",
                       "class_001/zz_huge": f"file too large: {600 * 2**20} bytes > max_file_bytes={512 * 2**20}"}


def test_max_file_bytes_is_configurable_and_part_of_the_key(tmp_path):
    root = tmp_path / "images"
    write_image_folder(root, 8, 2, 32)
    big = root / "class_000" / "img_000000.png"
    with pytest.raises(Exception, match="file too large"):
        read_input(str(big), 0, -1, big.stat().st_size - 1)
    assert read_input(str(big), 0, -1, big.stat().st_size) == big.read_bytes()
    result = run(tiny_preprocess_config(tmp_path / "out", source=str(root), shard_size=4, teacher="none",
                                        max_file_bytes=big.stat().st_size - 1, max_skip_fraction=0.5))
    manifest = json.loads(next((tmp_path / "out" / LATENTS).glob("*/manifest.json")).read_text())
    skipped = {s["key"]: s["reason"] for s in manifest["skipped"]}
    assert "class_000/img_000000" in skipped and "file too large" in skipped["class_000/img_000000"]
    assert result["samples"][LATENTS] == 8 - len(skipped)
    default = run(tiny_preprocess_config(tmp_path / "out", source=str(root), shard_size=4, teacher="none"))
    assert default["groups"][LATENTS] != result["groups"][LATENTS]


# ----------------------------------------------------------------------------------------------
# wds sources


def _cut(tar: Path, at: int) -> None:
    with open(tar, "r+b") as f:
        f.truncate(at)


@pytest.mark.parametrize("where", ["header boundary", "inside a member"])
def test_truncated_input_tar_counts_every_lost_sample(tmp_path, where, restore_logging):
    tars = write_wds_shards(tmp_path / "wds", 48, 4, 32, per_shard=16, ext="png")
    with tarfile.open(tars[1]) as tf:
        members = tf.getmembers()
    first_lost = members[2 * 10]  # the .cls header of the tar's 11th sample: 10 complete samples before it
    _cut(tars[1], first_lost.offset if where == "header boundary" else first_lost.offset_data + 1 + 512)
    src = open_source(str(tmp_path / "wds"))
    assert len(src.items) == 16 + 10 + 16
    (lost,) = src.rejected
    assert lost.input == str(tars[1]) and lost.count == 6 and "tar cut short" in lost.reason
    assert "10 complete samples kept, 6 lost" in lost.reason
    with pytest.raises(PreprocessError, match="6 of 48 inputs"):
        run(tiny_preprocess_config(tmp_path / "strict", source=str(tmp_path / "wds"), shard_size=16))
    result = run(tiny_preprocess_config(tmp_path / "out", source=str(tmp_path / "wds"), shard_size=16,
                                        teacher="none", max_skip_fraction=0.2))
    assert result["samples"] == {LATENTS: 42}
    assert manifest_source(tmp_path / "out")["rejected"][0]["count"] == 6


def test_a_lone_truncated_tar_counts_at_least_one_lost(tmp_path):
    (tar,) = write_wds_shards(tmp_path / "wds", 8, 2, 32, per_shard=8, ext="png")
    with tarfile.open(tar) as tf:
        cut = tf.getmembers()[8].offset
    _cut(tar, cut)
    src = open_source(str(tar))
    assert len(src.items) == 4 and src.num_rejected == 1 and "cannot be counted" in src.rejected[0].reason


def _tar_with(path: Path, names: list[str]) -> None:
    png = encode_image(synth_image(0, 2, 32)[0], "png")
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for name in names:
            for ext, data in (("cls", b"1"), ("png", png)):
                info = tarfile.TarInfo(f"{name}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_keys_that_would_escape_a_tar_are_refused(tmp_path):
    hostile = ["../../escape", "/abs/olute", "a/./b", "line\nbreak", "back\\slash"]
    _tar_with(tmp_path / "in.tar", ["good_0", *hostile, "sub/good_1"])
    src = open_source(str(tmp_path / "in.tar"))
    assert [it.key for it in src.items] == ["good_0", "sub/good_1"]
    assert len(src.rejected) == len(hostile)
    assert all("unusable as a sample key" in r.reason for r in src.rejected)
    result = run(tiny_preprocess_config(tmp_path / "out", source=str(tmp_path / "in.tar"), teacher="none",
                                        max_skip_fraction=0.8))
    assert result["samples"] == {LATENTS: 2} and cached_keys(tmp_path / "out") == ["good_0", "sub/good_1"]


@pytest.mark.parametrize("key", ["../x", "/x", "a//b", "./a", "a/..", "x\x00", "x\udcff"])
def test_writer_refuses_unsafe_keys(tmp_path, key):
    assert unsafe_key_reason(key) is not None
    w = ShardWriter(tmp_path / "shard-000000.tar", 0)
    with pytest.raises(CacheFormatError, match="refusing sample key"):
        w.add(key, {"cls": b"0"})
    w.abort()
    assert unsafe_key_reason("n01440764/n01440764_10026") is None
