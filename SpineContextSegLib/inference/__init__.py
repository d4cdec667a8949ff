"""From a CT image to a spine mask and vertebra labels (layer 3), in the order the data flows.

Import the modules directly; this package imports nothing (importing ``network.py`` loads torch).

- ``preprocessing.py``: the canonical grid (LPS-aligned, the model's spacing), the HU window, the
  body crop, the exact way back to the input's grid, and the memory a run needs.
- ``model_files.py``: model folders (``model.onnx`` + ``model.json``, ``model_int8.onnx``,
  ``model.pt``), their card and checksums, export from a training checkpoint.
- ``engine.py``: ONNX Runtime, OpenVINO and torch behind one ``predict(batch)`` interface, the
  choice of engine and precision (``auto``), CPU feature checks.
- ``network.py``: SpineContextResUNet (Context Block with dilations 1, 2, 4, 8) and its baselines
  (torch); ``network_constants.py``: what the torch-free path needs to know about them.
- ``stitcher.py``: Gaussian-weighted sliding-window inference over a volume.
- ``postprocess.py``: probability map -> clean spine mask (threshold, the column's components, holes).
- ``vertebra_labelling.py``: :func:`label_vertebrae`, the steps of :mod:`SpineContextSegLib.anatomy`
  run on SimpleITK images (working grid and back).
- ``spine_geometry.py``: the spine's region of interest and centreline as JSON (``--roi``, ``--centreline``).
- ``pipeline.py``: :func:`segment_file` / :func:`segment_image`, the one segmentation path for the
  command line, the worker (Slicer), evaluation and the benchmark.
"""
