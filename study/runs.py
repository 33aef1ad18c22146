"""A run is a folder (docs/design.md); :class:`RunDir` owns its whole layout. Every file of it is listed here,
read and written only through RunDir (writes are atomic):

    runs/<grid>/<name>-<hash>/
        config.yaml          the resolved configuration (its hash is the run's identity)
        status.json          the trainer's {"state": running | interrupted | failed | finished, "step",
                             "total_steps", "updated", ...}
        metrics.json         final numbers, one entry per step (see below)
        failure.json         the last attempt's error {"step", "error", "time"}; removed when a new attempt
                             starts, and ignored when older than the latest submission in launch.json
        launch.json          the latest submission {"job_id", "cluster", "steps", "submitted", "logs"}
        eval_<task>_<split>.json  the whole evaluation result, per-class tables and COCOeval's text included
        checkpoints/last.pt  model, optimiser, schedulers, step and random states (for resuming)
        checkpoints/model_final.pt  the trained weights alone
        logs/train.csv, logs/tb/    per-step log, TensorBoard events

What a step writes into ``metrics.json``:
    train   the trainer's summary (steps, final loss, images/s, world size, precision, device)
    eval    the evaluation result on ``eval.split`` (default ``data.val_split``) without the per-class tables
            and COCOeval's text (those stay in ``eval_<task>_<split>.json``), with the ``settings`` it used
    bench   parameters, GFLOPs (and by component), and FPS with its protocol when ``bench.fps`` is on

The steps of a run are ``STEPS``. Evaluation and benchmark settings are not part of a run's identity
(study/config.py), so those results record their settings and count as done only while they match the
configuration's (:func:`step_settings`, :meth:`RunDir.pending_steps`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable, Optional

import yaml

from study.config import Config, build_dataclass, config_hash, run_name, save_config, to_dict
from study.errors import UserError
from study.io import atomic_write_json

STEPS = ("train", "eval", "bench")
# What a benchmark result depends on besides the model (the eval step depends on the whole eval section).
BENCH_SETTINGS = ("fps", "device", "precision", "compile", "warmup", "iters", "scope")
# Parts of an evaluation result that stay in the eval file, out of metrics.json: per-class tables, the
# category list, COCOeval's printed summary.
EVAL_DETAILS = ("per_class", "categories", "summary")


def now() -> str:
    """The time stamp of every record (ISO, to the second: they compare as strings)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def check_steps(steps: Iterable[str]) -> tuple[str, ...]:
    steps = tuple(steps)
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        raise UserError(f"unknown step(s) {unknown}; steps are {', '.join(STEPS)}")
    return steps


def step_settings(step: str, config: dict) -> dict:
    """The settings a step's result depends on, from a configuration as a dict (``to_dict(cfg)``)."""
    if step == "eval":
        return dict(config.get("eval", {}))
    if step == "bench":
        return {k: config.get("bench", {}).get(k) for k in BENCH_SETTINGS}
    return {}


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def for_config(cls, cfg: Config) -> "RunDir":
        return cls(Path(cfg.output_dir) / run_name(cfg))

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
    tb_dir = property(lambda self: self.path / "logs" / "tb")

    def eval_file(self, task: str, split: str) -> Path:
        return self.path / f"eval_{task}_{split}.json"

    # ---------------------------------------------------------------------------------------- reading

    @staticmethod
    def _read(path: Path) -> dict:
        return json.loads(path.read_text()) if path.is_file() else {}

    def saved_config(self) -> dict:
        """config.yaml as a dict ({} when the folder has none yet)."""
        return (yaml.safe_load(self.config.read_text()) or {}) if self.config.is_file() else {}

    def status(self) -> dict:
        return self._read(self.status_file)

    def metrics(self) -> dict:
        return self._read(self.metrics_file)

    def launch_record(self) -> dict:
        return self._read(self.launch_file)

    def failure(self) -> dict:
        """failure.json (step, error, time) when it belongs to the latest submission, else {}: a job that
        dies before its first step cannot remove the previous attempt's record."""
        failure = self._read(self.failure_file)
        submitted = self.launch_record().get("submitted")
        if failure and submitted and failure.get("time", "") < submitted:  # ISO times compare as strings
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
        trained = self.status().get("state") == "finished"
        todo = []
        for step in steps:
            if step == "train":
                done = trained
            else:
                done = step in metrics and metrics[step].get("settings") == step_settings(step, config)
            if not done:
                todo.append(step)
        return todo

    # ---------------------------------------------------------------------------------------- writing

    def write_status(self, state: str, **fields) -> None:
        atomic_write_json(self.status_file, {"state": state, "updated": now(), **fields})

    def update_metrics(self, **fields) -> None:
        atomic_write_json(self.metrics_file, {**self.metrics(), **fields})

    def write_failure(self, step: Optional[str], error: str) -> None:
        atomic_write_json(self.failure_file, {"step": step, "error": error, "time": now()})

    def clear_failure(self) -> None:
        self.failure_file.unlink(missing_ok=True)

    def write_launch_record(self, job_id: str, cluster: str, steps: Iterable[str], submitted: str,
                            logs: Optional[Path] = None) -> None:
        atomic_write_json(self.launch_file, {"job_id": job_id, "cluster": cluster, "steps": list(steps),
                                             "submitted": submitted, "logs": str(logs) if logs else None})

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


def pending_steps(run: RunDir, steps: Iterable[str] = STEPS, cfg: Config | None = None) -> list[str]:
    """:meth:`RunDir.pending_steps` (kept as a function for callers that map it over runs)."""
    return run.pending_steps(steps, cfg)
