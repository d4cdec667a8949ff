"""Find labelled CT cases on disk and read their labels as VerSe ids or a binary spine mask.

A :class:`Case` is one CT plus its label file(s). :func:`find_cases` discovers the cases
of a dataset folder; :func:`patient_level_split` splits them for training so that all
scans of one patient land on the same side.

Layouts (``find_cases(root, layout)``)
--------------------------------------
``"shared"``
    One folder per case holding ``ct.nii.gz`` and one label file (the project's
    ``shared/data/real`` layout); ``root`` is the parent folder or a single case folder.
    Label files, in order of preference: ``seg_vert.nii.gz`` (VerSe ids);
    ``seg_vertebrae_spine_report.nii.gz``, ``seg_total_fast_3mm.nii.gz``,
    ``seg_total_fast.nii.gz`` (TotalSegmentator v2 ``total`` ids); ``seg_vertebrae_T12.nii.gz``
    (binary T12 -> VerSe 19, ``partial_labels=True``). Other files (sub-region maps, the
    high-resolution TotalSegmentator slab) are ignored. ``case_id`` = ``patient_id`` = folder name.
``"verse"``
    VerSe 2020 BIDS: ``rawdata/sub-*/[ses-*/]sub-*_ct.nii.gz`` with
    ``derivatives/sub-*/[ses-*/]sub-*_seg-vert_msk.nii.gz`` (``root`` may hold several
    ``rawdata``/``derivatives`` pairs, e.g. one per split). ``patient_id`` is the ``sub-*``
    part, so the sessions and reformats of one patient stay together. Without a ``rawdata``
    folder: the ``<name>.nii.gz`` + ``<name>_seg.nii.gz`` pairs of VerSe 2019
    (``verse004.nii.gz``, ``verse004_seg.nii.gz``) and of VerSe 2020's MICCAI folders
    (``<subject>/<subject>_CT-iso.nii.gz``, ``..._CT-iso_seg.nii.gz``); ``patient_id`` is
    the name without ``_CT-iso``/``_CT-sag``/``_CT-ax``/``_ct``.
``"ctspine1k"``
    CTSpine1K (github.com/MIRACLE-Center/CTSpine1K): volumes ``<name>.nii.gz`` and labels
    ``<name>_seg.nii.gz`` anywhere under ``root`` (the release puts them in parallel trees
    such as ``data/<source>/`` and ``label/<source>/``, or ``volumes/`` and ``labels/``),
    paired by name. Label values are VerSe ids 1-25 (C1-L6): CTSpine1K was annotated with
    an nnU-Net trained on VerSe (its ``Task056_VerSe2019.py`` and ``ReadMe.md`` evaluate
    labels 1-25), lists L6 cases (sacral lumbarisation) and leaves the sacrum unlabelled.
``"images-labels"``
    ``images/`` + ``labels/`` (or nnU-Net's ``imagesTr/`` + ``labelsTr/``), matched by file
    stem (an nnU-Net channel suffix ``_0000`` is ignored). A label map whose positive values
    are all VerSe ids and not just ``{1}`` is read as VerSe ids; any other map is binary
    (value > 0 = spine, no vertebra ids). Each label file is read once at discovery for this.
``"totalsegmentator"``
    The public TotalSegmentator dataset: ``<case>/ct.nii.gz`` and
    ``<case>/segmentations/<structure>.nii.gz``, one binary file per structure;
    ``vertebrae_C1`` ... ``vertebrae_L5``, ``vertebrae_S1`` and ``sacrum`` are read.

``"auto"`` tries them in the order shared, totalsegmentator, verse (BIDS), images-labels,
then ``_seg`` pairs (``ctspine1k`` when a folder name says so: ``ctspine1k``, ``colon``,
``liver``, ``HNSCC*``, ``COVID-19``; ``verse`` otherwise).

Label conventions
-----------------
Every label source is mapped to VerSe ids (1-7 C1-C7, 8-19 T1-T12, 20-25 L1-L6,
26 sacrum, 28 T13) with :mod:`SpineContextSegLib.labels`, which holds all id tables.

The binary spine mask EXCLUDES the sacrum (VerSe 26); it is
:func:`SpineContextSegLib.labels.spine_mask_from_vertebra_labels` (see
:data:`SpineContextSegLib.labels.SPINE_MASK_INCLUDES_SACRUM`). The training target then
matches the evaluation ground truth (verse014 labels L1-L5 and leaves its visible sacrum
unlabelled; VerSe and CTSpine1K never label the sacrum). TotalSegmentator's ``sacrum``
(25) and ``vertebrae_S1`` (26) both become VerSe 26 and so stay out of the binary mask
(TotalSegmentator's own binary "vertebrae" set, 26-50, includes S1), while the
per-vertebra map keeps them.

Grids
-----
Every label image comes back on exactly the CT's grid. A label whose header differs from
the CT's only by round-off (within the tolerances of
:func:`SpineContextSegLib.io.grids.check_same_grid`: spacing 1e-4 relative, origin 1e-3 mm,
direction 1e-4) gets the CT's geometry copied onto it; any other label is resampled onto
the CT with nearest neighbour (0 outside the label's extent).
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np

from SpineContextSegLib.errors import SegmentationError
from SpineContextSegLib.io.grids import Grid, on_grid_of

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK as sitk

#: Layout names accepted by :func:`find_cases`.
LAYOUTS = ("auto", "shared", "verse", "ctspine1k", "images-labels", "totalsegmentator")
#: ``label_format`` values of :class:`Case`.
LABEL_FORMATS = ("verse", "totalsegmentator", "binary", "ctspine1k", "phantom")

_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")

# shared layout: (label file, label_format, VerSe id of a binary file's foreground, partial_labels),
# in order of preference.
_SHARED_LABEL_FILES: Tuple[Tuple[str, str, Optional[int], bool], ...] = (
    ("seg_vert.nii.gz", "verse", None, False),
    ("seg_vertebrae_spine_report.nii.gz", "totalsegmentator", None, False),
    ("seg_total_fast_3mm.nii.gz", "totalsegmentator", None, False),
    ("seg_total_fast.nii.gz", "totalsegmentator", None, False),
    ("seg_vertebrae_T12.nii.gz", "binary", 19, True),
)

# Sub-folder names of the CTSpine1K release (its four sources), lower case.
_CTSPINE1K_FOLDER_HINTS = ("ctspine1k", "colon", "colonog", "liver", "covid-19", "covid19", "hnscc-3dct-rt", "hnscc-3dct-rt_neck")
# VerSe 2020 MICCAI file names end in the reformat: <subject>_CT-iso, _CT-sag, _CT-ax.
_SCAN_SUFFIX = re.compile(r"(_ct-(iso|sag|ax|cor)|_ct)$", re.IGNORECASE)
_BIDS_CT_SUFFIX = "_ct"
_BIDS_LABEL_SUFFIX = "_seg-vert_msk"


@dataclass
class Case:
    """One CT and its labels.

    Attributes
    ----------
    case_id : str
        Unique name of the scan (folder name or file stem).
    patient_id : str
        Patient the scan belongs to; :func:`patient_level_split` keeps a patient's scans together.
    image_path : str
        The CT file.
    label_path : str or None
        The label file; for the TotalSegmentator dataset layout its ``segmentations`` folder.
    label_format : str
        ``"verse"`` (VerSe ids), ``"totalsegmentator"`` (TotalSegmentator v2 ``total`` ids, or
        a ``segmentations/`` folder of binary masks), ``"binary"`` (non-zero = spine, or = the
        single vertebra ``binary_vertebra_id``), ``"ctspine1k"`` (ids 1-25, as VerSe) or
        ``"phantom"`` (a synthetic case labelled with VerSe ids).
    partial_labels : bool
        True when some visible vertebrae are NOT labelled (e.g. only T12): the binary mask is
        then not a complete spine ground truth.
    binary_vertebra_id : int or None
        For ``"binary"`` labels of one vertebra: its VerSe id (19 for T12).
    """

    case_id: str
    patient_id: str
    image_path: str
    label_path: Optional[str]
    label_format: str
    partial_labels: bool = False
    binary_vertebra_id: Optional[int] = None

    def load(self) -> Tuple["sitk.Image", Optional["sitk.Image"]]:
        """The CT and the raw label image on the CT's grid.

        Returns
        -------
        ct : SimpleITK.Image, 3D
            HU, pixel type as stored (checked by :func:`SpineContextSegLib.io.images.read_image`).
        labels : SimpleITK.Image or None
            Label values as stored (TotalSegmentator ids stay TotalSegmentator ids), on exactly
            the CT's grid; for a ``segmentations/`` folder the uint8 VerSe-id map built from its
            masks. None when the case has no label.
        """
        from SpineContextSegLib.io.images import read_image

        ct = read_image(self.image_path)
        return ct, self._raw_labels_on(Grid.of_image(ct))

    def load_vertebra_labels(self) -> Optional["sitk.Image"]:
        """uint8 VerSe ids on the CT's grid; None without labels or for a spine-only binary mask."""
        if self.label_path is None or (self.label_format == "binary" and self.binary_vertebra_id is None):
            return None
        grid = Grid.of_file(self.image_path)
        raw = self._raw_labels_on(grid)
        return grid.image_of(self.to_verse_ids(_array_view(raw)))

    def load_spine_mask(self) -> Optional["sitk.Image"]:
        """uint8 0/1 spine mask on the CT's grid (sacrum excluded, see the module docstring); None without labels."""
        from SpineContextSegLib.labels import spine_mask_from_vertebra_labels

        if self.label_path is None:
            return None
        grid = Grid.of_file(self.image_path)
        raw = self._raw_labels_on(grid)  # keep a reference: the view below does not own its memory
        values = _array_view(raw)
        if self.label_format == "binary" and self.binary_vertebra_id is None:
            mask = (values > 0).astype(np.uint8)
        else:
            mask = spine_mask_from_vertebra_labels(self.to_verse_ids(values))
        return grid.image_of(mask)

    def to_verse_ids(self, values: np.ndarray) -> np.ndarray:
        """Map label values as returned by :meth:`load` to uint8 VerSe ids (same shape).

        Raises
        ------
        ValueError
            For a spine-only binary mask (it has no vertebra ids) or an unknown ``label_format``.
        """
        from SpineContextSegLib.labels import totalsegmentator_to_verse, verse_to_verse

        if self.label_format == "binary":
            if self.binary_vertebra_id is None:
                raise ValueError(f"{self.case_id}: a spine-only binary mask has no vertebra ids")
            return (np.asarray(values) > 0).astype(np.uint8) * np.uint8(self.binary_vertebra_id)
        if self.label_format == "totalsegmentator" and not _is_mask_folder(self.label_path):
            return totalsegmentator_to_verse(values)
        if self.label_format in LABEL_FORMATS:  # VerSe ids already (a mask folder is mapped on reading)
            return verse_to_verse(values)
        raise ValueError(f"unknown label_format {self.label_format!r}; expected one of {LABEL_FORMATS}")

    def _raw_labels_on(self, grid: "Grid") -> Optional["sitk.Image"]:
        if self.label_path is None:
            return None
        if _is_mask_folder(self.label_path):
            return grid.image_of(_verse_ids_from_mask_folder(self.label_path, grid))
        return on_grid_of(_read_label(self.label_path), grid, what=os.path.basename(self.label_path))


