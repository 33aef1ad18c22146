"""A run is a folder (docs/design.md); :class:`RunDir` owns its whole layout. Every file of it is listed here,
read and written only through RunDir (writes are atomic):

    runs/<grid>/<name>-<hash>/
        config.yaml          the resolved configuration (its hash is the run's identity)
        status.json          the trainer's {"state": running | interrupted | failed | finished, "step",
                             "total_steps", "updated", ...}
        metrics.json         final numbers, one entry per step (see below)
        failure.json         the last attempt's error {"step", "error", "time", "seq"}; removed when a later
                             attempt succeeds, ignored when its seq is below the latest submission's
        launch.json          the latest submission {"job_id", "cluster", "steps", "submitted", "logs", "host",
                             "seq"} (seq: the run's event order, never wall-clock time)
                             and ``jobs``, every submission the run ever had (a job of an older launch may
                             still run: study/launch/submit.py's job_active asks about each one)
        writer.lock          the one-writer lock (:class:`FolderLock`): whoever writes the run holds an
                             exclusive flock on it, and the file names the holder (host, pid, job id)
        eval_<task>_<split>.json  the whole evaluation result, per-class tables and COCOeval's text included
        checkpoints/last.pt  model, optimiser, schedulers, step and random states (for resuming)
        checkpoints/model_final.pt  the trained weights alone
        logs/train.csv, logs/tb/    per-step log, TensorBoard events

What a step writes into ``metrics.json``: ``train`` the trainer's summary; ``eval`` the evaluation on
``eval.split`` with the ``settings`` it used (per-class tables stay in ``eval_<task>_<split>.json``); ``bench``
parameters, GFLOPs (by component) and, with ``bench.fps``, FPS with its protocol and ``settings``.

One writer at a time: :meth:`RunDir.writing` takes the lock (a second writer is refused, naming the holder)
and removes the temporary files a killed writer left behind. :meth:`RunDir.writer` probes the lock: a run
whose status.json says "running" while its lock is free was killed, which is how ``study status`` tells it is
interrupted (a dead holder's flock is released by the kernel; the file is never removed).

The steps of a run are ``STEPS``. Evaluation and benchmark settings are not part of a run's identity
(study/config.py), so those results record their settings and count as done only while they match the
configuration's (:func:`step_settings`, :meth:`RunDir.pending_steps`).
"""
from __future__ import annotations

import json
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional

import yaml

from study.bench.config import timing_settings
from study.config import Config, build_dataclass, config_hash, run_name, save_config, to_dict
from study.errors import UserError
from study.io import atomic_write_json
from study.launch.config import STEPS
from study.locks import FolderLock, now

# What a benchmark result depends on besides the model (study/bench/config.py's one declaration); the eval step
# depends on the whole eval section. EVAL_DETAILS stay in the eval file, out of metrics.json.
BENCH_SETTINGS = timing_settings()
EVAL_DETAILS = ("per_class", "categories", "summary")


def step_settings(step: str, config: dict) -> dict:
    """The settings a step's result depends on, from a configuration as a dict (``to_dict(cfg)``)."""
    if step == "eval":
        return dict(config.get("eval", {}))
    if step == "bench":
        return {k: config.get("bench", {}).get(k) for k in BENCH_SETTINGS}
    return {}


