"""Captioned sources follow the same input rules as class-labelled ones (issue 11 hardening):
directory links followed once (no loops), regular files only under a size cap, input tars
checked for their end-of-archive marker, keys that would escape a tar refused."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from pipeline.inputs.captions import open_input
from pipeline.inputs.images import SkipImage
from pipeline.inputs.synth import encode_image, synth_image


def _png(i: int) -> bytes:
    return encode_image(synth_image(i, 4, 32)[0], ".png")


def _caption_folder(root: Path, n: int) -> None:
    (root / "sub").mkdir(parents=True)
    for i in range(n):
        (root / "sub" / f"img{i}.png").write_bytes(_png(i))
        (root / "sub" / f"img{i}.txt").write_text(f"a picture number {i}\n")


def test_caption_folder_symlink_loop_lists_each_image_once(tmp_path):
    root = tmp_path / "caps"
    _caption_folder(root, 3)
    os.symlink(root, root / "sub" / "loop")          # a loop back to the root
    os.symlink(root / "sub", root / "again")         # the same folder a second time
    src = open_input(f"captions:{root}")
    names = sorted(Path(it.key).name for it in src.items)  # the folder is listed once, under its first name
    assert names == ["img0", "img1", "img2"]


def test_caption_folder_reads_regular_files_only_under_the_cap(tmp_path):
    root = tmp_path / "caps"
    _caption_folder(root, 2)
    os.mkfifo(root / "sub" / "fifo.png")
    (root / "sub" / "fifo.txt").write_text("a pipe\n")
    src = open_input(f"captions:{root}", max_file_bytes=10**6)
    item = next(it for it in src.items if it.key == "sub/fifo")
    with pytest.raises(SkipImage, match="not a regular file"):  # would block forever with a plain open()
        src.load(item, 32, 10**8)
    small = open_input(f"captions:{root}", max_file_bytes=16)
    with pytest.raises(SkipImage, match="too large"):
        small.load(next(it for it in small.items if it.key == "sub/img0"), 32, 10**8)


def _caption_tar(path: Path, names: list[str], n: int) -> None:
    with tarfile.open(path, "w") as tf:
        for i, name in enumerate(names[:n]):
            for ext, data in ((".png", _png(i)), (".txt", f"caption {i}\n".encode())):
                info = tarfile.TarInfo(name + ext)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_caption_tar_cut_short_is_counted_and_unsafe_keys_are_refused(tmp_path):
    good = tmp_path / "a.tar"
    _caption_tar(good, [f"s{i}" for i in range(4)], 4)
    src = open_input(str(good))
    assert len(src.items) == 4 and src.num_rejected == 0
    cut = tmp_path / "b.tar"
    data = good.read_bytes()
    cut.write_bytes(data[: len(data) // 2 // 512 * 512])   # cut at a header boundary: tarfile would not notice
    src = open_input(str(cut))
    assert 0 < len(src.items) < 4 and src.num_rejected >= 1
    assert "cut short" in src.rejected[0].reason
    evil = tmp_path / "c.tar"
    _caption_tar(evil, ["ok", "../escape"], 2)
    src = open_input(str(evil))
    assert [it.key for it in src.items] == ["ok"]
    assert any("unusable as a sample key" in r.reason for r in src.rejected)
