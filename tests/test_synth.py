"""Tests for pipeline/inputs/synth.py: determinism, labels, learnability, and the two writers."""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.inputs.images import decode_image, list_image_folder
from pipeline.inputs.synth import (
    NUM_DISTINCT_CLASSES,
    class_attributes,
    encode_image,
    synth_image,
    write_image_folder,
    write_wds_shards,
)


@pytest.mark.parametrize("size", [1, 17, 32, 256])
def test_shape_dtype_label(size: int) -> None:
    for index in [0, 5, 123]:
        img, label = synth_image(index, 7, size)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
        assert label == index % 7


def test_deterministic_and_seeded() -> None:
    a, _ = synth_image(42, 10, 64, seed=3)
    b, _ = synth_image(42, 10, 64, seed=3)
    assert a.tobytes() == b.tobytes()
    c, _ = synth_image(42, 10, 64, seed=4)
    d, _ = synth_image(43, 10, 64, seed=3)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)


def test_images_are_not_flat() -> None:
    img, _ = synth_image(0, 4, 64)
    assert img.std() > 20


def test_class_attributes_are_distinct() -> None:
    combos = {class_attributes(c) for c in range(NUM_DISTINCT_CLASSES)}
    assert len(combos) == NUM_DISTINCT_CLASSES
    # Neighbouring classes differ in every attribute, so small-K demos are easy to tell apart.
    for c in range(NUM_DISTINCT_CLASSES - 1):
        assert all(x != y for x, y in zip(class_attributes(c), class_attributes(c + 1)))


def test_nearest_class_mean_separates_classes() -> None:
    k, size = 4, 32
    train = [synth_image(i, k, size) for i in range(64)]
    test = [synth_image(i, k, size) for i in range(64, 128)]
    means = np.stack(
        [
            np.mean([img.astype(np.float64) for img, lab in train if lab == c], axis=0).ravel()
            for c in range(k)
        ]
    )
    correct = 0
    for img, lab in test:
        dist = np.linalg.norm(means - img.astype(np.float64).ravel(), axis=1)
        correct += int(np.argmin(dist) == lab)
    assert correct / len(test) >= 0.9


def test_fast_enough() -> None:
    synth_image(0, 10, 256)  # warm-up
    start = time.perf_counter()
    for i in range(20):
        synth_image(i, 10, 256)
    per_image = (time.perf_counter() - start) / 20
    assert per_image < 0.05  # ~5 ms on a laptop core; loose bound against noisy CI machines


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        synth_image(0, 0, 32)
    with pytest.raises(ValueError):
        encode_image(np.zeros((4, 4, 3), np.uint8), "xyz")


def test_write_image_folder_roundtrip(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    rels = write_image_folder(root, 10, 4, 16, seed=1)
    assert rels[0] == "class_000/img_000000.png" and rels[5] == "class_001/img_000005.png"
    classes, items = list_image_folder(root)
    assert classes == [f"class_{c:03d}" for c in range(4)]
    assert sorted(rels) == [rel for rel, _ in items]
    for rel, label in items:
        index = int(rel.split("img_")[1].split(".")[0])
        expected, expected_label = synth_image(index, 4, 16, seed=1)
        assert label == expected_label
        # PNG is lossless and the crop is the identity at the native size.
        np.testing.assert_array_equal(decode_image((root / rel).read_bytes(), 16), expected)
    assert not list(root.rglob("*.tmp*"))


def test_write_image_folder_idempotent(tmp_path: Path) -> None:
    rels = write_image_folder(tmp_path, 6, 3, 8)
    stamps = {rel: (tmp_path / rel).stat().st_mtime_ns for rel in rels}
    assert write_image_folder(tmp_path, 6, 3, 8) == rels
    assert {rel: (tmp_path / rel).stat().st_mtime_ns for rel in rels} == stamps


def test_write_image_folder_creates_all_class_dirs(tmp_path: Path) -> None:
    write_image_folder(tmp_path, 2, 5, 8, fmt="jpg")
    classes, items = list_image_folder(tmp_path)
    assert len(classes) == 5 and [lab for _, lab in items] == [0, 1]


def test_write_wds_shards_readable(tmp_path: Path) -> None:
    shards = write_wds_shards(tmp_path, 10, 3, 16, per_shard=4, seed=2)
    assert [p.name for p in shards] == ["synth-000000.tar", "synth-000001.tar", "synth-000002.tar"]
    with tarfile.open(shards[0]) as tar:
        assert tar.getnames() == [f"{i:08d}.{e}" for i in range(4) for e in ("cls", "jpg")]
    dataset = wds.WebDataset(
        [str(p) for p in shards], shardshuffle=False, nodesplitter=None, workersplitter=None
    )
    samples = list(dataset)
    assert [s["__key__"] for s in samples] == [f"{i:08d}" for i in range(10)]
    for i, sample in enumerate(samples):
        assert int(sample["cls"].decode("ascii")) == i % 3
        expected, _ = synth_image(i, 3, 16, seed=2)
        assert sample["jpg"] == encode_image(expected, "jpg")
        img = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
        assert img.shape == (16, 16, 3)
    assert not list(tmp_path.glob(".*tmp*"))


def test_write_wds_shards_are_byte_stable(tmp_path: Path) -> None:
    first = [p.read_bytes() for p in write_wds_shards(tmp_path / "a", 5, 2, 8, per_shard=8, ext="png")]
    second = [p.read_bytes() for p in write_wds_shards(tmp_path / "b", 5, 2, 8, per_shard=8, ext="png")]
    assert first == second