# ---------------------------------------------------------------------- label images
def _array_view(image: "sitk.Image") -> np.ndarray:
    """Read-only numpy view (z, y, x) of ``image``; valid only while ``image`` is referenced."""
    import SimpleITK as sitk

    return sitk.GetArrayViewFromImage(image)


def _read_label(path: str) -> "sitk.Image":
    import SimpleITK as sitk

    if not os.path.exists(path):
        raise SegmentationError("input_not_found", f"Label file not found: {path}.")
    try:
        image = sitk.ReadImage(path)
    except RuntimeError:
        raise SegmentationError("input_unreadable", f"Cannot read label {path}: the file is corrupt or not an image.") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise SegmentationError("input_not_scalar", f"Label {path} is not a 3D scalar label map.")
    return image


def _is_mask_folder(path: Optional[str]) -> bool:
    return path is not None and os.path.isdir(path)


def _verse_ids_from_mask_folder(folder: str, grid: Grid) -> np.ndarray:
    """uint8 VerSe ids (numpy order, ``grid``) from TotalSegmentator's ``segmentations/<name>.nii.gz`` masks."""
    from SpineContextSegLib.labels import TOTALSEGMENTATOR_NAME_TO_VERSE

    result = np.zeros(grid.size[::-1], dtype=np.uint8)
    for name in sorted(os.listdir(folder)):
        verse_id = TOTALSEGMENTATOR_NAME_TO_VERSE.get(_stem(name))
        if verse_id is None or not name.endswith(_IMAGE_SUFFIXES):
            continue
        mask = on_grid_of(_read_label(os.path.join(folder, name)), grid, what=name)
        result[_array_view(mask) > 0] = verse_id
    return result


