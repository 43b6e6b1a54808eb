"""Input datasets for preprocess: an ImageNet-style folder, ImageNet-wds tar shards, or synthetic.

Every source becomes an ordered list of ``Item``s (stable key, label, where the bytes are), so
output shard k is always items[k*S:(k+1)*S] whatever the number of ranks, workers or reruns.
Items are loaded by index in DataLoader workers; tar members are read by offset, which is why
wds inputs are indexed once with ``tarfile`` (headers only) instead of being streamed.

What is read: regular files only (a FIFO or a link to a device is skipped, never opened for a
blocking read), at most ``max_file_bytes`` each; input tars must end with the end-of-archive
marker (a tar cut short is used up to the cut and its lost samples are counted); keys that would
leave a tar when extracted (``../``, absolute, control characters) are refused. Everything left
out at listing time is a ``Rejected`` entry that counts against ``max_skip_fraction``.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from webdataset.tariterators import base_plus_ext

from pipeline.cache.schema import sample_key, unsafe_key_reason
from pipeline.inputs.images import IMAGE_EXTENSIONS, SkipImage, decode_image, display_path, scan_image_folder
from pipeline.inputs.synth import synth_image

DEFAULT_MAX_FILE_BYTES = 512 * 2**20  # an ImageNet JPEG is ~110 KB; anything near this is not an image


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
class Rejected:
    """An input left out while listing (it never becomes an ``Item``), counted like a skipped image."""

    input: str          # the path (raw bytes' repr when not UTF-8), or tar:member
    reason: str
    count: int = 1      # samples it stands for (a tar cut short: the samples lost after the cut)


@dataclass(frozen=True)
class Source:
    kind: str                   # "folder" | "wds" | "synthetic"
    location: str               # what the user passed
    classes: tuple[str, ...]
    items: tuple[Item, ...]
    synthetic_seed: int = 0
    rejected: tuple[Rejected, ...] = ()
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES

    @property
    def num_rejected(self) -> int:
        return sum(r.count for r in self.rejected)

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
        data = read_input(item.path, item.offset, item.size, self.max_file_bytes)
        return decode_image(data, resolution, name=item.key, max_pixels=max_pixels)


def read_input(path: str, offset: int, size: int, max_bytes: int) -> bytes:
    """``size`` bytes at ``offset`` (size < 0: the whole file) of a regular file, or raise ``SkipImage``.

    Opened non-blocking, so a FIFO is seen (and skipped) instead of waiting for a writer; a device
    (a link to /dev/zero) is skipped before any read; no read exceeds ``max_bytes`` + 1.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise SkipImage(f"unreadable: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
                    stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}.get(stat.S_IFMT(st.st_mode), "not a file")
            raise SkipImage(f"not a regular file ({kind})")
        want = st.st_size if size < 0 else size
        if want > max_bytes:
            raise SkipImage(f"file too large: {want} bytes > max_file_bytes={max_bytes}")
        try:
            f.seek(offset)
            data = f.read(max_bytes + 1 if size < 0 else size)
        except OSError as e:
            raise SkipImage(f"unreadable: {e.strerror or e}") from None
    if len(data) > max_bytes:  # the file grew after fstat
        raise SkipImage(f"file too large: over max_file_bytes={max_bytes}")
    return data


