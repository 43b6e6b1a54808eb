"""pipeline.cache.schema: every field and codec round-trips exactly; malformed samples are refused."""

from __future__ import annotations

import io
import pickle
import tarfile

import numpy as np
import pytest
import torch
from webdataset.tariterators import base_plus_ext

from pipeline.cache import schema
from pipeline.cache.schema import (
    CODECS,
    LATENTS,
    TEACHER,
    CacheFormatError,
    LatentSpec,
    TeacherSpec,
    bytes_per_sample,
    decode_members,
    encode_latent_sample,
    encode_teacher_sample,
    fields,
    get_codec,
    member_name,
    npy_bytes,
    sample_key,
)
from pipeline.cache.shards import ShardWriter, iter_samples

WHERE = "shard-000003.tar:class_001/img_000042"


def _tspec(codec: str, feat_dtype: str = "float16", layers=(1, 3), feat_codec: str = "plain") -> TeacherSpec:
    return TeacherSpec(layers=layers, num_heads=3, head_dim=4, embed_dim=6, grid=3, num_prefix_tokens=1,
                       scale=4 ** -0.5, feat_dtype=feat_dtype, codec=codec, feat_codec=feat_codec)


# Codecs that store the teacher's values exactly (up to their float dtype); the lossy ones and their
# error bounds are tested in tests/test_codecs.py.
EXACT_CODECS = sorted(n for n, c in CODECS.items() if c.lossless or n == "none")


def _teacher_arrays(spec: TeacherSpec, seed: int = 0):
    rng = np.random.default_rng(seed)
    feat = rng.standard_normal((spec.num_tokens, spec.embed_dim)).astype(np.float32) * 3
    shape = (len(spec.layers), spec.num_heads, spec.num_tokens, spec.head_dim)
    q = rng.standard_normal(shape).astype(np.float32) * 2
    k = rng.standard_normal(shape).astype(np.float32) * 2
    return feat, q, k


def test_codec_registry_is_what_the_tests_cover():
    assert set(CODECS) == {"qk-fp16", "qk-fp32", "logits-fp16", "none", "qk-int8", "lowrank-r32-fp16",
                           "lowrank-r16-int8", "lowrank-r24-int8", "lowrank-r32-int8", "tokens-int8",
                           "stream-int8", "stream-int10", "stream-int12", "stream-fp16"}  # stream-*: test_codecs_stream.py
    assert EXACT_CODECS == ["logits-fp16", "none", "qk-fp16", "qk-fp32"]
    with pytest.raises(CacheFormatError, match="unknown attention codec 'qk-int4'"):
        get_codec("qk-int4")


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_latent_round_trip_exact(dtype):
    spec = LatentSpec(channels=4, size=5, dtype=dtype)
    moments = np.random.default_rng(1).standard_normal(spec.moments_shape).astype(np.float32) * 4
    members = encode_latent_sample(spec, 917, moments)
    assert set(members) == set(fields(LATENTS, spec)) == {"moments.npy", "cls"}
    assert members["cls"] == b"917"
    out = decode_members(LATENTS, spec, members, WHERE)
    assert out["label"] == 917
    assert out["moments"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out["moments"], moments.astype(dtype))
    if dtype == "float32":
        np.testing.assert_array_equal(out["moments"], moments)


@pytest.mark.parametrize("feat_dtype", ["float16", "float32"])
@pytest.mark.parametrize("codec", EXACT_CODECS)
def test_teacher_round_trip_every_codec(codec, feat_dtype):
    spec = _tspec(codec, feat_dtype)
    feat, q, k = _teacher_arrays(spec)
    members = encode_teacher_sample(spec, feat, q, k)
    assert set(members) == set(fields(TEACHER, spec))
    out = decode_members(TEACHER, spec, members, WHERE)
    np.testing.assert_array_equal(out["feat"], feat.astype(feat_dtype))
    assert out["feat"].dtype == np.dtype(feat_dtype)
    c = get_codec(codec)
    if codec.startswith("qk-"):
        assert set(out) == {"feat", "q", "k"}
        np.testing.assert_array_equal(out["q"], q.astype(c.dtype))
        np.testing.assert_array_equal(out["k"], k.astype(c.dtype))
    elif codec.startswith("logits-"):
        assert set(out) == {"feat", "logits"}
        ref = ((q * np.float32(spec.scale)) @ np.swapaxes(k, -1, -2)).astype(np.float32)
        assert out["logits"].shape == (len(spec.layers), spec.num_heads, spec.num_tokens, spec.num_tokens)
        np.testing.assert_array_equal(out["logits"], ref.astype(c.dtype))
    else:
        assert set(out) == {"feat"}
        with pytest.raises(CacheFormatError, match="codec 'none'"):
            c.decode({}, spec.scale)


