"""Foreign datasets that try to make an import read what it should not: devices, FIFOs, files
outside the dataset, HDF5 external storage and links, entries that claim gigabytes. Each is
refused with one error naming the item, before anything is read (and nothing hangs).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.inputs import prepared_formats as pf
from pipeline.inputs.prepared_formats import FolderStore, H5Store, PreparedFormatError, ZipStore, read_labels


def test_folder_items_must_be_regular_files(tmp_path: Path) -> None:
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo.png")
    store = FolderStore(tmp_path)
    for name in ("zero.png", "fifo.png"):
        with pytest.raises(PreparedFormatError, match=f"{name}: not a regular file"):
            store.read(name)


def test_listed_names_stay_inside_the_dataset(tmp_path: Path) -> None:
    for bad in ("../secret.png", "/etc/passwd", "00000/../../x.png"):
        (tmp_path / "dataset.json").write_text(json.dumps({"labels": [[bad, 0]]}))
        with pytest.raises(PreparedFormatError, match="not a relative path inside the dataset"):
            read_labels(FolderStore(tmp_path))


def test_entries_over_the_size_cap_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pf, "MAX_ITEM_BYTES", 100)
    with zipfile.ZipFile(tmp_path / "d.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.png", b"\0" * 10_000)                      # 10 KB from a few compressed bytes
        zf.writestr("small.png", b"\0" * 10)
    store = ZipStore(tmp_path / "d.zip")
    assert store.read("small.png") == b"\0" * 10
    with pytest.raises(PreparedFormatError, match="big.png: 10000 bytes"):
        store.read("big.png")
    (tmp_path / "big.npy").write_bytes(b"\0" * 200)
    with pytest.raises(PreparedFormatError, match="big.npy: 200 bytes"):
        FolderStore(tmp_path).read("big.npy")


def test_hdf5_external_storage_and_links_are_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"private bytes!!!")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with h5py.File(tmp_path / "images.h5", "w") as f:
        f.create_dataset("ext.png", shape=(16,), dtype="u1", external=[(str(secret), 0, 16)])
        f["link.png"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "/x")
        f.create_dataset("ok.png", data=np.frombuffer(b"fine", np.uint8))
    store = H5Store(tmp_path / "images.h5")
    assert store.read("ok.png") == b"fine"
    with pytest.raises(PreparedFormatError, match="ext.png: stored in external files"):
        store.read("ext.png")
    with pytest.raises(PreparedFormatError, match="link.png: an external link"):
        store.read("link.png")
