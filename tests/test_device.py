"""Which device each process uses, simulated on the CPU for every launcher: plain runs, torchrun on one and
two nodes, and submitit tasks (local and Slurm) whose environment is set by submitit's own export().
torch.cuda is replaced by a node with PHYSICAL GPUs that honours CUDA_VISIBLE_DEVICES as the driver does."""
from __future__ import annotations

import pytest
import torch
from torch import distributed as dist

from study import device as dev
from study.device import (ProcessEnv, check_distinct_devices, init_distributed, process_group_backend,
                          resolve_process_device, set_deterministic)
from study.errors import UserError

PHYSICAL = 4
LAUNCH_VARS = ["WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "CUDA_VISIBLE_DEVICES", "SUBMITIT_EXECUTOR"]


@pytest.fixture
def node(monkeypatch):
    """A node with PHYSICAL GPUs; torch.cuda.device_count() reads CUDA_VISIBLE_DEVICES at call time."""
    import os

    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)  # also restores whatever a test (or submitit) sets

    def count():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is None:
            return PHYSICAL
        ids = [v for v in visible.split(",") if v.strip()]
        return len([i for i in ids if int(i) < PHYSICAL])

    monkeypatch.setattr(torch.cuda, "device_count", count)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count() > 0)
    return monkeypatch


def launch(monkeypatch, **env):
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))


def cuda(i):
    return torch.device("cuda", i)


def test_plain_run(node):
    assert resolve_process_device("auto") == cuda(0)
    assert resolve_process_device("cuda") == cuda(0)
    assert resolve_process_device("cuda:2") == cuda(2)
    assert resolve_process_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="cuda:7.*sees 4 GPU"):
        resolve_process_device("cuda:7")
    with pytest.raises(UserError, match="unknown device 'gpu'"):
        resolve_process_device("gpu")
    launch(node, CUDA_VISIBLE_DEVICES="")  # no GPU visible: auto is the CPU, cuda a clear error
    assert resolve_process_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="CUDA is not available"):
        resolve_process_device("cuda")


@pytest.mark.parametrize("requested", ["auto", "cuda"])
def test_torchrun_one_node_gives_each_rank_its_gpu(node, requested):
    for local in range(4):  # torchrun --nproc_per_node=4: every GPU visible to every process
        launch(node, WORLD_SIZE=4, RANK=local, LOCAL_RANK=local, LOCAL_WORLD_SIZE=4)
        assert resolve_process_device(requested) == cuda(local)


def test_torchrun_two_nodes(node):
    for rank in range(4):  # 2 nodes x 2 GPUs of the node's 4, shown through CUDA_VISIBLE_DEVICES
        launch(node, WORLD_SIZE=4, RANK=rank, LOCAL_RANK=rank % 2, LOCAL_WORLD_SIZE=2, CUDA_VISIBLE_DEVICES="2,3")
        assert resolve_process_device("cuda") == cuda(rank % 2)


def test_explicit_index_with_several_processes_is_refused(node):
    launch(node, WORLD_SIZE=2, RANK=1, LOCAL_RANK=1, LOCAL_WORLD_SIZE=2)
    with pytest.raises(UserError, match="train.device=cuda:0 with 2 processes per node"):
        resolve_process_device("cuda:0")
    # one process per node (e.g. 2 nodes x 1 GPU): an explicit index is fine
    launch(node, WORLD_SIZE=2, RANK=1, LOCAL_RANK=0, LOCAL_WORLD_SIZE=1)
    assert resolve_process_device("cuda:1") == cuda(1)


def test_too_few_gpus_for_the_processes_of_a_node(node):
    for local in range(4):
        launch(node, WORLD_SIZE=4, RANK=local, LOCAL_RANK=local, LOCAL_WORLD_SIZE=4, CUDA_VISIBLE_DEVICES="0,1")
        with pytest.raises(UserError, match="4 processes on this node.*sees 2 GPUs.*CUDA_VISIBLE_DEVICES=0,1"):
            resolve_process_device("auto")


def test_missing_launcher_variables(node):
    launch(node, WORLD_SIZE=2, RANK=0)
    with pytest.raises(UserError, match="WORLD_SIZE=2 is set but LOCAL_RANK is not"):
        resolve_process_device("cpu")
    launch(node, WORLD_SIZE=2, RANK=3, LOCAL_RANK=0)
    with pytest.raises(UserError, match="inconsistent"):
        ProcessEnv.from_env()