def open_source(spec: str, *, synthetic_classes: int = 8, synthetic_seed: int = 0,
                max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Source:
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
    tars = tar_paths(spec)
    if tars:
        return _wds_source(spec, tars, max_file_bytes)
    root = Path(spec)
    if not root.exists():
        raise SourceError(f"source not found: {spec} (expected an image folder tree, .tar shards or synthetic:<n>)")
    try:
        classes, files, left_out = scan_image_folder(root)
    except (FileNotFoundError, ValueError) as e:
        raise SourceError(str(e)) from None
    rejected = [Rejected(path, why) for path, why in left_out]
    items: list[Item] = []
    seen: dict[str, str] = {}
    for rel, label in files:
        key = sample_key(rel)
        if (why := unsafe_key_reason(key)) is not None:  # e.g. a newline in a file name
            rejected.append(Rejected(str(root / rel), f"unusable as a sample key: {why}"))
            continue
        if key in seen:  # e.g. a.jpg and a.png: one tar sample key, so one would overwrite the other
            raise SourceError(f"{root}: {seen[key]!r} and {rel!r} map to the same sample key {key!r} "
                              "(keys drop the extension); rename one of them")
        seen[key] = rel
        items.append(Item(key=key, label=label, path=str(root / rel)))
    return Source("folder", str(root.resolve()), tuple(classes), tuple(items), rejected=tuple(rejected),
                  max_file_bytes=max_file_bytes)


def tar_paths(spec: str) -> list[Path]:
    import braceexpand

    if spec.endswith(".tar") or "{" in spec:
        paths = [Path(p) for p in braceexpand.braceexpand(spec)]
        missing = [p for p in paths if not p.exists()]
        if missing:
            raise SourceError(f"tar shard not found: {missing[0]} ({len(missing)} of {len(paths)} missing)")
    else:
        paths = sorted(Path(spec).glob("*.tar")) if Path(spec).is_dir() else []
    odd = [p for p in paths if not p.is_file()]  # a FIFO would block the listing, a device never end
    if odd:
        raise SourceError(f"input tar {display_path(odd[0])} is not a regular file")
    return paths


def scan_tar(tar: Path) -> tuple[list[tarfile.TarInfo], str | None]:
    """The tar's complete members and, when it does not end with the end-of-archive marker, why.

    ``tarfile`` stops silently at a header cut off at a block boundary (or garbled), so a tar cut
    short would just look smaller; as ``pipeline.cache.reader`` does for our own shards, the block
    where iteration stopped must be the NUL end-of-archive marker.
    """
    members: list[tarfile.TarInfo] = []
    cut = None
    try:
        with open(tar, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tf:
            size = os.fstat(raw.fileno()).st_size
            try:
                for m in tf:
                    members.append(m)
                raw.seek(tf.offset)
                marker = raw.read(tarfile.BLOCKSIZE)
                if len(marker) < tarfile.BLOCKSIZE:
                    cut = f"no end-of-archive marker, the file ends at byte {size}"
                elif marker.strip(tarfile.NUL):
                    cut = f"unreadable tar header at byte {tf.offset}"
            except (tarfile.TarError, EOFError) as e:  # cut inside a member's data
                cut = f"cut inside a member ({e})"
    except (tarfile.TarError, OSError) as e:
        raise SourceError(f"cannot read tar shard {tar}: {e}") from None
    complete = [m for m in members if m.offset_data + m.size <= size]
    return complete, cut or (f"cut inside a member, the file ends at byte {size}" if len(complete) < len(members)
                             else None)


def _tar_items(tar: Path, members: list[tarfile.TarInfo], cut: bool) -> tuple[list[Item], list[Rejected], int]:
    """Items of one tar (an image member plus a ``.cls`` label per key), refused keys, and the
    number of samples only partly in the tar (at the cut of a tar cut short)."""
    images: dict[str, tarfile.TarInfo] = {}
    labels: dict[str, tarfile.TarInfo] = {}
    for m in members:
        parsed = base_plus_ext(m.name) if m.isfile() else None  # webdataset's own key/extension rule
        if parsed is None or parsed[0] is None:
            continue
        key, ext = parsed
        if ext.lower() == "cls":
            labels[key] = m
        elif "." + ext.lower() in IMAGE_EXTENSIONS:
            images[key] = m
    items, rejected, partial = [], [], 0
    with open(tar, "rb") as raw:
        for key, m in images.items():
            if key not in labels:
                if cut:
                    partial += 1
                    continue
                raise SourceError(f"{tar}: sample {key!r} has an image but no .cls label")
            if (why := unsafe_key_reason(key)) is not None:  # "../x" would leave our shards when extracted
                rejected.append(Rejected(f"{display_path(tar)}:{display_path(key)}", f"unusable as a sample key: {why}"))
                continue
            raw.seek(labels[key].offset_data)
            label = _parse_label(raw.read(labels[key].size), tar, key)
            items.append(Item(key=key, label=label, path=str(tar.resolve()), offset=m.offset_data, size=m.size))
    partial += sum(1 for key in labels if key not in images) if cut else 0
    return items, rejected, partial


def _wds_source(spec: str, tars: list[Path], max_file_bytes: int) -> Source:
    """Index ImageNet-wds shards; a tar cut short keeps its complete samples, the rest count as lost."""
    scans = [(tar, *scan_tar(tar)) for tar in tars]
    per_tar = [(tar, cut, *_tar_items(tar, members, cut is not None)) for tar, members, cut in scans]
    full = [len(its) + len(rej) for _, cut, its, rej, _ in per_tar if cut is None]
    items: list[Item] = []
    rejected: list[Rejected] = []
    for tar, cut, tar_items, tar_rejected, partial in per_tar:
        items += tar_items
        rejected += tar_rejected
        if cut is None:
            continue
        kept = len(tar_items) + len(tar_rejected)
        if full:  # the samples after the cut are gone: the largest complete tar says how many there were
            lost = partial + max(0, max(full) - kept - partial)
            how = f"estimated from the largest complete tar ({max(full)} samples)"
        else:
            lost = max(1, partial)
            how = "no complete tar to compare with: the samples after the cut cannot be counted"
        rejected.append(Rejected(display_path(tar), f"tar cut short ({cut}): {kept} complete samples kept, "
                                                    f"{lost} lost ({how})", lost))
    if not items:
        raise SourceError(f"no image samples with .cls labels found in {spec}")
    num_classes = max(it.label for it in items) + 1
    return Source("wds", spec, tuple(str(c) for c in range(num_classes)), tuple(items), rejected=tuple(rejected),
                  max_file_bytes=max_file_bytes)


def _parse_label(data: bytes, tar: Path, key: str) -> int:
    try:
        return int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise SourceError(f"{tar}: {key}.cls is not an integer label") from None