def same_settings(step: str, recorded, config: dict) -> bool:
    """Whether a result recorded with ``recorded`` settings holds for ``config``. A setting the record lacks
    was added since, and its default is what the code did before it existed; a recorded setting no longer
    among the step's is ignored."""
    want = step_settings(step, config)
    default = step_settings(step, to_dict(build_dataclass(Config, {})))
    return isinstance(recorded, dict) and all(recorded.get(k, default.get(k)) == v for k, v in want.items())


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def for_config(cls, cfg: Config) -> "RunDir":
        """The run folder of ``cfg`` under its ``output_dir``: the existing folder of its identity (the hash
        suffix, whatever readable name precedes it: folders named before readable names existed still
        read), else a new ``<name>-<hash>``."""
        root, digest = Path(cfg.output_dir), config_hash(cfg)
        new = root / run_name(cfg)
        if new.is_dir() or not root.is_dir():
            return cls(new)
        for folder in sorted(root.glob(f"*-{digest}")):
            if (folder / "config.yaml").is_file():
                return cls(folder)
        return cls(new)

    @classmethod
    def holding(cls, file: str | Path) -> Optional["RunDir"]:
        """The run folder ``file`` lies in (a checkpoint under ``<run>/checkpoints/``, or a file of the run
        itself), or None when it is in no run folder."""
        file = Path(file).resolve()
        for folder in (file.parent, file.parent.parent):
            if (folder / "config.yaml").is_file() and (folder / "checkpoints").is_dir():
                return cls(folder)
        return None

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    config = property(lambda self: self.path / "config.yaml")
    status_file = property(lambda self: self.path / "status.json")
    metrics_file = property(lambda self: self.path / "metrics.json")
    failure_file = property(lambda self: self.path / "failure.json")
    launch_file = property(lambda self: self.path / "launch.json")
    last_checkpoint = property(lambda self: self.path / "checkpoints" / "last.pt")
    final_weights = property(lambda self: self.path / "checkpoints" / "model_final.pt")
    csv_log = property(lambda self: self.path / "logs" / "train.csv")
    lock_file = property(lambda self: self.path / "writer.lock")
    tb_dir = property(lambda self: self.path / "logs" / "tb")

    def eval_file(self, task: str, split: str) -> Path:
        return self.path / f"eval_{task}_{split}.json"

    # ---------------------------------------------------------------------------------------- reading

    @staticmethod
    def _read(path: Path) -> dict:
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
        except ValueError as e:
            raise UserError(f"{path} is damaged ({e}); remove it (the run's other files are kept) or restore "
                            f"it") from None
        if not isinstance(data, dict):
            raise UserError(f"{path} is damaged (it holds a {type(data).__name__}, not a mapping); remove or "
                            f"restore it")
        return data

    def saved_config(self) -> dict:
        """config.yaml as a dict ({} when the folder has none yet)."""
        if not self.config.is_file():
            return {}
        try:
            data = yaml.safe_load(self.config.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{self.config} is damaged ({str(e).splitlines()[0]}); restore it") from None
        if not isinstance(data, dict):
            raise UserError(f"{self.config} is damaged (not a mapping); restore it")
        return data

    def status(self) -> dict:
        return self._read(self.status_file)

    def metrics(self) -> dict:
        return self._read(self.metrics_file)

    def launch_record(self) -> dict:
        return self._read(self.launch_file)

    def _seq_of(self, record: dict) -> int:
        seq = record.get("seq")
        return seq if isinstance(seq, int) and not isinstance(seq, bool) else 0

    def next_seq(self) -> int:
        """The next number of the run's event sequence (launch records, failures): events are ordered by it,
        never by wall-clock time, which differs between hosts (a login node and a compute node)."""
        records = [self.launch_record(), self._read(self.failure_file)]
        return 1 + max(self._seq_of(r) for r in records)

    def launch_jobs(self) -> list[dict]:
        """Every job the run was ever submitted as, oldest first (each like launch.json's latest record)."""
        record = self.launch_record()
        jobs = record.get("jobs")
        if jobs is None:  # written before the list was kept
            return [record] if record.get("job_id") else []
        return list(jobs)

    # ---------------------------------------------------------------------------------------- the writer

    def _lock(self) -> FolderLock:
        return FolderLock(self.lock_file, f"run folder {self.path}")

    def writer(self) -> Optional[str]:
        """Whether a process writes the run now: "held", "free", or None when the file system cannot tell."""
        return self._lock().state()

    def holder(self) -> dict:
        """Who holds (or last held) the run's lock: host, pid, job_id, doing, since."""
        return self._lock().holder()

    @contextmanager
    def writing(self, doing: str) -> Iterator[None]:
        """Be the run's one writer for the block (a UserError names the holder when another process is).
        Taking it first removes the temporary files of writes a killed writer never finished. An exception
        leaving the block (not SystemExit or Ctrl-C: those interrupt) is recorded in failure.json unless the
        block recorded its own (a run that fails before its first step shows as failed, not pending); a block
        that succeeds clears an earlier attempt's failure."""
        with self._lock().hold(doing) as first:
            if first:
                self.remove_orphans()
            start = self.next_seq() if first else None
            try:
                yield
                if start is not None and self.failure_file.is_file():  # an earlier attempt's failure (or a
                    self._clear_failure_before(start)  # damaged record) is over once a later one succeeds
            except Exception as e:
                if start is not None and self.config.is_file():
                    try:
                        recorded = self._seq_of(self._read(self.failure_file)) >= start
                    except UserError:  # a damaged failure.json: replace it
                        recorded = False
                    if not recorded:
                        self.write_failure(doing, f"{type(e).__name__}: {e}")
                raise

    def remove_orphans(self) -> list[Path]:
        """Remove the temporary files of atomic writes that never finished (study/io.py names them
        ``.<file>.<random>.tmp``); call only while holding the lock. Returns what was removed."""
        removed = []
        for folder in (self.path, self.path / "checkpoints", self.path / "logs"):
            for tmp in sorted(folder.glob(".*.tmp")) if folder.is_dir() else ():
                size = tmp.stat().st_size
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
                print(f"{self.path.name}: removed {tmp.name} ({size} bytes), left by a write that never "
                      f"finished", file=sys.stderr)
        return removed

    def failure(self) -> dict:
        """failure.json (step, error, time, seq) when it belongs to the latest submission, else {}: a job that
        dies before its first step cannot remove the previous attempt's record. Ordered by the run's sequence
        number (:meth:`next_seq`); only records written before sequence numbers existed compare times."""
        failure = self._read(self.failure_file)
        launch = self.launch_record()
        if not failure or not launch:
            return failure
        if "seq" in failure and "seq" in launch:
            return failure if self._seq_of(failure) >= self._seq_of(launch) else {}
        submitted = launch.get("submitted")
        if submitted and failure.get("time", "") < submitted:  # ISO times compare as strings (same host)
            return {}
        return failure

    def evaluation(self, task: str, split: str) -> dict:
        """The whole result of ``eval_<task>_<split>.json`` ({} when not evaluated)."""
        return self._read(self.eval_file(task, split))

    def pending_steps(self, steps: Iterable[str] = STEPS, cfg: Config | None = None) -> list[str]:
        """The steps of ``steps`` this run has not finished for configuration ``cfg`` (default: the one saved
        in the folder): training finished, evaluation and benchmark recorded with the same settings."""
        metrics = self.metrics()
        config = to_dict(cfg) if cfg is not None else self.saved_config()
        trained = self.status().get("state") == "finished" and not self.weights_missing()
        todo = []
        for step in steps:
            if step == "train":
                done = trained
            else:
                done = step in metrics and same_settings(step, metrics[step].get("settings"), config)
            if not done:
                todo.append(step)
        return todo

    def weights_missing(self) -> bool:
        """Training says it finished but its final weights are gone (deleted, or lost with a disk)."""
        return self.status().get("state") == "finished" and not self.final_weights.is_file()

    # ---------------------------------------------------------------------------------------- writing

    def write_status(self, state: str, **fields) -> None:
        atomic_write_json(self.status_file, {"state": state, "updated": now(), **fields})

    def update_metrics(self, **fields) -> None:
        atomic_write_json(self.metrics_file, {**self.metrics(), **fields})

    def write_failure(self, step: Optional[str], error: str) -> None:
        atomic_write_json(self.failure_file, {"step": step, "error": error, "time": now(), "seq": self.next_seq()})

    def clear_failure(self) -> None:
        self.failure_file.unlink(missing_ok=True)

    def _clear_failure_before(self, seq: int) -> None:
        try:
            if self._seq_of(self._read(self.failure_file)) >= seq:
                return  # recorded by this attempt: it stays
        except UserError:
            pass
        self.clear_failure()

    def write_launch_record(self, job_id: str, cluster: str, steps: Iterable[str], submitted: str,
                            logs: Optional[Path] = None, seq: Optional[int] = None, **extra) -> None:
        """Record a submission: the latest one at the top of launch.json, and appended to its ``jobs``.
        ``seq``: the sequence number taken before the job was submitted (a failure the job records before
        this record is written then still counts as the job's), else the next one."""
        job = {"job_id": job_id, "cluster": cluster, "steps": list(steps), "submitted": submitted,
               "logs": str(logs) if logs else None, "host": socket.gethostname(),
               "seq": self.next_seq() if seq is None else seq, **extra}
        atomic_write_json(self.launch_file, {**job, "jobs": self.launch_jobs() + [job]})

    def write_evaluation(self, result: dict) -> dict:
        """Record an evaluation result (it holds ``task``, ``split`` and ``settings``): the whole of it in
        ``eval_<task>_<split>.json``, its headline numbers as ``metrics.json``'s ``eval``. Returns the
        latter."""
        atomic_write_json(self.eval_file(result["task"], result["split"]), result)
        headline = {k: v for k, v in result.items() if k not in EVAL_DETAILS}
        self.update_metrics(eval=headline)
        return headline

    def claim(self, cfg: Config) -> None:
        """Write the resolved config, or check that the folder already belongs to this same config."""
        if self.config.is_file():
            saved = self.saved_config()
            theirs = config_hash(build_dataclass(Config, saved))
            if theirs != config_hash(cfg):
                raise UserError(f"run folder {self.path} holds a run of another configuration (hash {theirs},"
                                f" this one {config_hash(cfg)}); choose another folder or remove it")
            if to_dict(cfg) == saved:
                return
        save_config(cfg, self.config)

    def belongs_to(self, cfg: Config) -> bool:
        """Whether the folder's saved configuration has the identity of ``cfg``."""
        saved = self.saved_config()
        return bool(saved) and config_hash(build_dataclass(Config, saved)) == config_hash(cfg)


def display_name(run: RunDir | str | Path) -> str:
    """A run's readable name, for tables, figures, curve files, logs and errors (e.g. ``eomt-L640-lr3e-4-s1``):
    the folder name without its hash suffix. Names are unique inside a grid (the grid gives each run the keys
    that set it apart; an explicit ``name`` that repeats keeps uniqueness only through the hash, so use
    ``run.path.name`` where a name must be unique). A folder of the old ``<grid name>-<hash>`` form reads as its
    grid name. Stable: callers may rely on it."""
    name = (run.path if isinstance(run, RunDir) else Path(run)).name
    head, _, tail = name.rpartition("-")
    return head if head and len(tail) == 8 and all(c in "0123456789abcdef" for c in tail) else name

