"""``make study``: the study in miniature, one command (issue 10).

1. counts: parameters and GFLOPs of the real-size models (study/bench/run.py REAL_SIZE_TABLE: EoMT S/B/L/g at
   640 without and with masking, L and g at 1280, Table 1 rows 0-3 at L 640, row 0 at S/B/g 640 and L 1280),
   each row beside the paper's numbers, with the fast counter (what ``study bench --no-fps`` does);
2. train + eval: the grid (experiments/main_study.yaml: Table 1's six rows and Table 7's mask settings with
   tiny models on the built-in synthetic set) through the grid launcher, ``--cluster local`` by default:
   one submitit local job per run, all at once, as a Slurm grid would run them;
3. timing: on a local cluster the benchmark step (params, GFLOPs, FPS and the time per component) runs here,
   one run after another, so that no two timings share the CPU with each other or with a training (on Slurm
   each job times its own run on its node; ``--cluster debug`` runs every step here);
4. report: ``study report <grid folder> --all <root>/report``, with the count table, into one index.md.

Every stage is found when it is done already: the runs by their folders (the launcher submits nothing), the
count table and the report by a fingerprint of their inputs (the code and settings they depend on), so a
second ``make study`` only reads. What each stage did and how long it took goes to ``<root>/study_summary.json``,
with the summaries of the earlier ``make study`` runs under ``earlier`` (oldest first, the last
:data:`KEEP_SUMMARIES`), so that a second run (every stage found, a few seconds) does not replace the first's
stage times.

    .venv/bin/python scripts/main_study.py [--set KEY=VALUE ...] [--cluster local|debug|slurm]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STARTED = time.perf_counter()  # before torch is imported: the summary's seconds are the whole command's
# The profiler of the timing step: no log lines from Kineto (its start/stop notices are dropped by
# study/bench/speed.py without_profiler_notices, which KINETO_LOG_LEVEL does not reach).
os.environ.setdefault("KINETO_LOG_LEVEL", "5")
# What the count table depends on besides its own settings: the models, the counters and the paper's numbers.
COUNT_INPUTS = ("study/models", "study/bench", "baselines", "study/config.py", "study/paper_numbers.py",
                "study/paper_numbers.csv")
REPORT_INPUTS = ("analysis", "study/paper_numbers.py", "study/paper_numbers.csv", "study/launch/collect.py")
KEEP_SUMMARIES = 20  # earlier make study summaries kept in study_summary.json (our choice)


def _earlier_summaries(path: Path) -> list[dict]:
    from analysis.study_summary import earlier_summaries

    return earlier_summaries(path, KEEP_SUMMARIES, _say)


def _say(line: str = "") -> None:
    from tqdm import tqdm

    tqdm.write(line)  # above any bar that is drawn
    sys.stdout.flush()


def _threads(n: int) -> str:
    return f"{n} thread" + "s" * (n != 1)


def _tty() -> bool:
    return sys.stderr.isatty()


def fingerprint(paths, *extra) -> str:
    from analysis.study_summary import fingerprint as digest

    return digest(REPO, paths, *extra)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------------------------ counts


def parse_entry(text: str) -> tuple[str, str, int]:
    from study.errors import UserError

    parts = text.split(":")
    if len(parts) != 3 or not parts[2].isdigit():
        raise UserError(f"--count {text!r}: give VARIANT:SIZE:IMG_SIZE, e.g. eomt:S:640")
    return parts[0], parts[1], int(parts[2])


def count_stage(entries, path: Path, overrides: list[str]) -> dict:
    """The parameter and GFLOPs rows of ``entries`` (variant, size, img_size), from ``path`` when it holds
    them for the same inputs, else counted (a bar, one line per row with the paper's numbers)."""
    import torch
    from tqdm import tqdm

    from study.bench.run import HEADER, format_row, format_table, table_rows
    from study.config import load_config, to_dict
    from study.io import atomic_write_json

    cfg = load_config(REPO / "experiments" / "bench_eomt.yaml", ["bench.fps=false", *overrides])
    key = fingerprint(COUNT_INPUTS, [list(e) for e in entries], to_dict(cfg), torch.__version__)
    # the setting every row is counted in (the paper's COCO panoptic one unless --count-set changes it)
    setting = f"{cfg.task}, {cfg.model.num_classes} classes, {cfg.model.num_queries} queries"
    found = _read_json(path)
    _say(f"== 1/4 counts: parameters and GFLOPs of {len(entries)} real-size models, counter "
         f"{cfg.bench.counter} (as `study bench experiments/bench_eomt.yaml --no-fps`), ours beside the paper's")
    t0 = time.perf_counter()
    if found.get("inputs") == key:
        rows = found["rows"]
        _say(f"   found in {path} (same code and settings): nothing to count")
        _say(HEADER)
        for r in rows:
            _say(format_row(r))
        return {"found": True, "rows": rows, "seconds": round(time.perf_counter() - t0, 1), "path": str(path),
                "setting": setting}
    rows = []
    _say(HEADER)
    with tqdm(total=len(entries), desc="counting", unit="model", disable=None, leave=False) as bar:
        for entry in entries:
            bar.set_postfix_str(" ".join(map(str, entry)))
            rows += table_rows(cfg, [entry], progress=_say)
            bar.update(1)
    _say(format_table(rows, with_rows=False))
    seconds = round(time.perf_counter() - t0, 1)
    atomic_write_json(path, {"inputs": key, "seconds": seconds, "rows": rows})
    _say(f"   counted in {seconds:.0f} s -> {path}")
    return {"found": False, "rows": rows, "seconds": seconds, "path": str(path), "setting": setting}


# ------------------------------------------------------------------------------------------------- runs


def run_label(changes: dict) -> str:
    """'row 0 vit_adapter_m2f s1', 'row 5 eomt s0', 'eomt / unmasked': the run's place in Tables 1 and 7, and
    its seed where the grid gives several."""
    from study.models.build import variants

    variant = changes.get("model.variant", "?")
    setting = changes.get("model.mask_setting")
    row = getattr(variants().get(variant), "row", None)
    seed = f" s{changes['seed']}" if "seed" in changes else ""
    if setting:
        return f"{variant} / {setting}{seed}"
    return (f"row {row} {variant}" if row is not None else variant) + seed


def _steps_done(run) -> int:
    try:
        with open(run.csv_log) as f:
            return max(0, sum(1 for _ in f) - 1)
    except OSError:
        return int(run.status().get("step") or 0)


# What a run's state (study.launch.collect.run_state, the one derivation of it) shows on its progress bar.
STAGES = {"complete": "done", "trained": "evaluating", "running": "training", "interrupted": "interrupted",
          "failed": "failed", "lost": "failed"}


@contextmanager
def _job_environment(threads: int):
    """OMP/MKL threads of the jobs started inside (``threads`` 0: left alone; a value the user set wins)."""
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if threads and saved["OMP_NUM_THREADS"] is None:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _watch(submitted, labels: dict, poll_s: float) -> None:
    """Until every job of ``submitted`` ends: a bar per run (its training steps, then 'evaluating'), or on
    a log a line per change; a line with its numbers when each run ends."""
    from tqdm import tqdm

    from study.launch.collect import run_state
    from study.runs import RunDir

    watched = [s for s in submitted if s.job is not None]
    if not watched:
        return
    width = max(len(labels[id(s)]) for s in watched)
    bars = {id(s): tqdm(total=s.run.config.train.max_steps, desc=labels[id(s)].ljust(width), position=i,
                        unit="step", disable=None, leave=False, dynamic_ncols=True)
            for i, s in enumerate(watched)}
    last: dict[int, str] = {}
    ended: set[int] = set()
    summary_at = time.perf_counter()
    try:
        while len(ended) < len(watched):
            if not _tty() and time.perf_counter() - summary_at > 30:  # a log: the steps every 30 s
                summary_at = time.perf_counter()
                _say("   steps: " + ", ".join(f"{labels[id(s)]} {bars[id(s)].n}/{bars[id(s)].total}"
                                              for s in watched if id(s) not in ended))
            for s in watched:
                if id(s) in ended:
                    continue
                run = RunDir(s.run.folder)
                stage, bar = STAGES.get(run_state(run), "starting"), bars[id(s)]
                bar.n = min(_steps_done(run), bar.total)
                bar.set_postfix_str(stage, refresh=False)
                bar.refresh()
                if bar.disable and stage != last.get(id(s)) and stage not in ("done", "failed"):
                    _say(f"   {labels[id(s)]}: {stage}" + (f" (step {bar.n} of {bar.total})" if bar.n else ""))
                last[id(s)] = stage
                if s.job.done():
                    ended.add(id(s))
                    error = run.failure().get("error")
                    _say(f"   {'FAILED' if error else 'done':<6} {labels[id(s)]:<{width}}  "
                         + (error if error else run_numbers(s.run.folder)))
            if len(ended) < len(watched):
                time.sleep(poll_s)
    finally:
        for b in bars.values():
            b.close()


def run_numbers(folder) -> str:
    from analysis.study_summary import run_numbers as numbers

    return numbers(folder)


def run_stage(grid: Path, overrides: list[str], cluster: str, steps, job_threads: int, poll_s: float) -> dict:
    """Launch ``steps`` of every run of the grid on ``cluster`` and wait, with progress; returns what was
    done (the launcher's actions and the runs that failed)."""
    from study.launch.grid import expand_grid
    from study.launch.submit import launch, wait

    name, runs = expand_grid(grid, [*overrides, f"launch.cluster={cluster}"])
    grid_dir = Path(runs[0].config.output_dir)
    t0 = time.perf_counter()
    with _job_environment(job_threads if cluster == "local" else 0):
        submitted = launch(runs, grid_dir, steps, progress=lambda *a: None)
    labels = {id(s): run_label(s.run.changes) for s in submitted}
    actions = dict(Counter(s.action for s in submitted))
    _say(f"   {len(runs)} runs in {grid_dir}: " + ", ".join(
        f"{n} {dict(skip='found complete', submit='submitted', resume='resumed', active='still running')[a]}"
        for a, n in actions.items()) + (f" ({cluster} jobs)" if cluster != "debug" else ""))
    for s in submitted:
        if s.action == "skip":
            _say(f"   found  {labels[id(s)]}: {run_numbers(s.run.folder)}")
        elif s.ran:
            error = s.error
            _say(f"   {'FAILED' if error else 'done':<6} {labels[id(s)]}: " + (error or run_numbers(s.run.folder)))
    _watch(submitted, labels, poll_s)
    wait([s for s in submitted if s.job is not None], progress=lambda *a: None)  # sets each job's error
    failed = [labels[id(s)] for s in submitted if s.error]
    return {"grid_dir": str(grid_dir), "runs": len(runs), "actions": actions,
            "submitted": sum(actions.get(a, 0) for a in ("submit", "resume")), "failed": failed,
            "seconds": round(time.perf_counter() - t0, 1)}


def timing_stage(grid: Path, overrides: list[str], threads: int) -> dict:
    """The benchmark step of every run, here, one after another (a bar over the runs, a line per run)."""
    import torch
    from tqdm import tqdm

    from study.launch.grid import expand_grid
    from study.launch.submit import launch

    torch.set_num_threads(threads)  # the count the index names (metrics.bench.protocol.threads)
    _, runs = expand_grid(grid, [*overrides, "launch.cluster=debug"])
    grid_dir = Path(runs[0].config.output_dir)
    t0 = time.perf_counter()
    actions: dict[str, int] = {}
    failed = []
    with tqdm(total=len(runs), desc="timing", unit="run", disable=None, leave=False) as bar:
        for r in runs:
            label = run_label(r.changes)
            bar.set_postfix_str(label)
            (s,) = launch([r], grid_dir, ("bench",), progress=lambda *a: None)
            actions[s.action] = actions.get(s.action, 0) + 1
            word = {"skip": "found"}.get(s.action, "FAILED" if s.error else "timed")
            _say(f"   {word:<6} {label}: " + (s.error or run_numbers(r.folder)))
            if s.error:
                failed.append(label)
            bar.update(1)
    return {"runs": len(runs), "actions": actions, "submitted": sum(actions.get(a, 0) for a in ("submit", "resume")),
            "failed": failed, "threads": threads, "seconds": round(time.perf_counter() - t0, 1)}


# ----------------------------------------------------------------------------------------------- report


def _machine() -> str:
    from study.bench.environment import cpu_name

    return (f"host {platform.node()}, {cpu_name()}, {os.cpu_count()} logical CPUs, {platform.system()} "
            f"{platform.release()}")


def report_stage(grid_dir: Path, out: Path, counts: dict | None, notes: list[str]) -> dict:
    """``study report GRID_DIR --all OUT`` with the count table as the index's first section; skipped when
    the collected results, the count table and the analysis code are those of the last report."""
    from analysis.cli import write_all
    from study.io import adopt_earlier_output, atomic_write_text
    from study.launch.collect import collect

    t0 = time.perf_counter()
    results = collect(grid_dir)
    data = results.drop(columns="job_id", errors="ignore").to_csv(index=False)
    key = fingerprint(REPORT_INPUTS, data, counts and counts["rows"], notes)
    stamp = adopt_earlier_output(out, ".inputs")  # a report folder written before the output manifest existed
    index = out / "index.md"
    if index.is_file() and stamp.is_file() and stamp.read_text().strip() == key:
        _say(f"   found {index} (same runs, counts and analysis code): nothing to redraw")
        return {"found": True, "index": str(index), "seconds": round(time.perf_counter() - t0, 1)}
    extra = []
    if counts is not None:
        from analysis.study_summary import counts_markdown

        table = counts_markdown(counts["rows"])
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "counts_real_size.md", table, guard=True)
        extra.append((f"Parameters and GFLOPs at the real sizes ({counts['setting']})",
                      table + "\nGFLOPs: fvcore's convention (1 multiply-add = 1 FLOP, batch 1, padded square "
                      "input); params: all trainable parameters. File: [counts_real_size.md](counts_real_size.md)"
                      f", rows as JSON in {counts['path']}."))
    extra.append(("How this was made", "\n".join(f"- {n}" for n in notes)))
    index = write_all(results, out, str(grid_dir), extra=extra)
    atomic_write_text(stamp, key + "\n", guard=True)
    return {"found": False, "index": str(index), "seconds": round(time.perf_counter() - t0, 1)}


