"""Shared fixtures: tiny random Hugging Face models saved with save_pretrained."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from hf_models import ARCHS, build_hf_model  # noqa: E402


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """arch -> (folder saved with save_pretrained, the torch model)."""
    out = {}
    for arch in ARCHS:
        path = tmp_path_factory.mktemp(f"hf_{arch}")
        model = build_hf_model(arch)
        model.save_pretrained(path)
        out[arch] = (str(path), model)
    return out


@pytest.fixture
def rng():
    return np.random.RandomState(0)
