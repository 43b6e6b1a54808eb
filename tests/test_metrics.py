"""pipeline.metrics.scores / pipeline.metrics.extractors: Fréchet math, references, IS splits, lazy inputs, offline errors.

Everything runs on CPU with the registered random-init extractor on 32 px images; FID through
``compute_metrics`` uses ``fid_method="eigh"`` (same value as sqrtm, see the reference test) so that
the 2048-d covariances cost ~2 s instead of ~20 s.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
import zarr
from PIL import Image
from scipy import linalg
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_isc import isc_features_to_metric

from pipeline.configs import ConfigError
from pipeline.inputs.synth import synth_image
from pipeline.metrics.extractors import (
    INCEPTION_WEIGHTS_FILE,
    RANDOM_EXTRACTOR,
    ImageArrayDataset,
    RandomInitConvNet,
    build_extractor,
    extract_features,
)
from pipeline.metrics.scores import (
    MetricsConfig,
    MetricsError,
    compute_metrics,
    feature_stats,
    frechet_distance,
    load_reference,
    summary_line,
)

N, RES = 40, 32


def _cfg(**kw) -> MetricsConfig:
    base = dict(extractor=RANDOM_EXTRACTOR, fid_method="eigh", batch_size=16, save_cpu_ram=True)
    return MetricsConfig(**{**base, **kw})


def _features(images, names=("2048",), **kw) -> dict[str, torch.Tensor]:
    ext = build_extractor(RANDOM_EXTRACTOR, list(names), device="cpu")
    return extract_features(ext, ImageArrayDataset(images, 16), batch_size=16, device="cpu",
                            save_cpu_ram=kw.get("save_cpu_ram", True))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes() -> np.ndarray:
    return np.stack([synth_image(i, 4, RES, seed=0)[0] for i in range(N)])          # (N, 32, 32, 3)


@pytest.fixture(scope="module")
def noise() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (N, RES, RES, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def refs(tmp_path_factory, shapes) -> dict[str, str]:
    """The shapes set as an images-only npz and as a stats-only npz (stats of its random-init features)."""
    root = tmp_path_factory.mktemp("refs")
    np.savez(root / "images.npz", arr_0=shapes)
    mu, sigma = feature_stats(_features(shapes)["2048"])
    np.savez(root / "stats.npz", mu=mu, sigma=sigma)
    return {"images": str(root / "images.npz"), "stats": str(root / "stats.npz")}


@pytest.fixture(scope="module")
def results(shapes, noise, refs) -> dict[str, dict]:
    return {
        "self": compute_metrics(shapes, _cfg(reference=refs["images"])),
        "diff": compute_metrics(noise, _cfg(reference=refs["images"])),
        "diff_stats": compute_metrics(noise, _cfg(reference=refs["stats"], metrics=("fid",))),
    }


# ----------------------------------------------------------------------------
# Fréchet distance


def _adm_reference_fd(mu1, s1, mu2, s2) -> float:
    """guided-diffusion evaluator.py's computation, written out independently."""
    covmean = linalg.sqrtm(s1.dot(s2))
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("n", [20, 300])  # rank-deficient (N < D) and full-rank covariances
@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_matches_scipy_reference(n, method):
    rng = np.random.default_rng(n)
    a = np.maximum(rng.normal(size=(n, 48)), 0)
    b = np.maximum(rng.normal(size=(n, 48)) + 0.3, 0) * 1.5
    mu1, s1 = feature_stats(a)
    mu2, s2 = feature_stats(b)
    want = _adm_reference_fd(mu1, s1, mu2, s2)
    assert want > 1.0
    assert frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(want, rel=1e-7)
    assert abs(frechet_distance(mu1, s1, mu1, s1, method=method)) < 1e-6 * np.trace(s1)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_closed_form_diagonal(method):
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    d1, d2 = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
    want = np.sum((mu1 - mu2) ** 2) + np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2))
    got = frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2), method=method)
    assert got == pytest.approx(want, rel=1e-10)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(MetricsError, match="one D"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_stats_is_float64_np_cov():
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))      # float32
    mu, sigma = feature_stats(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_array_equal(sigma, np.cov(x.double().numpy(), rowvar=False))
    np.testing.assert_array_equal(mu, x.double().numpy().mean(axis=0))


# ----------------------------------------------------------------------------
# End to end with the random-init extractor


def test_self_fid_is_zero_and_different_distributions_are_far(results):
    self_fid, diff_fid = results["self"]["fid"], results["diff"]["fid"]
    assert abs(self_fid) < 1e-6
    assert diff_fid > 5.0 and diff_fid > 1e6 * abs(self_fid)
    # saved statistics of the same reference give the same FID as its images
    assert results["diff_stats"]["fid"] == pytest.approx(diff_fid, rel=1e-9)
    assert results["diff_stats"]["reference_fid_stats"] == "mu/sigma from stats.npz"
    assert results["diff"]["reference_fid_stats"] == f"computed from {N} reference images"


def test_precision_recall_and_kid(results):
    same, diff = results["self"], results["diff"]
    assert same["precision"] == same["recall"] == 1.0      # every point lies in its own k-NN ball
    assert diff["precision"] == diff["recall"] == 0.0      # noise vs shapes: no overlap
    assert same["kid_subset_size"] == N                     # clamped from 1000 to the sample count
    assert diff["kid_mean"] > 0.01 and abs(same["kid_mean"]) < 0.05 * diff["kid_mean"]


def test_results_are_labelled_and_json_ready(results):
    import json

    r = results["diff"]
    assert json.loads(json.dumps(r)) == r
    assert r["random_init"] is True and "NOT comparable" in r["extractor"]
    line = summary_line(r)
    assert line.startswith(f"FID {r['fid']:.2f} | IS ") and "NOT comparable" in line
    assert f"{N} samples, ref images.npz)" in line


def test_summary_line_format():
    r = {"fid": 12.345, "is_mean": 45.61, "is_std": 1.23, "precision": 0.7123, "recall": 0.5512,
         "kid_mean": 0.00123, "kid_std": 0.0002, "extractor": "inception-v3-compat", "num_samples": 50000,
         "reference": "VIRTUAL_imagenet256_labeled.npz", "skipped": {"fd_dinov2": "no weights"}}
    assert summary_line(r) == ("FID 12.35 | IS 45.61 ± 1.23 | P 0.712 R 0.551 | KID 0.00123 ± 0.00020 | "
                               "FD-DINOv2 skipped (inception-v3-compat, 50000 samples, ref "
                               "VIRTUAL_imagenet256_labeled.npz)")


def test_is_uses_consecutive_unshuffled_splits(shapes):
    flat = np.broadcast_to(np.random.default_rng(2).integers(0, 256, (N, 1, 1, 3), dtype=np.uint8),
                           shapes.shape)
    images = np.concatenate([shapes[:20], flat[:20]])     # split content differs by position
    r = compute_metrics(images, _cfg(metrics=("is",), is_splits=10))
    logits = _features(images, names=("logits_unbiased",))["logits_unbiased"].double().numpy()
    scores = []
    for chunk in np.split(logits, 10):                    # 10 consecutive splits of 4
        p = np.exp(chunk - chunk.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        kl = (p * (np.log(p) - np.log(p.mean(0, keepdims=True)))).sum(1).mean()
        scores.append(np.exp(kl))
    assert r["is_mean"] == pytest.approx(np.mean(scores), rel=1e-9)
    assert r["is_std"] == pytest.approx(np.std(scores), rel=1e-9)
    shuffled = isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=True)
    assert abs(shuffled["inception_score_mean"] - r["is_mean"]) > 0.05   # the test can tell them apart


# ----------------------------------------------------------------------------
# Extractor and inputs


def test_random_extractor_is_deterministic_and_inception_shaped(shapes):
    assert set(RandomInitConvNet.get_provided_features_list()) == set(
        FeatureExtractorInceptionV3.get_provided_features_list())
    x = torch.from_numpy(shapes[:4]).permute(0, 3, 1, 2).contiguous()
    a = build_extractor(RANDOM_EXTRACTOR, ["2048", "logits_unbiased"], device="cpu")
    torch.manual_seed(123)                                 # the global RNG must not matter
    b = build_extractor(RANDOM_EXTRACTOR, ["2048", "logits_unbiased"], device="cpu")
    fa, fb = a(x), b(x)
    assert fa[0].shape == (4, 2048) and fa[1].shape == (4, 1008)
    assert all(torch.equal(u, v) for u, v in zip(fa, fb))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # torch-fidelity's fixed 4 workers
def test_zarr_input_gives_the_same_features_as_numpy(tmp_path, shapes):
    z = zarr.create_array(store=str(tmp_path / "s.zarr"), shape=shapes.shape, chunks=(7, RES, RES, 3),
                          dtype="uint8")
    z[:] = shapes
    want = _features(shapes, names=("2048", "logits_unbiased"))
    for save_cpu_ram in (True, False):                     # False: forked DataLoader workers read zarr
        got = _features(zarr.open_array(str(tmp_path / "s.zarr"), mode="r"), ("2048", "logits_unbiased"),
                        save_cpu_ram=save_cpu_ram)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_image_array_dataset_reads_lazily_in_blocks(shapes):
    class Recording:
        shape, dtype = shapes.shape, shapes.dtype

        def __init__(self):
            self.reads = []

        def __getitem__(self, s):
            assert isinstance(s, slice), "row blocks only, never the whole array or fancy indexing"
            self.reads.append((s.start, s.stop))
            return shapes[s]

    arr = Recording()
    ds = ImageArrayDataset(arr, block_rows=16)
    items = [ds[i] for i in range(N)]
    assert arr.reads == [(0, 16), (16, 32), (32, 40)]
    assert items[17].dtype == torch.uint8 and torch.equal(items[17], torch.from_numpy(shapes[17]).permute(2, 0, 1))


@pytest.mark.parametrize("bad", [np.zeros((2, 8, 8), np.uint8), np.zeros((2, 8, 8, 3), np.float32),
                                 np.zeros((0, 8, 8, 3), np.uint8)])
def test_image_array_dataset_rejects_bad_arrays(bad):
    with pytest.raises(MetricsError):
        ImageArrayDataset(bad)


# ----------------------------------------------------------------------------
# Reference loading


def test_load_adm_style_npz(tmp_path, shapes):
    mu, sigma = np.arange(4, dtype=np.float64), np.eye(4)
    path = tmp_path / "VIRTUAL_ref.npz"
    np.savez(path, arr_0=shapes, mu=mu, sigma=sigma, mu_s=np.zeros(3), sigma_s=np.eye(3))
    ref = load_reference(path)
    assert ref.name == "VIRTUAL_ref.npz" and ref.num_images == N
    assert isinstance(ref.images, np.memmap)              # uncompressed arr_0 is not read into RAM
    np.testing.assert_array_equal(ref.images, shapes)
    np.testing.assert_array_equal(ref.mu, mu)
    np.testing.assert_array_equal(ref.sigma, sigma)


def test_load_stats_only_and_compressed_images_only(tmp_path, shapes):
    np.savez(tmp_path / "stats.npz", mu=np.zeros(4, np.float32), sigma=np.eye(4, dtype=np.float32))
    stats = load_reference(tmp_path / "stats.npz")
    assert stats.images is None and stats.num_images == 0 and stats.mu.dtype == np.float64
    np.savez_compressed(tmp_path / "imgs.npz", arr_0=shapes)
    imgs = load_reference(tmp_path / "imgs.npz")
    assert imgs.mu is None and imgs.sigma is None
    np.testing.assert_array_equal(imgs.images, shapes)


def test_load_image_folder(tmp_path, shapes):
    for i in range(5):
        sub = tmp_path / "ref" / f"class{i % 2}"           # nested, as ImageNet-style folders are
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(shapes[i]).save(sub / f"{i}.png")
    ref = load_reference(tmp_path / "ref")
    assert ref.num_images == 5 and ref.mu is None
    got = {tuple(ref.images[i].shape) for i in range(5)}
    assert got == {(3, RES, RES)} and ref.images[0].dtype == torch.uint8


@pytest.mark.parametrize("arrays, key", [
    ({"mu": np.zeros(4)}, "sigma"),
    ({"sigma": np.eye(4)}, "mu"),
    ({"images": np.zeros((2, 8, 8, 3), np.uint8)}, "arr_0"),
])
def test_missing_key_error_names_file_and_key(tmp_path, arrays, key):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(MetricsError) as e:
        load_reference(path)
    assert str(path) in str(e.value) and f"'{key}'" in str(e.value)


class _Sentinel:
    unpickled = False

    def __setstate__(self, state):
        _Sentinel.unpickled = True


@pytest.mark.parametrize("key", ["arr_0", "mu"])
def test_pickled_object_arrays_are_refused(tmp_path, key):
    arrays = {"mu": np.zeros(4), "sigma": np.eye(4)}
    arrays[key] = np.array([_Sentinel(), _Sentinel()], dtype=object)
    path = tmp_path / "pickled.npz"
    np.savez(path, **arrays)
    with pytest.raises(MetricsError, match=f"'{key}' is a pickled object array"):
        load_reference(path)
    assert not _Sentinel.unpickled


def test_bad_images_and_missing_file(tmp_path):
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(MetricsError, match="'arr_0' must be uint8"):
        load_reference(tmp_path / "f.npz")
    with pytest.raises(MetricsError, match="not found"):
        load_reference(tmp_path / "nope.npz")


# ----------------------------------------------------------------------------
# Offline behaviour and config


class _Untouchable:
    """Valid-looking images whose pixels must not be read (proves errors come before slow work)."""

    shape, dtype = (8, 32, 32, 3), np.uint8

    def __getitem__(self, item):
        raise AssertionError("images were read before the configuration error")


def test_offline_inception_without_weights_says_where_to_put_them(tmp_path, monkeypatch, refs):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url",
                        lambda *a, **k: pytest.fail("tried to download Inception weights"))
    cfg = MetricsConfig(reference=refs["stats"], metrics=("fid",))
    with pytest.raises(MetricsError) as e:
        compute_metrics(_Untouchable(), cfg)
    expected = tmp_path / "th" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE
    assert str(expected) in str(e.value) and "inception_weights=" in str(e.value)
    assert isinstance(e.value, RuntimeError)

    cfg = MetricsConfig(reference=refs["stats"], metrics=("fid",), inception_weights=str(tmp_path / "w.pth"))
    with pytest.raises(MetricsError, match="w.pth.*file not found"):
        compute_metrics(_Untouchable(), cfg)


