"""A foreign preprocessed dataset opened for import: images paired with VAE moments by name.

    ds = open_edm2("data/images", "data/vae-sd")          # folders or .zip files
    ds = open_repae("data", latents_name="sdvae")         # images.h5 + sdvae.h5 (+ *_h5.json)
    ds.source       # a preprocess ``Source`` over the images (the teacher pass reads it)
    ds.moment_names # aligned with ds.source.items; read with ``read_moments(ds.moments, name, res)``

Layouts and assumptions are in ``pipeline.inputs.prepared_formats``. Items are ordered by image name
(so the cache does not depend on the order of entries in dataset.json), keyed like preprocess
keys (relative path, extension dropped).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.cache.schema import sample_key
from pipeline.inputs.images import SkipImage, decode_image
from pipeline.inputs.prepared_formats import (
    LABELS_JSON,
    H5Store,
    PreparedFormatError,
    Store,
    is_image_name,
    moments_name,
    open_store,
    raise_problems,
    read_key_list,
    read_labels,
)
from pipeline.inputs.sources import Item, Source

EDM2, REPAE = "edm2", "repae"


@dataclass(frozen=True)
class Pair:
    image: str       # name in the images store
    moments: str     # name in the moments store
    label: int


@dataclass(frozen=True)
class PreparedImageSource(Source):
    """Images of a foreign dataset as a preprocess source; ``item.path`` is the name in ``store``."""

    store: Store | None = field(default=None, compare=False)

    def load(self, item: Item, resolution: int, max_pixels: int) -> np.ndarray:
        assert self.store is not None
        try:
            data = self.store.read(item.path)
        except (OSError, PreparedFormatError) as e:
            raise SkipImage(f"unreadable: {e}") from None
        size = image_size(data)
        if size is not None and size != (resolution, resolution):
            # the moments were encoded from these pixels: a re-crop would not match them
            raise SkipImage(f"image is {size[0]}x{size[1]}, the imported moments are for {resolution}x{resolution}")
        return decode_image(data, resolution, name=item.key, max_pixels=max_pixels)


@dataclass(frozen=True)
class PreparedDataset:
    fmt: str                          # EDM2 | REPAE
    source: PreparedImageSource        # items sorted by image name
    moments: Store
    moment_names: tuple[str, ...]     # aligned with source.items
    resolution: int                   # image side; moments are (8, resolution/8, resolution/8)
    locations: dict[str, str]         # where each part was read from (for the manifest)

    def identity(self) -> dict[str, object]:
        """The moments side of the latents group key: format and the exact (name, label) listing."""
        h = hashlib.sha256()
        for name, item in zip(self.moment_names, self.source.items):
            h.update(f"{name}\t{item.label}\n".encode())
        return {"format": self.fmt, "count": len(self.moment_names), "moments_listing_sha256": h.hexdigest()}

    def close(self) -> None:
        """Drop this process's handles, so DataLoader workers forked next open their own."""
        self.moments.close()
        if self.source.store is not None:
            self.source.store.close()


# ----------------------------------------------------------------------------------------------
# Opening
# ----------------------------------------------------------------------------------------------

def find_edm2_parts(root: str | Path) -> tuple[Path, Path]:
    """``root/images`` (or images.zip) and ``root/vae-sd`` (or vae-sd.zip), as REPA/HASTE expect."""
    root = Path(root)
    found = []
    for part in ("images", "vae-sd"):
        options = [root / part, root / f"{part}.zip"]
        hit = next((p for p in options if p.exists()), None)
        if hit is None:
            raise PreparedFormatError(f"{root}: neither {part}/ nor {part}.zip found (the edm2 layout: images/ "
                                      "and vae-sd/, each a folder or a .zip)")
        found.append(hit)
    return found[0], found[1]


def open_edm2(images: str | Path, moments: str | Path) -> PreparedDataset:
    """An edm2/REPA/HASTE dataset: ``images`` and ``moments`` are folders or zips with dataset.json."""
    img_store, mom_store = open_store(images), open_store(moments)
    img_labels, mom_labels = read_labels(img_store), read_labels(mom_store)
    what = (img_store.where(LABELS_JSON), mom_store.where(LABELS_JSON))
    pairs = pair_by_name(img_labels, mom_labels, img_store.exists, mom_store.exists, what)
    return _assemble(EDM2, img_store, mom_store, pairs, {"images": str(images), "moments": str(moments)})


def find_repae_latents(root: str | Path, latents_name: str | None) -> str:
    """The ``<name>`` of ``<name>.h5``: given, or the only .h5 in ``root`` other than images.h5."""
    if latents_name:
        return latents_name.removesuffix(".h5")
    names = sorted(p.stem for p in Path(root).glob("*.h5") if p.name != "images.h5")
    if len(names) != 1:
        raise PreparedFormatError(f"{root}: found latents files {names or 'none'}; pass the latents name "
                                 "(the <name> of <name>.h5, REPA-E --vae-latents-name)")
    return names[0]


