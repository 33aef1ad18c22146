"""One-line and one-table summaries of ``make study`` (scripts/main_study.py): a run's numbers, the count table
of the real-size models beside the paper's, and the run-to-run noise of the study's groups."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path


def counts_markdown(rows: list[dict]) -> str:
    """The count table as Markdown: ours beside the paper's, the difference in percent."""
    from study.models.build import variants

    table = variants()
    lines = ["| variant (Table 1 row) | size | input | params M (ours / paper) | GFLOPs (ours / paper) | "
             "ΔGFLOPs | counter |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r.get("paper") or {}
        row = getattr(table.get(r["variant"]), "row", None)
        name = f"`{r['variant']}`" + (f" ({row})" if row is not None else "")
        pp, pg = p.get("params_m"), p.get("gflops")
        diff = f"{100 * (r['gflops'] - pg) / pg:+.1f}%" if pg else "-"
        lines.append(f"| {name} | {r['size']} | {r['img_size']} | {r['params'] / 1e6:.2f} / "
                     f"{'-' if pp is None else f'{pp:g}'} | {r['gflops']:.1f} / {'-' if pg is None else f'{pg:g}'} "
                     f"| {diff} | {r.get('flop_counter', '-')} |")
    return "\n".join(lines) + "\n"



def run_numbers(folder) -> str:
    """A finished run's numbers on one line: PQ / AP / mIoU, steps and speed of training, params, GFLOPs, FPS."""
    from study.launch.collect import headline
    from study.runs import RunDir

    run = RunDir(folder)
    m = run.metrics()
    h = headline(m)
    parts = []
    for k, fmt in (("PQ", "PQ {:.1f}"), ("AP", "AP {:.1f}"), ("mIoU", "mIoU {:.1f}")):
        if h.get(k) is not None:
            parts.append(fmt.format(h[k]))
    t = m.get("train") or {}
    if t:
        parts.append(f"{t.get('steps')} steps at {t.get('images_per_s') or 0:.1f} img/s")
    if h.get("params_M") is not None:
        parts.append(f"{h['params_M']:.2f} M params")
    if h.get("GFLOPs") is not None:
        parts.append(f"{h['GFLOPs']:.3g} GFLOPs")
    if h.get("FPS") is not None:
        parts.append(f"{h['FPS']:.1f} FPS")
    return ", ".join(parts)


def noise_lines(results) -> list[str]:
    """The run-to-run noise of each group of seeds (analysis/study.py): its label, n, and the main metric's
    mean ± std [95% interval], or that one seed gives no interval."""
    from analysis.study import build_study

    study = build_study(results)
    m = study.main
    if m is None:
        return []
    out = []
    for i, r in study.frame.iterrows():
        name = ", ".join(str(r["label"] if a == "model.variant" else r[a]) for a in study.axes
                         if r[a] is not None and r[a] == r[a]) or "all runs"
        s = study.stats[i][m]
        spread = (f"± {s.std:.1f} [{s.lo:.1f}, {s.hi:.1f}]" if s.has_interval else "(n = 1: no interval)")
        out.append(f"{name}: {m} {s.mean:.1f} {spread}, n = {s.n}")
    return out


def earlier_summaries(path: Path, keep: int, say) -> list[dict]:
    """The summaries of the earlier runs, the latest one last: the one in ``path`` and those it kept. An
    unreadable file is moved aside to ``<name>.unreadable-<time>`` (said on one line) rather than overwritten."""
    if not path.exists():
        return []
    try:
        old = json.loads(path.read_text())
        if not isinstance(old, dict) or not isinstance(old.get("earlier", []), list):
            raise ValueError("not a summary: a JSON object with a list under 'earlier'")
    except (OSError, ValueError) as e:
        stem, n = f"{path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}", 1
        aside = path.with_name(stem)
        while aside.exists():  # never over an earlier one
            aside, n = path.with_name(f"{stem}-{n}"), n + 1
        path.replace(aside)
        say(f"note: {path} could not be read ({e}); moved to {aside}, a new summary is written")
        return []
    earlier = old.pop("earlier", [])
    return (earlier + [old])[-keep:]


def fingerprint(repo: Path, paths, *extra) -> str:
    """sha256 over the contents of the files under ``paths`` (relative to the repository) and ``extra``."""
    h = hashlib.sha256()
    for rel in paths:
        p = repo / rel
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".py", ".csv", ".yaml")) \
            if p.is_dir() else [p]
        for f in files:
            h.update(str(f.relative_to(repo)).encode())
            h.update(f.read_bytes())
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]