def _stem(file_name: str) -> str:
    """File name without an image suffix (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``, ``.mhd``)."""
    for suffix in _IMAGE_SUFFIXES:
        if file_name.endswith(suffix):
            return file_name[: -len(suffix)]
    return file_name


def _image_files(folder: str) -> List[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(_IMAGE_SUFFIXES) and os.path.isfile(os.path.join(folder, name)))


def _subfolders(folder: str) -> List[str]:
    return sorted(os.path.join(folder, e) for e in os.listdir(folder) if os.path.isdir(os.path.join(folder, e)))


# ---------------------------------------------------------------------- shared layout
def _shared_case(folder: str) -> Optional[Case]:
    image_path = os.path.join(folder, "ct.nii.gz")
    if not os.path.isfile(image_path):
        return None
    name = os.path.basename(os.path.normpath(folder))
    for file_name, label_format, vertebra_id, partial in _SHARED_LABEL_FILES:
        label_path = os.path.join(folder, file_name)
        if os.path.isfile(label_path):
            return Case(name, name, image_path, label_path, label_format, partial, vertebra_id)
    return None


def _find_shared(root: str) -> List[Case]:
    single = _shared_case(root)
    if single is not None:
        return [single]
    return [case for case in (_shared_case(folder) for folder in _subfolders(root)) if case is not None]


