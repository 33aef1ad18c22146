"""scripts/gpu_check.sh and its record (issue 23), the fast checks: valid bash; each way the set-up can stop has
its own exit status and message, before anything is run (no GPU listed: 3 and nothing written; torch not
importable: 4; torch without CUDA: 3; no wheels: 5; a bad option or a file in $OUT the suite did not write: 2);
the record (scripts/gpu_record.py) never reads as finished before its last step and never as passed with a
failed step; scripts/gpu_wheels.sh refuses a wheel whose requirement is neither on the device nor carried.
The rehearsal itself (the whole device mode offline on this CPU) is tests/test_gpu_rehearsal.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

from conftest import REPO

SCRIPT = REPO / "scripts" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "scripts"))
import gpu_record  # noqa: E402


def run_script(tmp_path, *argv, path_prefix=None, **env):
    full = {**os.environ, "OUT": str(tmp_path / "out"), "SCRATCH": str(tmp_path / "scratch"), **env}
    if path_prefix:
        full["PATH"] = f"{path_prefix}:{full['PATH']}"
    return subprocess.run(["bash", str(SCRIPT), *argv], cwd=REPO, env=full, capture_output=True, text=True,
                          timeout=120)


def fake_nvidia_smi(folder, listing: str):
    folder.mkdir()
    exe = folder / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\nprintf '%s' '{listing}'\n")
    exe.chmod(0o755)
    return folder


def test_script_is_valid_bash():
    for name in ("gpu_check.sh", "gpu_wheels.sh"):
        assert subprocess.run(["bash", "-n", str(REPO / "scripts" / name)], capture_output=True).returncode == 0


def test_no_gpu_listed_exits_3_before_writing_anything(tmp_path):
    cases = [fake_nvidia_smi(tmp_path / "bin", "No devices were found\n")]
    if shutil.which("nvidia-smi") is None:
        cases.append(None)
    for prefix in cases:
        proc = run_script(tmp_path, path_prefix=prefix)
        assert proc.returncode == 3, proc.stderr
        assert "gpu_check: no CUDA GPU on this machine" in proc.stderr and "nothing was run" in proc.stderr
        assert not (tmp_path / "out").exists() and not (tmp_path / "scratch").exists()


def test_python_without_torch_exits_4_not_blaming_cuda(tmp_path):
    bare = tmp_path / "bare"  # a Python that holds no torch
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    gpu = fake_nvidia_smi(tmp_path / "bin", "GPU 0: Fake GPU (UUID: GPU-0)\n")
    proc = run_script(tmp_path, path_prefix=gpu, PYTHON=str(bare / "bin" / "python"))
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "cannot import torch" in proc.stdout and "CUDA" not in proc.stdout.split("cannot import torch")[1]


def test_torch_without_cuda_exits_3(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a real GPU machine: torch sees the GPU, the case cannot be simulated")
    gpu = fake_nvidia_smi(tmp_path / "bin", "GPU 0: Fake GPU (UUID: GPU-0)\n")
    proc = run_script(tmp_path, path_prefix=gpu, PYTHON=sys.executable)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "torch.cuda.is_available() is False" in proc.stdout
    assert not (tmp_path / "scratch" / "site").exists()  # stopped before the install


def test_no_wheels_is_a_setup_failure(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_script(tmp_path, "--device", "cpu", "--size", "tiny", PYTHON=sys.executable,
                      WHEELS=str(tmp_path / "empty"))
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "offline set-up failed: no wheels in" in proc.stdout and "gpu_wheels.sh" in proc.stdout
    assert not (tmp_path / "out" / "gpu_check.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--device", "tpu"], "--device must be cuda or cpu"),
    (["--size", "XL"], "--size must be tiny, S, B, L or g"),
    (["--fast"], "unknown option '--fast'"),
])
def test_bad_option_is_a_usage_error(tmp_path, argv, message):
    proc = run_script(tmp_path, *argv)
    assert proc.returncode == 2 and message in proc.stderr and "usage:" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_foreign_file_in_out_is_never_replaced(tmp_path):
    (tmp_path / "out").mkdir()
    mine = tmp_path / "out" / "gpu_check.log"
    mine.write_text("a user's own log\n")
    proc = run_script(tmp_path, "--device", "cpu", "--size", "tiny", PYTHON=sys.executable)
    assert proc.returncode == 2 and "did not write" in proc.stderr
    assert mine.read_text() == "a user's own log\n"


def _init(out, device="cuda", gpus=1):
    ns = type("A", (), dict(device=device, size="L", img_size=640, budget=360, gpus=gpus, wheels=str(out / "w")))
    gpu_record.init(out, ns)


def test_record_is_finished_only_by_its_last_step(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "w").mkdir()
    (out / "w" / "commit.txt").write_text("commit abc123\ndirty true\nwritten 2026-12-06T00:00:00Z\n")
    _init(out)
    gpu_record.record_step(out, "setup", "ok", 12, 0, None)
    gpu_record.record_step(out, "table1_eager", "TIMEOUT", 160, 160, None)
    report = json.loads((out / "gpu_check.json").read_text())  # what a killed run leaves
    assert report["finished"] is False and report["passed"] is None
    assert report["commit"]["commit"] == "abc123" and report["commit"]["dirty"] is True
    assert report["ddp"] == "not tested (1 GPU)"
    assert [s["step"] for s in report["steps"]] == ["setup", "table1_eager"]
    assert report["steps"][1]["estimate_s_h100"] == gpu_record.STEPS["table1_eager"][0]
    assert gpu_record.finish(out) is False  # a timed-out step: finished, not passed
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["finished"] is True and report["passed"] is False


def test_record_without_commit_file_says_why(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _init(out, device="cpu", gpus=0)
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["commit"]["commit"] is None and "gpu_wheels.sh" in report["commit"]["why"]
    assert report["ddp"] == "not tested (CPU rehearsal)"


def test_estimates_fit_the_budget():
    """The H100 estimates of every step, set-up included, fit the 6 minutes the issue allows; each step's limit
    is at least its estimate."""
    total = gpu_record.SETUP_ESTIMATE_S + sum(e for e, _ in gpu_record.STEPS.values())
    assert total <= 360
    assert all(limit >= estimate for estimate, limit in gpu_record.STEPS.values())
    lines = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_record.py"), "estimates"],
                           capture_output=True, text=True, check=True).stdout.split("\n")
    assert lines[0].split()[0] == "setup" and [ln.split()[0] for ln in lines[1:] if ln] == list(gpu_record.STEPS)


def _wheel(path, name, requires):
    with zipfile.ZipFile(path, "w") as z:
        meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
        z.writestr(f"{name}-1.0.dist-info/METADATA", meta)


def test_wheels_requiring_what_the_device_lacks_are_refused(tmp_path):
    """The requirement check of gpu_wheels.sh over a folder whose stamp is current (no download): a requirement
    on the device (numpy), an extra's and a marker for another Python pass; one missing everywhere stops it."""
    dest = tmp_path / "whl"
    dest.mkdir()
    script = (REPO / "scripts" / "gpu_wheels.sh").read_text()
    binary = script.split('BINARY="')[1].split('"')[0]
    sdist = script.split('SDIST="')[1].split('"')[0]
    (dest / "stamp.txt").write_text(f"python 3.12: {binary} {sdist}\n")
    _wheel(dest / "good-1.0-py3-none-any.whl", "good",
           ["numpy>=1.20", "pytest; extra == 'test'", "tomli; python_version < '3.11'"])
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "scripts/gpu_wheels.sh", "--dest", str(dest)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "every requirement on the device or carried" in proc.stdout
    assert (dest / "commit.txt").read_text().startswith("commit ")
    _wheel(dest / "bad-1.0-py3-none-any.whl", "bad", ["not-on-the-device>=2"])
    proc = subprocess.run(["bash", "scripts/gpu_wheels.sh", "--dest", str(dest)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "bad-1.0-py3-none-any.whl requires not-on-the-device>=2" in proc.stderr


def test_paper_ratios_are_table1s():
    """The paper column of the rows: Table 1's FPS over row 0's, read through study.paper_numbers (the oracle
    here is the table itself, row by row)."""
    import gpu_steps
    from study.paper_numbers import paper_table

    t1 = paper_table("1")
    fps = dict(zip(t1["model.variant"], t1["FPS"]))
    assert len(fps) == 6
    for variant, value in fps.items():
        assert gpu_steps._paper(variant, "L", 640) == value
    assert gpu_steps._paper("eomt", "L", 640) / gpu_steps._paper(gpu_steps.ROW0, "L", 640) == \
        pytest.approx(fps["eomt"] / fps["vit_adapter_m2f"])
    assert gpu_steps._paper("eomt", "tiny", 64) is None


def test_figure_of_a_partial_record(tmp_path):
    """A run stopped in the compiled step: the figure shows the eager rows, the compiled ones it has and the
    paper's ratios; it refuses a record with no timed row."""
    out = tmp_path / "out"
    out.mkdir()
    _init(out)
    with pytest.raises(SystemExit, match="no timed row"):
        gpu_record.figure(out)
    paper = {"vit_adapter_m2f": 29, "sfp_m2f": 36, "eomt": 128}  # a subset, as a stopped run would have
    eager = [{"variant": v, "table1_row": i, "ratio": r, "ratio_ci": [r * 0.95, r * 1.05], "precision": "bf16",
              "paper_ratio": paper[v] / 29} for i, (v, r) in enumerate([("vit_adapter_m2f", 1.0), ("sfp_m2f", 1.3),
                                                                       ("eomt", 3.9)])]
    gpu_record.update(out / "gpu_check.json", "table1_eager", {"rows": eager})
    gpu_record.update(out / "gpu_check.json", "table1_compiled", {"rows": [dict(eager[0]), dict(eager[2], ratio=4.2)]})
    path = gpu_record.figure(out)
    assert path.stat().st_size > 10_000 and path.name in json.loads((out / ".study-manifest.json").read_text())["written"]


def test_a_failing_row_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    """table1_eager in this process on the CPU (tiny models): a row whose model cannot be built gets its error
    in the record, the rows after it are still timed and written, and the step ends in failure."""
    import argparse

    import gpu_steps

    out = tmp_path / "out"
    out.mkdir()
    _init(out, device="cpu", gpus=0)
    real = gpu_steps.build

    def build(variant, *args):
        if variant == "sfp_m2f":
            raise RuntimeError("no kernel for this row")
        return real(variant, *args)

    monkeypatch.setattr(gpu_steps, "build", build)
    a = argparse.Namespace(json=out / "gpu_check.json", size="tiny", img_size=64, compiled_rows="")
    with pytest.raises(SystemExit, match="rows failed: sfp_m2f"):
        gpu_steps.table1(a, torch.device("cpu"), compiled=False)
    rows = json.loads((out / "gpu_check.json").read_text())["table1_eager"]["rows"]
    assert [r["variant"] for r in rows] == ["vit_adapter_m2f", "sfp_m2f", "sfp_no_pixel_decoder", "single_scale",
                                            "eomt_masked", "eomt"]
    assert rows[1]["error"] == "RuntimeError: no kernel for this row" and "fps" not in rows[1]
    assert all(r["fps"] > 0 and r["n_iters"] == 3 for i, r in enumerate(rows) if i != 1)
