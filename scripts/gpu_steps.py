"""The steps of a device run (scripts/gpu_check.sh, issue 23), one process each, so that the shell gives each
its own time limit; every step writes its part of gpu_check.json (scripts/gpu_record.py) as soon as it has it.

  environment      device, driver, clocks, CUDA, torch, TF32, SDPA switches, deformable-attention kernel
  table1_eager     the six Table 1 rows in eager bf16, cheapest first: row 0 stays loaded and each row k is
                   timed in interleaved rounds with it (study.bench.speed.time_interleaved: its ratio to row 0
                   and that ratio's bootstrap interval over paired rounds), then written, paper ratio beside;
                   the per-component breakdown is timed afterwards in its own pass, never in the timed rows
  sync_check       no host sync in the forward: torch.cuda.set_sync_debug_mode("error") (CUDA only)
  train            a few optimiser steps of EoMT at the run's size (study.train.loop: setup, run_step), time
                   per step and peak memory; scratch data and nothing else written (no checkpoint)
  table1_compiled  the same rows compiled (default torch.compile, as the paper), each paired with compiled
                   row 0, their reference; EoMT is compiled and timed alone first (its FPS is kept if row 0's
                   compile outlasts the limit), then row 0, EoMT paired with it, then the others

Attention: FlashAttention chosen through torch.nn.attention.sdpa_kernel, as the paper's FPS used
FlashAttention-2 (docs/paper.md section 8); calls with a mask, which FlashAttention does not take, may use the
memory-efficient kernel (CUDA), and the math kernel only where neither fused one applies (on the CPU: masked
calls). The kernels a profiled forward ran are in every row.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/ (gpu_record) when imported by a test
import gpu_record  # noqa: E402

# the paper's Table 1 FPS come from study/paper_numbers.csv through study.paper_numbers (one place)
ROW0 = "vit_adapter_m2f"
COMPILED_ORDER = ("vit_adapter_m2f", "eomt", "eomt_masked", "sfp_no_pixel_decoder", "single_scale", "sfp_m2f")
FIRST_ALONE = "eomt"  # compiled: timed alone before row 0 is compiled, then again paired with it


def _rounds(device: torch.device, compiled: bool) -> tuple[int, int]:
    """(warm-up, timed rounds): our choice (the paper states none); the CPU rehearsal takes the fewest."""
    if device.type != "cuda":
        return (1, 3)
    return (3, 30) if compiled else (10, 50)


def sdpa_backends(device: torch.device):
    from torch.nn.attention import SDPBackend

    # the math kernel last: taken only for a call neither fused kernel supports (the rows record what ran)
    if device.type == "cuda":
        return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def attention_choice(device: torch.device):
    from torch.nn.attention import sdpa_kernel

    try:  # the list's order as priority (torch >= 2.6); else the backends alone, in torch's own order
        return sdpa_kernel(sdpa_backends(device), set_priority=True)
    except TypeError:
        return sdpa_kernel(sdpa_backends(device))


# The rehearsal's models (size tiny): narrow heads, so that a CPU forward of row 0 takes a fraction of a second
# (with the full-width Mask2Former decoder and pixel decoder it took 10-18 s on a loaded 2-core machine); the
# real sizes use the paper's COCO panoptic setting (study/config.py defaults: 133 classes, 200 queries).
TINY = dict(num_classes=3, num_queries=5)
TINY_BASELINE = dict(hidden_dim=32, encoder_layers=2, encoder_heads=4, encoder_ffn=48, decoder_heads=4, decoder_ffn=48,
                     conv_inplane=32)


def _model_config(variant: str, size: str, img: int):
    from study.config import Config

    cfg = replace(Config().model, variant=variant, size=size, img_size=img, checkpoint=None, pretrained=None)
    if size == "tiny":
        cfg = replace(cfg, **TINY, baseline=dict(TINY_BASELINE) if variant not in ("eomt", "eomt_masked") else {})
    return cfg


def build(variant: str, size: str, img: int, device: torch.device):
    """The model with random weights, in eval mode on ``device``: initialised there (a ViT-L's initialisation
    takes seconds on the CPU, each of twelve builds), or, if building under the device fails, on the CPU and
    moved."""
    from study.models.build import build_model

    cfg = _model_config(variant, size, img)
    torch.manual_seed(0)
    try:
        with torch.device(device):
            model = build_model(cfg)
    except Exception as e:  # noqa: BLE001 - the plain way below raises what is really wrong
        print(f"{variant}: built on the CPU ({type(e).__name__}: {e})", flush=True)
        torch.manual_seed(0)
        model = build_model(cfg)
    return model.to(device).eval()


def deform_kernel(model) -> str:
    from baselines.deform_attn import MSDeformAttn

    layers = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
    if not layers:
        return "none (no deformable attention)"
    kinds = {"compiled op (torch-ms-deform-attn)" if m.compiled else "pytorch (F.grid_sample, float32)"
             for m in layers}
    return f"{' and '.join(sorted(kinds))}, {len(layers)} layers"


def tf32_state() -> dict:
    return {"matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def _smi(query: str) -> str | None:
    try:
        r = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=20)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def step_environment(a, device: torch.device) -> dict:
    from study.bench.environment import environment, sdpa_enabled

    env = {**environment(device), "tf32": tf32_state(), "sdpa_enabled": sdpa_enabled(device),
           "sdpa_chosen": [b.name for b in sdpa_backends(device)] + ["(torch.nn.attention.sdpa_kernel, in order)"],
           "deformable_attention": "pytorch (F.grid_sample, float32): model.baseline.use_compiled_deform_attn is "
                                   "off (its default); torch-ms-deform-attn "
                                   + ("installed" if importlib.util.find_spec("torch_ms_deform_attn") else "absent"),
           "gpus": torch.cuda.device_count()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(sm=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1))
        for key, query in (("driver", "driver_version"), ("clocks_now_mhz", "clocks.sm,clocks.mem"),
                           ("clocks_max_mhz", "clocks.max.sm,clocks.max.mem"), ("power_limit_w", "power.limit"),
                           ("persistence_mode", "persistence_mode"), ("temperature_c", "temperature.gpu")):
            env[key] = _smi(query)
    gpu_record.update(a.json, "environment", env)
    for k, v in env.items():
        print(f"{k}: {v}")
    return env


def _paper(variant: str, size: str, img: int) -> float | None:
    from study.paper_numbers import paper_numbers

    row = paper_numbers(variant, size, img)
    return None if row is None else row["FPS"]


_BREAKDOWN_ITERS = {True: 5, False: 2}  # (CUDA?) -> rounds of the breakdown pass: our choice


def _breakdown(model, img: int, protocol) -> dict | None:
    """The per-component time, in its own pass (a few rounds of the eager model alone, hooks on)."""
    from study.bench import speed

    p = replace(protocol, warmup=1, iters=_BREAKDOWN_ITERS[torch.device(protocol.device).type == "cuda"])
    row = speed.measure_fps(model, img, p, breakdown=True)
    return row.get("breakdown_ms")


def table1(a, device: torch.device, compiled: bool) -> None:
    """Each Table 1 row paired with row 0 (both eager, or both compiled), written as soon as it is timed."""
    from study.bench.protocol import SpeedProtocol
    from study.bench.speed import build_entry, time_interleaved
    from study.models.build import table1_rows

    key = "table1_compiled" if compiled else "table1_eager"
    rows = {v.name: v.row for v in table1_rows()}  # also proves the study.variants entry point was installed
    order = list(rows)
    if compiled:
        wanted = a.compiled_rows.split(",") if a.compiled_rows else list(COMPILED_ORDER)
        order = [ROW0] + [v for v in wanted if v != ROW0 and v in order]
        import torch._dynamo as dynamo

        for name in ("recompile_limit", "cache_size_limit"):  # six models through the same code
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, max(getattr(dynamo.config, name), 64))
    warmup, iters = _rounds(device, compiled)
    # bf16 autocast on CUDA as the paper (mixed precision); study/device.py's "auto" (fp32 on the CPU otherwise)
    proto = SpeedProtocol(device=str(device), precision="auto", compile=compiled, warmup=warmup, iters=iters,
                          threads=1 if device.type == "cpu" else None)
    paper0 = _paper(ROW0, a.size, a.img_size)
    part = {"rows": [], "reference": f"{ROW0} {'compiled' if compiled else 'eager'} bf16, timed in the same rounds "
                                     "as each row", "sdpa_chosen": [b.name for b in sdpa_backends(device)],
            "tf32": tf32_state(), "warmup": warmup, "iters": iters}
    gpu_record.update(a.json, key, part)

    def write(variant, model, results, warning, t0, index=None) -> dict:
        r = results[-1]
        paper = _paper(variant, a.size, a.img_size)
        paired = len(results) > 1 or variant == ROW0
        row = {"variant": variant, "table1_row": rows[variant],
               "fps": r["fps"], "ms_median": r["ms_median"], "ms_p5": r["ms_p5"], "ms_p95": r["ms_p95"],
               "n_iters": r["n_iters"], "ratio": r["ratio"] if paired else None,
               "ratio_ci": r["ratio_ci"] if paired else None,
               "reference_fps_same_rounds": results[0]["fps"] if paired else None, "rank_warning": warning,
               "paper_fps_h100": paper, "paper_ratio": paper / paper0 if paper and paper0 else None,
               "attention_kernels": r["attention_kernels"], "deformable_attention": deform_kernel(model),
               "compile": r["env"]["compile_mode"], "precision": r["env"]["precision"],
               "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}
        row["ratio_over_paper"] = row["ratio"] / row["paper_ratio"] if row["paper_ratio"] and paired else None
        if not compiled:
            row["breakdown_ms"] = _breakdown(model, a.img_size, proto)
            row["breakdown_of"] = ("its own pass after the timed rounds (hooks on, 1 warm-up and "
                                   f"{_BREAKDOWN_ITERS[device.type == 'cuda']} rounds), not the timed rows")
        if not paired:
            row["ratio_note"] = "timed alone first; its ratio follows once compiled row 0 is timed with it"
        row["seconds"] = round(time.perf_counter() - t0, 1)
        if index is None:
            part["rows"].append(row)
        else:  # the row timed alone before, now paired with row 0: its first figure kept beside
            row["fps_alone"] = part["rows"][index]["fps"]
            part["rows"][index] = row
        part["environment"] = r["env"]
        gpu_record.update(a.json, key, part)
        ratio = f"{row['ratio']:.2f}x row 0 [{row['ratio_ci'][0]:.2f}, {row['ratio_ci'][1]:.2f}]" if paired else \
            "(alone; ratio to follow)"
        paper_txt = f"paper {row['paper_ratio']:.2f}x" if row["paper_ratio"] else "paper -"
        print(f"{variant:<22} {row['fps']:9.2f} FPS  {ratio}  {paper_txt}  ({row['seconds']} s)", flush=True)
        return row

    failed_alone = []
    with attention_choice(device):
        early = {}  # variant -> (model, entry, index in part["rows"])
        if compiled and FIRST_ALONE in order:
            # the headline row first, timed alone: its FPS (the paper prints 128 on an H100) survives a compile of
            # row 0 that outlasts the step's limit
            t0 = time.perf_counter()
            try:
                model = build(FIRST_ALONE, a.size, a.img_size, device)
                entry = build_entry(FIRST_ALONE, model, a.img_size, proto)
                results, _ = time_interleaved([entry], breakdown=False)
                write(FIRST_ALONE, model, results, None, t0)
                early[FIRST_ALONE] = (model, entry, len(part["rows"]) - 1)
            except Exception as e:  # noqa: BLE001 - recorded; row 0 and the others still run
                traceback.print_exc()
                part["rows"].append({"variant": FIRST_ALONE, "table1_row": rows[FIRST_ALONE],
                                     "error": f"{type(e).__name__}: {e}"[:2000],
                                     "seconds": round(time.perf_counter() - t0, 1)})
                gpu_record.update(a.json, key, part)
                order = [v for v in order if v != FIRST_ALONE]
                failed_alone = [FIRST_ALONE]
        ref_model = build(ROW0, a.size, a.img_size, device)
        ref_entry = build_entry(f"{ROW0}:{key}", ref_model, a.img_size, proto)
        failed = list(failed_alone)
        for variant in order:
            t0 = time.perf_counter()
            index, model, entries = None, None, None
            try:
                if variant == ROW0:
                    model, entries = ref_model, [ref_entry]
                elif variant in early:
                    model, entry, index = early.pop(variant)
                    entries = [ref_entry, entry]
                else:
                    model = build(variant, a.size, a.img_size, device)
                    entries = [ref_entry, build_entry(variant, model, a.img_size, proto)]
                results, warning = time_interleaved(entries, breakdown=False, reference=0)
                write(variant, model, results, warning, t0, index)
            except Exception as e:  # noqa: BLE001 - one row's failure is recorded; the other rows still run
                if variant == ROW0:
                    raise  # the reference of every other row
                traceback.print_exc()
                failed.append(variant)
                row = {"variant": variant, "table1_row": rows[variant], "error": f"{type(e).__name__}: {e}"[:2000],
                       "seconds": round(time.perf_counter() - t0, 1)}
                if index is None:
                    part["rows"].append(row)
                else:
                    part["rows"][index] = row
                gpu_record.update(a.json, key, part)
            if model is not None and model is not ref_model:
                del model, entries
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if failed:
        raise SystemExit(f"{key}: rows failed: {', '.join(failed)} (their errors are in the record)")


def step_sync(a, device: torch.device) -> None:
    """The forwards of EoMT (masked, unmasked, training mode) and of row 0 with host syncs made errors."""
    from study.device import autocast, resolve_precision

    checks, syncs = [], []
    for variant, mode in (("eomt", "eval"), ("eomt_masked", "eval"), ("eomt", "train"), (ROW0, "eval")):
        model = build(variant, "tiny", 64, device).train(mode == "train")
        if mode == "train":
            model.set_mask_probs([0.5] * model.num_masked_layers)
        x = torch.rand(1, 3, 64, 64, device=device)
        with torch.no_grad(), autocast(device, resolve_precision("auto", device)), attention_choice(device):
            model(x)  # the first call builds and caches the per-shape constants
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    model(x)
                    verdict = "no host sync in the forward"
                except RuntimeError as e:  # the sync that was made an error: recorded, the other checks still run
                    verdict = f"HOST SYNC: {e}"[:1000]
                    syncs.append(f"{variant} {mode}")
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            else:
                model(x)
                verdict = "forward ran; syncs not checked (set_sync_debug_mode is CUDA only; tests/test_host_syncs.py)"
        checks.append({"variant": variant, "mode": mode, "result": verdict})
        print(f"{variant} {mode}: {verdict}", flush=True)
    gpu_record.update(a.json, "sync_check", {"size": "tiny", "img_size": 64, "checks": checks})
    if syncs:
        raise SystemExit(f"sync_check: a host sync in the forward of {', '.join(syncs)}")


def step_train(a, device: torch.device) -> None:
    """A few optimiser steps of EoMT at the run's size on the synthetic set: seconds per step, peak memory."""
    from study.config import Config, load_config
    from study.device import ProcessEnv
    from study.runs import RunDir
    from study.train.loop import batches, log_values, run_step, setup

    os.environ.setdefault("STUDY_CACHE", str(Path(a.scratch) / "cache"))  # the synthetic data, not $OUT
    tiny = a.size == "tiny"  # the rehearsal: 3 steps of 2 images, quickstart's 2048 points
    steps, batch = (min(a.train_steps, 3), 2) if tiny else (a.train_steps, a.train_batch)
    sets = [f"model.size={a.size}", f"model.img_size={a.img_size}", f"train.device={device}",
            "train.precision=auto", f"data.batch_size={batch}", f"train.batch_size={batch}", "train.max_steps=1000",
            "train.tensorboard=false", "data.synthetic_train_images=16", "data.synthetic_val_images=4",
            "data.num_workers=2"] + ([] if tiny else [f"train.num_points={Config().train.num_points}"])
    cfg = load_config("experiments/quickstart.yaml", sets)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with attention_choice(device):
        tr = setup(cfg, RunDir(Path(a.scratch) / "train"), ProcessEnv(), device)
        setup_s = time.perf_counter() - t0
        rec = {"variant": "eomt", "size": a.size, "img_size": a.img_size, "batch": batch,
               "precision": tr.precision, "num_points": cfg.train.num_points, "setup_s": round(setup_s, 1),
               "steps": [], "sdpa_chosen": [b.name for b in sdpa_backends(device)], "checkpoints": "none written"}
        for _, micro in batches(tr, 0):
            if tr.step >= steps:
                break
            s0 = time.perf_counter()
            result = run_step(tr, micro)
            values = log_values(tr, result)  # the step's one host sync
            rec["steps"].append({"step": tr.step, "seconds": round(time.perf_counter() - s0, 3),
                                 "loss": values["loss"], "grad_norm": values["grad_norm"],
                                 "p_mask": result.probs[:1]})
            if device.type == "cuda":
                rec["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                rec["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
            else:
                import resource

                rec["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
            gpu_record.update(a.json, "train", rec)
            print(f"step {tr.step}: {rec['steps'][-1]['seconds']} s, loss {values['loss']:.3f}", flush=True)
    later = [s["seconds"] for s in rec["steps"][1:]]
    rec["seconds_per_step_after_first"] = round(sum(later) / len(later), 3) if later else None
    gpu_record.update(a.json, "train", rec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("step", choices=["environment", "table1_eager", "sync_check", "train", "table1_compiled"])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", default="L")
    p.add_argument("--img-size", type=int, default=640)
    p.add_argument("--scratch", default=os.environ.get("SCRATCH", "/tmp/gpu_check_scratch"))
    p.add_argument("--compiled-rows", default="", help="comma-separated variants (row 0 is always first)")
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--train-batch", type=int, default=4)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cpu":  # the rehearsal (no figure of it is a measurement): one thread, no oversubscription
        torch.set_num_threads(1)
    if a.step == "environment":
        step_environment(a, device)
    elif a.step in ("table1_eager", "table1_compiled"):
        table1(a, device, compiled=a.step == "table1_compiled")
    elif a.step == "sync_check":
        step_sync(a, device)
    else:
        step_train(a, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
