"""The device run rehearsed on this CPU (issue 23): scripts/gpu_check.sh --device cpu --size tiny, end to end,
offline (PIP_NO_INDEX=1), in a fresh environment holding only the device image's packages
(scripts/gpu_rehearsal.py) plus the wheels that scripts/gpu_wheels.sh carries (here for this Python's version:
the device's is 3.12). Proves: the set-up works from the wheels alone (the packages the device lacks are first
shown missing), the project's entry points exist after its offline install, and gpu_check.json holds every
step's record, the six Table 1 rows with their ratios and breakdowns, the training steps and the commit.

The wheels come from the package index (reachable here and in CI; only the device is offline): a few MB, a
few seconds with pip's cache."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO

PYVER = f"{sys.version_info.major}.{sys.version_info.minor}"
MISSING_ON_DEVICE = ("pycocotools", "fvcore", "iopath", "yacs", "termcolor", "submitit", "hotcoco", "panopticapi")
TABLE1 = ["vit_adapter_m2f", "sfp_m2f", "sfp_no_pixel_decoder", "single_scale", "eomt_masked", "eomt"]


@pytest.fixture(scope="module")
def device_like(tmp_path_factory):
    """(python, wheels folder) of the rehearsal: the device's package set and the carried wheels."""
    root = tmp_path_factory.mktemp("rehearsal")
    wheels = root / "whl"
    proc = subprocess.run(["bash", "scripts/gpu_wheels.sh", "--python-version", PYVER, "--dest", str(wheels)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_rehearsal.py"), str(root / "env")], check=True,
                   capture_output=True, timeout=120)
    return root / "env" / "bin" / "python", wheels


def _importable(python, code: str, cwd) -> bool:
    return subprocess.run([str(python), "-c", code], cwd=cwd, capture_output=True, timeout=120).returncode == 0


def test_the_fresh_environment_lacks_what_the_device_lacks(device_like, tmp_path):
    python, _ = device_like
    assert _importable(python, "import torch, timm, scipy, pandas, matplotlib, portalocker, tabulate", tmp_path)
    for module in MISSING_ON_DEVICE:
        assert not _importable(python, f"import {module}", tmp_path), module
    # the project: neither importable from outside the checkout nor its entry points visible (inside it, the
    # local editable install's eomt_study.egg-info would be found through the current folder)
    assert not _importable(python, "import study", tmp_path)
    assert not _importable(python, "from importlib.metadata import entry_points as e; "
                                   "assert list(e(group='study.variants'))", tmp_path)


def test_rehearsal_end_to_end_offline(device_like, tmp_path):
    python, wheels = device_like
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    env = {**os.environ, "OUT": str(out), "SCRATCH": str(scratch), "PYTHON": str(python), "WHEELS": str(wheels),
           "PIP_NO_INDEX": "1", "BUDGET_S": "600"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(key, None)
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--device", "cpu", "--size", "tiny", "--no-compile"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == [".study-manifest.json", "gpu_check.json", "gpu_check.log",
                                                     "gpu_check.png"]  # at most 4 files come back
    assert (scratch / "site" / "pycocotools").is_dir() and "set-up: study from " + str(scratch / "site") in proc.stdout
    assert (scratch / "src" / "build").is_dir()  # the project was built from its copy in the scratch folder
    r = json.loads((out / "gpu_check.json").read_text())
    assert r["finished"] is True and r["passed"] is True
    assert [(s["step"], s["verdict"]) for s in r["steps"]] == [
        ("setup", "ok"), ("environment", "ok"), ("table1_eager", "ok"), ("sync_check", "ok"), ("train", "ok"),
        ("table1_compiled", "not run"), ("figure", "ok")]
    assert r["steps"][5]["detail"] == "--no-compile"
    commit = (wheels / "commit.txt").read_text().split()[1]
    assert r["commit"]["commit"] == commit and len(commit) == 40
    # the HEAD of when the wheels were made (other commits may have landed since)
    assert subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=REPO).returncode == 0
    assert r["ddp"] == "not tested (CPU rehearsal)"
    e = r["environment"]
    assert e["tf32"]["float32_matmul_precision"] in ("highest", "high", "medium") and "FLASH_ATTENTION" in e["sdpa_chosen"]
    rows = r["table1_eager"]["rows"]
    assert [x["variant"] for x in rows] == TABLE1 and [x["table1_row"] for x in rows] == list(range(6))
    assert rows[0]["ratio"] == 1.0 and rows[0]["ratio_ci"] == [1.0, 1.0]
    for x in rows:
        assert x["fps"] > 0 and x["n_iters"] == 3 and x["compile"] == "off" and x["precision"] == "fp32"
        # the ratio is row 0's median over this row's, both timed in the same rounds
        assert x["ratio"] == pytest.approx(x["fps"] / x["reference_fps_same_rounds"], rel=1e-9)
        assert x["ratio_ci"][0] <= x["ratio"] <= x["ratio_ci"][1]
        assert x["breakdown_ms"]["total"] > 0 and "its own pass" in x["breakdown_of"]
        assert x["paper_ratio"] is None  # the paper has no tiny rows
    assert rows[0]["deformable_attention"].startswith("pytorch (F.grid_sample") and \
        rows[-1]["deformable_attention"].startswith("none")
    assert [c["variant"] for c in r["sync_check"]["checks"]] == ["eomt", "eomt_masked", "eomt", "vit_adapter_m2f"]
    t = r["train"]
    assert [s["step"] for s in t["steps"]] == [1, 2, 3] and all(math.isfinite(s["loss"]) for s in t["steps"])
    assert t["peak_rss_gib"] > 0 and t["checkpoints"] == "none written"
    assert not list(scratch.rglob("*.pt"))  # no checkpoint anywhere


@pytest.mark.slow
def test_rehearsal_compiled_rows(device_like, tmp_path):
    """The compiled step (a few minutes here): EoMT compiled and timed alone first, written at once; then row 0
    compiled and EoMT timed with it. On a slow CPU row 0's compile may outlast the limit: then the step reads
    TIMEOUT and EoMT's row is still there, without a ratio and saying why."""
    python, wheels = device_like
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "SCRATCH": str(tmp_path / "scratch"), "PYTHON": str(python),
           "WHEELS": str(wheels), "PIP_NO_INDEX": "1", "BUDGET_S": "900", "GPU_CHECK_LIMIT_table1_compiled": "500"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(key, None)
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--device", "cpu", "--size", "tiny", "--compiled-rows",
                           "eomt"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    r = json.loads((out / "gpu_check.json").read_text())
    verdict = {s["step"]: s["verdict"] for s in r["steps"]}
    assert r["finished"] and verdict["table1_eager"] == "ok" and verdict["table1_compiled"] in ("ok", "TIMEOUT")
    rows = {x["variant"]: x for x in r["table1_compiled"]["rows"]}
    assert rows["eomt"]["fps"] > 0 and rows["eomt"]["compile"] == "default"
    if verdict["table1_compiled"] == "ok":
        assert proc.returncode == 0 and list(rows) == ["eomt", "vit_adapter_m2f"]
        assert rows["vit_adapter_m2f"]["ratio"] == 1.0 and rows["eomt"]["fps_alone"] > 0
        assert rows["eomt"]["ratio"] == pytest.approx(rows["eomt"]["fps"] / rows["eomt"]["reference_fps_same_rounds"])
    else:
        assert proc.returncode == 1 and r["passed"] is False
        assert rows["eomt"]["ratio"] is None and "ratio follows" in rows["eomt"]["ratio_note"]