def test_unloadable_inception_weights_give_a_clear_error(tmp_path, refs):
    import hashlib

    (tmp_path / "w.pth").write_bytes(b"not a checkpoint")
    cfg = MetricsConfig(reference=refs["stats"], metrics=("fid",), inception_weights=str(tmp_path / "w.pth"))
    with pytest.raises(MetricsError, match="w.pth have sha256 .*expected 6726825d"):   # checked first
        compute_metrics(_Untouchable(), cfg)
    sha = hashlib.sha256(b"not a checkpoint").hexdigest()
    with pytest.raises(MetricsError, match="could not load Inception weights"):
        compute_metrics(_Untouchable(), dataclasses.replace(cfg, inception_sha256=sha[:12]))


def test_fd_dinov2_is_skipped_with_reason_offline(tmp_path, monkeypatch, shapes, refs):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setattr(torch.hub, "load", lambda *a, **k: pytest.fail("tried torch.hub.load"))
    r = compute_metrics(shapes, _cfg(reference=refs["images"], metrics=("is",), fd_dinov2=True))
    assert r["fd_dinov2"].startswith("skipped: ") and "dinov2_vitl14_pretrain.pth" in r["fd_dinov2"]
    assert "fd_dinov2" in r["skipped"] and "FD-DINOv2 skipped" in summary_line(r)
    assert r["is_mean"] > 1.0


