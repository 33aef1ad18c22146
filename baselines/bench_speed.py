"""Speed of the six Table 1 rows side by side, and of our Mask2Former parts next to Hugging Face's.

    python -m baselines.bench_speed                      # tiny and S at 640 on this machine
    python -m baselines.bench_speed --sizes S --img-size 640 --iters 5 --json runs/bench_baselines.jsonl

Part 1: for each size, the four baselines (rows 0-3) and EoMT with and without masking (rows 4-5), all built
through study.models.build and timed with the suite's protocol (study/bench/speed.py: the six rows in the same
interleaved rounds, eval mode, no_grad, warm-up, FPS from the median iteration), ratio to row 0 with its
bootstrap interval, then the per-component breakdown (ms) of the same timed iterations.
Part 2: our pixel decoder and Transformer decoder against HF's ``Mask2FormerPixelDecoder`` and
``Mask2FormerTransformerModule`` (+ class predictor) with the same weights on the same inputs (the features an
S-size adapter gives at the input size), each pair timed with the same protocol (ours and HF's in the same
interleaved rounds, medians, HF/ours with its bootstrap interval); the largest output difference is reported
next to the times.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch

from study.bench.protocol import SpeedProtocol
from study.bench.speed import build_entry, time_interleaved
from study.bench.timing import Entry
from study.models.build import build_model, table1_rows
from study.models.config import ModelConfig


def bench_rows(size: str, img: int, protocol: SpeedProtocol) -> tuple[list[dict], str | None]:
    """The six Table 1 rows of one size, timed in the same interleaved rounds; and the ranking warning."""
    entries = []
    for variant in (v.name for v in table1_rows()):
        torch.manual_seed(0)
        model = build_model(ModelConfig(variant=variant, size=size, img_size=img)).eval()
        entries.append(build_entry(variant, model, img, protocol))
    results, warning = time_interleaved(entries, breakdown=True)
    rows = [dict(kind="row", variant=e.label, size=size, img_size=img, fps=r["fps"], ms=r["ms_median"],
                 ms_mean=r["ms_mean"], ms_p5=r["ms_p5"], ms_p95=r["ms_p95"], n_iters=r["n_iters"],
                 ratio_to_row0=r["ratio"], ratio_ci=r["ratio_ci"], components=r["breakdown_ms"],
                 protocol=r["protocol"], env=r["env"]) for e, r in zip(entries, results)]
    return rows, warning


def time_pair(ours, theirs, protocol: SpeedProtocol) -> tuple[dict, dict]:
    """Our and HF's callables timed in the same interleaved rounds under ``protocol`` (on the CPU in fp32, one
    input: the callables run as given, no autocast); their result rows, HF's the reference of the ratio (so
    ours' ``ratio`` is HF's median time over ours)."""
    p = replace(protocol, device="cpu", precision="fp32", compile=False, freezing=False, batch=1).resolved()
    entries = [Entry(label, lambda _inputs, fn=fn: fn(), None, p, no_breakdown="a part, not a model")
               for label, fn in (("ours", ours), ("hf", theirs))]
    (mine, hf), _ = time_interleaved(entries, reference=1)
    return mine, hf


def bench_against_hf(in_dim: int, img: int, protocol: SpeedProtocol) -> list[dict]:
    """Our pixel decoder and decoder vs HF's, same weights, same inputs (Mask2Former's default widths), on the
    CPU, timed with ``protocol`` (:func:`time_pair`)."""
    from transformers.models.mask2former import modeling_mask2former as m2f

    from baselines.config import BaselineConfig
    from baselines.hf import decoder_from_hf, pixel_decoder_from_hf
    from baselines.m2f_decoder import MaskedAttentionDecoder
    from baselines.pixel_decoder import PixelDecoder

    opts = BaselineConfig()
    cfg = m2f.Mask2FormerConfig(num_queries=200, num_labels=133)  # HF defaults = the widths of docs/baseline.md
    torch.manual_seed(0)
    feats = [torch.randn(1, in_dim, img // s, img // s) for s in (4, 8, 16, 32)]

    hf_pd = m2f.Mask2FormerPixelDecoder(cfg, feature_channels=[in_dim] * 4).eval()
    with torch.no_grad():
        hf_pd.level_embed.normal_()  # HF leaves it uninitialised outside a PreTrainedModel
    ours_pd = PixelDecoder(in_dim, opts.hidden_dim, opts.encoder_layers, opts.encoder_heads, opts.encoder_points,
                           opts.encoder_ffn).eval()
    ours_pd.load_state_dict(pixel_decoder_from_hf(hf_pd.state_dict()))
    fmap = dict(zip((4, 8, 16, 32), feats))
    with torch.no_grad():
        ref = hf_pd(feats)
        mask_features, levels = ours_pd(fmap)
    pd_err = (mask_features - ref.mask_features).abs().max().item()

    hf_dec = m2f.Mask2FormerTransformerModule(opts.hidden_dim, cfg).eval()
    cls = torch.nn.Linear(opts.hidden_dim, 134)
    ours_dec = MaskedAttentionDecoder(opts.hidden_dim, opts.decoder_heads, opts.decoder_ffn, opts.decoder_layers,
                                      3, 200, 133).eval()
    ours_dec.load_state_dict(decoder_from_hf(hf_dec.state_dict(), cls.state_dict()))
    levels = [t.contiguous() for t in levels]

    def hf_decoder():
        out = hf_dec(levels, mask_features)
        return [cls(h.transpose(0, 1)) for h in out.intermediate_hidden_states], out.masks_queries_logits

    def our_decoder():
        return ours_dec(levels, mask_features, active=lambda i: True, drop=lambda m, i: m)

    with torch.no_grad():
        hf_classes, hf_masks = hf_decoder()
        dec_err = max((s.mask_logits - m).abs().max().item() for s, m in zip(our_decoder(), hf_masks))
    results = []
    for part, ours, theirs, err in (("pixel_decoder", lambda: ours_pd(fmap), lambda: hf_pd(feats), pd_err),
                                    ("decoder", our_decoder, hf_decoder, dec_err)):
        mine, hf = time_pair(ours, theirs, protocol)
        results.append(dict(kind="hf", part=part, in_dim=in_dim, img_size=img, ms_ours=mine["ms_median"],
                            ms_hf=hf["ms_median"], n_iters=mine["n_iters"], speedup=mine["ratio"],
                            speedup_ci=mine["ratio_ci"], max_abs_diff=err, protocol=mine["protocol"],
                            env=mine["env"]))
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "S"])
    p.add_argument("--img-size", type=int, default=640)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: every available core)")
    p.add_argument("--min-time", type=float, default=0.0, help="seconds of timed iterations per row, at least")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--json", default=None, help="append one JSON row per measurement to this file")
    args = p.parse_args(argv)
    protocol = SpeedProtocol(device="cpu", precision="fp32", warmup=args.warmup, iters=args.iters,
                             batch=args.batch, threads=args.threads, min_time=args.min_time)
    out = []
    for size in args.sizes:
        rows, warning = bench_rows(size, args.img_size, protocol)
        out += rows
        print(f"\n== size {size}, {args.img_size}x{args.img_size}, CPU threads {rows[0]['env']['threads']}, "
              f"batch {args.batch}, fp32, eager, interleaved rounds, load {rows[0]['env']['load_avg_1min']}")
        print(f"{'variant':22s} {'FPS':>7s} {'ms med':>8s} {'p5-p95':>15s} {'n':>4s} {'vs row 0 [95% CI]':>20s}   "
              "per-component ms (mean)")
        for r in rows:
            comps = ", ".join(f"{k} {v:.0f}" for k, v in r["components"].items() if k != "total")
            ci = f"{r['ratio_to_row0']:.2f}x [{r['ratio_ci'][0]:.2f}-{r['ratio_ci'][1]:.2f}]"
            print(f"{r['variant']:22s} {r['fps']:7.2f} {r['ms']:8.1f} {r['ms_p5']:7.1f}-{r['ms_p95']:<7.1f} "
                  f"{r['n_iters']:4d} {ci:>20s}   {comps}")
        if warning:
            print(warning)
    if not args.skip_hf:
        in_dim = 384  # ViT-S width: the features our S-size pixel decoder reads
        hf = bench_against_hf(in_dim, args.img_size, protocol)
        out += hf
        print(f"\n== ours vs Hugging Face Mask2Former, same weights, inputs of width {in_dim} at {args.img_size}")
        for r in hf:
            print(f"{r['part']:14s} ours {r['ms_ours']:8.1f} ms   HF {r['ms_hf']:8.1f} ms   (medians of {r['n_iters']})  "
                  f"HF/ours {r['speedup']:.2f}x [{r['speedup_ci'][0]:.2f}-{r['speedup_ci'][1]:.2f}]   "
                  f"max |diff| {r['max_abs_diff']:.1e}")
    if args.json:
        with open(args.json, "a") as f:
            for r in out:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