@pytest.mark.parametrize("codec", ["qk-fp16", "qk-fp32", "logits-fp16"])
def test_decoded_logits_equal_scaled_q_kT(codec):
    """Batched decode == scale * q @ k^T of the stored (cast) q and k, computed independently."""
    spec = _tspec(codec)
    samples = [encode_teacher_sample(spec, *_teacher_arrays(spec, seed)) for seed in range(3)]
    decoded = [decode_members(TEACHER, spec, m, WHERE) for m in samples]
    names = [n for n in ("q", "k", "logits") if n in decoded[0]]
    batch = {n: torch.from_numpy(np.stack([d[n] for d in decoded])) for n in names}
    logits = get_codec(codec).decode(batch, spec.scale)
    assert logits.dtype == torch.float32
    assert logits.shape == (3, len(spec.layers), spec.num_heads, spec.num_tokens, spec.num_tokens)
    c = get_codec(codec)
    for i, seed in enumerate(range(3)):
        _, q, k = _teacher_arrays(spec, seed)
        qd, kd = q.astype(c.dtype).astype(np.float64), k.astype(c.dtype).astype(np.float64)
        ref = spec.scale * qd @ np.swapaxes(kd, -1, -2)
        tol = 1e-5 if codec.startswith("qk-") else 5e-3 * np.abs(ref).max()  # logits-fp16 rounds the result
        np.testing.assert_allclose(logits[i].numpy(), ref, rtol=0, atol=tol * max(1.0, np.abs(ref).max()))


def test_encode_refuses_wrong_shapes():
    spec = _tspec("qk-fp16")
    feat, q, k = _teacher_arrays(spec)
    with pytest.raises(CacheFormatError, match="features shape"):
        encode_teacher_sample(spec, feat[:-1], q, k)
    with pytest.raises(CacheFormatError, match="q/k shape"):
        encode_teacher_sample(spec, feat, q[:1], k)
    with pytest.raises(CacheFormatError, match="moments shape"):
        encode_latent_sample(LatentSpec(size=4), 0, np.zeros((8, 4, 5), np.float32))


def _good_teacher_members():
    spec = _tspec("qk-fp16")
    return spec, encode_teacher_sample(spec, *_teacher_arrays(spec))


def test_decode_wrong_dtype_names_the_member():
    spec, members = _good_teacher_members()
    members["q.npy"] = npy_bytes(np.zeros(fields(TEACHER, spec)["q.npy"]["shape"], np.float32))
    with pytest.raises(CacheFormatError) as e:
        decode_members(TEACHER, spec, members, WHERE)
    assert WHERE in str(e.value) and "q.npy" in str(e.value) and "float32" in str(e.value)


def test_decode_wrong_shape_names_the_member():
    spec, members = _good_teacher_members()
    members["feat.npy"] = npy_bytes(np.zeros((spec.num_tokens + 1, spec.embed_dim), np.float16))
    with pytest.raises(CacheFormatError) as e:
        decode_members(TEACHER, spec, members, WHERE)
    assert WHERE in str(e.value) and "feat.npy" in str(e.value) and "(10, 6)" in str(e.value)
    # big-endian data of the right "kind" is still refused: the dtype must match exactly
    members = encode_latent_sample(LatentSpec(size=2), 1, np.zeros((8, 2, 2), np.float32))
    members["moments.npy"] = npy_bytes(np.zeros((8, 2, 2), ">f2"))
    with pytest.raises(CacheFormatError, match="moments.npy"):
        decode_members(LATENTS, LatentSpec(size=2), members, WHERE)


def test_decode_missing_and_extra_members_named():
    spec, members = _good_teacher_members()
    missing = dict(members)
    del missing["k.npy"]
    with pytest.raises(CacheFormatError, match=r"missing \['k.npy'\]") as e:
        decode_members(TEACHER, spec, missing, WHERE)
    assert WHERE in str(e.value)
    extra = {**members, "logits.npy": members["q.npy"]}
    with pytest.raises(CacheFormatError, match=r"unexpected \['logits.npy'\]") as e:
        decode_members(TEACHER, spec, extra, WHERE)
    assert WHERE in str(e.value)


