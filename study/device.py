"""Device and precision choices, in one place for training, evaluation and benchmarks.

The paper trains and measures in mixed precision on GPUs (docs/paper.md sections 6 and 8). Here: "auto" picks
CUDA when present, else the CPU; on CUDA "auto" precision is bf16 autocast, on the CPU fp32 (bf16 autocast
on the CPU is possible but slower than fp32 on most CPUs, and no number of the paper was measured there).

**Which GPU a process uses** (:func:`resolve_process_device`, the one convention of the suite). A process
reads its place from the launcher's environment: ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``
(torchrun sets all four; so does submitit's ``TorchDistributedEnvironment().export()``). Then, with ``n`` the
GPUs this process sees (``torch.cuda.device_count()``, which honours ``CUDA_VISIBLE_DEVICES``):

- ``n >= LOCAL_WORLD_SIZE``: every process of the node sees every GPU (torchrun, srun) -> ``cuda:LOCAL_RANK``;
- ``n == 1``: each process sees its own GPU only (submitit's export sets ``CUDA_VISIBLE_DEVICES`` to the
  task's local rank) -> ``cuda:0``;
- otherwise a :class:`~study.errors.UserError` that says what the process sees.

``train.device=cuda`` (no index) and ``auto`` follow this rule; an explicit ``cuda:N`` is taken as given,
but refused with several processes per node (they would all share GPU N). :func:`init_distributed` makes the
resolved device current before it joins the process group (NCCL on CUDA, gloo otherwise), and
:func:`check_distinct_devices` refuses two processes of a node on one GPU (one GPU shown to every process).
"""
from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from typing import Mapping

import torch

from study.errors import UserError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """The device of a single-process command (eval, bench): "auto", "cpu", "cuda", "cuda:N"."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = _parse(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{name}' was asked for, but CUDA is not available on this machine; "
                        "use 'cpu' or 'auto'")
    return device


def _parse(name: str) -> torch.device:
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None


@dataclass(frozen=True)
class ProcessEnv:
    """Where this process stands in a distributed job (all 0/1 for a plain, single-process run)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ProcessEnv":
        """From torchrun's or submitit's variables (``WORLD_SIZE`` unset or 1: a plain run)."""
        env = os.environ if env is None else env
        world = _int(env, "WORLD_SIZE", "1")
        if world <= 1:
            return cls()
        for key in ("RANK", "LOCAL_RANK"):
            if key not in env:
                raise UserError(f"WORLD_SIZE={world} is set but {key} is not; launch the processes with torchrun "
                                "or submitit (both set RANK, LOCAL_RANK and LOCAL_WORLD_SIZE), or unset WORLD_SIZE")
        rank, local = _int(env, "RANK"), _int(env, "LOCAL_RANK")
        local_world = _int(env, "LOCAL_WORLD_SIZE", str(world))
        if not (0 <= rank < world and 0 <= local < local_world <= world):
            raise UserError(f"inconsistent launcher variables RANK={rank}, LOCAL_RANK={local}, "
                            f"LOCAL_WORLD_SIZE={local_world}, WORLD_SIZE={world}")
        return cls(rank, world, local, local_world)


def _int(env: Mapping[str, str], key: str, default: str | None = None) -> int:
    value = env.get(key, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"environment variable {key}={value!r} is not an integer") from None