def _submitit_local_task(node, k: int, ntasks: int, visible: str) -> None:
    """The environment submitit's local controller gives task k (submitit/local/local.py)."""
    launch(node, SUBMITIT_EXECUTOR="local", SUBMITIT_LOCAL_JOB_ID=4242, SUBMITIT_LOCAL_NTASKS=ntasks,
           SUBMITIT_LOCAL_JOB_NUM_NODES=1, SUBMITIT_LOCAL_NODEID=0, SUBMITIT_LOCAL_GLOBALID=k,
           SUBMITIT_LOCAL_LOCALID=k, CUDA_VISIBLE_DEVICES=visible)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        node.delenv(key, raising=False)  # a fresh task process: export() refuses variables already set


@pytest.mark.parametrize("set_visible", [True, False])
def test_submitit_local_tasks(node, set_visible):
    import submitit

    for k in range(2):
        _submitit_local_task(node, k, ntasks=2, visible="0,1")
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=set_visible)
        env = ProcessEnv.from_env()
        assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (k, 2, k, 2)
        # export() shows task k GPU k only (then it is cuda:0 of the task), or keeps both visible (cuda:k)
        assert resolve_process_device("auto") == (cuda(0) if set_visible else cuda(k))
        assert resolve_process_device("cuda") == (cuda(0) if set_visible else cuda(k))


def test_submitit_slurm_tasks_two_nodes(node):
    import submitit

    for rank in range(4):
        launch(node, SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID=77, SLURM_NTASKS=4, SLURM_JOB_NUM_NODES=2,
               SLURM_NODEID=rank // 2, SLURM_JOB_NODELIST="gpu[1-2]", SLURM_PROCID=rank, SLURM_LOCALID=rank % 2,
               CUDA_VISIBLE_DEVICES="0,1")
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            node.delenv(key, raising=False)
        submitit.helpers.TorchDistributedEnvironment().export()
        assert ProcessEnv.from_env().local_world_size == 2
        assert resolve_process_device("cuda") == cuda(0)  # each task sees its own GPU


@pytest.fixture
def recorded(node):
    calls = []
    node.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
    node.setattr(dist, "is_initialized", lambda: False)
    node.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(("init", backend, kw)))
    return calls


def test_set_device_comes_before_the_process_group(recorded):
    for local in range(2):
        recorded.clear()
        init_distributed(cuda(local), ProcessEnv(local, 2, local, 2))
        assert recorded[0] == ("set_device", cuda(local))
        assert recorded[1][:2] == ("init", "nccl") and recorded[1][2]["device_id"] == cuda(local)


def test_backend_follows_the_resolved_device_not_the_machine(recorded):
    assert torch.cuda.is_available()  # the simulated node has GPUs, but this run asked for the CPU
    init_distributed(torch.device("cpu"), ProcessEnv(0, 2, 0, 2))
    assert recorded == [("init", "gloo", {})]
    assert process_group_backend(cuda(1)) == "nccl" and process_group_backend(torch.device("cpu")) == "gloo"
    recorded.clear()
    init_distributed(torch.device("cpu"), ProcessEnv())  # single process: no process group
    assert recorded == []


def _gpus_of(monkeypatch, uuids: list[str], rank: int):
    class Props:
        uuid = uuids[rank]

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: Props())

    def gather(out, obj):
        out[:] = [(obj[0], u) for u in uuids]

    monkeypatch.setattr(dist, "all_gather_object", gather)


def test_two_processes_on_one_gpu_are_refused(node):
    _gpus_of(node, ["GPU-a", "GPU-b"], rank=1)
    check_distinct_devices(cuda(0), ProcessEnv(1, 2, 1, 2))  # distinct GPUs: fine
    _gpus_of(node, ["GPU-a", "GPU-a"], rank=1)  # e.g. torchrun --nproc_per_node=2 on a one-GPU machine
    with pytest.raises(UserError, match="processes 1 and 0 run on the same GPU"):
        check_distinct_devices(cuda(0), ProcessEnv(1, 2, 1, 2))


def test_deterministic_is_refused_on_cuda(node):
    with pytest.raises(UserError, match="train.deterministic=true.*grid_sample.*nll_loss2d"):
        set_deterministic(True, cuda(0))
    set_deterministic(False, cuda(0))  # off: nothing to refuse
    assert dev.resolve_precision("auto", cuda(0)) == "bf16"