# ---------------------------------------------------------------------- TotalSegmentator dataset
def _totalsegmentator_case(folder: str) -> Optional[Case]:
    image_path = os.path.join(folder, "ct.nii.gz")
    masks = os.path.join(folder, "segmentations")
    if not (os.path.isfile(image_path) and os.path.isdir(masks)):
        return None
    name = os.path.basename(os.path.normpath(folder))
    return Case(name, name, image_path, masks, "totalsegmentator")


def _find_totalsegmentator(root: str) -> List[Case]:
    single = _totalsegmentator_case(root)
    if single is not None:
        return [single]
    return [case for case in (_totalsegmentator_case(folder) for folder in _subfolders(root)) if case is not None]


# ---------------------------------------------------------------------- VerSe BIDS
def _bids_roots(root: str) -> List[str]:
    """Folders holding ``rawdata`` and ``derivatives``: ``root`` itself or its sub-folders (splits), or ``root`` = rawdata."""
    if os.path.basename(os.path.normpath(root)) == "rawdata" and os.path.isdir(os.path.join(os.path.dirname(os.path.normpath(root)), "derivatives")):
        return [os.path.dirname(os.path.normpath(root))]
    found = []
    for folder in [root] + _subfolders(root):
        if os.path.isdir(os.path.join(folder, "rawdata")) and os.path.isdir(os.path.join(folder, "derivatives")):
            found.append(folder)
    return found


def _find_verse_bids(root: str) -> List[Case]:
    cases = []
    for bids_root in _bids_roots(root):
        rawdata, derivatives = os.path.join(bids_root, "rawdata"), os.path.join(bids_root, "derivatives")
        labels_by_name: Dict[str, str] = {}
        for folder, _, files in os.walk(derivatives):
            for name in files:
                if _stem(name).endswith(_BIDS_LABEL_SUFFIX):
                    labels_by_name[_stem(name)[: -len(_BIDS_LABEL_SUFFIX)]] = os.path.join(folder, name)
        for folder, _, files in os.walk(rawdata):
            for name in sorted(files):
                stem = _stem(name)
                if not (stem.startswith("sub-") and stem.endswith(_BIDS_CT_SUFFIX)):
                    continue
                scan = stem[: -len(_BIDS_CT_SUFFIX)]  # e.g. sub-verse500_dir-ax or sub-verse753_ses-20120702
                label_path = labels_by_name.get(scan)
                if label_path is None:
                    continue
                cases.append(Case(scan, scan.split("_")[0], os.path.join(folder, name), label_path, "verse"))
    return cases