@pytest.mark.parametrize("bad", [b"", b"x", b"seven", b"\xff\xfe"])
def test_decode_bad_cls(bad):
    spec = LatentSpec(size=2)
    members = encode_latent_sample(spec, 3, np.zeros(spec.moments_shape, np.float32))
    members["cls"] = bad
    with pytest.raises(CacheFormatError, match="cls"):
        decode_members(LATENTS, spec, members, WHERE)


class _Boom:
    """Unpickling this object would flip a flag: proof that the reader never unpickles."""

    triggered = False

    def __reduce__(self):
        return (_set_triggered, ())


def _set_triggered():
    _Boom.triggered = True
    return np.zeros(1)


def test_pickled_npy_is_refused_without_unpickling():
    spec = LatentSpec(size=2)
    members = encode_latent_sample(spec, 3, np.zeros(spec.moments_shape, np.float32))
    obj = np.empty(spec.moments_shape, dtype=object)
    obj[...] = _Boom()
    buf = io.BytesIO()
    np.save(buf, obj, allow_pickle=True)
    for payload in (buf.getvalue(), pickle.dumps(_Boom())):
        members["moments.npy"] = payload
        with pytest.raises(CacheFormatError, match="not a plain .npy") as e:
            decode_members(LATENTS, spec, members, WHERE)
        assert "moments.npy" in str(e.value)
    assert not _Boom.triggered


def _npz_bytes() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, moments=np.zeros((8, 2, 2), np.float16))
    return buf.getvalue()


@pytest.mark.parametrize("data", [b"", b"\x93NUMPY", b"PK\x03\x04junk", _npz_bytes(),
                                  npy_bytes(np.zeros((8, 2, 2), np.float16))[:-5]])
def test_truncated_or_garbage_npy_is_a_format_error(data):
    spec = LatentSpec(size=2)
    members = {"moments.npy": data, "cls": b"1"}
    with pytest.raises(CacheFormatError, match="moments.npy"):
        decode_members(LATENTS, spec, members, WHERE)


def _write_shard(path, kind, spec, n):
    w = ShardWriter(path, 0)
    rng = np.random.default_rng(0)
    for i in range(n):
        if kind == LATENTS:
            members = encode_latent_sample(spec, i * 97 % 1000, rng.standard_normal(spec.moments_shape).astype(np.float32))
        elif get_codec(spec.codec).inputs == ("x",):  # tokens-*: the qkv input tokens, not q/k
            x = rng.standard_normal((len(spec.layers), spec.num_tokens, spec.embed_dim)).astype(np.float32)
            members = encode_teacher_sample(spec, _teacher_arrays(spec, i)[0], x=x)
        else:
            members = encode_teacher_sample(spec, *_teacher_arrays(spec, i))
        w.add(f"n0144/img_{i:04d}", members)
    return w.commit()


@pytest.mark.parametrize("kind,spec", [
    (LATENTS, LatentSpec(size=8)), (LATENTS, LatentSpec(size=32, dtype="float32")),
    (TEACHER, _tspec("qk-fp16")), (TEACHER, _tspec("qk-fp32", "float32")), (TEACHER, _tspec("logits-fp16")),
    (TEACHER, _tspec("none")), (TEACHER, _tspec("qk-int8", feat_codec="int8")), (TEACHER, _tspec("lowrank-r3-fp16")),
    (TEACHER, _tspec("lowrank-r2-int8", "float32", feat_codec="int8")), (TEACHER, _tspec("tokens-int8", feat_codec="int8")),
    (TEACHER, _tspec("tokens-fp16")),
])
def test_bytes_per_sample_matches_written_tar(tmp_path, kind, spec):
    n = 11
    rec = _write_shard(tmp_path / "s.tar", kind, spec, n)
    bps = bytes_per_sample(kind, spec)
    with tarfile.open(tmp_path / "s.tar") as tf:
        members = tf.getmembers()
    assert len(members) == n * len(fields(kind, spec))
    for m in members:
        ext = base_plus_ext(m.name)[1]
        if ext == "cls":
            assert 1 <= m.size <= bps["field:cls"]
        else:
            assert m.size == bps[f"field:{ext}"], m.name
    assert bps["payload"] == sum(v for k, v in bps.items() if k.startswith("field:"))
    # Tar footprint: n samples at bps["tar"] each, then the two end-of-archive blocks.
    size = (tmp_path / "s.tar").stat().st_size
    assert rec.bytes == size
    assert size == n * bps["tar"] + 2 * tarfile.BLOCKSIZE
    # and every sample decodes with the schema
    assert [k for k, _ in iter_samples(tmp_path / "s.tar")] == [f"n0144/img_{i:04d}" for i in range(n)]
    for key, mem in iter_samples(tmp_path / "s.tar"):
        decode_members(kind, spec, mem, key)


