"""Input datasets for preprocess: an ImageNet-style folder, ImageNet-wds tar shards, or synthetic.

Every source becomes an ordered list of ``Item``s (stable key, label, where the bytes are), so
output shard k is always items[k*S:(k+1)*S] whatever the number of ranks, workers or reruns.
Items are loaded by index in DataLoader workers; tar members are read by offset, which is why
wds inputs are indexed once with ``tarfile`` (headers only) instead of being streamed.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from webdataset.tariterators import base_plus_ext

from pipeline.cache.schema import sample_key
from pipeline.inputs.images import IMAGE_EXTENSIONS, SkipImage, decode_image, list_image_folder
from pipeline.inputs.synth import synth_image


class SourceError(ValueError):
    """The input dataset is missing or unusable; the message names the path."""


@dataclass(frozen=True)
class Item:
    key: str            # sample key in the cache (from the relative path / wds key)
    label: int
    path: str = ""      # file to read ("" for synthetic)
    offset: int = 0     # byte offset of a tar member (wds inputs)
    size: int = -1      # member size; -1 = whole file


@dataclass(frozen=True)
class Source:
    kind: str                   # "folder" | "wds" | "synthetic"
    location: str               # what the user passed
    classes: tuple[str, ...]
    items: tuple[Item, ...]
    synthetic_seed: int = 0

    def identity(self) -> dict[str, object]:
        """What makes two sources the same dataset: kind, classes and the exact item listing."""
        h = hashlib.sha256()
        for it in self.items:
            h.update(f"{it.key}\t{it.label}\t{it.size}\n".encode())
        classes = hashlib.sha256(json.dumps(list(self.classes)).encode()).hexdigest()
        out: dict[str, object] = {"kind": self.kind, "count": len(self.items), "listing_sha256": h.hexdigest(),
                                  "classes_sha256": classes, "num_classes": len(self.classes)}
        if self.kind == "synthetic":
            out["seed"] = self.synthetic_seed
        return out

    def load(self, item: Item, resolution: int, max_pixels: int) -> np.ndarray:
        """uint8 (R, R, 3) center-cropped RGB, or raise ``SkipImage``."""
        if self.kind == "synthetic":
            return synth_image(int(item.key.rsplit("_", 1)[1]), len(self.classes), resolution, self.synthetic_seed)[0]
        try:
            with open(item.path, "rb") as f:
                f.seek(item.offset)
                data = f.read() if item.size < 0 else f.read(item.size)
        except OSError as e:
            raise SkipImage(f"unreadable: {e.strerror or e}") from None
        return decode_image(data, resolution, name=item.key, max_pixels=max_pixels)


def open_source(spec: str, *, synthetic_classes: int = 8, synthetic_seed: int = 0) -> Source:
    """``synthetic:<n>``, a folder tree, a directory of .tar shards, or a brace/glob tar pattern."""
    if spec.startswith("synthetic:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            raise SourceError(f"source {spec!r}: expected synthetic:<count>") from None
        if n <= 0 or synthetic_classes <= 0:
            raise SourceError(f"source {spec!r}: count and synthetic_classes must be positive")
        classes = tuple(f"class_{c:03d}" for c in range(synthetic_classes))
        items = tuple(Item(key=f"{classes[i % synthetic_classes]}/img_{i:06d}", label=i % synthetic_classes)
                      for i in range(n))
        return Source("synthetic", spec, classes, items, synthetic_seed)
    tars = _tar_paths(spec)
    if tars:
        return _wds_source(spec, tars)
    root = Path(spec)
    if not root.exists():
        raise SourceError(f"source not found: {spec} (expected an image folder tree, .tar shards or synthetic:<n>)")
    try:
        classes, files = list_image_folder(root)
    except (FileNotFoundError, ValueError) as e:
        raise SourceError(str(e)) from None
    items = tuple(Item(key=sample_key(rel), label=label, path=str(root / rel)) for rel, label in files)
    seen: dict[str, str] = {}
    for it, (rel, _) in zip(items, files):
        if it.key in seen:  # e.g. a.jpg and a.png: one tar sample key, so one would overwrite the other
            raise SourceError(f"{root}: {seen[it.key]!r} and {rel!r} map to the same sample key {it.key!r} "
                              "(keys drop the extension); rename one of them")
        seen[it.key] = rel
    return Source("folder", str(root.resolve()), tuple(classes), items)


def _tar_paths(spec: str) -> list[Path]:
    import braceexpand

    if spec.endswith(".tar") or "{" in spec:
        paths = [Path(p) for p in braceexpand.braceexpand(spec)]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise SourceError(f"tar shard not found: {missing[0]} ({len(missing)} of {len(paths)} missing)")
        return paths
    root = Path(spec)
    return sorted(root.glob("*.tar")) if root.is_dir() else []


def _wds_source(spec: str, tars: list[Path]) -> Source:
    """Index ImageNet-wds shards: one image member plus a ``.cls`` label per key."""
    items: list[Item] = []
    for tar in tars:
        images: dict[str, tarfile.TarInfo] = {}
        labels: dict[str, int] = {}
        try:
            with tarfile.open(tar, "r:") as tf, open(tar, "rb") as raw:
                for m in tf:
                    if not m.isfile():
                        continue
                    parsed = base_plus_ext(m.name)  # webdataset's own key/extension rule
                    if parsed is None or parsed[0] is None:
                        continue
                    key, ext = parsed
                    if ext.lower() == "cls":
                        raw.seek(m.offset_data)
                        labels[key] = _parse_label(raw.read(m.size), tar, key)
                    elif "." + ext.lower() in IMAGE_EXTENSIONS:
                        images[key] = m
        except tarfile.TarError as e:
            raise SourceError(f"cannot read tar shard {tar}: {e}") from None
        for key, m in images.items():
            if key not in labels:
                raise SourceError(f"{tar}: sample {key!r} has an image but no .cls label")
            items.append(Item(key=key, label=labels[key], path=str(tar.resolve()), offset=m.offset_data, size=m.size))
    if not items:
        raise SourceError(f"no image samples with .cls labels found in {spec}")
    num_classes = max(it.label for it in items) + 1
    return Source("wds", spec, tuple(str(c) for c in range(num_classes)), tuple(items))


def _parse_label(data: bytes, tar: Path, key: str) -> int:
    try:
        return int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise SourceError(f"{tar}: {key}.cls is not an integer label") from None
