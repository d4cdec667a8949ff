"""STL export of a segmentation: the files for all segments or a vertebra subset (the default folder: parameters.py)."""
from __future__ import annotations

from typing import List

from . import mrml_io


def exportStl(
    segmentationNode,
    folder: str,
    *,
    vertebrae: str = "",
    merge: bool = False,
    sizeScale: float = 1.0,
    lps: bool = True,
) -> List[str]:
    """Write closed surfaces as STL; ``vertebrae`` (e.g. ``"L1-L5"``) selects a subset by name.

    Returns the files written. Raises ``SegmentationError`` with a clear message when the
    subset matches no segment or the folder cannot be written.
    """
    from SpineContextSegLib.errors import SegmentationError

    if segmentationNode is None:
        raise ValueError("no segmentation selected")
    segmentIds = None
    if vertebrae and vertebrae.strip() and vertebrae.strip().lower() != "all":
        from SpineContextSegLib.labels import parse_vertebra_range, vertebra_by_verse_id

        try:
            names = [vertebra_by_verse_id(v).name for v in parse_vertebra_range(vertebrae)]
        except ValueError as error:
            raise SegmentationError("input_format", f"Vertebra subset '{vertebrae}': {error}") from None
        segmentIds = mrml_io.segment_ids_by_name(segmentationNode, names)
        if not segmentIds:
            raise SegmentationError(
                "no_spine_found",
                f"'{segmentationNode.GetName()}' has no segment named {', '.join(names)}. "
                "A vertebra subset needs a Vertebrae-task result; clear the field to export every segment.",
            )
    segmentationNode.CreateClosedSurfaceRepresentation()
    return mrml_io.export_stl(segmentationNode, folder, segment_ids=segmentIds, merge=merge, size_scale=sizeScale, lps=lps)
