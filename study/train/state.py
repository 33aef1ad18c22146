"""The trainer's state on disk: ``checkpoints/last.pt`` (everything a bitwise resume needs) and the final
weights. One place saves (:func:`save_state`), one place restores (:func:`restore_state`).

``last.pt`` holds model, optimiser, lr schedule, gradient scaler, step and the random states of every process
(``rng``, one entry per rank, each with that rank's own CUDA generator only: a resume under a launcher that
shows each process a different set of GPUs still restores the right generator). It is read memory-mapped
(``torch.load(mmap=True)``): every process maps the same file instead of copying model and AdamW state into
its own RAM (about 13 GB per process for ViT-g).
"""
from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import distributed as dist

from study.errors import UserError
from study.io import atomic_torch_save

if TYPE_CHECKING:
    from study.train.trainer import Trainer


def rng_state(device: torch.device) -> dict:
    """Every random state of this process, as plain types and tensors (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)  # this process's own GPU, not every visible one
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if device.type == "cuda" and isinstance(cuda, list):  # written by an older version: every visible GPU's
        cuda = cuda[device.index] if device.index is not None and device.index < len(cuda) else None
    if device.type == "cuda" and cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def load_checkpoint(path: Path) -> dict:
    """``last.pt``, memory-mapped (tensors stay in the page cache, shared by every process of a node)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:  # code inside: never loaded, and no advice to lift weights_only
        raise UserError(f"checkpoint {path} holds Python objects besides tensors ({str(e).splitlines()[0]}); "
                        f"it was not written by study train; remove it to train from the start") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} is damaged ({path.stat().st_size} bytes: {first}); remove it to "
                        f"train from the start") from None


def restore_state(tr: "Trainer") -> bool:
    """Resume ``tr`` from its run's ``last.pt`` if there is one; returns whether it did."""
    path = tr.run.last_checkpoint
    if not path.is_file():
        return False
    ckpt = load_checkpoint(path)
    world = tr.env.world_size
    if len(ckpt["rng"]) != world:
        raise UserError(f"{path} was written by {len(ckpt['rng'])} process(es); resume it with the same number "
                        f"(this launch has {world}) so that the data order stays the same")
    tr.model.load_state_dict(ckpt["model"])
    tr.optimizer.load_state_dict(ckpt["optimizer"])
    tr.scheduler.load_state_dict(ckpt["scheduler"])
    tr.scaler.load_state_dict(ckpt["scaler"])
    tr.step = ckpt["step"]
    set_rng_state(ckpt["rng"][tr.env.rank], tr.device)
    return True


def save_state(tr: "Trainer", final: bool) -> None:
    """Write ``last.pt`` (and, at the end, the final weights) from rank 0, with every rank's random state."""
    mine = rng_state(tr.device)
    if tr.env.distributed:
        rngs = [None] * tr.env.world_size
        dist.all_gather_object(rngs, mine)
    else:
        rngs = [mine]
    if tr.main:
        atomic_torch_save({"model": tr.model.state_dict(), "optimizer": tr.optimizer.state_dict(),
                           "scheduler": tr.scheduler.state_dict(), "scaler": tr.scaler.state_dict(),
                           "step": tr.step, "rng": rngs}, tr.run.last_checkpoint)
        if final:
            atomic_torch_save(tr.model.state_dict(), tr.run.final_weights)
    if tr.env.distributed:
        dist.barrier()