def open_repae(root: str | Path, latents_name: str | None = None) -> PreparedDataset:
    """A REPA-E dataset dir: images.h5 + images_h5.json, <name>.h5 + <name>_h5.json."""
    root = Path(root)
    name = find_repae_latents(root, latents_name)
    paths = {"images": root / "images.h5", "moments": root / f"{name}.h5"}
    for part, path in paths.items():
        if not path.is_file():
            raise PreparedFormatError(f"{path} not found (REPA-E {part} file)")
    img_store, mom_store = H5Store(paths["images"]), H5Store(paths["moments"])
    problems: list[str] = []
    img_labels = _h5_listing(img_store, is_image_name, problems)
    mom_labels = _h5_listing(mom_store, lambda n: n.lower().endswith(".npy"), problems)
    raise_problems(problems, "reading the REPA-E key lists")
    what = (f"{paths['images'].name} (images_h5.json)", f"{paths['moments'].name} ({name}_h5.json)")
    pairs = pair_by_name(img_labels, mom_labels, img_store.exists, mom_store.exists, what)
    return _assemble(REPAE, img_store, mom_store, pairs, {k: str(v) for k, v in paths.items()})


def _h5_listing(store: H5Store, wanted: Callable[[str], bool], problems: list[str]) -> dict[str, int]:
    """Names in the key list (``<stem>_h5.json``) that ``wanted`` accepts, with their dataset.json labels."""
    keys = [k for k in read_key_list(store.path.with_name(f"{store.path.stem}_h5.json")) if wanted(k)]
    labels = read_labels(store)
    problems += [f"{k} is in the key list but has no label in {store.where(LABELS_JSON)}"
                 for k in keys if k not in labels]
    return {k: labels[k] for k in keys if k in labels}


def pair_by_name(images: dict[str, int], moments: dict[str, int], image_ok: Callable[[str], bool],
                 moments_ok: Callable[[str], bool], what: tuple[str, str]) -> list[Pair]:
    """Pair listed images with listed moments by name, sorted by image name; one error names every mismatch."""
    problems: list[str] = []
    pairs: list[Pair] = []
    for name in sorted(images):
        m = moments_name(name)
        if not image_ok(name):
            problems.append(f"image {name} is listed in {what[0]} but missing")
        elif m not in moments:
            problems.append(f"image {name} has no moments ({m} is not in {what[1]})")
        elif not moments_ok(m):
            problems.append(f"moments {m} are listed in {what[1]} but missing")
        elif moments[m] != images[name]:
            problems.append(f"label of {name} differs: {images[name]} in {what[0]} but {moments[m]} for {m} "
                            f"in {what[1]}")
        else:
            pairs.append(Pair(name, m, images[name]))
    paired = {moments_name(n) for n in images}
    problems += [f"moments {m} have no image (nothing in {what[0]} maps to it)" for m in sorted(moments)
                 if m not in paired]
    raise_problems(problems, "pairing images with moments by name")
    if not pairs:
        raise PreparedFormatError(f"no images listed in {what[0]}")
    return pairs


def _assemble(fmt: str, images: Store, moments: Store, pairs: list[Pair], locations: dict[str, str]) -> PreparedDataset:
    first = pairs[0].image
    try:
        size = image_size(images.read(first))
    except OSError as e:
        raise PreparedFormatError(f"cannot read {images.where(first)}: {e}") from None
    if size is None or size[0] != size[1]:
        raise PreparedFormatError(f"{images.where(first)}: expected a square image, found "
                                 f"{'an undecodable file' if size is None else f'{size[0]}x{size[1]}'}")
    items = tuple(Item(key=sample_key(p.image), label=p.label, path=p.image) for p in pairs)
    seen: dict[str, str] = {}
    for it in items:
        if it.key in seen:  # a.png and a.jpg: one sample key
            raise PreparedFormatError(f"{seen[it.key]!r} and {it.path!r} map to the same sample key {it.key!r}")
        seen[it.key] = it.path
    source = PreparedImageSource(kind=fmt, location=locations["images"], classes=class_names(p.label for p in pairs),
                                items=items, store=images)
    ds = PreparedDataset(fmt, source, moments, tuple(p.moments for p in pairs), size[0], locations)
    ds.close()
    return ds


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header; None when undecodable (``decode_image`` then says why)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except (OSError, ValueError, SyntaxError):
        return None


def class_names(labels: Iterable[int]) -> tuple[str, ...]:
    """Class names of an integer-labelled dataset: "0" .. "max" (as for a wds source)."""
    return tuple(str(c) for c in range(max(labels, default=-1) + 1))
