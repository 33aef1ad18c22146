"""Inference, post-processing, metrics and prediction export (docs/paper.md section 7).

    inference.py     padded (panoptic, instance) and windowed (semantic) protocols, masking on or off
    postprocess.py   panoptic merge, instance top-k, per-pixel semantic logits
    engines.py       the scoring engines (hotcoco by default; panopticapi, pycocotools, faster-coco-eval, ours)
    protocol.py      the paper's metric protocol (the official code's torchmetrics metrics), beside the standard
    strict.py        the strict input checks of COCO results, vectorised; png_header.py reads PNG headers
    pq.py            PQ / SQ / RQ with panopticapi's exact rules, vectorised; pq_files.py reads the files
    coco_ap.py       mask AP inputs (ids from 1, areas, crowd flags, input checks), scored through an engine
    miou.py          confusion-matrix mIoU: classes present, and the ADE20K official all-classes mean
    export.py        COCO panoptic JSON + PNGs, COCO results JSON (RLE), semantic label PNGs
    run.py           the evaluation loop over a dataset of Samples
    cli.py           `study score {panoptic,instance,semantic}` and `study eval CONFIG`
    bench_score.py   `python -m study.eval.bench_score`: our PQ scorer against panopticapi's pq_compute
    bench_engines.py `python -m study.eval.bench_engines`: every engine, in process and as whole processes
"""
