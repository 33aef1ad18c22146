"""``study bench``: parameters, GFLOPs and FPS of every (variant, size) combination, one JSON row each."""
from __future__ import annotations

import gc
import platform
import time
from dataclasses import replace

import torch

from study.bench.count_fake import build_meta_model
from study.bench.flops import count_flops, count_params
from study.bench.protocol import SpeedProtocol
from study.bench.runtimes import apply_mode
from study.bench.speed import build_entry, time_interleaved
from study.config import Config, check_config
from study.errors import UserError
from study.models.build import build_model
from study.paper_numbers import paper_numbers


def _modes(b) -> list[str]:
    return list(b.modes) or [""]


def _reference_index(b, labels: list[tuple[str, str]]) -> int:
    """Index of the reference row among (variant, mode) pairs of one size (``bench.reference``)."""
    if b.reference is None:
        return 0
    variant, _, mode = b.reference.partition(":")
    for i, (v, m) in enumerate(labels):
        if v == variant and (not mode or m == mode):
            return i
    raise UserError(f"bench.reference '{b.reference}' names no row; rows are "
                    + ", ".join(f"{v}:{m}" if m else v for v, m in labels))


def _count_row(cfg: Config, variant: str, size: str) -> tuple[dict, torch.nn.Module]:
    """Parameters and GFLOPs of one (variant, size), and the model (with weights when it is to be timed)."""
    b = cfg.bench
    mcfg = replace(cfg.model, variant=variant, size=size, img_size=b.img_size, checkpoint=None, pretrained=None)
    torch.manual_seed(cfg.seed)
    if b.fps or b.counter == "fvcore":
        model = build_model(mcfg)
    else:  # counting only: no weights at all (parameters on the meta device, no storage, no init)
        model = build_meta_model(lambda: build_model(mcfg))
    flops = count_flops(model, b.img_size, counter=b.counter)
    row = {
        "variant": variant, "size": size, "img_size": b.img_size,
        "num_classes": mcfg.num_classes, "num_queries": mcfg.num_queries,
        "params": count_params(model),
        # 3 decimals, as the pipeline's rows: the printed 1-decimal figure is then the count's own rounding
        # (2 decimals made 166.049 read 166.05 and print as 166.1)
        "gflops": round(flops.gflops, 3),
        "fps": None, "flop_counter": b.counter, "uncounted_ops": flops.uncounted,
        "gflops_by_module": {k: round(v / 1e9, 3) for k, v in flops.by_module.items()},
        "gflops_by_component": {k: round(v / 1e9, 3) for k, v in flops.by_component.items()},
    }
    paper = paper_numbers(variant, size, b.img_size, cfg.task, backbone=mcfg.backbone)  # study/paper_numbers.csv
    if paper is not None:
        where = f"Table {paper['table']}" + (f" ({paper['group']})" if paper["group"] else "")
        row["paper"] = {"params_m": paper["params_M"], "gflops": paper["GFLOPs"], "fps_h100": paper["FPS"],
                        "table": f"{where}: {paper['row']}"}
    return row, model


def bench_rows(cfg: Config, progress=print) -> list[dict]:
    """One row per (variant, size, mode) of ``cfg.bench``, the model configured by ``cfg.model`` otherwise.

    The rows of one size are timed together in interleaved rounds (study/bench/speed.py), every mode of
    every variant; their ratios are to the reference row of that size (``bench.reference``).
    """
    check_config(cfg)  # the load-time checks (study/config.py), for configs built in code too
    b = cfg.bench
    base = SpeedProtocol(b.device, b.precision, b.compile, b.warmup, b.iters, b.scope, b.batch, b.threads,
                         b.min_time, b.compile_mode, b.runtime, b.freezing)
    protocols = {mode: (apply_mode(mode, base) if mode else base) for mode in _modes(b)}
    rows = []
    for size in b.sizes:
        t0 = time.perf_counter()
        counted = [_count_row(cfg, variant, size) for variant in b.variants]
        if not b.fps:
            for row, model in counted:
                row.update(seconds=round(time.perf_counter() - t0, 1), host=platform.node())
                rows.append(row)
                progress(format_row(row))
            del counted
            gc.collect()
            continue
        pairs = [(row, mode) for row, _ in counted for mode in protocols]
        reference = _reference_index(b, [(row["variant"], mode) for row, mode in pairs])
        entries = [build_entry(f"{row['variant']}:{mode}" if mode else row["variant"], model, b.img_size,
                               protocols[mode], gflops=row["gflops"]) for row, model in counted for mode in protocols]
        progress(f"timing {len(entries)} rows of size {size} in interleaved rounds ({b.warmup} warm-up, "
                 f">= {b.iters} timed, >= {b.min_time:g} s per row)")
        results, warning = time_interleaved(entries, breakdown=b.breakdown, reference=reference, limit=b.limit)
        seconds = round(time.perf_counter() - t0, 1)
        group = []
        for (row, mode), result in zip(pairs, results):
            r = {**row, **result, "mode": mode or "as configured", "seconds_group": seconds,
                 "host": platform.node(), "rank_warning": warning}
            group.append(r)
            progress(format_row(r))
        rows += group
        del counted, entries
        gc.collect()
    return rows


