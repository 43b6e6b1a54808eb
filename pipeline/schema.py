"""THE cache contract: field names, dtypes, shapes, attention codecs, manifests.

The preprocess writer and every reader import this module and nothing else to agree on what
a cached sample is. A cache is two aligned WebDataset shard groups (same shard numbering, same
keys in the same order), so a latents-only reader never streams teacher bytes:

    latents/<key>/shard-000000.tar   <k>.moments.npy  (2C, h, w) posterior mean ++ std
                                     <k>.cls          class index as ASCII
    teacher/<key>/shard-000000.tar   <k>.feat.npy     (T, D) final-norm patch tokens
                                     <k>.q.npy <k>.k.npy (L, H, T, hd)   codec qk-*
                                     or <k>.logits.npy   (L, H, T, T)    codec logits-*

Arrays are ``.npy`` written with ``allow_pickle=False`` and read back the same way: a cache can
never execute code. See README "Cache format" for the manifest layout.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

SCHEMA_VERSION = 1
LATENTS, TEACHER = "latents", "teacher"
SD_VAE_SCALE = 0.18215  # SD-VAE latent scale (SPEC §4); recorded per cache, applied at train time


class CacheFormatError(ValueError):
    """A cached sample or manifest does not match the schema; the message names what and where."""


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
    feat_dtype: str = "float16"
    codec: str = "qk-fp16"

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid


def spec_from_dict(kind: str, data: Mapping[str, Any]) -> LatentSpec | TeacherSpec:
    cls = LatentSpec if kind == LATENTS else TeacherSpec
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names}
        return cls(**kw)
    except TypeError as e:
        raise CacheFormatError(f"{kind} spec in manifest is incomplete: {e}") from None


# ----------------------------------------------------------------------------------------------
# Attention codecs: a small registry (encode, decode, bytes per sample)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttnCodec:
    """How the teacher's attention logits of the stored layers are kept on disk.

    ``encode`` maps per-sample q, k (L, H, T, hd) float32 to named arrays; ``decode`` maps
    batched tensors (N, ...) of those arrays back to logits (N, L, H, T, T) float32 on their
    device (so the trainer decodes on the GPU); ``member_shapes`` gives each array's shape.
    """

    name: str
    dtype: str
    member_shapes: Callable[[TeacherSpec], dict[str, tuple[int, ...]]]
    encode: Callable[[np.ndarray, np.ndarray, float], dict[str, np.ndarray]]
    decode: Callable[[Mapping[str, torch.Tensor], float], torch.Tensor]
    qk_dtype: str = "float32"  # precision ``encode`` needs q, k in (the writer casts on the device)


def _qk_shapes(s: TeacherSpec) -> dict[str, tuple[int, ...]]:
    shape = (len(s.layers), s.num_heads, s.num_tokens, s.head_dim)
    return {"q": shape, "k": shape}


def _logit_shapes(s: TeacherSpec) -> dict[str, tuple[int, ...]]:
    return {"logits": (len(s.layers), s.num_heads, s.num_tokens, s.num_tokens)}


def _qk_codec(dtype: str) -> AttnCodec:
    def encode(q: np.ndarray, k: np.ndarray, scale: float) -> dict[str, np.ndarray]:
        return {"q": q.astype(dtype, copy=False), "k": k.astype(dtype, copy=False)}

    def decode(arrays: Mapping[str, torch.Tensor], scale: float) -> torch.Tensor:
        # Same order of operations as timm's unfused attention: (q * scale) @ k^T, in fp32.
        q, k = arrays["q"].float(), arrays["k"].float()
        return (q * scale) @ k.transpose(-1, -2)

    return AttnCodec(f"qk-{_short(dtype)}", dtype, _qk_shapes, encode, decode, qk_dtype=dtype)


def _logits_codec(dtype: str) -> AttnCodec:
    def encode(q: np.ndarray, k: np.ndarray, scale: float) -> dict[str, np.ndarray]:
        logits = (q.astype(np.float32) * np.float32(scale)) @ np.swapaxes(k, -1, -2).astype(np.float32)
        return {"logits": logits.astype(dtype)}

    def decode(arrays: Mapping[str, torch.Tensor], scale: float) -> torch.Tensor:
        return arrays["logits"].float()

    return AttnCodec(f"logits-{_short(dtype)}", dtype, _logit_shapes, encode, decode)


def _no_attention() -> AttnCodec:
    def decode(arrays: Mapping[str, torch.Tensor], scale: float) -> torch.Tensor:
        raise CacheFormatError("this teacher group was written with codec 'none' (no attention stored)")

    return AttnCodec("none", "float16", lambda s: {}, lambda q, k, scale: {}, decode)


def _short(dtype: str) -> str:
    return {"float16": "fp16", "float32": "fp32"}[dtype]


CODECS: dict[str, AttnCodec] = {
    c.name: c for c in (_qk_codec("float16"), _qk_codec("float32"), _logits_codec("float16"), _no_attention())
}


def get_codec(name: str) -> AttnCodec:
    if name not in CODECS:
        raise CacheFormatError(f"unknown attention codec {name!r} (known: {', '.join(CODECS)})")
    return CODECS[name]


# ----------------------------------------------------------------------------------------------
# Fields, sample encode/decode
# ----------------------------------------------------------------------------------------------

def fields(kind: str, spec: LatentSpec | TeacherSpec) -> dict[str, dict[str, Any]]:
    """Member extension -> {dtype, shape[, codec]} for one group; ``cls`` is ASCII text."""
    if kind == LATENTS:
        assert isinstance(spec, LatentSpec)
        return {"moments.npy": {"dtype": spec.dtype, "shape": list(spec.moments_shape)},
                "cls": {"dtype": "ascii-int", "shape": []}}
    assert isinstance(spec, TeacherSpec)
    out = {"feat.npy": {"dtype": spec.feat_dtype, "shape": [spec.num_tokens, spec.embed_dim]}}
    codec = get_codec(spec.codec)
    for name, shape in codec.member_shapes(spec).items():
        out[f"{name}.npy"] = {"dtype": codec.dtype, "shape": list(shape), "codec": codec.name}
    return out


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes, *, dtype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    """A plain .npy payload as a read-only view of ``data`` (no copy): the loader's batch
    stacking is then the only copy of the ~3.5 MB teacher record. Pickles, object dtypes,
    Fortran order and .npz archives are refused."""
    fp = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
        header = _npy_header(fp, version)
    except ValueError as e:
        raise CacheFormatError(f"{where}: not a plain .npy array ({e})") from None
    found_shape, fortran, found_dtype = header
    if found_dtype.hasobject or fortran:
        raise CacheFormatError(f"{where}: not a plain .npy array (object dtype or Fortran order)")
    if found_dtype != np.dtype(dtype) or tuple(found_shape) != tuple(shape):
        raise CacheFormatError(f"{where}: expected {dtype} {tuple(shape)}, found {found_dtype} {tuple(found_shape)}")
    offset = fp.tell()
    count = int(np.prod(found_shape))
    if len(data) - offset != count * found_dtype.itemsize:
        raise CacheFormatError(f"{where}: truncated .npy payload ({len(data) - offset} bytes for {count} items)")
    return np.frombuffer(data, dtype=found_dtype, count=count, offset=offset).reshape(found_shape)


def _npy_header(fp: io.BytesIO, version: tuple[int, int]) -> tuple[tuple[int, ...], bool, np.dtype]:
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fp)
    raise ValueError(f"unsupported .npy version {version}")


def encode_latent_sample(spec: LatentSpec, label: int, moments: np.ndarray) -> dict[str, bytes]:
    """One latents-group sample: member extension -> bytes."""
    if tuple(moments.shape) != spec.moments_shape:
        raise CacheFormatError(f"moments shape {moments.shape} != {spec.moments_shape}")
    return {"moments.npy": npy_bytes(moments.astype(spec.dtype, copy=False)), "cls": str(int(label)).encode()}


def encode_teacher_sample(spec: TeacherSpec, feat: np.ndarray, q: np.ndarray, k: np.ndarray) -> dict[str, bytes]:
    """One teacher-group sample from fp32 feat (T, D) and q, k (L, H, T, hd)."""
    expect_qk = (len(spec.layers), spec.num_heads, spec.num_tokens, spec.head_dim)
    if tuple(feat.shape) != (spec.num_tokens, spec.embed_dim):
        raise CacheFormatError(f"teacher features shape {feat.shape} != {(spec.num_tokens, spec.embed_dim)}")
    if get_codec(spec.codec).name != "none" and (tuple(q.shape) != expect_qk or tuple(k.shape) != expect_qk):
        raise CacheFormatError(f"teacher q/k shape {q.shape}/{k.shape} != {expect_qk}")
    out = {"feat.npy": npy_bytes(feat.astype(spec.feat_dtype, copy=False))}
    for name, arr in get_codec(spec.codec).encode(q, k, spec.scale).items():
        out[f"{name}.npy"] = npy_bytes(arr)
    return out


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
        name = ext.removesuffix(".npy")
        if ext == "cls":
            try:
                out["label"] = int(members[ext].decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                raise CacheFormatError(f"{where}: .cls is not an ASCII integer") from None
        else:
            out[name] = load_npy(members[ext], dtype=info["dtype"], shape=tuple(info["shape"]), where=f"{where}.{ext}")
    return out


def bytes_per_sample(kind: str, spec: LatentSpec | TeacherSpec) -> dict[str, int]:
    """Exact payload bytes per member (npy header included) and the tar footprint per sample."""
    sizes = {}
    for ext, info in fields(kind, spec).items():
        if ext == "cls":
            sizes[ext] = 4  # up to 4 ASCII digits for ImageNet-1k labels
        else:
            sizes[ext] = len(npy_bytes(np.zeros(info["shape"], dtype=info["dtype"])))
    tar = sum(512 + -(-n // 512) * 512 for n in sizes.values())  # header + padded payload per member
    return {"payload": sum(sizes.values()), "tar": tar, **{f"field:{k}": v for k, v in sizes.items()}}


# ----------------------------------------------------------------------------------------------
# Keys: source keys must survive WebDataset's "key = path up to the first dot" rule
# ----------------------------------------------------------------------------------------------

def sample_key(relpath: str) -> str:
    """Relative image path -> tar sample key: extension dropped, '%' and '.' escaped (reversible)."""
    stem = relpath.rsplit(".", 1)[0] if "." in relpath.rsplit("/", 1)[-1] else relpath
    return stem.replace("%", "%25").replace(".", "%2E")


def member_name(key: str, ext: str) -> str:
    return f"{key}.{ext}"


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
    kind: str                        # "latents" | "teacher"
    key: str                         # content address of the group (dir name)
    spec: LatentSpec | TeacherSpec
    identity: dict[str, Any]         # everything that went into the key
    source: dict[str, Any]           # path, count, class list (hash), per-shard counts
    models: dict[str, Any]           # name, weight sha256, dtype, autocast per model
    producer: dict[str, Any]         # package version, git SHA, time, argv
    shards: tuple[ShardRecord, ...]
    schema_version: int = SCHEMA_VERSION
    classes: tuple[str, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)

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
                       settings=d.get("settings", {}))
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
