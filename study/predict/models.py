"""From what the user names to a loaded model: a run folder, a config, or a config with a checkpoint.

A model is named by a *spec*:

- ``RUN``: a run folder (it holds ``config.yaml``); its trained weights ``checkpoints/model_final.pt``. A run
  that is not finished (status.json says running, failed or interrupted) is refused: its weights are not the
  run's result.
- ``CONFIG``: a YAML config; its weights as ``study eval`` finds them (study/eval/run.py ``run_weights``: the
  config's run folder, else ``model.checkpoint``; never random weights).
- ``CONFIG@WEIGHTS``: a YAML config and a weights file in any layout the suite reads: ours, the official EoMT
  release's, or Hugging Face's ``EomtForUniversalSegmentation`` (study/models/checkpoint.py).

The classes (names, thing or stuff, dataset category ids) come from the config's data set
(``data.root``), or from a COCO-style categories JSON (``--categories``, e.g. panopticapi's
``panoptic_coco_categories.json``) when the data set is not on this machine.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from study.config import Config, load_config
from study.device import resolve_device, resolve_precision
from study.errors import UserError

_YAML = (".yaml", ".yml")


@dataclass
class Predictor:
    """One loaded model and what predicting with it needs."""

    label: str  # the model's name in output folders and figure titles
    cfg: Config
    weights: Path
    model: torch.nn.Module
    categories: list[dict]  # contiguous class order: {"id" (dataset id), "name", "isthing"}
    device: torch.device
    precision: str

    @property
    def task(self) -> str:
        return self.cfg.task

    @property
    def input_size(self) -> int:
        return self.cfg.eval.input_size or self.cfg.model.img_size

    @property
    def is_thing(self) -> list[bool]:
        return [bool(c["isthing"]) for c in self.categories]


def split_spec(spec: str) -> tuple[Path, Optional[Path]]:
    """``PATH`` or ``CONFIG@WEIGHTS`` -> (path, weights or None). A path that exists as given is never split."""
    if Path(spec).exists() or "@" not in spec:
        return Path(spec), None
    config, weights = spec.rsplit("@", 1)
    return Path(config), Path(weights)


def resolve_spec(spec: str, overrides: list, checkpoint: Optional[str] = None) -> tuple[Config, Path, str]:
    """(configuration, weights file, label) of a model spec (see the module docstring). ``checkpoint`` (the
    ``--checkpoint`` flag) takes the place of ``@WEIGHTS``. A spec that is neither a run folder nor a YAML
    config is a UserError naming it."""
    from study.eval.run import run_weights
    from study.runs import RunDir

    path, weights = split_spec(spec)
    if checkpoint is not None:
        if weights is not None:
            raise UserError(f"model {spec} names its weights after '@' and --checkpoint {checkpoint} names others; "
                            "give one")
        weights = Path(checkpoint)
    if path.is_dir():
        run = RunDir(path)
        if not run.config.is_file():
            raise UserError(f"{path} is a folder without config.yaml: not a run folder; give a run folder (e.g. "
                            "runs/quickstart/quickstart-<hash>), a YAML config, or CONFIG@WEIGHTS")
        if weights is None:
            weights = _finished_weights(run)
        cfg = load_config(run.config, overrides)
        return cfg, run_weights(cfg, weights), path.resolve().name
    if path.is_file() and path.suffix in _YAML:
        cfg = load_config(path, overrides)
        named = weights is not None
        weights = run_weights(cfg, weights)
        holder = RunDir.holding(weights)
        label = holder.path.name if holder is not None else f"{path.stem}-{weights.stem}" if named else path.stem
        return cfg, weights, label
    if not path.exists():
        raise UserError(f"model {spec}: {path} does not exist; give a run folder, a YAML config, or "
                        "CONFIG@WEIGHTS")
    raise UserError(f"model {spec}: {path} is neither a run folder (a folder with config.yaml) nor a YAML config "
                    f"(.yaml, .yml)")


def _finished_weights(run) -> Path:
    """The trained weights of a finished run; an unfinished run is refused, naming its state."""
    state = run.status().get("state")
    if state is not None and state != "finished":
        raise UserError(f"run {run.path} is {state}, not finished: its weights are not the run's result. Finish "
                        f"it (study train {run.config}), or name a weights file with --checkpoint")
    if not run.final_weights.is_file():
        raise UserError(f"run {run.path} has no {run.final_weights.relative_to(run.path)}: it has not finished "
                        "training")
    return run.final_weights


def read_categories(path: str | Path) -> list[dict]:
    """A COCO-style categories JSON (a list, or a dict with ``categories``): {"id", "name", "isthing"} sorted by
    id, the contiguous class order the readers use (study/data/coco.py)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"categories file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"categories file {path} is not JSON ({e})") from None
    cats = data.get("categories") if isinstance(data, dict) else data
    if not isinstance(cats, list) or not cats:
        raise UserError(f"categories file {path} holds no list of categories (a list, or a dict with 'categories')")
    out = []
    for i, c in enumerate(cats):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise UserError(f"categories file {path}: entry {i} needs an integer 'id' and a string 'name'")
        out.append({"id": c["id"], "name": c["name"], "isthing": int(bool(c.get("isthing", 0)))})
    ids = [c["id"] for c in out]
    if len(set(ids)) != len(ids):
        raise UserError(f"categories file {path} lists an id twice")
    return sorted(out, key=lambda c: c["id"])