# The parameter and GFLOPs table at the real sizes (issue 10): EoMT S/B/L/g at 640 without and with masking, L and
# g at 1280, Table 1 rows 0-3 at L 640, row 0 at S/B/g 640 and at L 1280. (variant, size, img_size) each.
REAL_SIZE_TABLE = (
    [(v, s, 640) for s in ("S", "B", "L", "g") for v in ("eomt", "eomt_masked")]
    + [("eomt", s, 1280) for s in ("L", "g")]
    + [(v, "L", 640) for v in ("vit_adapter_m2f", "sfp_m2f", "sfp_no_pixel_decoder", "single_scale")]
    + [("vit_adapter_m2f", s, 640) for s in ("S", "B", "g")] + [("vit_adapter_m2f", "L", 1280)]
)


def table_rows(cfg: Config, entries=REAL_SIZE_TABLE, progress=print) -> list[dict]:
    """:func:`bench_rows` for explicit (variant, size, img_size) entries, in one process (``cfg.bench`` gives
    everything else: counter, fps, ...)."""
    rows = []
    for variant, size, img in entries:
        one = replace(cfg, bench=replace(cfg.bench, variants=[variant], sizes=[size], img_size=img))
        rows += bench_rows(one, progress)
    return rows


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


HEADER = (f"{'variant':<22}{'size':>5}{'img':>6}{'mode':>14}{'params M':>10}{'paper':>7}{'GFLOPs':>10}{'paper':>7}"
          f"{'FPS':>9}{'ms med':>9}{'p5-p95 ms':>16}{'n':>5}{'ratio [95% CI]':>22}{'x limit':>9}")


def format_row(r: dict) -> str:
    p = r.get("paper", {})
    mode = r.get("mode") or "-"
    spread = (f"{r['ms_p5']:.1f}-{r['ms_p95']:.1f}" if r.get("ms_p5") is not None else "-")
    ratio = (f"{r['ratio']:.2f} [{r['ratio_ci'][0]:.2f}, {r['ratio_ci'][1]:.2f}]" if r.get("ratio") is not None
             else "-")
    return (f"{r['variant']:<22}{r['size']:>5}{r['img_size']:>6}{mode[:13]:>14}{r['params'] / 1e6:>10.2f}"
            f"{_fmt(p.get('params_m'), '.0f'):>7}{r['gflops']:>10.1f}{_fmt(p.get('gflops'), '.0f'):>7}"
            f"{_fmt(r.get('fps'), '.2f'):>9}{_fmt(r.get('ms_median', r.get('ms_mean')), '.1f'):>9}{spread:>16}"
            f"{_fmt(r.get('n_iters'), 'd'):>5}{ratio:>22}{_limit(r):>9}")


def _limit(r: dict) -> str:
    """The "x limit" cell; a ratio below 1 (an overstated limit, ``limit_note``) is marked "!" (explained
    below the table), so that it does not read as a result."""
    if r.get("limit_ratio") is None:
        return "-"
    return f"{r['limit_ratio']:.2f}" + ("!" if r.get("limit_note") else "")


def _name(r: dict) -> str:
    mode = r.get("mode")
    return f"{r['variant']}-{r['size']}" + (f" [{mode}]" if mode and mode != "as configured" else "")


