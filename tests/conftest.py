"""Shared test fixtures: the real sample data beside the project, and small seeded helpers."""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# The real labelled samples (../shared/data); STUDY_DATA overrides the place.
DATA_ROOT = Path(os.environ.get("STUDY_DATA", REPO.parent / "shared" / "data"))


# In CI (CI=true) a missing oracle or missing sample data is a failure, not a skip: the checks that compare
# us with the official tools must run there.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# The seed every test starts from (torch.manual_seed before each test). STUDY_TEST_SEED varies it, to find
# comparisons that pass only for one draw: `STUDY_TEST_SEED=7 make test`. Tests that build their own
# torch.Generator keep their own seeds.
TEST_SEED = int(os.environ.get("STUDY_TEST_SEED", "0"))


def _absent(reason: str):
    if IN_CI:
        pytest.fail(f"{reason}; CI=true requires it (see the Makefile's install target)", pytrace=False)
    pytest.skip(reason)


def data_dir(name: str) -> Path:
    """The sample folder ``name`` under the shared data; skip without it (fail in CI)."""
    path = DATA_ROOT / name
    if not path.is_dir():
        _absent(f"sample data {path} is absent (set STUDY_DATA to the shared data folder)")
    return path


def require(module: str):
    """Import an oracle or optional package for a test; skip without it (fail in CI)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        _absent(f"{module} is not installed ({e})")


@pytest.fixture(autouse=True)
def _restore_environment():
    """Every test leaves os.environ as it found it. submitit's TorchDistributedEnvironment().export() writes
    RANK, WORLD_SIZE, MASTER_ADDR, ... straight into os.environ; left behind, a later in-process training would
    wait forever for a second process in init_process_group."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """A seeded start, and torch's thread count and deterministic mode as they were: code under test that sets it (the main study's
    timing, the benchmark's --threads) must not change the next test's arithmetic. An in-process run at 1
    thread and a subprocess at 2 sum in other orders, which broke the bitwise-resume test after the main
    study's test had run in the same session."""
    torch.manual_seed(TEST_SEED)
    threads = torch.get_num_threads()
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    # an in-process training with train.deterministic=true turns torch's deterministic mode on for the process;
    # left on, torchmetrics' bincount takes its deterministic fallback, a (N, bins) matrix: 62 GB in the
    # official mIoU test that happened to run after one
    if (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) \
            != deterministic:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is faster and immune to other processes on the 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class oracle:
    """A module imported when a test first uses it, so a missing oracle skips (or, in CI, fails) only the
    tests that need it, never a whole file: ``m2f = oracle("transformers.models.mask2former...")``."""

    def __init__(self, module: str):
        self._name = module

    def __getattr__(self, attr: str):
        return getattr(require(self._name), attr)
