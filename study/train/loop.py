"""One trainer for every variant: ``train(cfg)`` runs or resumes the run folder of a configuration.

The loop is short and visible: per optimiser step, set the masking probabilities (mask annealing), run
``accumulate`` micro-batches (forward under autocast, loss in float32, backward), clip, step the optimiser
and the lr schedule, log; checkpoint every ``train.checkpoint_every`` steps and at the end.

Resuming restores model, optimiser, lr schedule, gradient scaler, step, the random states of every process
and the data order (the sampler and the augmentation are pure functions of seed, epoch and position), so on
the CPU in deterministic mode a resumed run ends bitwise identical to an uninterrupted one.
"""
from __future__ import annotations

import csv
import os
import random
import time
from contextlib import nullcontext

import numpy as np
import torch
from torch import distributed as dist
from torch.utils.data import DataLoader, Sampler

from study.config import Config
from study.device import autocast, resolve_device, resolve_precision
from study.io import atomic_torch_save
from study.runs import RunDir


class ShardedSampler(Sampler):
    """Each process takes every ``world``-th index of a seeded permutation of the epoch, from ``start`` on.

    The order depends only on (seed, epoch), so a resumed run reads the same samples in the same order.
    The tail that does not fill a whole round of processes is dropped, as DistributedSampler(drop_last=True).
    """

    def __init__(self, size: int, rank: int = 0, world: int = 1, seed: int = 0):
        self.size, self.rank, self.world, self.seed = size, rank, world, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.size // self.world - self.start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=g)[: self.size // self.world * self.world]
        return iter(order[self.rank::self.world][self.start:].tolist())


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's or submitit's environment; joins the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, 0
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"  # gloo on the CPU
        dist.init_process_group(backend)
    return rank, world, local