def resolve_process_device(requested: str = "auto", env: Mapping[str, str] | None = None) -> torch.device:
    """The device of this process of a (possibly distributed) run; see the module docstring for the rule."""
    penv = ProcessEnv.from_env(env)
    env = os.environ if env is None else env
    if requested == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        requested = "cuda"
    device = _parse(requested)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise UserError(f"train.device={requested} was asked for, but CUDA is not available on this machine; "
                        "use cpu or auto")
    count = torch.cuda.device_count()
    visible = env.get("CUDA_VISIBLE_DEVICES", "<unset>")
    if device.index is not None:
        if penv.local_world_size > 1:
            raise UserError(f"train.device={requested} with {penv.local_world_size} processes per node would put "
                            "every process on the same GPU; use train.device=cuda (or auto), which gives each "
                            "process its own GPU")
        if device.index >= count:
            raise UserError(f"train.device={requested}, but this process sees {count} GPU(s) "
                            f"(CUDA_VISIBLE_DEVICES={visible}); use an index below {count}")
        return device
    if count >= penv.local_world_size:  # every GPU of the node visible to every process (torchrun)
        return torch.device("cuda", penv.local_rank)
    if count == 1:  # each process sees its own GPU (submitit's export sets CUDA_VISIBLE_DEVICES per task)
        return torch.device("cuda", 0)
    raise UserError(f"{penv.local_world_size} processes on this node, but process LOCAL_RANK={penv.local_rank} "
                    f"sees {count} GPUs (CUDA_VISIBLE_DEVICES={visible}); show each process either its own single "
                    f"GPU or all {penv.local_world_size} or more GPUs of the node")


def process_group_backend(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo otherwise (the resolved device decides, not whether CUDA exists)."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: torch.device, penv: ProcessEnv) -> None:
    """Make ``device`` this process's current CUDA device, then join the process group (world size > 1).

    The order matters: without ``set_device`` first, NCCL puts every process of a node on GPU 0.
    """
    from torch import distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not penv.distributed or dist.is_initialized():
        return
    backend = process_group_backend(device)
    if backend == "nccl":  # bound to the device: NCCL's communicator is created now, errors show at start-up
        dist.init_process_group(backend, device_id=device)
    else:
        dist.init_process_group(backend)


def check_distinct_devices(device: torch.device, penv: ProcessEnv) -> None:
    """Refuse two processes of one node on the same GPU (e.g. one GPU shown to every process); one collective."""
    from torch import distributed as dist

    if device.type != "cuda" or not penv.distributed:
        return
    mine = (socket.gethostname(), str(torch.cuda.get_device_properties(device).uuid))
    everyone = [None] * penv.world_size
    dist.all_gather_object(everyone, mine)
    shared = [r for r, other in enumerate(everyone) if other == mine and r != penv.rank]
    if shared:
        raise UserError(f"processes {penv.rank} and {shared[0]} run on the same GPU ({mine[1]} on {mine[0]}); "
                        "give each process its own GPU (CUDA_VISIBLE_DEVICES, or launch one process per GPU)")


def set_deterministic(enabled: bool, device: torch.device) -> None:
    """``train.deterministic``: bitwise-repeatable runs, on the CPU only (see study/train/config.py)."""
    if not enabled:
        return
    if device.type == "cuda":
        raise UserError("train.deterministic=true is supported on the CPU only: the point sampling of the loss "
                        "(grid_sample backward), the cross-entropy on masks (nll_loss2d) and bilinear "
                        "interpolation backward have no deterministic CUDA kernels; set "
                        "train.deterministic=false on CUDA (or train.device=cpu)")
    torch.use_deterministic_algorithms(True)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise UserError(f"unknown precision '{precision}'; choose auto, fp32, bf16 or fp16")
    if precision == "fp16" and device.type != "cuda":
        raise UserError("precision fp16 (autocast) needs CUDA; use bf16 or fp32 on the CPU")
    return precision


def dtype_of(precision: str) -> torch.dtype:
    """The tensor dtype of a resolved precision (fp32, bf16, fp16)."""
    return torch.float32 if precision == "fp32" else _DTYPES[precision]


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision ("fp32" = no autocast)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def cpu_threads(threads: int | None):
    """torch's intra-op CPU threads set to ``threads`` (None: every available core), restored afterwards.

    Yields the number in force. A benchmark records it: the same model runs several times faster or slower
    with another thread count, and other processes on the machine compete for the same cores.
    """
    n = available_cores() if threads is None else threads
    if n < 1:
        raise UserError(f"threads must be >= 1, got {n}")
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(saved)
