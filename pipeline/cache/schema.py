"""THE cache contract: field names, dtypes, shapes, attention codecs, manifests.

The preprocess writer and every reader import this module and nothing else to agree on what
a cached sample is. A cache is two aligned WebDataset shard groups (same shard numbering, same
keys in the same order), so a latents-only reader never streams teacher bytes:

    latents/<key>/shard-000000.tar   <k>.moments.npy  (2C, h, w) posterior mean ++ std
                                     <k>.cls          class index as ASCII
    teacher/<key>/shard-000000.tar   <k>.feat.npy     (T, D) final-norm patch tokens
                                     [<k>.feat_scale.npy (T,)  feat_codec int8]
                                     <k>.q.npy <k>.k.npy (L, H, T, hd|r [+2])  codec qk-*, lowrank-*
                                     or <k>.logits.npy   (L, H, T, T)    codec logits-*
                                     or <k>.x.npy        (L, T, D [+2])  codec tokens-*
                                     or <k>.stream.npy   (P + T, D [+2] | D·b/8 + 2)  codec stream-*
                                                         (no feat members: features are derived)
    teacher/<key>/codec/             qk_weight.npy (L, 2, H, hd, D), qk_bias.npy (L, 2, H, hd)
                                     float32, once per group (codec tokens-*; sha256 in the manifest),
                                     or blocks l0..depth-1 + final norm (+ basis) (codec stream-*)
    text/<key>/shard-000000.tar      <k>.text.npy     (K, max_length, dim) every caption's encoding
                                     <k>.captions.json  JSON list of the K caption strings
    text/<key>/codec/                empty_caption.npy (max_length, dim): the "" encoding (CFG null)

A text group (captioned sources) is aligned with the latents like the teacher group; K varies
per image (``-1`` in a field shape). Its writer and batching live in ``pipeline.cache.text``.

Arrays are ``.npy`` written with ``allow_pickle=False`` and read back the same way: a cache can
never execute code. See README "Cache format" for the manifest layout. The codecs themselves
(names, encode/decode, error bounds) live in ``pipeline.cache.codecs`` and are re-exported here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.cache.codecs import (  # noqa: F401  (re-exported: the schema is the one import for readers)
    CODECS,
    FEAT_CODECS,
    AttnCodec,
    CacheFormatError,
    Member,
    decode_features,
    decode_targets,
    encode_features,
    feat_members,
    get_codec,
)
from pipeline.cache.keys import member_name, sample_key, unsafe_key_reason  # noqa: F401  (re-exported)
from pipeline.cache.npy import load_npy, npy_bytes  # noqa: F401  (re-exported)

SCHEMA_VERSION = 1
LATENTS, TEACHER, TEXT = "latents", "teacher", "text"
SD_VAE_SCALE = 0.18215  # SD-VAE latent scale (SPEC §4); recorded per cache, applied at train time


# ----------------------------------------------------------------------------------------------
# Specs: what one sample of each group holds
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class LatentSpec:
    channels: int = 4               # latent channels; the stored moments have 2x (mean ++ std)
    size: int = 32                  # latent side = image side / 8
    dtype: str = "float16"
    scale: float = SD_VAE_SCALE     # z = (mean + std * eps) * scale + bias
    bias: float = 0.0

    @property
    def moments_shape(self) -> tuple[int, int, int]:
        return (2 * self.channels, self.size, self.size)


@dataclass(frozen=True, kw_only=True)
class TeacherSpec:
    layers: tuple[int, ...]         # teacher blocks whose attention is stored (0-based)
    num_heads: int
    head_dim: int
    embed_dim: int                  # feature dim of the stored patch tokens
    grid: int                       # patch tokens per side; tokens = grid**2, row-major
    num_prefix_tokens: int          # cls + registers, removed before storing (from the model)
    scale: float                    # teacher attention scale (head_dim ** -0.5)
    feat_dtype: str = "float16"     # dtype the writer hands features over in; stored as is when "plain"
    codec: str = "qk-fp16"          # attention codec (pipeline.cache.codecs)
    feat_codec: str = "plain"       # "plain" | "int8" (per-token scale in feat_scale.npy); unused by stream-*
    depth: int = 0                  # teacher blocks; 0 = not recorded (groups written before stream-*)
    mlp_dim: int = 0                # MLP hidden width of the teacher blocks (stream-* stores them); 0 = not recorded

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid


@dataclass(frozen=True, kw_only=True)
class TextSpec:
    max_length: int = 77            # tokens per caption (CLIP: padded/truncated to 77)
    dim: int = 768                  # text encoder width (CLIP ViT-L/14: 768)
    dtype: str = "float16"          # stored dtype of every encoding and of the empty-caption file


AnySpec = LatentSpec | TeacherSpec | TextSpec


def spec_from_dict(kind: str, data: Mapping[str, Any]) -> AnySpec:
    cls = {LATENTS: LatentSpec, TEACHER: TeacherSpec, TEXT: TextSpec}.get(kind)
    if cls is None:
        raise CacheFormatError(f"unknown group kind {kind!r} in manifest")
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names}
        return cls(**kw)
    except TypeError as e:
        raise CacheFormatError(f"{kind} spec in manifest is incomplete: {e}") from None


# ----------------------------------------------------------------------------------------------
# Fields, sample encode/decode
# ----------------------------------------------------------------------------------------------

def fields(kind: str, spec: AnySpec) -> dict[str, dict[str, Any]]:
    """Member extension -> {dtype, shape[, codec]} for one group; ``cls`` is ASCII text; -1 = K captions."""
    if isinstance(spec, TextSpec):
        return {"text.npy": {"dtype": spec.dtype, "shape": [-1, spec.max_length, spec.dim]},
                "captions.json": {"dtype": "json", "shape": [-1]}}
    if kind == LATENTS:
        assert isinstance(spec, LatentSpec)
        return {"moments.npy": {"dtype": spec.dtype, "shape": list(spec.moments_shape)},
                "cls": {"dtype": "ascii-int", "shape": []}}
    assert isinstance(spec, TeacherSpec)
    out: dict[str, dict[str, Any]] = {}
    codec = get_codec(spec.codec)
    feats = {} if codec.derives_features else feat_members(spec.feat_codec, spec.feat_dtype, spec.num_tokens,
                                                            spec.embed_dim)
    for name, (dtype, shape) in feats.items():
        out[f"{name}.npy"] = {"dtype": dtype, "shape": list(shape)}
    for name, (dtype, shape) in codec.members(spec).items():
        out[f"{name}.npy"] = {"dtype": dtype, "shape": list(shape), "codec": codec.name}
    return out


def encode_latent_sample(spec: LatentSpec, label: int, moments: np.ndarray) -> dict[str, bytes]:
    """One latents-group sample: member extension -> bytes."""
    if tuple(moments.shape) != spec.moments_shape:
        raise CacheFormatError(f"moments shape {moments.shape} != {spec.moments_shape}")
    return {"moments.npy": npy_bytes(moments.astype(spec.dtype, copy=False)), "cls": str(int(label)).encode()}


def encode_teacher_sample(spec: TeacherSpec, feat: np.ndarray | None, q: np.ndarray | None = None,
                          k: np.ndarray | None = None, *, x: np.ndarray | None = None,
                          stream: np.ndarray | None = None) -> dict[str, bytes]:
    """One teacher-group sample from feat (T, D) and the codec's inputs, through the spec's codecs:
    q, k (L, H, T, hd), for ``tokens-*`` the qkv input tokens x (L, T, D) (or int8 (L, T, D + 2)
    already packed on the writer's device), for ``stream-*`` the residual stream (P + T, D) entering
    the first aligned block (or its stored rows, prepared on the device); ``feat`` is then unused."""
    codec = get_codec(spec.codec)
    if not codec.derives_features and (feat is None or tuple(feat.shape) != (spec.num_tokens, spec.embed_dim)):
        raise CacheFormatError(f"teacher features shape {None if feat is None else feat.shape} != "
                               f"{(spec.num_tokens, spec.embed_dim)}")
    given = {"q": q, "k": k, "x": x, "stream": stream}
    missing = [n for n in codec.inputs if given[n] is None]
    if missing:
        raise CacheFormatError(f"attention codec {codec.name!r} encodes teacher outputs {list(codec.inputs)}; "
                               f"{missing} not given")
    expect_qk = (len(spec.layers), spec.num_heads, spec.num_tokens, spec.head_dim)
    if "q" in codec.inputs and (tuple(q.shape) != expect_qk or tuple(k.shape) != expect_qk):
        raise CacheFormatError(f"teacher q/k shape {q.shape}/{k.shape} != {expect_qk}")
    if "x" in codec.inputs:
        width = spec.embed_dim + 2 if x.dtype == np.int8 else spec.embed_dim  # int8: packed rows
        if tuple(x.shape) != (len(spec.layers), spec.num_tokens, width):
            raise CacheFormatError(f"teacher token (x) shape {x.shape} != {(len(spec.layers), spec.num_tokens, width)}")
    if "stream" in codec.inputs:  # float (P + T, D), or the stored rows
        shapes = [(spec.num_prefix_tokens + spec.num_tokens, spec.embed_dim), codec.members(spec)["stream"][1]]
        if tuple(stream.shape) not in shapes:
            raise CacheFormatError(f"teacher stream shape {stream.shape} != {shapes[0]} (or stored {shapes[1]})")
    encoded = codec.encode(*(given[n] for n in codec.inputs), spec.scale)
    feats = {} if codec.derives_features else encode_features(feat, spec.feat_codec, spec.feat_dtype)
    arrays = {**feats, **encoded}
    return {f"{name}.npy": npy_bytes(arr) for name, arr in arrays.items()}


def decode_members(kind: str, spec: LatentSpec | TeacherSpec, members: Mapping[str, bytes],
                   where: str) -> dict[str, Any]:
    """Raw tar members of one sample -> numpy arrays (and ``label`` for latents). Never unpickles.

    Arrays are read-only views of the member bytes; stack or copy them before writing.
    """
    expected = fields(kind, spec)
    missing = sorted(set(expected) - set(members))
    extra = sorted(set(members) - set(expected))
    if missing or extra:
        raise CacheFormatError(f"{where}: members missing {missing} / unexpected {extra}")
    out: dict[str, Any] = {}
    for ext, info in expected.items():
        name = ext.rsplit(".", 1)[0]
        if ext == "cls":
            try:
                out["label"] = int(members[ext].decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                raise CacheFormatError(f"{where}: .cls is not an ASCII integer") from None
        elif info["dtype"] == "json":  # the captions: a JSON list of strings (null = unknown, imported)
            try:
                out[name] = json.loads(members[ext].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise CacheFormatError(f"{where}.{ext} is not UTF-8 JSON") from None
            if not isinstance(out[name], list) or not all(c is None or isinstance(c, str) for c in out[name]):
                raise CacheFormatError(f"{where}.{ext} is not a JSON list of strings")
        else:
            out[name] = load_npy(members[ext], dtype=info["dtype"], shape=tuple(info["shape"]), where=f"{where}.{ext}")
    if "captions" in out and len(out["captions"]) != len(out["text"]):
        raise CacheFormatError(f"{where}: {len(out['captions'])} captions but {len(out['text'])} encodings")
    return out


def bytes_per_sample(kind: str, spec: AnySpec) -> dict[str, int]:
    """Exact payload bytes per member (npy header included) and the tar footprint per sample (text: of
    an image with one 60-character caption; ``pipeline.cache.text.text_bytes`` counts K captions)."""
    sizes = {}
    for ext, info in fields(kind, spec).items():
        if ext == "cls":
            sizes[ext] = 4  # up to 4 ASCII digits for ImageNet-1k labels
        elif info["dtype"] == "json":
            sizes[ext] = 64  # ["<60 characters>"]
        else:
            sizes[ext] = len(npy_bytes(np.zeros([max(1, d) for d in info["shape"]], dtype=info["dtype"])))
    tar = sum(512 + -(-n // 512) * 512 for n in sizes.values())  # header + padded payload per member
    return {"payload": sum(sizes.values()), "tar": tar, **{f"field:{k}": v for k, v in sizes.items()}}


# ----------------------------------------------------------------------------------------------
# Group-level codec files: arrays a codec decodes with, stored once per teacher group
# ----------------------------------------------------------------------------------------------

CODEC_DIR = "codec"  # <group>/codec/<name>.npy; tokens-*: the teacher's frozen q/k projections


def codec_files(spec: TeacherSpec) -> dict[str, Member]:
    """File name under ``<group>/codec/`` -> (dtype, shape), for the spec's codec (empty for most)."""
    return {f"{name}.npy": m for name, m in get_codec(spec.codec).params(spec).items()}


def encode_codec_params(spec: TeacherSpec, arrays: Mapping[str, np.ndarray]) -> dict[str, bytes]:
    """Checked .npy bytes per codec file, from the teacher's arrays (``Teacher.qk_params``) through the
    codec's ``store_params`` (the writer renames them into place)."""
    arrays = get_codec(spec.codec).store_params(arrays)
    out = {}
    for fname, (dtype, shape) in codec_files(spec).items():
        arr = arrays.get(fname.removesuffix(".npy"))
        if arr is None or tuple(arr.shape) != tuple(shape) or not np.isfinite(arr).all():
            got = "missing" if arr is None else f"{arr.dtype} {tuple(arr.shape)}"
            raise CacheFormatError(f"codec {spec.codec!r}: group file {fname} must be finite {dtype} "
                                   f"{tuple(shape)}, got {got}")
        out[fname] = npy_bytes(arr.astype(dtype, copy=False))
    return out


def _read_codec_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CacheFormatError(f"codec file missing: {path} (the teacher group is incomplete; delete it and "
                               "re-run `haste preprocess`)") from None
    except OSError as e:
        raise CacheFormatError(f"codec file unreadable: {path} ({e})") from None


def codec_file_records(group_dir: Path, spec: TeacherSpec) -> dict[str, dict[str, Any]]:
    """sha256, bytes, dtype and shape of each codec file on disk (for the manifest); each file is
    parsed as a plain .npy of the expected dtype and shape first."""
    out: dict[str, dict[str, Any]] = {}
    for fname, (dtype, shape) in codec_files(spec).items():
        path = Path(group_dir) / CODEC_DIR / fname
        data = _read_codec_file(path)
        load_npy(data, dtype=dtype, shape=tuple(shape), where=str(path))
        out[fname] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "dtype": dtype,
                      "shape": list(shape)}
    return out


