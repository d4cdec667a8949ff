"""Input and output (layer 1): images, label maps, surfaces and pictures on disk, and the checks on them.

Import the modules directly; this package imports nothing.

- ``files.py``: atomic output (write under a temporary name, rename at the end), the output
  checks and codes (``disk_full``, ``output_not_writable``, ...), removal of stale temporary files.
- ``memory.py``: the memory this process can still use and :func:`check_memory` (``input_too_large``).
- ``validation.py``: checks that an image is a CT we can segment: its header before a voxel is
  read (:func:`check_header`), its voxels (:func:`validate_ct`); unsigned CT shifted to HU.
- ``dicom.py``: DICOM series: the image series in a folder, their files in slice order, refused
  slice layouts (duplicated, missing, uneven, sheared).
- ``images.py``: :func:`read_image` (a CT file or DICOM series folder, checked) and
  :func:`write_labelmap` (NIfTI, NRRD, MHA, Slicer ``.seg.nrrd``, DICOM SEG), format sniffing and
  the check that a written file is complete.
- ``dicom_seg.py``: the DICOM Segmentation object that references the source series.
- ``grids.py``: :func:`check_same_grid` / :class:`GridMismatchError`, a grid read from a header
  alone, and :func:`on_grid_of` (a label map onto a reference grid).
- ``datasets.py``: labelled cases on disk (:func:`find_cases` for the shared, VerSe, CTSpine1K,
  images/labels and TotalSegmentator layouts), their labels as VerSe ids or a spine mask, and
  :func:`patient_level_split`.
- ``meshing.py``: label map -> closed surface in LPS mm (Slicer's conversion) -> STL files.
- ``stl.py``: writing and reading STL, and :func:`is_watertight`.
- ``qc.py``: the quality-control PNG (sagittal and coronal views with the mask outline).
"""
