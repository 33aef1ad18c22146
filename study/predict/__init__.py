"""``study predict``: a trained model on the user's own images, drawn as overlays and written in the official formats.

- :mod:`study.predict.models`: from what the user names (a run folder, a config, a config with a checkpoint of
  any of the three layouts) to a loaded model, its classes and its device.
- :mod:`study.predict.run`: the task's own inference and post-processing (study/eval/inference.py and
  postprocess.py) on one image, and the raw prediction in the official formats.
- :mod:`study.predict.overlay`: the overlay PNG (coloured segments, class names and scores, a legend) and the
  side-by-side comparison of several models.
- :mod:`study.predict.cli`: the sub-command.
"""
