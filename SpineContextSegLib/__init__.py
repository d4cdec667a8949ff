"""SpineContextSegLib: CT in, spine segmentation and surface out.

Pure Python (numpy, SciPy, SimpleITK, VTK, ONNX Runtime; PyTorch only for training
and the optional torch engine). Never imports ``slicer`` or ``qt``: the Slicer module
runs this library in a separate process through :mod:`SpineContextSegLib.worker`.
Importing the package is cheap; heavy modules load when used.
"""
import os

__version__ = "0.1.0"

#: This package's folder, and the data it ships (models, sample CT, bone shapes) below it.
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
RESOURCES_DIR = os.path.join(PACKAGE_DIR, "resources")
