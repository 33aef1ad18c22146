"""scripts/gpu_check.sh: valid bash; on a machine without a GPU it stops at once with a clear message and exit
status 3 (nothing installed, nothing run); a bad option is exit status 2; its CPU fallback (--device cpu --size
tiny) runs the Table 1 bench and the DDP step and writes gpu_check.json (slow: a few minutes here)."""
from __future__ import annotations

import json
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


@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu"], "--device must be cuda or cpu"),
    (["--size", "XL"], "--size must be tiny, S, B, L or g"),
    (["--fast"], "unknown option '--fast'"),
])
def test_bad_option_is_a_usage_error(tmp_path, argv, message):
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", str(SCRIPT), *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and "usage:" in proc.stderr
    assert not (tmp_path / "out").exists()


def _cpu_fallback(tmp_path, *extra):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "BUDGET_S": "900"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--size", "tiny", *extra], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    return proc, report


def _check_report(proc, report, modes):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["passed"] and report["device"] == "cpu" and report["size"] == "tiny"
    assert [s["step"] for s in report["steps"]] == ["versions", "bench_table1", "train_ddp"]
    rows = report["bench_table1"]
    variants = ["vit_adapter_m2f", "sfp_m2f", "sfp_no_pixel_decoder", "single_scale", "eomt_masked", "eomt"]
    assert [(r["variant"], r["mode"]) for r in rows] == [(v, m) for v in variants for m in modes]
    for r in rows:
        assert r["fps"] > 0 and r["n_iters"] == 3 and r["ratio_to"] == "vit_adapter_m2f:bf16"
        assert r["env"]["precision"] == "bf16" and r["env"]["batch"] == 1
        if r["mode"] == "bf16":  # eager rows: the breakdown from their timed iterations
            assert r["breakdown_ms"]["total"] == pytest.approx(r["ms_mean"])
        else:
            assert r["breakdown_ms"] is None and r["env"]["compile_mode"] == "default"
    ddp = report["train_ddp"]
    assert [d["rank"] for d in ddp] == [0, 1] and all(d["world_size"] == 2 and d["rc"] == 0 for d in ddp)
    assert all(d["peak_rss_gib"] > 0 for d in ddp)


@pytest.mark.slow
def test_cpu_fallback_eager_bench_and_ddp_one_json(tmp_path):
    """--device cpu --size tiny --no-compile: the six Table 1 rows in bf16 in interleaved rounds, two gloo
    ranks training EoMT-tiny with their peak memory, everything in gpu_check.json."""
    proc, report = _cpu_fallback(tmp_path, "--no-compile")
    _check_report(proc, report, ["bf16"])


@pytest.mark.slow
def test_cpu_fallback_with_compile(tmp_path):
    proc, report = _cpu_fallback(tmp_path)
    _check_report(proc, report, ["compile+bf16", "bf16"])