def test_bytes_per_sample_matches_spec_section_9():
    """SPEC §9: fp16 moments 8x32x32 are 16,512 B with the npy header, DINOv2-B fp16 features 393,216 B + header."""
    lat = bytes_per_sample(LATENTS, LatentSpec())
    assert lat["field:moments.npy"] == 16_512
    t = TeacherSpec(layers=(8, 9, 10, 11), num_heads=12, head_dim=64, embed_dim=768, grid=16, num_prefix_tokens=1,
                    scale=0.125)
    bps = bytes_per_sample(TEACHER, t)
    assert bps["field:feat.npy"] == 393_216 + 128
    assert bps["field:q.npy"] == bps["field:k.npy"] == 4 * 12 * 256 * 64 * 2 + 128
    assert bps["field:q.npy"] * 2 == pytest.approx(3.15e6, rel=0.01)   # "3.1 MB/image" in the issue
    tok = bytes_per_sample(TEACHER, TeacherSpec(**{**t.__dict__, "codec": "tokens-int8"}))
    assert tok["field:x.npy"] == 4 * 256 * (768 + 2) + 128                # L·T·(D + 2): 788 KB/image
    assert schema.codec_files(TeacherSpec(**{**t.__dict__, "codec": "tokens-int8"})) == {
        "qk_weight.npy": ("float32", (4, 2, 12, 64, 768)), "qk_bias.npy": ("float32", (4, 2, 12, 64))}


def _unescape(key: str) -> str:
    return key.replace("%2E", ".").replace("%25", "%")


@pytest.mark.parametrize("relpath", [
    "n01440764/n01440764_10026.JPEG", "a.b/c.d.e.jpg", "x%y/z%2E.png", "cls/noext", "d/file.tar.gz",
    "sp ace/ü.webp", "a/b/c/%25%2E%.png", "v1.0/img.1.2.PNG",
])
def test_sample_key_reversible_and_wds_safe(relpath):
    key = sample_key(relpath)
    stem = relpath.rsplit(".", 1)[0] if "." in relpath.rsplit("/", 1)[-1] else relpath
    assert _unescape(key) == stem
    assert "." not in key
    for ext in ("moments.npy", "cls", "feat.npy", "q.npy"):
        assert base_plus_ext(member_name(key, ext)) == (key, ext)


def test_sample_key_injective():
    stems = ["a.b", "a%2Eb", "a%252Eb", "a%b", "a%25b", "a_b", "a/b", "a.b.c", "a%2Eb.c"]
    keys = [sample_key(s + ".png") for s in stems]
    assert len(set(keys)) == len(stems)


def test_manifest_json_round_trip(tmp_path):
    spec = _tspec("qk-fp16", layers=(8, 9))
    rec = _write_shard(tmp_path / "shard-000000.tar", TEACHER, spec, 3)
    rec = schema.ShardRecord(**{**rec.__dict__, "skipped": (("k1", "empty file"),)})
    m = schema.GroupManifest(kind=TEACHER, key="abc", spec=spec, identity={"x": 1}, source={"count": 4},
                             models={}, producer={}, shards=(rec,), classes=("a", "b"))
    import json
    (tmp_path / "manifest.json").write_text(json.dumps(m.to_json()))
    back = schema.read_manifest(tmp_path)
    assert back == m
    assert back.skipped == [("k1", "empty file")]
    d = m.to_json()
    d["schema_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(CacheFormatError, match="schema version 99"):
        schema.read_manifest(tmp_path)


def test_atomic_write_failure_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch) -> None:
    import os

    from pipeline.cache import shards

    path = tmp_path / "manifest.json"
    shards.atomic_write_json(path, {"v": 1})

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        shards.atomic_write_json(path, {"v": 2})
    assert path.read_text() == '{\n  "v": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