def _noise(grid_dir: Path) -> list[str]:
    """Print and return the run-to-run noise of each row: the main metric over its seeds (analysis/study.py)."""
    from analysis.study_summary import noise_lines
    from study.errors import UserError
    from study.launch.collect import collect

    try:
        lines = noise_lines(collect(grid_dir))
    except UserError as e:  # no complete run: said, the summary still written
        lines = [str(e)]
    _say("   run-to-run noise over the seeds (mean ± std [95% interval, Student's t]):")
    for line in lines:
        _say(f"     {line}")
    return lines


# ------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="scripts/main_study.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", default=str(REPO / "experiments" / "main_study.yaml"), help="the grid file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every run of the grid, repeatable (e.g. train.max_steps=2000, "
                        "model.size=S, data.root=..., launch.partition=gpu)")
    p.add_argument("--cluster", default="local", choices=["local", "debug", "slurm"],
                   help="where the runs train: submitit local jobs (default), here (debug), or Slurm")
    p.add_argument("--count", action="append", metavar="VARIANT:SIZE:IMG",
                   help="count these models instead of the real-size table (repeatable)")
    p.add_argument("--no-counts", action="store_true", help="skip the real-size count table")
    p.add_argument("--count-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the count table's configuration (experiments/bench_eomt.yaml)")
    p.add_argument("--job-threads", type=int, default=1,
                   help="OMP threads of each local job (they all run at once; 0: torch's default)")
    p.add_argument("--time-threads", type=int, default=1,
                   help="torch threads of the timing stage (default 1: on a CPU that other processes share, "
                        "2 threads can run 50x slower than 1; the index names the count)")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between progress updates")
    args = p.parse_args(argv)

    from study.errors import UserError

    try:
        return _main(args)
    except UserError as e:
        print(f"make study: {e}", file=sys.stderr)
        return 2