# ---------------------------------------------------------------------- <name> + <name>_seg pairs
def _find_seg_pairs(root: str, label_format: str) -> List[Case]:
    """``<name>.nii.gz`` + ``<name>_seg.nii.gz`` anywhere under ``root`` (VerSe 2019/2020 MICCAI, CTSpine1K)."""
    images: Dict[str, List[str]] = {}
    labels: Dict[str, List[str]] = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith((".nii.gz", ".nii")):
                continue
            stem = _stem(name)
            if stem.endswith("_seg"):
                labels.setdefault(stem[: -len("_seg")], []).append(os.path.join(folder, name))
            else:
                images.setdefault(stem, []).append(os.path.join(folder, name))
    cases = []
    for stem in sorted(set(images) & set(labels)):
        for image_path in sorted(images[stem]):
            label_path = _closest(image_path, labels[stem])
            if label_path is None:
                continue
            case_id = stem if len(images[stem]) == 1 else f"{os.path.basename(os.path.dirname(image_path))}/{stem}"
            cases.append(Case(case_id, _SCAN_SUFFIX.sub("", stem), image_path, label_path, label_format))
    return cases


def _closest(image_path: str, candidates: Sequence[str]) -> Optional[str]:
    """The label among ``candidates`` for ``image_path``: the only one, or the one in the same or a same-named folder."""
    if len(candidates) == 1:
        return candidates[0]
    image_folder = os.path.dirname(image_path)
    for candidate in candidates:
        if os.path.dirname(candidate) == image_folder:
            return candidate
    same_name = [c for c in candidates if os.path.basename(os.path.dirname(c)) == os.path.basename(image_folder)]
    return same_name[0] if len(same_name) == 1 else None


def _looks_like_ctspine1k(root: str) -> bool:
    names = [os.path.basename(os.path.normpath(root)).lower()]
    for folder, subfolders, _ in os.walk(root):
        names.extend(s.lower() for s in subfolders)
        if folder.count(os.sep) - root.count(os.sep) >= 2:
            subfolders[:] = []  # the hints sit in the top two levels
    return any(name in _CTSPINE1K_FOLDER_HINTS or name.startswith("hnscc") for name in names)


def _find_verse(root: str) -> List[Case]:
    return _find_verse_bids(root) if _bids_roots(root) else _find_seg_pairs(root, "verse")


def _find_ctspine1k(root: str) -> List[Case]:
    return _find_seg_pairs(root, "ctspine1k")


# ---------------------------------------------------------------------- images/ + labels/
_IMAGE_LABEL_FOLDERS = (("images", "labels"), ("imagesTr", "labelsTr"))


def _images_labels_folders(root: str) -> Optional[Tuple[str, str]]:
    for image_name, label_name in _IMAGE_LABEL_FOLDERS:
        images, labels = os.path.join(root, image_name), os.path.join(root, label_name)
        if os.path.isdir(images) and os.path.isdir(labels):
            return images, labels
    return None


def guess_label_format(label_array: np.ndarray) -> str:
    """``"verse"`` if every positive value is a VerSe id (1-26, 28) and the values are not just ``{1}``; else ``"binary"``.

    Parameters
    ----------
    label_array : numpy.ndarray, any shape, integer values
    """
    from SpineContextSegLib.labels import VERTEBRAE

    values = set(int(v) for v in np.unique(label_array) if v > 0)
    verse_ids = {info.value for info in VERTEBRAE}
    return "verse" if values and values <= verse_ids and values != {1} else "binary"


def _find_images_labels(root: str) -> List[Case]:
    folders = _images_labels_folders(root)
    if folders is None:
        return []
    images_folder, labels_folder = folders
    labels = {_stem(name): os.path.join(labels_folder, name) for name in _image_files(labels_folder)}
    cases = []
    for name in _image_files(images_folder):
        stem = _stem(name)
        key = stem if stem in labels else re.sub(r"_\d{4}$", "", stem)  # nnU-Net channel suffix
        if key not in labels:
            continue
        label = _read_label(labels[key])
        label_format = guess_label_format(_array_view(label))
        cases.append(Case(key, key, os.path.join(images_folder, name), labels[key], label_format))
    return cases


