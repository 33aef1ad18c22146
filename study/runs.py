"""A run is a folder (docs/design.md): resolved config, status, metrics, checkpoints and logs, written atomically.

    runs/<grid>/<name>-<hash>/
        config.yaml          the resolved configuration (its hash is the run's identity)
        status.json          {"state": running | finished | failed, "step", "total_steps", "updated", ...}
        metrics.json         final numbers (training summary, evaluation)
        checkpoints/last.pt  model, optimiser, schedulers, step and random states (for resuming)
        checkpoints/model_final.pt  the trained weights alone
        logs/train.csv, logs/tb/    per-step log, TensorBoard events
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from study.config import Config, build_dataclass, config_hash, run_name, save_config, to_dict
from study.io import atomic_write_json


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def for_config(cls, cfg: Config) -> "RunDir":
        return cls(Path(cfg.output_dir) / run_name(cfg))

    config = property(lambda self: self.path / "config.yaml")
    status_file = property(lambda self: self.path / "status.json")
    metrics_file = property(lambda self: self.path / "metrics.json")
    last_checkpoint = property(lambda self: self.path / "checkpoints" / "last.pt")
    final_weights = property(lambda self: self.path / "checkpoints" / "model_final.pt")
    csv_log = property(lambda self: self.path / "logs" / "train.csv")
    tb_dir = property(lambda self: self.path / "logs" / "tb")

    def status(self) -> dict:
        if not self.status_file.is_file():
            return {}
        return json.loads(self.status_file.read_text())

    def write_status(self, state: str, **fields) -> None:
        atomic_write_json(self.status_file, {"state": state, "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                             **fields})

    def metrics(self) -> dict:
        return json.loads(self.metrics_file.read_text()) if self.metrics_file.is_file() else {}

    def update_metrics(self, **fields) -> None:
        atomic_write_json(self.metrics_file, {**self.metrics(), **fields})

    def claim(self, cfg: Config) -> None:
        """Write the resolved config, or check that the folder already belongs to this same config."""
        if self.config.is_file():
            saved = yaml.safe_load(self.config.read_text())
            theirs = config_hash(build_dataclass(Config, saved))
            if theirs != config_hash(cfg):
                raise ValueError(f"run folder {self.path} holds a run of another configuration (hash {theirs},"
                                 f" this one {config_hash(cfg)}); choose another folder or remove it")
            if to_dict(cfg) == saved:
                return
        save_config(cfg, self.config)