def _component_block(rows: list[dict], key: str, title: str) -> list[str]:
    """A titled block with one line per row holding ``key``: component -> value, as 'variant-size: a 1.0, ...'."""
    split = [r for r in rows if r.get(key)]
    if key == "gflops_by_component":  # the same for every mode of a (variant, size)
        split = list({(r["variant"], r["size"], r["img_size"]): r for r in reversed(split)}.values())[::-1]
        return ["", title] + [f"  {r['variant']}-{r['size']}: " + ", ".join(f"{k} {v:.1f}" for k, v in r[key].items())
                              for r in split] if split else []
    if not split:
        return []
    return ["", title] + [f"  {_name(r)}: " + ", ".join(f"{k} {v:.1f}" for k, v in r[key].items()) for r in split]


def format_table(rows: list[dict], with_rows: bool = True) -> str:
    """The terminal table (``with_rows``: the rows too, else only what follows them), then speed ratios to
    the reference row of each size with their intervals, ranking warnings, the breakdowns and the protocol."""
    lines = [HEADER, "-" * len(HEADER)] + [format_row(r) for r in rows] if with_rows else []
    lines += _component_block(rows, "gflops_by_component", "GFLOPs by component:")
    timed = [r for r in rows if r.get("fps")]
    if timed:
        lines.append("")
        lines.append("speed relative to the reference row of the same size (FPS ratio from medians, "
                     "95% bootstrap interval over the rounds; the paper compares to row 0):")
        for size in dict.fromkeys(r["size"] for r in timed):
            same = [r for r in timed if r["size"] == size]
            ref = next((r for r in same if r.get("ratio_to") is None), same[0])
            parts = []
            for r in same:
                if r.get("ratio") is not None:
                    parts.append(f"{_name(r)} {r['ratio']:.2f}x [{r['ratio_ci'][0]:.2f}-{r['ratio_ci'][1]:.2f}]")
                else:
                    parts.append(f"{_name(r)} {r['fps'] / ref['fps']:.2f}x")
            to = same[0].get("ratio_to")
            lines.append(f"  size {size}" + (f" (to {to})" if to else "") + ": " + ", ".join(parts))
        for warning in dict.fromkeys(r["rank_warning"] for r in timed if r.get("rank_warning")):
            lines.append("  " + warning)
        limited = [r for r in timed if r.get("limit_ratio") is not None]
        if limited:
            lines.append("")
            lines.append("x limit: median forward over its matmul limit, 2 x GFLOPs x batch / the FLOP/s of a matmul "
                         "probe in the row's precision (the faster of two), timed in the same rounds, the probes of a "
                         "precision together about as long as one forward (study/bench/limit.py); 95% bootstrap "
                         "interval over the rounds:")
            for r in limited:
                lo, hi = r.get("limit_ratio_ci", [float("nan")] * 2)
                p5, p95 = r["limit_rate_p5_p95"]
                lines.append(f"  {_name(r)}: {r['limit_ratio']:.2f}x [{lo:.2f}-{hi:.2f}] of {r['limit_ms']:.1f} ms "
                             f"({r['protocol']['precision']} probe {r['limit_rate_gflops']:.0f} GFLOP/s, p5-p95 "
                             f"{p5:.0f}-{p95:.0f}; {r['limit_probe']})" + (f"; {r['limit_note']}" if r.get("limit_note") else ""))
        lines += _component_block(timed, "breakdown_ms", "time per forward by component (ms; mean over the "
                                  "same timed iterations, 'other' = measured forward minus the parts):")
        proto, env = timed[0]["protocol"], timed[0].get("env", {})
        lines.append("")
        lines.append("protocol: " + ", ".join(f"{k}={v}" for k, v in proto.items())
                     + f"; attention kernels: {timed[0]['attention_kernels']}")
        if env:
            lines.append("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    counters = sorted({r.get("flop_counter", "fvcore") for r in rows})
    lines.append("GFLOPs: fvcore convention (1 multiply-add = 1 FLOP, attention matmuls counted, batch 1, "
                 f"padded square input; counter: {', '.join(counters)}); params: all trainable parameters.")
    return "\n".join(lines)
