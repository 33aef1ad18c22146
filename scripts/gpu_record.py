"""The record of a device run (scripts/gpu_check.sh, issue 23): one JSON file, rewritten whole after every step
and every timed row, so that a run stopped at any point leaves what it had measured; and its figure.

No torch here: ``record`` runs between the steps and must cost no device time.

Layout of gpu_check.json: ``finished`` (false until the last step wrote it: a killed run never reads as
finished) and ``passed``; ``steps``, one record per step in the order run (verdict, seconds, its limit and the
H100 estimate); ``commit`` (read from .whl/commit.txt, written before the run by scripts/gpu_wheels.sh: .git
does not travel); ``setup``; then one key per step (``environment``, ``table1_eager``, ``sync_check``,
``train``, ``table1_compiled``) and ``ddp``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from study.io import atomic_write_json, record_written, refuse_foreign  # no torch import

JSON_NAME, LOG_NAME, FIGURE_NAME = "gpu_check.json", "gpu_check.log", "gpu_check.png"
# The steps after the set-up, in the order gpu_check.sh runs them, with their estimated seconds on one H100
# (docs/device.md says how each was derived; they are estimates, not measurements) and their own time limits.
STEPS = {
    "environment": (10, 30),
    "table1_eager": (110, 160),
    "sync_check": (20, 45),
    "train": (45, 90),
    "table1_compiled": (130, 200),
    "figure": (5, 20),
}
SETUP_ESTIMATE_S = 25  # wheels (3 s), the project's build (5 s), torch and the project imported three times


def load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def save(path: Path, report: dict) -> None:
    """Rewrite the whole record (atomic: a reader sees the old one or the new one), never over a foreign file."""
    atomic_write_json(path, report, guard=True)


def update(path: Path, key: str, value) -> dict:
    report = load(path)
    report[key] = value
    save(path, report)
    return report


def read_commit(wheels: Path) -> dict:
    """HEAD and whether the tree differed from it, as scripts/gpu_wheels.sh wrote them before the run."""
    try:
        lines = (wheels / "commit.txt").read_text().splitlines()
    except OSError:
        return {"commit": None, "why": f"{wheels / 'commit.txt'} is missing: run scripts/gpu_wheels.sh first"}
    fields = dict(line.split(" ", 1) for line in lines if " " in line)
    return {"commit": fields.get("commit"), "dirty": fields.get("dirty") == "true", "written": fields.get("written"),
            "source": str(wheels / "commit.txt")}


def init(out: Path, args) -> None:
    """A new record (the record and the figure are claimed in $OUT's manifest first; gpu_check.sh checked the
    log before it began writing it)."""
    for name in (JSON_NAME, FIGURE_NAME):
        refuse_foreign(out / name)
    record_written(out / LOG_NAME)
    report = {"finished": False, "passed": None, "device": args.device, "size": args.size,
              "img_size": args.img_size, "budget_s": args.budget,
              "estimate_s": {"setup": SETUP_ESTIMATE_S, **{k: v[0] for k, v in STEPS.items()}},
              "commit": read_commit(Path(args.wheels)), "steps": [],
              "ddp": "not tested (1 GPU)" if args.gpus == 1 else
                     (f"not tested ({args.gpus} GPUs: this check runs on one)" if args.gpus > 1
                      else "not tested (CPU rehearsal)")}
    save(out / JSON_NAME, report)


def record_step(out: Path, name: str, verdict: str, seconds: int, limit: int, detail: str | None) -> None:
    report = load(out / JSON_NAME)
    step = {"step": name, "verdict": verdict, "seconds": seconds, "limit_s": limit,
            "estimate_s_h100": report.get("estimate_s", {}).get(name)}
    if detail:
        step["detail"] = detail
    report.setdefault("steps", []).append(step)
    save(out / JSON_NAME, report)


def finish(out: Path) -> bool:
    report = load(out / JSON_NAME)
    steps = report.get("steps", [])
    # "not run": left out by an option (--no-compile); a step skipped for want of time counts as failed
    report["passed"] = bool(steps) and all(s["verdict"] in ("ok", "not run") for s in steps)
    report["finished"] = True
    save(out / JSON_NAME, report)
    return report["passed"]


def figure(out: Path) -> Path:
    """Speed ratios to row 0, ours beside the paper's (Table 1), eager and compiled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from study.io import refuse_foreign as guard

    report = load(out / JSON_NAME)
    groups = [k for k in ("table1_eager", "table1_compiled") if report.get(k, {}).get("rows")]
    rows = [r for k in groups for r in report[k]["rows"]]
    if not rows:
        raise SystemExit("figure: no timed row in the record")
    names = list(dict.fromkeys(r["variant"] for r in rows))
    number = {r["variant"]: r.get("table1_row") for r in rows}
    paper = {r["variant"]: r.get("paper_ratio") for r in rows if r.get("paper_ratio") is not None}
    bars = len(groups) + bool(paper)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.8 / bars
    for g, key in enumerate(groups):
        by = {r["variant"]: r for r in report[key]["rows"]}
        mine = [n for n in names if n in by and by[n].get("ratio") is not None]  # none yet, or a failed row
        if not mine:
            continue
        first = by[mine[0]]
        label = f"ours, {'compiled' if key == 'table1_compiled' else 'eager'} {first.get('precision', '')}"
        ax.bar([names.index(n) + g * width for n in mine], [by[n]["ratio"] for n in mine], width, label=label,
               # a percentile interval need not hold the point estimate: such a side is drawn as 0
               yerr=[[max(0.0, by[n]["ratio"] - by[n]["ratio_ci"][0]) for n in mine],
                     [max(0.0, by[n]["ratio_ci"][1] - by[n]["ratio"]) for n in mine]], capsize=3)
    if paper:
        ax.bar([names.index(n) + len(groups) * width for n in paper], list(paper.values()), width, color="0.6",
               label="paper (Table 1: H100, compiled, mixed precision)")
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_xticks([i + (bars - 1) * width / 2 for i in range(len(names))])
    ax.set_xticklabels([f"{number[n]}: {n}" for n in names], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("FPS / FPS of row 0 (timed in the same rounds)\nerror bars: 95% bootstrap interval", fontsize=8)
    dev = report.get("environment", {}).get("device_name", report.get("device"))
    rehearsal = " (CPU rehearsal, not a measurement)" if report.get("device") == "cpu" else ""
    ax.set_title(f"Table 1 at {report.get('size')} {report.get('img_size')}: speed relative to row 0 on {dev}"
                 f"{rehearsal}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / FIGURE_NAME
    guard(path)
    fig.savefig(path, dpi=120)
    record_written(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["init", "record", "finish", "figure", "estimates"])
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    p.add_argument("--step"), p.add_argument("--verdict"), p.add_argument("--detail")
    p.add_argument("--seconds", type=int, default=0), p.add_argument("--limit", type=int, default=0)
    p.add_argument("--device", default="cuda"), p.add_argument("--size", default="L")
    p.add_argument("--img-size", type=int, default=640), p.add_argument("--budget", type=int, default=0)
    p.add_argument("--gpus", type=int, default=0), p.add_argument("--wheels", default=".whl")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.what == "estimates":  # name estimate limit, one step a line, for the shell
        print(f"setup {SETUP_ESTIMATE_S} 0")
        for name, (estimate, limit) in STEPS.items():  # GPU_CHECK_LIMIT_<step>=seconds overrides a limit
            print(name, estimate, int(os.environ.get(f"GPU_CHECK_LIMIT_{name}", limit)))
    elif a.what == "init":
        init(out, a)
    elif a.what == "record":
        record_step(out, a.step, a.verdict, a.seconds, a.limit, a.detail)
    elif a.what == "figure":
        print(f"wrote {figure(out)}")
    else:
        return 0 if finish(out) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
