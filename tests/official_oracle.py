"""The official EoMT code (../shared/oracles/eomt-official, commit 7bd19dd) loaded by path, as a test oracle.

The project never imports it; tests do, through :func:`official`:

- its folder goes on ``sys.path`` (its modules import each other as ``models.*``, ``training.*``,
  ``datasets.*``);
- ``wandb`` is only imported at the top of its Lightning module: a stub module stands in for it when the real
  one is not installed;
- its ``ViT`` downloads pretrained weights unless given a ``ckpt_path``: :func:`official_vit` always passes
  one (a path that is never read; the official ViT only uses it to choose ``pretrained=False``).

A missing oracle (folder, lightning, torchmetrics) skips the test, and fails it with ``CI=true``
(tests/conftest.py ``require`` / ``_absent``).
"""
from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

from conftest import REPO, _absent, require

OFFICIAL = Path(os.environ.get("EOMT_OFFICIAL", REPO.parent / "shared" / "oracles" / "eomt-official"))
# The official top-level package names: a module of the same name imported from elsewhere (Hugging Face's
# ``datasets`` package, say) would shadow the official one.
_PACKAGES = ("models", "training", "datasets")


def _stub_wandb() -> None:
    if "wandb" in sys.modules:
        return
    try:
        importlib.import_module("wandb")
    except ImportError:
        stub = types.ModuleType("wandb")
        stub.__doc__ = "stand-in for wandb: the official EoMT code imports it at the top and never calls it here"
        sys.modules["wandb"] = stub


def official(module: str):
    """Import ``module`` of the official code (``"models.eomt"``, ``"training.lightning_module"``, ...)."""
    if not (OFFICIAL / "models" / "eomt.py").is_file():
        _absent(f"the official EoMT code is absent at {OFFICIAL} (set EOMT_OFFICIAL)")
    for dep in ("lightning", "torchmetrics", "timm", "transformers"):
        require(dep)
    _stub_wandb()
    root = str(OFFICIAL)
    if root not in sys.path:
        sys.path.insert(0, root)
    for pkg in _PACKAGES:  # a same-named module from another place must not stand in for the official one
        m = sys.modules.get(pkg)
        if m is not None and not str(getattr(m, "__file__", "") or "").startswith(root) \
                and not any(str(p).startswith(root) for p in getattr(m, "__path__", [])):
            del sys.modules[pkg]
    return importlib.import_module(module)


def official_vit(img_size: int, backbone_name: str, patch_size: int = 16):
    """The official ``ViT`` wrapper on a timm backbone with random weights: ``ckpt_path`` set so that nothing is
    downloaded (the official class then builds timm's model with ``pretrained=False``)."""
    vit = official("models.vit")
    return vit.ViT((img_size, img_size), patch_size=patch_size, backbone_name=backbone_name,
                   ckpt_path="<never read: weights come from the test>")
