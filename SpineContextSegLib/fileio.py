"""Atomic output files: write to a temporary name beside the target, rename at the end.

A reader never sees a half-written file, a failed or cancelled run leaves nothing
behind, and OS errors become :class:`~SpineContextSegLib.errors.SegmentationError`
with the codes ``disk_full``, ``output_not_writable`` or ``output_dir_missing``.
"""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from typing import Iterator

from .errors import SegmentationError

#: Prefix of every temporary file this library creates beside an output, so leftovers are recognisable.
TEMP_PREFIX = ".scs-tmp-"

# Extensions whose writers pick the format from the name: the temporary name must keep them.
_COMPOUND_SUFFIXES = (".seg.nrrd", ".nii.gz")


def output_suffix(path: str) -> str:
    """``.nii.gz`` for ``a.nii.gz``, ``.seg.nrrd`` for ``b.seg.nrrd``, else the last suffix."""
    lower = path.lower()
    for suffix in _COMPOUND_SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    return os.path.splitext(path)[1]


def check_output_location(path: str) -> None:
    """Raise a clear error now, before any computing, if ``path`` cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SegmentationError("output_dir_missing", f"Output folder does not exist: {folder}. Create it or choose another output path.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SegmentationError("output_not_writable", f"Cannot write to {folder}: the folder is read-only. Choose a folder you can write to.")
    if os.path.isdir(path):
        raise SegmentationError("output_not_writable", f"Output path {path} is a folder; give a file name.")


def translate_os_error(error: OSError, path: str) -> SegmentationError:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return SegmentationError("disk_full", f"Disk full while writing {path}. Free some space and run again; no partial file was kept.")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return SegmentationError("output_not_writable", f"Cannot write {path}: permission denied or read-only file system. Choose another folder.")
    if error.errno == errno.ENOENT:
        return SegmentationError("output_dir_missing", f"Output folder for {path} does not exist. Create it or choose another output path.")
    return SegmentationError("output_not_writable", f"Cannot write {path}: {error.strerror or error}.")


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """Yield a temporary path in the target's folder; on success rename it onto ``path``.

    The temporary file keeps the target's extension (writers choose the format from it).
    On any exception, including cancellation, the temporary file is removed.
    """
    path = os.path.abspath(path)
    check_output_location(path)
    folder = os.path.dirname(path)
    try:
        fd, temp_path = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=output_suffix(path), dir=folder)
    except OSError as error:
        raise translate_os_error(error, path) from None
    os.close(fd)
    try:
        yield temp_path
        os.replace(temp_path, path)
    except OSError as error:
        _remove_quietly(temp_path)
        raise translate_os_error(error, path) from None
    except BaseException:
        _remove_quietly(temp_path)
        raise


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)
