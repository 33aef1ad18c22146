"""Deployment runtimes for the suite's segmenters: ONNX export and ONNX Runtime (study/export/onnx.py, the
``study export`` command in study/export/cli.py), and the bf16-on-the-CPU benchmark (study/export/bench_bf16.py).

Nothing here changes a model: every variant is exported through its ordinary forward.
"""
