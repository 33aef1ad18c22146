"""Run by tests/test_train_ddp.py under torchrun: one optimiser step of the trainer on every process; rank 0
writes every process's own losses and what the trainer logs to the JSON file argv[3]."""
from __future__ import annotations

import json
import sys

from torch import distributed as dist

from study.config import load_config
from study.device import ProcessEnv, init_distributed, resolve_process_device
from study.runs import RunDir
from study.train.loop import batches, log_values, run_step, setup


def main(config: str, run_dir: str, out: str) -> None:
    cfg = load_config(config)
    env = ProcessEnv.from_env()
    device = resolve_process_device(cfg.train.device)
    init_distributed(device, env)
    tr = setup(cfg, RunDir(run_dir), env, device)
    tr.model.train()
    _, micro = next(batches(tr, 0))
    result = run_step(tr, micro)
    everyone = [None] * env.world_size
    dist.all_gather_object(everyone, dict(zip(result.names, result.values.tolist())))
    logged = log_values(tr, result)
    if tr.main:
        with open(out, "w") as f:
            json.dump({"processes": everyone, "logged": logged,
                       "find_unused_parameters": tr.ddp.find_unused_parameters}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
