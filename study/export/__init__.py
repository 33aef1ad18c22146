"""Deployment runtimes for the suite's segmenters: ONNX export and ONNX Runtime (study/export/onnx.py, the
``study export`` command in study/export/cli.py). The bf16-on-the-CPU benchmark is study/bench/bf16.py.

Nothing here changes a model: every variant is exported through its ordinary forward.
"""
