"""Evaluation (layer 4): how good a segmentation is, and how fast the pipeline runs.

Import the modules directly; this package imports nothing.

- ``metrics.py``: the scores on numpy arrays (Dice, IoU, precision, recall, F1, HD95, ASSD),
  the labelled slab, per-vertebra Dice, HD95 and identification rate, and :func:`score_masks`
  and :func:`threshold_baseline` on SimpleITK images.
- ``evaluate.py``: ``spinecontextseg evaluate``: a model, or saved predictions, scored against
  labelled CT (slab Dice beside the HU > 200 threshold), as Markdown and CSV.
- ``bench.py``: ``spinecontextseg bench``: the default pipeline against the paper's, stage by
  stage, each variant in its own process (time, peak memory, agreement of the masks).
"""
