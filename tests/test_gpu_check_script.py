"""scripts/gpu_check.sh: valid bash, and on a machine without a GPU it stops at once with a clear message and
exit status 3 (nothing installed, nothing run)."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from conftest import REPO

SCRIPT = REPO / "scripts" / "gpu_check.sh"


def run_script(tmp_path, path_prefix=None):
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    if path_prefix:
        env["PATH"] = f"{path_prefix}:{env['PATH']}"
    return subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def fake_nvidia_smi(folder, listing: str):
    folder.mkdir()
    exe = folder / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\nprintf '%s' '{listing}'\n")
    exe.chmod(0o755)
    return folder


def test_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_no_gpu_exits_early_with_a_clear_message(tmp_path):
    # an nvidia-smi that finds no device; and, when this machine has no nvidia-smi at all, the real PATH
    cases = [fake_nvidia_smi(tmp_path / "bin", "No devices were found\n")]
    if shutil.which("nvidia-smi") is None:
        cases.append(None)
    for prefix in cases:
        proc = run_script(tmp_path, prefix)
        assert proc.returncode == 3, proc.stderr
        assert "gpu_check: no CUDA GPU on this machine" in proc.stderr and "nothing was run" in proc.stderr
        assert not (tmp_path / "out").exists()  # nothing started, no log folder


def test_gpu_listed_but_invisible_to_torch_stops_after_the_install_check(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a real GPU machine: torch sees the GPU, the case cannot be simulated")
    if subprocess.run(["make", "-q", "install"], cwd=REPO, capture_output=True).returncode != 0:
        pytest.skip("make install is not up to date here: the script would install (network, minutes)")
    proc = run_script(tmp_path, fake_nvidia_smi(tmp_path / "bin", "GPU 0: Fake GPU (UUID: GPU-0)\n"))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "torch.cuda.is_available() is False" in proc.stderr
    assert "install" in (tmp_path / "out" / "summary.txt").read_text()
