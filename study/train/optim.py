"""Optimiser: AdamW with layer-wise lr decay from the model's parameter groups (docs/paper.md section 6).

The model knows which parameters are backbone blocks, embeddings and new parts (``model.param_groups(
layer_decay)`` -> list of :class:`~study.models.contract.ParamGroup`); this module turns its groups into
AdamW groups with lr = base lr x ``lr_scale`` and weight decay on every parameter, tagged with ``backbone``
so that the two-stage warm-up (``study.train.schedules``) knows which groups start late. Also here: the
global-norm gradient clipping and the number of accumulated micro-batches that make the paper's batch of 16.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from study.errors import UserError
from study.models.contract import ParamGroup
from study.train.config import TrainConfig


def checked_param_groups(model: nn.Module, layer_decay: float,
                         decay_query_blocks: bool = True) -> list[ParamGroup]:
    """The model's groups, checked to hold every trainable parameter exactly once (and no frozen one).

    A parameter left out would silently never train; one listed twice would get two updates per step.
    ``decay_query_blocks=False``: no layer-wise decay on EoMT's query blocks (``train.layer_decay_query_blocks``).
    """
    groups = model.param_groups(layer_decay, decay_query_blocks=decay_query_blocks)
    names = {id(p): n for n, p in model.named_parameters()}
    seen: dict[int, str] = {}
    for g in groups:
        for p in g.params:
            name = names.get(id(p), "<not a parameter of the model>")
            if id(p) in seen:
                raise ValueError(f"parameter '{name}' is in groups '{seen[id(p)]}' and '{g.name}'")
            if not p.requires_grad:
                raise ValueError(f"frozen parameter '{name}' is in group '{g.name}'")
            seen[id(p)] = g.name
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise ValueError(f"{type(model).__name__}.param_groups() leaves out trainable parameters: "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the model's parameter groups: lr = cfg.lr x lr_scale, weight decay cfg.weight_decay on all.

    Each optimiser group keeps ``name``, ``lr_scale`` and ``backbone`` from its :class:`ParamGroup`.
    """
    groups = [dict(params=g.params, lr=cfg.lr * g.lr_scale, weight_decay=cfg.weight_decay, name=g.name,
                   lr_scale=g.lr_scale, backbone=g.backbone)
              for g in checked_param_groups(model, cfg.layer_decay, cfg.layer_decay_query_blocks) if g.params]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay)


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: Optional[float]) -> torch.Tensor:
    """Clip the gradients of every parameter of ``optimizer`` to a global L2 norm of ``max_norm`` (paper:
    0.01); returns the norm before clipping. With mixed precision, unscale the gradients first
    (``GradScaler.unscale_``). ``max_norm=None`` only measures."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not params:
        return torch.zeros(())
    if max_norm is None:
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def accumulation_steps(batch_size: int, per_process_batch: int, world_size: int = 1,
                       accumulate: Optional[int] = None) -> int:
    """Micro-batches per optimiser step so that per_process_batch x world_size x steps = batch_size.

    ``accumulate`` (``train.accumulate``) is taken as given when set, but must still reach ``batch_size``
    exactly: a different effective batch would be a different recipe (docs/paper.md section 6: 16).
    """
    if per_process_batch < 1 or world_size < 1:
        raise UserError("per-process batch and world size must be >= 1")
    per_step = per_process_batch * world_size
    if accumulate is None:
        if batch_size % per_step:
            raise UserError(f"the effective batch train.batch_size={batch_size} is not a multiple of "
                             f"data.batch_size={per_process_batch} x {world_size} process(es); change "
                             "data.batch_size or train.batch_size")
        return batch_size // per_step
    if accumulate * per_step != batch_size:
        raise UserError(f"train.accumulate={accumulate} x data.batch_size={per_process_batch} x {world_size} "
                         f"process(es) = {accumulate * per_step}, not train.batch_size={batch_size}; leave "
                         "train.accumulate null to derive it")
    return accumulate