# ---------------------------------------------------------------------- entry points
_FINDERS = {
    "shared": _find_shared,
    "totalsegmentator": _find_totalsegmentator,
    "verse": _find_verse,
    "ctspine1k": _find_ctspine1k,
    "images-labels": _find_images_labels,
}


def detect_layout(root: str) -> str:
    """The layout of the dataset folder ``root`` (one of :data:`LAYOUTS` but ``"auto"``).

    Raises
    ------
    SegmentationError
        ``input_not_found`` if no layout fits.
    """
    root = os.path.normpath(root)
    folders = [root] + _subfolders(root)
    if any(_shared_case(folder) is not None for folder in folders):
        return "shared"
    if any(_totalsegmentator_case(folder) is not None for folder in folders):
        return "totalsegmentator"
    if _bids_roots(root):
        return "verse"
    if _images_labels_folders(root) is not None:
        return "images-labels"
    for _, _, files in os.walk(root):
        if any(name.endswith(("_seg.nii.gz", "_seg.nii")) for name in files):
            return "ctspine1k" if _looks_like_ctspine1k(root) else "verse"
    raise SegmentationError(
        "input_not_found",
        f"No labelled CT found in {root}: expected case folders with ct.nii.gz and a label, VerSe (rawdata/derivatives "
        f"or *_seg.nii.gz), CTSpine1K, images/ + labels/, or TotalSegmentator (ct.nii.gz + segmentations/).",
    )


def find_cases(root: str, layout: str = "auto") -> List[Case]:
    """All labelled cases under ``root``, sorted by ``case_id``.

    Parameters
    ----------
    root : str
        Dataset folder (for ``"shared"`` and ``"totalsegmentator"`` also a single case folder).
    layout : str
        One of :data:`LAYOUTS` (see the module docstring); ``"auto"`` detects it.

    Returns
    -------
    list of Case
        Possibly empty when an explicit ``layout`` finds nothing.

    Raises
    ------
    SegmentationError
        ``input_not_found`` if ``root`` is not a folder, or (``"auto"``) no layout fits.
    ValueError
        For an unknown layout name.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if not os.path.isdir(root):
        raise SegmentationError("input_not_found", f"Dataset folder not found: {root}. Check the path.")
    root = os.path.normpath(root)
    if layout == "auto":
        layout = detect_layout(root)
    return sorted(_FINDERS[layout](root), key=lambda case: case.case_id)


def patient_level_split(cases: Sequence[Case], validation_fraction: float, seed: int) -> Tuple[List[Case], List[Case]]:
    """Split cases into training and validation with no patient on both sides.

    Patients are ranked by a hash of ``(seed, patient_id)``, so the split depends only on the
    seed and the set of patient ids (not on the order of ``cases``); the first
    ``round(validation_fraction * n_patients)`` patients go to validation (at least one when
    the fraction is positive and there are two patients or more; never all of them).

    Parameters
    ----------
    cases : sequence of Case (anything with ``patient_id``)
    validation_fraction : float in [0, 1)
        Share of *patients* (not scans) held out.
    seed : int

    Returns
    -------
    (train, validation) : two lists of cases, each in the input order.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must lie in [0, 1), got {validation_fraction}")
    patients = sorted({case.patient_id for case in cases})
    n_validation = int(round(validation_fraction * len(patients)))
    if validation_fraction > 0 and n_validation == 0 and len(patients) >= 2:
        n_validation = 1
    n_validation = min(n_validation, max(len(patients) - 1, 0))

    def rank(patient_id: str) -> str:
        return hashlib.sha256(f"{seed}:{patient_id}".encode("utf-8")).hexdigest()

    validation_patients = set(sorted(patients, key=rank)[:n_validation])
    train = [case for case in cases if case.patient_id not in validation_patients]
    validation = [case for case in cases if case.patient_id in validation_patients]
    return train, validation