def _main(args) -> int:
    import torch

    from study.bench.run import REAL_SIZE_TABLE
    from study.io import atomic_write_json
    from study.launch.grid import expand_grid

    started = STARTED
    threads = args.time_threads if args.time_threads > 0 else torch.get_num_threads()
    torch.set_num_threads(threads)  # what runs here (timing; every step with --cluster debug)
    # the benchmark's protocol sets (and records) its own thread count: the same one, in every stage
    args.overrides = [*args.overrides, f"bench.threads={threads}"]
    grid = Path(args.grid)
    _, runs = expand_grid(grid, args.overrides)  # every run checked before anything runs
    grid_dir = Path(runs[0].config.output_dir)
    root = grid_dir.parent
    summary: dict = {"grid": str(grid), "overrides": args.overrides, "cluster": args.cluster,
                     "machine": _machine()}
    _say(f"make study: {len(runs)} tiny runs of {grid} ({args.cluster} jobs), results under {root}/ "
         f"({summary['machine']})")

    counts = None
    if not args.no_counts:
        entries = [parse_entry(e) for e in args.count] if args.count else list(REAL_SIZE_TABLE)
        counts = count_stage(entries, root / "counts_real_size.json", args.count_set)
        summary["counts"] = {k: v for k, v in counts.items() if k != "rows"}

    cfg = runs[0].config
    if cfg.data.dataset == "synthetic":  # made once here, not by every job at once
        from study.data.synthetic import ensure_synthetic

        ensure_synthetic(cfg.data.root, cfg.data.synthetic_image_size, cfg.data.synthetic_train_images,
                         cfg.data.synthetic_val_images, cfg.data.synthetic_seed)

    time_here = args.cluster == "local"
    steps = ("train", "eval") if time_here else ("train", "eval", "bench")
    _say(f"== 2/4 {' + '.join(steps)}: `study launch {grid} --cluster {args.cluster} --steps {','.join(steps)}`")
    summary["train_eval"] = run_stage(grid, args.overrides, args.cluster, steps, args.job_threads, args.poll)
    if time_here:
        _say(f"== 3/4 timing: the benchmark step of every run here, one after another ({_threads(threads)})")
        summary["timing"] = timing_stage(grid, args.overrides, threads)
    else:
        _say("== 3/4 timing: done by each job with its run (stage 2)")
    notes = [f"`make study` (scripts/main_study.py) with grid {grid.name}"
             + (f" and {' '.join('--set ' + o for o in args.overrides)}" if args.overrides else ""),
             f"training and evaluation: {args.cluster} jobs"
             + (f" ({len(runs)} at once, {_threads(args.job_threads)} each)" if time_here else ""),
             "timing: " + (f"here, one run after another, {_threads(threads)}, nothing else of the study running"
                           if time_here else "in each run's job"),
             f"machine: {summary['machine']}"]
    _say(f"== 4/4 report: `study report {grid_dir} --all {root / 'report'}`")
    summary["report"] = report_stage(grid_dir, root / "report", counts, notes)
    summary["noise"] = _noise(grid_dir)
    failed = summary["train_eval"]["failed"] + summary.get("timing", {}).get("failed", [])
    summary["failed"] = failed
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["earlier"] = _earlier_summaries(root / "study_summary.json")
    atomic_write_json(root / "study_summary.json", summary)
    submitted = summary["train_eval"]["submitted"] + summary.get("timing", {}).get("submitted", 0)
    _say(f"make study: {summary['seconds']:.0f} s, {submitted} run steps launched"
         + (f", {len(failed)} failed: {', '.join(failed)}" if failed else ""))
    _say(f"index: {summary['report']['index']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # analysis/ is not installed: import it from the checkout
    sys.exit(main())
