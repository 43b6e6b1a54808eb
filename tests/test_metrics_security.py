"""Hostile files around the metrics: no code from a weights file or a feature cache ever runs.

Every payload here is a pickle whose ``__reduce__`` creates a marker directory; each test asserts
that the marker never appears and that the error is one line naming the file. Legitimate weights
(a random-init Inception saved by us) still load, through our tensor-only path, to the same
features as torch-fidelity's own loader gives.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

from pipeline.inputs.synth import synth_image
from pipeline.metrics.extractors import DINOV2_CHECKPOINT, INCEPTION, RANDOM_EXTRACTOR, build_extractor
from pipeline.metrics.reference import load_reference
from pipeline.metrics.scores import MetricsConfig, MetricsError, compute_metrics, preflight

N, RES = 12, 32


class Payload:
    """Unpickling this creates ``marker``: proof that code from a file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes() -> np.ndarray:
    return np.stack([synth_image(i, 4, RES, seed=0)[0] for i in range(N)])


@pytest.fixture(scope="module")
def ref(tmp_path_factory, shapes) -> str:
    path = tmp_path_factory.mktemp("ref") / "images.npz"
    np.savez(path, arr_0=shapes)
    return str(path)


def bare_inception() -> torch.nn.Module:
    """torch-fidelity's Inception at its default init (no released weights offline; nothing loaded)."""
    with mock.patch.object(tf_inception, "load_state_dict_from_url", return_value=None), \
            mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict"):
        return tf_inception.FeatureExtractorInceptionV3(INCEPTION, ["2048"])


@pytest.fixture(scope="module")
def inception_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in bare_inception().state_dict().items()}


def _cfg(**kw) -> MetricsConfig:
    return MetricsConfig(**{**dict(metrics=("kid",), batch_size=8, save_cpu_ram=True, device="cpu",
                                   kid_subsets=5), **kw})


# ----------------------------------------------------------------------------------------------
# metrics.inception_weights


def test_hostile_inception_weights_never_run(tmp_path, shapes, ref):
    marker, weights = tmp_path / "pwned", tmp_path / "weights.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": Payload(marker)}, weights)
    cfg = _cfg(extractor=INCEPTION, reference=ref, inception_weights=str(weights), inception_sha256=sha(weights))
    with pytest.raises(MetricsError) as e:  # even with its sha256 accepted on purpose
        compute_metrics(shapes, cfg)
    assert str(weights) in one_line(e) and "unsupported global os.makedirs" in str(e.value).lower()
    assert not marker.exists()


def test_inception_weights_with_another_sha256_are_an_error(tmp_path, shapes, ref, inception_state):
    marker, weights = tmp_path / "pwned", tmp_path / "weights.pth"
    torch.save({**inception_state, "extra": Payload(marker)}, weights)
    with pytest.raises(MetricsError) as e:                 # the default: torch-fidelity's 6726825d...
        preflight(_cfg(extractor=INCEPTION, reference=ref, inception_weights=str(weights)))
    msg = one_line(e)
    assert "6726825d" in msg and sha(weights)[:16] in msg and "inception_sha256" in msg
    assert not marker.exists()


@pytest.mark.slow
def test_plain_weights_load_through_our_path_to_torch_fidelitys_features(tmp_path, shapes, inception_state):
    from safetensors.torch import save_file

    torch.save(inception_state, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in inception_state.items()}, str(tmp_path / "w.safetensors"))
    theirs = bare_inception()
    theirs.load_state_dict(inception_state)                # torch-fidelity's own model, same tensors
    x = torch.from_numpy(shapes[:1]).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        want = theirs.eval()(x)[0]
        for fmt in ("pth", "safetensors"):
            ours = build_extractor(INCEPTION, ["2048"], device="cpu", inception_weights=tmp_path / f"w.{fmt}")
            assert torch.equal(ours(x)[0], want), fmt


def test_weights_of_another_architecture_are_one_line(tmp_path):
    weights = tmp_path / "w.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, weights)
    with pytest.raises(MetricsError) as e:
        build_extractor(INCEPTION, ["2048"], device="cpu", inception_weights=weights)
    assert "could not load Inception weights" in one_line(e) and str(weights) in str(e.value)


# ----------------------------------------------------------------------------------------------
# metrics.cache_root


def test_files_planted_in_the_feature_cache_never_run(tmp_path, shapes, ref):
    root, marker = tmp_path / "cache", tmp_path / "pwned"
    root.mkdir()
    key = load_reference(ref).cache_key()
    # torch-fidelity's cache names (what this stage used to read with torch.load(weights_only=False))
    old = root / f"{key}-{RANDOM_EXTRACTOR}-seed0-features-2048.pt"
    torch.save(Payload(marker), old)
    cfg = _cfg(extractor=RANDOM_EXTRACTOR, reference=ref, cache_root=str(root))
    first = compute_metrics(shapes, cfg)
    assert not marker.exists() and old.is_file()           # never read
    ours = root / f"{key}-{RANDOM_EXTRACTOR}-seed0-2048.features.npy"
    cached = np.load(ours, allow_pickle=False)
    assert cached.dtype == np.float32 and cached.shape == (N, 2048)
    assert compute_metrics(shapes, cfg)["kid_mean"] == first["kid_mean"]

    ours.write_bytes(pickle.dumps(Payload(marker)))       # a pickle under our own name
    with pytest.raises(MetricsError) as e:
        compute_metrics(shapes, cfg)
    assert str(ours) in one_line(e) and "delete it" in str(e.value)
    assert not marker.exists()

    np.save(ours, np.zeros((N + 1, 2048), np.float32))      # stale: another number of reference images
    with pytest.raises(MetricsError, match=r"expected float32 \(12, D\)"):
        compute_metrics(shapes, cfg)


# ----------------------------------------------------------------------------------------------
# FD-DINOv2: torch.hub would unpickle its checkpoint with weights_only=False


def test_a_hostile_dinov2_checkpoint_is_refused_before_torch_hub(tmp_path, monkeypatch, ref):
    hub, marker = tmp_path / "th" / "hub", tmp_path / "pwned"
    (hub / "facebookresearch_dinov2_main").mkdir(parents=True)
    (hub / "checkpoints").mkdir()
    torch.save({"w": Payload(marker)}, hub / "checkpoints" / DINOV2_CHECKPOINT)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setattr(torch.hub, "load", lambda *a, **k: pytest.fail("torch.hub.load ran"))
    with pytest.raises(MetricsError) as e:
        preflight(_cfg(extractor=RANDOM_EXTRACTOR, reference=ref, metrics=("is",), fd_dinov2=True))
    assert DINOV2_CHECKPOINT in one_line(e)
    assert not marker.exists()
