"""Shared fixtures: tiny preprocess configs and a session-wide demo cache built once."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]


def tiny_preprocess_config(out: Path, **overrides):
    """A CPU-sized preprocess config: synthetic 64 px images, random tiny VAE + DINOv2."""
    from stages.preprocess import PreprocessConfig

    base = dict(source="synthetic:48", synthetic_classes=4, out=str(out), resolution=64, shard_size=8,
                vae="random:tiny", teacher="random:tiny", batch_size=8, num_workers=0, device="cpu",
                codec="qk-fp16")
    base.update(overrides)
    return PreprocessConfig(**base)


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    """A complete tiny cache (48 samples, 6 shards of 8, both groups); treat as read-only."""
    from stages.preprocess import run

    out = tmp_path_factory.mktemp("demo_cache")
    run(tiny_preprocess_config(out))
    return out


@pytest.fixture(scope="session")
def caption_cache(tmp_path_factory) -> Path:
    """A tiny captioned cache (48 synthetic-captions samples with 1-3 captions each, 6 shards of 8): latents,
    teacher and text groups, the text encoded by a random-init tiny CLIP text model (8 tokens x 32 dims);
    treat as read-only."""
    from stages.preprocess import run

    out = tmp_path_factory.mktemp("caption_cache")
    run(tiny_preprocess_config(out, source="synthetic-captions:48", text_encoder="random:tiny", text_max_length=8,
                               text_batch_size=64))
    return out


@pytest.fixture
def restore_logging():
    """The CLI configures the root logger (basicConfig(force=True)); put it back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models and convs run several times faster on one intra-op thread than on two (far more on a
    busy box); modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture
def no_loss_plot(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loss plot is tested in test_trainer.py; elsewhere it would only cost time at small log_every."""
    import trainer.preview

    monkeypatch.setattr(trainer.preview, "loss_plot", lambda *a, **k: None)
