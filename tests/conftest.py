"""Shared test fixtures: the real sample data beside the project, and small seeded helpers."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The real labelled samples (../shared/data); STUDY_DATA overrides the place.
DATA_ROOT = Path(os.environ.get("STUDY_DATA", REPO.parent / "shared" / "data"))


def data_dir(name: str) -> Path:
    """The sample folder ``name`` under the shared data, or skip the test with the reason."""
    path = DATA_ROOT / name
    if not path.is_dir():
        pytest.skip(f"sample data {path} is absent (set STUDY_DATA to the shared data folder)")
    return path


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is faster and immune to other processes on the 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
