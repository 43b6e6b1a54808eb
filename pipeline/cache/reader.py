"""Reader API for a preprocess cache: open, check against a config, iterate in lockstep.

    cache = open_cache("cache/", need_teacher=True)
    check_cache(cache, Requirements(teacher_layers=(8, 9, 10, 11), num_tokens=256, ...))
    stream = CacheStream(cache, with_teacher=True, batch_size=32, seed=0, rank=0, world_size=1)

Captioned caches also have a text group: ``open_cache(..., need_text=True)``, ``cache.text_null()``,
``CacheStream(..., with_text=True)`` (``pipeline.cache.text`` documents the batch layout).

Order is exact and resumable: each epoch permutes shards with (seed, epoch), gives shard
``order[slot::slots]`` to reader slot ``rank * workers + worker``, and visits the samples of a
shard in a permutation seeded by (seed, epoch, shard). Members are read by offset (the tar
headers are indexed once per shard), so resuming at any sample costs no replay, and a
latents-only stream never touches a teacher byte.
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from webdataset.tariterators import base_plus_ext

from pipeline.cache.groups import group_dir, read_index
from pipeline.cache.schema import (
    LATENTS,
    TEACHER,
    TEXT,
    CacheFormatError,
    GroupManifest,
    TeacherSpec,
    TextSpec,
    decode_targets,
    fields,
    get_codec,
    load_codec_params,
    read_manifest,
)
from pipeline.cache.text import NULL_FILE, cached_null

log = logging.getLogger(__name__)


class CacheMismatchError(ValueError):
    """The cache cannot serve this config; the message names the fields that differ."""


@dataclass(frozen=True)
class Cache:
    root: Path
    latents: GroupManifest
    teacher: GroupManifest | None
    text: GroupManifest | None = None

    def shard_path(self, kind: str, index: int) -> Path:
        m = {LATENTS: self.latents, TEACHER: self.teacher, TEXT: self.text}[kind]
        assert m is not None
        return group_dir(self.root, kind, m.key) / m.shards[index].name

    def text_null(self) -> torch.Tensor:
        """(L, D) in the stored dtype: the text group's empty-caption encoding (the CFG null), sha256-checked,
        read once per process."""
        assert self.text is not None and isinstance(self.text.spec, TextSpec), "open the cache with need_text=True"
        sha = self.text.codec_files.get(NULL_FILE, {}).get("sha256", "")
        return cached_null(str(group_dir(self.root, TEXT, self.text.key)), self.text.spec, sha)

    @property
    def num_shards(self) -> int:
        return len(self.latents.shards)

    def teacher_logits(self, arrays: dict[str, torch.Tensor], layer_index: Sequence[int] | None = None) -> torch.Tensor:
        """Decoded attention logits (N, L', H, T, T) fp32 from a batch's codec arrays, on their device.

        ``layer_index``: positions in ``spec.layers`` to decode (all when None); a codec with
        group-level arrays (tokens-*, stream-*) gets those, loaded once per device.
        """
        assert self.teacher is not None
        return decode_teacher_logits(self.root, self.teacher, arrays, layer_index)

    def teacher_targets(self, batch: Mapping[str, Any], layer_index: Sequence[int] | None = None, *,
                        device: torch.device | str | None = None, features: bool = True,
                        attention: bool = True, compute: str | None = None
                        ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A loader batch's teacher targets through the group's codec: features (N, T, D) and logits
        (N, L', H, T, T) of the layers at ``layer_index``, float32 on ``device``; None where not asked.

        Only the teacher members this decode reads travel (non-blocking from pinned memory), uncut:
        layers are selected on the device, where a slice costs nothing (a CPU-side gather of ~100 MB
        would stall the host).
        """
        assert self.teacher is not None
        spec = self.teacher.spec
        codec = get_codec(spec.codec)
        names = set(codec.members(spec)) if attention or codec.derives_features else set()
        if features and not codec.derives_features:  # only what this step decodes crosses to the device
            names |= {f.removesuffix(".npy") for f in fields(TEACHER, spec)} - set(codec.members(spec))
        arrays = {n: batch[n].to(device, non_blocking=True) if device is not None else batch[n] for n in names}
        return decode_teacher_targets(self.root, self.teacher, arrays, layer_index, features=features,
                                      attention=attention, compute=compute)


def decode_teacher_logits(root: Path, manifest: GroupManifest, arrays: dict[str, torch.Tensor],
                          layer_index: Sequence[int] | None = None) -> torch.Tensor:
    """``Cache.teacher_logits`` for a teacher group's manifest (also used by ``haste cache verify``).
    The members of a per-layer codec come already cut to ``layer_index``; stream-*'s are never cut."""
    codec = get_codec(manifest.spec.codec)
    params = _group_params(root, manifest, arrays, layer_index, needed=True)
    logits = decode_targets(manifest.spec, arrays, params, None if codec.per_layer else layer_index,
                            features=False)[1]
    assert logits is not None
    return logits


def decode_teacher_targets(root: Path, manifest: GroupManifest, arrays: Mapping[str, torch.Tensor],
                           layer_index: Sequence[int] | None = None, *, features: bool = True,
                           attention: bool = True, compute: str | None = None
                           ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``codecs.decode_targets`` on a batch's uncut members, with the group's codec arrays."""
    codec = get_codec(manifest.spec.codec)
    params = _group_params(root, manifest, arrays, layer_index, needed=attention or codec.derives_features)
    return decode_targets(manifest.spec, arrays, params, layer_index, features=features, attention=attention,
                          compute=compute)


def _group_params(root: Path, manifest: GroupManifest, arrays: Mapping[str, torch.Tensor],
                  layer_index: Sequence[int] | None, needed: bool) -> dict[str, torch.Tensor] | None:
    """The group's codec arrays on the arrays' device (None when the codec has none or they are not
    needed), cut to ``layer_index`` for a per-layer codec; stream-*'s blocks serve every layer."""
    spec = manifest.spec
    assert isinstance(spec, TeacherSpec)
    codec = get_codec(spec.codec)
    if not (needed and codec.params(spec)):
        return None
    layers = None
    if codec.per_layer:
        layers = tuple(range(len(spec.layers))) if layer_index is None else tuple(layer_index)
    return _device_params(str(group_dir(root, TEACHER, manifest.key)), spec,
                          tuple(sorted((f, r["sha256"]) for f, r in manifest.codec_files.items())),
                          str(next(iter(arrays.values())).device), layers)


@lru_cache(maxsize=8)
def _device_params(gdir: str, spec: TeacherSpec, sha: tuple[tuple[str, str], ...], device: str,
                   layers: tuple[int, ...] | None) -> dict[str, torch.Tensor]:
    """A teacher group's codec arrays (sha256-checked), cut to ``layers`` (None: uncut) and moved to
    ``device`` once: ~19 MB for tokens-int8's 4 DINOv2-B layers, ~116 MB for stream-*'s 4 blocks,
    read once per process rather than once per step. Keyed by the recorded hashes too, so a rebuilt
    group under the same path is read again."""
    arrays = load_codec_params(Path(gdir), spec, {f: {"sha256": h} for f, h in sha})
    return {n: torch.from_numpy(a if layers is None else a[list(layers)]).to(device) for n, a in arrays.items()}


def open_cache(root: str | Path, *, latents: str | None = None, teacher: str | None = None,
               need_teacher: bool = True, text: str | None = None, need_text: bool = False) -> Cache:
    """Open the groups of a cache root; by default the newest (latents, teacher) pair in index.json.

    With ``need_teacher=False`` the teacher group is neither opened nor required to exist. The
    latents group is chosen the same way whatever ``need_teacher`` is (an explicit ``teacher`` key
    still selects the run it was recorded with), so Phase I and a Phase II reopen that pass the same
    keys read the same latents. When the newest run for the chosen latents recorded no teacher, the
    newest teacher group recorded for those same latents is used. ``need_text`` (or a ``text`` key) opens
    the text group of a captioned cache the same way: the newest one recorded for the chosen latents.
    """
    root = Path(root)
    if not root.is_dir():
        raise CacheFormatError(f"cache not found: {root} (run `haste preprocess` first)")
    runs = list(reversed(read_index(root).get("runs", [])))  # newest first
    pick = next((r for r in runs if latents in (None, r.get("latents")) and teacher in (None, r.get("teacher"))
                 and text in (None, r.get("text"))), None)
    if pick is None and text is not None:  # a text group recorded with other teacher keys: its latents
        pick = next((r for r in runs if text == r.get("text") and latents in (None, r.get("latents"))), None)
    if pick is None and teacher is not None:
        if need_teacher and latents is None:
            raise CacheMismatchError(f"{root}: index.json records no run with teacher group {teacher}; "
                                     "pass its latents group key too, or re-run `haste preprocess`")
        pick = next((r for r in runs if latents in (None, r.get("latents"))), None)
    lat_key = latents or (pick or {}).get("latents")
    if lat_key is None:
        raise CacheFormatError(f"{root}: no complete latents group recorded in index.json")
    lat = _read_group(root, LATENTS, lat_key)
    txt = _open_text(root, lat, text, runs) if need_text or text is not None else None
    if not need_teacher:
        return Cache(root, lat, None, txt)
    t_key = teacher or (pick or {}).get("teacher")
    if t_key is None:  # a later latents-only run may have been recorded for the same latents
        t_key = next((r.get("teacher") for r in runs if r.get("latents") == lat_key and r.get("teacher")), None)
    if t_key is None:
        raise CacheMismatchError(f"{root}: no teacher group recorded for latents group {lat_key}; "
                                 "preprocess with a teacher (teacher != none) or train without alignment")
    t_dir = group_dir(root, TEACHER, t_key)
    if not t_dir.is_dir():
        raise CacheMismatchError(f"teacher group {t_dir} is missing: Phase I needs the teacher targets. "
                                 "Re-run `haste preprocess` with the same config to rebuild them.")
    tm = _read_group(root, TEACHER, t_key)
    _check_aligned(lat, tm)
    return Cache(root, lat, tm, txt)


def _open_text(root: Path, lat: GroupManifest, key: str | None, runs: list[dict]) -> GroupManifest:
    key = key or next((r["text"] for r in runs if r.get("latents") == lat.key and r.get("text")), None)
    if key is None:
        raise CacheMismatchError(f"{root}: no text group recorded for latents group {lat.key}; text-to-image "
                                 "training needs a captioned source (COCO, caption folder or tars, "
                                 "synthetic-captions:<n>) preprocessed with a text_encoder")
    if not group_dir(root, TEXT, key).is_dir():
        raise CacheMismatchError(f"text group {group_dir(root, TEXT, key)} is missing; re-run `haste preprocess` "
                                 "with the same config to rebuild it")
    tm = _read_group(root, TEXT, key)
    _check_aligned(lat, tm)
    return tm


def _read_group(root: Path, kind: str, key: str) -> GroupManifest:
    """The manifest of ``<root>/<kind>/<key>``; it must describe that very directory (shard paths use its key)."""
    gdir = group_dir(root, kind, key)
    m = read_manifest(gdir)
    if (m.kind, m.key) != (kind, key):
        raise CacheFormatError(f"{gdir}/manifest.json describes {m.kind} group {m.key}, not {kind} group {key}; "
                               "the group directory was moved or copied (re-run `haste preprocess`)")
    return m


def _check_aligned(lat: GroupManifest, tm: GroupManifest) -> None:
    """``tm`` (a teacher or text group) holds the same samples as ``lat``, in the same shards."""
    kind = tm.kind
    for field in ("listing_sha256", "count", "shard_size"):
        if lat.source.get(field) != tm.source.get(field):
            raise CacheMismatchError(f"latents group {lat.key} and {kind} group {tm.key} come from different "
                                     f"sources (source.{field}: {lat.source.get(field)} vs {tm.source.get(field)})")
    if lat.settings.get("transform") != tm.settings.get("transform"):
        raise CacheMismatchError(f"latents and {kind} groups differ in transform: "
                                 f"{lat.settings.get('transform')} vs {tm.settings.get('transform')}")
    if len(lat.shards) != len(tm.shards):
        raise CacheMismatchError(f"latents group {lat.key} has {len(lat.shards)} shards but {kind} group "
                                 f"{tm.key} has {len(tm.shards)}")
    for a, b in zip(lat.shards, tm.shards):
        if (a.count, a.first_key, a.last_key) != (b.count, b.first_key, b.last_key):
            raise CacheMismatchError(f"shard {a.name} differs between the latents and {kind} groups")


@dataclass(frozen=True, kw_only=True)
class Requirements:
    """What a training config needs from the cache (None = don't care)."""

    latent_size: int | None = None
    latent_channels: int | None = None
    num_classes: int | None = None
    teacher_layers: tuple[int, ...] = ()
    teacher_heads: tuple[int, ...] = ()
    num_tokens: int | None = None
    feat_dim: int | None = None
    need_features: bool = False
    need_attention: bool = False
    text_dim: int | None = None       # text-to-image: the model's context width (CLIP ViT-L/14: 768)
    text_length: int | None = None    # and its context length (77)


def check_cache(cache: Cache, req: Requirements) -> None:
    """Raise ``CacheMismatchError`` listing every field the cache cannot satisfy."""
    problems = []
    ls = cache.latents.spec
    if req.latent_size is not None and ls.size != req.latent_size:
        problems.append(f"latent size {ls.size} != model input_size {req.latent_size}")
    if req.latent_channels is not None and ls.channels != req.latent_channels:
        problems.append(f"latent channels {ls.channels} != model in_channels {req.latent_channels}")
    n_cls = len(cache.latents.classes)
    if req.num_classes is not None and n_cls > req.num_classes:
        problems.append(f"cache has {n_cls} classes but the model has num_classes={req.num_classes}")
    if req.need_features or req.need_attention:
        ts = cache.teacher.spec if cache.teacher else None
        if not isinstance(ts, TeacherSpec):
            problems.append("alignment losses need a teacher group, but none is open")
        else:
            problems += _teacher_problems(ts, req)
    if req.text_dim is not None or req.text_length is not None:
        problems += _text_problems(cache, req)
    if problems:
        raise CacheMismatchError(f"cache {cache.root} does not fit the config: " + "; ".join(problems))


def _text_problems(cache: Cache, req: Requirements) -> list[str]:
    spec = cache.text.spec if cache.text else None
    if not isinstance(spec, TextSpec):
        return ["text conditioning needs a text group, but none is open (open_cache(..., need_text=True))"]
    out = []
    if req.text_dim is not None and spec.dim != req.text_dim:
        out.append(f"text encodings are {spec.dim}-dimensional but the model's context width is {req.text_dim}")
    if req.text_length is not None and spec.max_length != req.text_length:
        out.append(f"text encodings have {spec.max_length} tokens but the model expects {req.text_length}")
    return out


def _teacher_problems(ts: TeacherSpec, req: Requirements) -> list[str]:
    out = []
    if req.num_tokens is not None and ts.num_tokens != req.num_tokens:
        out.append(f"teacher has {ts.num_tokens} patch tokens ({ts.grid}x{ts.grid}) but the model has {req.num_tokens}")
    if req.need_features and req.feat_dim is not None and ts.embed_dim != req.feat_dim:
        out.append(f"teacher feature dim {ts.embed_dim} != projector z_dim {req.feat_dim}")
    if req.need_attention:
        if ts.codec == "none":
            out.append("teacher group stores no attention (codec none) but attention alignment is on")
        missing = sorted(set(req.teacher_layers) - set(ts.layers))
        if missing:
            out.append(f"teacher layers {missing} are not cached (cached: {list(ts.layers)})")
        bad = [h for h in req.teacher_heads if not 0 <= h < ts.num_heads]
        if bad:
            out.append(f"teacher heads {bad} out of range (teacher has {ts.num_heads})")
    return out


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

ShardIndex = tuple[tuple[str, dict[str, tuple[int, int]]], ...]


def index_shard(path: Path) -> ShardIndex:
    """(key, {ext: (offset, size)}) per sample, in file order, from the tar headers alone.

    Cached per file version (path, inode, size, mtime), so a shard replaced on disk is re-indexed.
    Raises ``CacheFormatError`` naming the file when it is missing, truncated or corrupt.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CacheFormatError(f"shard missing: {path}") from None
    except OSError as e:
        raise CacheFormatError(f"shard unreadable: {path} ({e})") from None
    return _index_shard(path, st.st_ino, st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _index_shard(path: Path, ino: int, size: int, mtime_ns: int) -> ShardIndex:
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                parsed = base_plus_ext(m.name) if m.isfile() else None
                if parsed is None or parsed[0] is None:
                    continue
                key, ext = parsed
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][ext] = (m.offset_data, m.size)
            end = tf.offset  # where tarfile stopped: must be the end-of-archive marker
        # tarfile stops silently at a cut-off or garbled header after the first one; a complete
        # shard has a NUL end-of-archive block right where the iteration stopped.
        with open(path, "rb") as f:
            f.seek(end)
            marker = f.read(tarfile.BLOCKSIZE)
    except FileNotFoundError:
        raise CacheFormatError(f"shard missing: {path}") from None
    except (tarfile.TarError, EOFError, OSError) as e:
        raise CacheFormatError(f"shard corrupt or truncated: {path} ({e})") from None
    if len(marker) < tarfile.BLOCKSIZE:
        raise CacheFormatError(f"shard truncated: {path} ({size} bytes, ends inside or right after the member "
                               f"at byte {end}); re-run `haste preprocess` to rewrite it")
    if marker.strip(tarfile.NUL):
        raise CacheFormatError(f"shard corrupt: {path} (unreadable tar header at byte {end})")
    return tuple(samples)


def read_sample(path: Path, entry: tuple[str, dict[str, tuple[int, int]]], f=None) -> dict[str, bytes]:
    """Member bytes of one indexed sample; ``f`` is an already open binary handle on ``path``."""
    if f is None:
        try:
            with open(path, "rb") as fh:
                return read_sample(path, entry, fh)
        except FileNotFoundError:
            raise CacheFormatError(f"shard missing: {path}") from None
        except OSError as e:
            raise CacheFormatError(f"shard unreadable: {path} ({e})") from None
    out = {}
    for ext, (offset, size) in entry[1].items():
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise CacheFormatError(f"shard truncated: {path} (member {entry[0]}.{ext})")
        out[ext] = data
    return out


def shard_order(seed: int, epoch: int, num_shards: int) -> list[int]:
    return np.random.default_rng([seed, epoch]).permutation(num_shards).tolist()


def sample_order(seed: int, epoch: int, shard: int, count: int, shuffle: bool = True) -> list[int]:
    return np.random.default_rng([seed, epoch, shard]).permutation(count).tolist() if shuffle else list(range(count))