def categories_for(cfg: Config, categories_file: Optional[str], label: str) -> list[dict]:
    """The model's classes in contiguous order: from ``categories_file``, else from the config's data set."""
    if categories_file:
        cats = read_categories(categories_file)
        where = f"categories file {categories_file}"
    else:
        from study.data import build_dataset
        from study.eval.run import categories_of

        split = cfg.eval.split or cfg.data.val_split
        try:
            info = build_dataset(cfg.data, split, cfg.task).info
        except UserError as e:
            raise UserError(f"model {label}: the class names come from its data set, which cannot be read here "
                            f"({e}); give them with --categories FILE (a COCO categories JSON, e.g. "
                            f"panoptic_coco_categories.json) or set data.root") from None
        cats = categories_of(info)
        where = f"data set '{info.name}' ({split})"
    if len(cats) != cfg.model.num_classes:
        raise UserError(f"model {label} predicts {cfg.model.num_classes} classes (model.num_classes) but {where} "
                        f"has {len(cats)}")
    return cats


def load_predictor(spec: str, overrides: list, checkpoint: Optional[str] = None,
                   categories_file: Optional[str] = None) -> Predictor:
    """Resolve ``spec``, load its weights (study/eval/run.py ``trained_model``, any layout) and place the model
    on the device of ``eval.device`` (study/device.py: CUDA when present)."""
    from study.eval.run import trained_model

    cfg, weights, label = resolve_spec(spec, overrides, checkpoint)
    if cfg.task not in ("panoptic", "instance", "semantic"):
        raise UserError(f"model {spec}: task '{cfg.task}' has no prediction format; use panoptic, instance or "
                        "semantic")
    categories = categories_for(cfg, categories_file, label)
    device = resolve_device(cfg.eval.device)
    precision = resolve_precision(cfg.eval.precision, device)
    model = trained_model(cfg, weights).to(device).eval()
    return Predictor(label, cfg, weights, model, categories, device, precision)


def unique_labels(predictors: list[Predictor]) -> None:
    """Make the labels distinct (a suffix -2, -3, ... on repeats, and on the names of the folders that
    ``--compare`` writes beside them), in place: they name output folders."""
    seen: dict[str, int] = {"compare": 1, "overlay": 1}  # the side-by-side folder, the overlay folder
    for p in predictors:
        n = seen.get(p.label, 0) + 1
        seen[p.label] = n
        if n > 1:
            p.label = f"{p.label}-{n}"