def _rng_state() -> dict:
    """Every random state of this process, as plain types and tensors (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(cfg: Config, run: RunDir | None = None) -> RunDir:
    """Train (or resume, or skip when finished) the run of ``cfg``; returns its folder."""
    from study.data import build_dataset
    from study.data.transforms import AugmentedDataset, TrainTransform, collate
    from study.models.build import build_model
    from study.train.loss import build_loss
    from study.train.optim import accumulation_steps, build_optimizer, clip_gradients
    from study.train.schedules import build_lr_scheduler, build_mask_annealing

    t = cfg.train
    run = run or RunDir.for_config(cfg)
    rank, world, local = _distributed()
    main = rank == 0
    if main:
        run.claim(cfg)  # the folder must belong to this very configuration
    if run.status().get("state") == "finished":
        if main:
            print(f"study train: {run.path} is finished already; nothing to do")
        return run
    device = resolve_device(t.device if world == 1 or t.device != "auto" else
                            ("cuda:%d" % local if torch.cuda.is_available() else "cpu"))
    precision = resolve_precision(t.precision, device)
    if t.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    _seed(cfg.seed + rank)

    dataset = build_dataset(cfg.data, cfg.data.train_split, cfg.task)
    if dataset.info.num_classes != cfg.model.num_classes:
        raise ValueError(f"model.num_classes={cfg.model.num_classes} but the {cfg.data.dataset} data set has "
                         f"{dataset.info.num_classes} classes; set model.num_classes={dataset.info.num_classes}")
    augmented = AugmentedDataset(dataset, TrainTransform.from_config(cfg.data, cfg.task, cfg.model.img_size),
                                 seed=cfg.seed)
    sampler = ShardedSampler(len(augmented), rank, world, cfg.seed)
    per_process = cfg.data.batch_size
    accumulate = accumulation_steps(t.batch_size, per_process, world, t.accumulate)
    steps_per_epoch = (len(augmented) // world) // (per_process * accumulate)
    if steps_per_epoch < 1:
        raise ValueError(f"the training split has {len(augmented)} images: too few for one step of "
                         f"{per_process * accumulate * world} images (train.batch_size)")
    total = t.total_steps(steps_per_epoch)

    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    model = build_model(cfg.model).to(device)
    _seed(cfg.seed + rank)
    optimizer = build_optimizer(model, t)
    scheduler = build_lr_scheduler(optimizer, t, total)
    annealing = build_mask_annealing(t, total, model.num_masked_layers, model.masked_inference)
    criterion = build_loss(t, cfg.model.num_classes)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    step = 0
    if run.last_checkpoint.is_file():  # resume
        ckpt = torch.load(run.last_checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]
        if len(ckpt["rng"]) != world:
            raise ValueError(f"{run.last_checkpoint} was written by {len(ckpt['rng'])} process(es); resume it with "
                             f"the same number (this launch has {world}) so the data order stays the same")
        _set_rng_state(ckpt["rng"][rank])
        if main:
            print(f"study train: resuming {run.path} at step {step} of {total}")
    net = model
    if world > 1:
        if device.type == "cuda":  # the ViT-Adapter's BatchNorm pools statistics over processes, as the reference
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # (SyncBatchNorm needs a GPU)
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[local] if device.type == "cuda" else None)
    forward = torch.compile(net) if t.compile else net

    def batches(start: int):
        epoch, within = divmod(start, steps_per_epoch)
        while True:
            sampler.set_epoch(epoch, start=within * accumulate * per_process)
            augmented.set_epoch(epoch)
            # Its own generator: a DataLoader iterator otherwise draws its base seed from the global RNG,
            # which would shift every later random draw depending on where an epoch's iterator was made.
            loader = DataLoader(augmented, per_process, sampler=sampler, collate_fn=collate, drop_last=True,
                                num_workers=cfg.data.num_workers,
                                generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
            it = iter(loader)
            for _ in range(steps_per_epoch - within):
                yield epoch, [next(it) for _ in range(accumulate)]
            epoch, within = epoch + 1, 0

    def save(final: bool) -> None:
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, _rng_state())
        else:
            rngs = [_rng_state()]
        if main:
            atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "step": step,
                               "rng": rngs}, run.last_checkpoint)
            if final:
                atomic_torch_save(model.state_dict(), run.final_weights)
        if world > 1:
            dist.barrier()

    logger = _Logger(run, step, main, t.tensorboard)
    from tqdm import tqdm

    bar = tqdm(total=total, initial=step, disable=not main, desc=f"train {run.path.name}", dynamic_ncols=True)
    if main:
        run.write_status("running", step=step, total_steps=total, world_size=world)
    model.train()
    started, images_seen, row = time.perf_counter(), 0, {}
    try:
        for epoch, micro in batches(step):
            if step >= total:
                break
            probs = annealing.apply(model, step) if annealing is not None else model.attn_mask_probs.tolist()
            parts = {}
            for i, (images, targets) in enumerate(micro):
                sync = net.no_sync() if world > 1 and i < accumulate - 1 else nullcontext()
                with sync:
                    with autocast(device, precision):
                        sets = forward(images.to(device, non_blocking=True))
                    loss, parts = criterion(sets, [{k: v.to(device) for k, v in tg.items()} for tg in targets])
                    scaler.scale(loss / accumulate).backward()
                images_seen += images.shape[0] * world
            scaler.unscale_(optimizer)
            grad_norm = clip_gradients(optimizer, t.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
            row = {"step": step, "epoch": epoch, "loss": loss.item(), "grad_norm": float(grad_norm),
                   "lr": max(lrs.values()), "lr_backbone_top": max((g["lr"] for g in optimizer.param_groups
                                                                   if g["backbone"]), default=0.0),
                   "mask_prob_mean": float(np.mean(probs)) if len(probs) else 0.0,
                   "images_per_s": images_seen / (time.perf_counter() - started),
                   **{k: v.item() for k, v in parts.items() if "_" not in k.removeprefix("loss_")}}
            logger.log(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}")
            bar.update(1)
            if step % t.checkpoint_every == 0 or step == total:
                save(final=step == total)
                if main:
                    run.write_status("running", step=step, total_steps=total, world_size=world)
    except Exception as e:
        if main:
            run.write_status("failed", step=step, total_steps=total, error=f"{type(e).__name__}: {e}")
        raise
    except BaseException as e:  # SystemExit (a job's time limit or pre-emption, requeued) or Ctrl-C: resumable
        if main:
            run.write_status("interrupted", step=step, total_steps=total, reason=type(e).__name__)
        raise
    finally:
        bar.close()
        logger.close()
    if main:
        seconds = time.perf_counter() - started
        run.update_metrics(train={"steps": total, "final_loss": row.get("loss"),
                                  "images_per_s": images_seen / seconds if seconds else None,
                                  "world_size": world, "precision": precision, "device": str(device)})
        run.write_status("finished", step=step, total_steps=total, world_size=world)
    return run


class _Logger:
    """CSV (and TensorBoard) per-step log; on resume, rows after the checkpoint's step are dropped."""

    def __init__(self, run: RunDir, step: int, main: bool, tensorboard: bool):
        self.main, self.csv, self.tb, self.fields = main, None, None, None
        if not main:
            return
        path = run.csv_log
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.is_file():
            with open(path) as f:
                kept = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        self.rows = kept
        self._path = path
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run.tb_dir), purge_step=step + 1 if step else None)

    def log(self, row: dict) -> None:
        if not self.main:
            return
        self.rows.append(row)
        if self.fields is None:
            self.fields = list(row)
            with open(self._path, "w", newline="") as f:  # rewrite once: drops rows past a resumed step
                w = csv.DictWriter(f, self.fields, extrasaction="ignore")
                w.writeheader()
                w.writerows(self.rows)
        else:
            with open(self._path, "a", newline="") as f:
                csv.DictWriter(f, self.fields, extrasaction="ignore").writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
