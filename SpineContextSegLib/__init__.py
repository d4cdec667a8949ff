"""SpineContextSegLib: CT in, spine segmentation and surface out.

Pure Python (numpy, SciPy, SimpleITK, VTK, ONNX Runtime; PyTorch only for training
and the optional torch engine). Never imports ``slicer`` or ``qt``: the Slicer module
runs this library in a separate process through :mod:`SpineContextSegLib.worker`.
Importing the package is cheap; heavy modules load when used.
"""
__version__ = "0.1.0"
