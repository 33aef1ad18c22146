"""``study bench``: parameters, GFLOPs and FPS of every (variant, size) combination, one JSON row each."""
from __future__ import annotations

import gc
import platform
import time
from dataclasses import replace

import torch

from study.bench.count_fake import build_meta_model
from study.bench.flops import count_flops, count_params
from study.bench.speed import SpeedProtocol, component_breakdown, measure_fps
from study.config import Config
from study.models.backbone import check_size
from study.models.build import build_model, check_variant
from study.paper_numbers import paper_numbers


def check_bench(cfg: Config) -> None:
    """Reject unknown variants or sizes and a bad input size before anything runs."""
    b = cfg.bench
    for v in b.variants:
        check_variant(v)
    for s in b.sizes:
        check_size(s)
    if b.img_size % cfg.model.patch_size:
        raise ValueError(f"--img-size {b.img_size} is not divisible by the patch size {cfg.model.patch_size}")


def bench_rows(cfg: Config, progress=print) -> list[dict]:
    """One row per (variant, size) of ``cfg.bench``, the model configured by ``cfg.model`` otherwise."""
    check_bench(cfg)
    b = cfg.bench
    protocol = SpeedProtocol(b.device, b.precision, b.compile, b.warmup, b.iters, b.scope)
    rows = []
    for size in b.sizes:
        for variant in b.variants:
            t0 = time.perf_counter()
            mcfg = replace(cfg.model, variant=variant, size=size, img_size=b.img_size, checkpoint=None,
                           pretrained=None)
            torch.manual_seed(cfg.seed)
            if b.fps or b.counter == "fvcore":
                model = build_model(mcfg)
            else:  # counting only: no weights at all (parameters on the meta device, no storage, no init)
                model = build_meta_model(lambda: build_model(mcfg))
            flops = count_flops(model, b.img_size, counter=b.counter)
            row = {
                "variant": variant, "size": size, "img_size": b.img_size,
                "num_classes": mcfg.num_classes, "num_queries": mcfg.num_queries,
                "params": count_params(model), "gflops": round(flops.gflops, 2),
                "fps": None, "flop_counter": b.counter, "uncounted_ops": flops.uncounted,
                "gflops_by_module": {k: round(v / 1e9, 3) for k, v in flops.by_module.items()},
                "gflops_by_component": {k: round(v / 1e9, 3) for k, v in flops.by_component.items()},
            }
            paper = paper_numbers(variant, size, b.img_size, cfg.task)  # study/paper_numbers.csv
            if paper is not None:
                where = f"Table {paper['table']}" + (f" ({paper['group']})" if paper["group"] else "")
                row["paper"] = {"params_m": paper["params_M"], "gflops": paper["GFLOPs"], "fps_h100": paper["FPS"],
                                "table": f"{where}: {paper['row']}"}
            if b.fps:
                row.update(measure_fps(model, b.img_size, protocol))
                if b.breakdown:
                    row["breakdown_ms"] = component_breakdown(model, b.img_size, protocol)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            row["host"] = platform.node()
            rows.append(row)
            progress(format_row(row))
            del model
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


HEADER = (f"{'variant':<22}{'size':>5}{'img':>6}{'params M':>10}{'paper':>7}{'GFLOPs':>10}{'paper':>7}"
          f"{'FPS':>9}{'ms':>9}")


def format_row(r: dict) -> str:
    p = r.get("paper", {})
    return (f"{r['variant']:<22}{r['size']:>5}{r['img_size']:>6}{r['params'] / 1e6:>10.2f}"
            f"{_fmt(p.get('params_m'), '.0f'):>7}{r['gflops']:>10.1f}{_fmt(p.get('gflops'), '.0f'):>7}"
            f"{_fmt(r.get('fps'), '.2f'):>9}{_fmt(r.get('ms_mean'), '.1f'):>9}")


def _component_block(rows: list[dict], key: str, title: str) -> list[str]:
    """A titled block with one line per row holding ``key``: component -> value, as 'variant-size: a 1.0, ...'."""
    split = [r for r in rows if r.get(key)]
    if not split:
        return []
    return ["", title] + [f"  {r['variant']}-{r['size']}: " + ", ".join(f"{k} {v:.1f}" for k, v in r[key].items())
                          for r in split]


def format_table(rows: list[dict], with_rows: bool = True) -> str:
    """The terminal table (``with_rows``: the rows too, else only what follows them), then speed ratios to
    the first variant of each size, the breakdowns and the protocol."""
    lines = [HEADER, "-" * len(HEADER)] + [format_row(r) for r in rows] if with_rows else []
    lines += _component_block(rows, "gflops_by_component", "GFLOPs by component:")
    timed = [r for r in rows if r.get("fps")]
    if timed:
        lines.append("")
        lines.append("speed relative to the first variant of the same size (the paper compares to row 0):")
        for size in dict.fromkeys(r["size"] for r in timed):
            same = [r for r in timed if r["size"] == size]
            ref = same[0]
            lines.append("  " + ", ".join(f"{r['variant']} {r['fps'] / ref['fps']:.2f}x" for r in same)
                         + f"  (size {size})")
        lines += _component_block(timed, "breakdown_ms", "time per forward by component (ms):")
        proto = timed[0]["protocol"]
        lines.append("")
        lines.append("protocol: " + ", ".join(f"{k}={v}" for k, v in proto.items())
                     + f"; attention kernels: {timed[0]['attention_kernels']}")
    counters = sorted({r.get("flop_counter", "fvcore") for r in rows})
    lines.append("GFLOPs: fvcore convention (1 multiply-add = 1 FLOP, attention matmuls counted, batch 1, "
                 f"padded square input; counter: {', '.join(counters)}); params: all trainable parameters.")
    return "\n".join(lines)
