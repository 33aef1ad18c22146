"""``study launch GRID``, ``study status GRID|FOLDER`` and ``study collect FOLDER``."""
from __future__ import annotations

import argparse
from pathlib import Path

from study.errors import UserError
from study.flags import add_set_flag, config_flag, csv

# Columns of the status table (those present), after the run's changes from the grid's base.
_SHOWN = ["state", "step", "total_steps", "PQ", "AP", "mIoU", "params_M", "GFLOPs", "FPS", "FPS_trusted", "job_id", "error"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("launch", help="run a grid of configurations (in-process, local processes or Slurm)",
                       description="Expand a grid file and submit every run that is not complete: each job "
                                   "trains, evaluates and benchmarks its configuration. Finished runs are "
                                   "skipped, interrupted ones resume.")
    p.add_argument("grid", help="grid YAML (a run config with a 'grid:' section; see study/launch/grid.py)")
    add_set_flag(p, help="dotted override for every run, repeatable (e.g. --set launch.partition=gpu)")
    config_flag(p, "--cluster", "launch.cluster", type=str, help="where the runs execute: local, debug or slurm")
    config_flag(p, "--steps", "launch.steps", type=csv,
                help="comma-separated steps of each run, from train, eval, bench")
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted, submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the jobs and report each run")
    p.set_defaults(func=run_launch)

    p = sub.add_parser("status", help="the state of every run of a grid file or under a folder")
    p.add_argument("path", help="grid YAML, or a folder of runs")
    add_set_flag(p, help="the overrides the grid was launched with (they change run identities)")
    p.set_defaults(func=run_status)

    p = sub.add_parser("collect", help="the results table of every run under a folder, as CSV")
    p.add_argument("folder", help="folder of runs (e.g. runs/table1)")
    p.add_argument("--csv", help="where to write it (default: FOLDER/results.csv)")
    p.set_defaults(func=run_collect)


def _changes(change: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in change.items())


def run_launch(args: argparse.Namespace) -> int:
    from study.launch.grid import expand_grid
    from study.launch.config import check_steps
    from study.launch.submit import launch, wait

    name, runs = expand_grid(args.grid, args.overrides)
    steps = {tuple(r.config.launch.steps) for r in runs}
    if len(steps) > 1:
        raise UserError(f"grid {args.grid}: its runs set different launch.steps {sorted(steps)}; one launch runs "
                        f"the same steps for every run (launch them separately)")
    steps = check_steps(steps.pop())
    grid_dir = Path(runs[0].config.output_dir)
    print(f"study launch: grid '{name}', {len(runs)} runs in {grid_dir} (steps: {', '.join(steps)})")
    if any(r.config.launch.cluster == "slurm" for r in runs):
        from study.launch.submit import check_slurm, executor_settings

        sbatch = check_slurm()  # a clear line when Slurm is missing, before anything is written
        if args.dry_run:
            for launch_cfg in {repr(r.config.launch): r.config.launch for r in runs}.values():
                settings = ", ".join(f"{k}={v}" for k, v in executor_settings(launch_cfg, name).items())
                print(f"  sbatch ({sbatch}): {settings}")
    submitted = launch(runs, grid_dir, steps, dry_run=args.dry_run)
    counts: dict[str, int] = {}
    for s in submitted:
        counts[s.action] = counts.get(s.action, 0) + 1
        if s.job is not None:
            job = f"job {s.job.job_id}"
        elif s.ran:
            job = "failed here" if s.error else "ran here"
        elif s.action == "damaged":
            job = f"not submitted: {s.error}"
        else:
            job = {"skip": "complete", "active": "its job is still queued or running"}.get(s.action, "dry run")
        print(f"  {s.action:<7}{Path(s.run.folder).name:<30}{_changes(s.run.changes):<50} {job}")
    print("  " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    damaged = counts.get("damaged", 0)
    if args.dry_run:
        return 1 if damaged else 0
    finished = wait([s for s in submitted if s.ran or args.wait])  # runs done here, and jobs if --wait
    failed = [r for r, error in finished if error]
    if failed or damaged:
        print(f"study launch: {len(failed)} run(s) failed, {damaged} damaged (not submitted); "
              f"`study status {args.grid}` lists them")
        return 1
    return 0


def run_status(args: argparse.Namespace) -> int:
    import pandas as pd

    from study.launch.collect import collect, run_row
    from study.launch.submit import job_active  # asks Slurm / the process table: lost and interrupted jobs
    from study.runs import RunDir

    path = Path(args.path)
    if not path.exists():
        raise UserError(f"study status: {path} is neither a grid file nor a folder of runs")
    if path.is_file():
        from study.launch.grid import expand_grid

        _, runs = expand_grid(path, args.overrides)
        rows = []
        for r in runs:
            folder = RunDir(r.folder)
            row = run_row(folder, active=job_active) if folder.config.is_file() else {"run": folder.path.name, "state": "pending"}
            rows.append({"run": row["run"], "changes": _changes(r.changes), **row})
        table = pd.DataFrame(rows)
    else:
        table = collect(path, active=job_active)
    if table.empty:
        print(f"study status: no runs under {path}")
        return 0
    columns = ["run"] + (["changes"] if "changes" in table else []) + [c for c in _SHOWN if c in table]
    columns = [c for c in columns if table[c].notna().any()]  # e.g. no error column when nothing failed
    for c in ("step", "total_steps"):  # integers, even when a pending run has none
        if c in table:
            table[c] = table[c].astype("Int64")
    with pd.option_context("display.max_rows", None, "display.width", 200, "display.max_colwidth", 60):
        print(table[columns].to_string(index=False, na_rep="-", float_format=lambda x: f"{x:.2f}"))
    print("  " + ", ".join(f"{n} {s}" for s, n in table["state"].value_counts().items()))
    return 0


def run_collect(args: argparse.Namespace) -> int:
    from study.io import atomic_write_text
    from study.launch.collect import collect

    if not Path(args.folder).is_dir():
        raise UserError(f"study collect: {args.folder} is not a folder of runs")
    table = collect(args.folder)
    out = Path(args.csv) if args.csv else Path(args.folder) / "results.csv"
    atomic_write_text(out, table.to_csv(index=False))
    print(f"study collect: {len(table)} runs -> {out}")
    return 0
