from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from fixtures import KQ_TEXT, KQUANT, make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random checkpoint in the official layout, written once per test session."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "Z-Image-Tiny")


@pytest.fixture(scope="session")
def kq_model(tmp_path_factory) -> Path:
    """The 256-wide tiny checkpoint whose main weights K-quants can tile, written once per test session."""
    return make_checkpoint(tmp_path_factory.mktemp("kq") / "Z-Image-KQ", KQUANT)


@pytest.fixture(scope="session")
def kq_text_model(tmp_path_factory) -> Path:
    """The tiny checkpoint with a 256-wide text encoder, whose every weight a K-quant can tile."""
    return make_checkpoint(tmp_path_factory.mktemp("kqte") / "Z-Image-KQ-Text", KQ_TEXT)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # The demo model is generated into the user's cache; tests use their own.
    monkeypatch.setenv("ZIMAGE_LITE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip where torch sees no GPU; `pytest -m cuda` selects them (benchmarks/gpu_check.sh)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)