def load_codec_params(group_dir: Path, spec: TeacherSpec, records: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The group's codec arrays by name (writable copies), each checked against the manifest's sha256
    and parsed by ``load_npy`` (never unpickled)."""
    out = {}
    for fname, (dtype, shape) in codec_files(spec).items():
        path = Path(group_dir) / CODEC_DIR / fname
        rec = records.get(fname)
        if rec is None:
            raise CacheFormatError(f"{Path(group_dir) / 'manifest.json'}: no record of codec file {fname}; "
                                   "re-run `haste preprocess` to rebuild the teacher group")
        data = _read_codec_file(path)
        if hashlib.sha256(data).hexdigest() != rec["sha256"]:
            raise CacheFormatError(f"{path}: sha256 differs from the manifest (corrupt or replaced); "
                                   "re-run `haste preprocess` to rebuild the teacher group")
        out[fname.removesuffix(".npy")] = load_npy(data, dtype=dtype, shape=tuple(shape), where=str(path)).copy()
    return out


# ----------------------------------------------------------------------------------------------
# Manifests
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardRecord:
    index: int
    name: str
    count: int
    bytes: int
    sha256: str
    first_key: str | None
    last_key: str | None
    skipped: tuple[tuple[str, str], ...] = ()   # (key, reason) of inputs dropped from this shard


@dataclass(frozen=True)
class GroupManifest:
    kind: str                        # "latents" | "teacher" | "text"
    key: str                         # content address of the group (dir name)
    spec: AnySpec
    identity: dict[str, Any]         # everything that went into the key
    source: dict[str, Any]           # path, count, class list (hash), per-shard counts
    models: dict[str, Any]           # name, weight sha256, dtype, autocast per model
    producer: dict[str, Any]         # package version, git SHA, time, argv
    shards: tuple[ShardRecord, ...]
    schema_version: int = SCHEMA_VERSION
    classes: tuple[str, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)
    codec_files: dict[str, Any] = field(default_factory=dict)  # <group>/codec/ file -> sha256, bytes, dtype, shape

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return [item for s in self.shards for item in s.skipped]

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["fields"] = fields(self.kind, self.spec)
        d["bytes_per_sample"] = bytes_per_sample(self.kind, self.spec)
        d["num_samples"] = self.num_samples
        d["skipped"] = [{"key": k, "reason": r} for k, r in self.skipped]
        d["total_bytes"] = sum(s.bytes for s in self.shards)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = "manifest.json") -> GroupManifest:
        if d.get("schema_version") != SCHEMA_VERSION:
            raise CacheFormatError(
                f"{where}: schema version {d.get('schema_version')} != {SCHEMA_VERSION} of this code; "
                "re-run `haste preprocess` to rebuild the cache")
        try:
            shards = tuple(ShardRecord(**{**s, "skipped": tuple(tuple(x) for x in s["skipped"])})
                           for s in d["shards"])
            return cls(kind=d["kind"], key=d["key"], spec=spec_from_dict(d["kind"], d["spec"]),
                       identity=d["identity"], source=d["source"], models=d["models"],
                       producer=d["producer"], shards=shards, classes=tuple(d.get("classes", ())),
                       settings=d.get("settings", {}), codec_files=d.get("codec_files", {}))
        except (KeyError, TypeError) as e:
            raise CacheFormatError(f"{where}: malformed manifest ({e!r})") from None


def read_manifest(group_dir: Path) -> GroupManifest:
    path = Path(group_dir) / "manifest.json"
    if not path.is_file():
        raise CacheFormatError(f"{path} not found: the group is incomplete (re-run `haste preprocess`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CacheFormatError(f"{path} is not valid JSON ({e})") from None
    return GroupManifest.from_json(data, where=str(path))