def test_reference_features_are_cached(tmp_path, monkeypatch, shapes, noise, refs):
    import pipeline.metrics.scores as m

    calls = []
    real = m.extract_features
    monkeypatch.setattr(m, "extract_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = _cfg(reference=refs["images"], metrics=("kid",), kid_subsets=10, cache_root=str(tmp_path / "cache"))
    first = compute_metrics(noise, cfg)
    second = compute_metrics(noise, cfg)
    assert len(calls) == 3                                # samples twice, reference once
    assert list((tmp_path / "cache").glob(f"images.npz-*-{RANDOM_EXTRACTOR}-seed0-2048.features.npy"))
    assert first["kid_mean"] == second["kid_mean"]


@pytest.mark.parametrize("kw, field", [
    (dict(extractor="vgg16"), "extractor"),
    (dict(metrics=("fid", "sfid")), "metrics"),
    (dict(metrics=("fid",), reference=None), "reference"),
    (dict(batch_size=0), "batch_size"),
    (dict(device="gpu"), "device"),
    (dict(kid_subset_size=1), "kid_subset_size"),
    (dict(extractor=RANDOM_EXTRACTOR, inception_weights="w.pth"), "inception_weights"),
])
def test_config_validation_names_the_field(kw, field):
    base = dict(reference="ref.npz")
    with pytest.raises(ConfigError, match=f"'{field}'"):
        MetricsConfig(**{**base, **kw})


def test_too_few_samples_skip_with_reason(refs, shapes):
    r = compute_metrics(shapes[:3], _cfg(reference=refs["images"], metrics=("is", "pr", "kid")))
    assert set(r["skipped"]) == {"is", "pr"} and "is_splits=10" in r["skipped"]["is"]
    assert r["kid_subset_size"] == 3 and "is_mean" not in r and "precision" not in r


def test_image_array_dataset_accepts_torch_tensors(shapes):
    ds = ImageArrayDataset(torch.from_numpy(shapes), block_rows=8)
    assert torch.equal(ds[9], torch.from_numpy(shapes[9]).permute(2, 0, 1))
    with pytest.raises(MetricsError, match="uint8"):
        ImageArrayDataset(torch.zeros(2, 8, 8, 3))
