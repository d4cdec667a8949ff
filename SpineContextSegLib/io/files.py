"""Atomic output files: write to a temporary name beside the target, rename at the end.

A reader never sees a half-written file, a failed or cancelled run leaves nothing
behind, and OS errors become :class:`~SpineContextSegLib.errors.SegmentationError`
with the codes ``disk_full``, ``output_not_writable`` or ``output_dir_missing``.

A run killed outright (SIGKILL, power loss) cannot clean up: its temporary file stays,
named ``.scs-tmp-<pid>.<host>.<random><suffix>``, and the target itself is untouched. The
next write into that folder from the same machine removes temporary files whose process
is gone (:func:`remove_stale_temp_files`).
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import tempfile
from typing import Iterator, List

from SpineContextSegLib.errors import SegmentationError

#: Prefix of every temporary file this library creates beside an output, so leftovers are recognisable.
TEMP_PREFIX = ".scs-tmp-"

# Extensions whose writers pick the format from the name: the temporary name must keep them.
_COMPOUND_SUFFIXES = (".seg.nrrd", ".nii.gz")

# The machine's name as it appears in temporary names (letters and digits only).
_HOST_TAG = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
_TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + r"(\d+)\.([A-Za-z0-9]+)\.")


def output_suffix(path: str) -> str:
    """``.nii.gz`` for ``a.nii.gz``, ``.seg.nrrd`` for ``b.seg.nrrd``, else the last suffix."""
    lower = path.lower()
    for suffix in _COMPOUND_SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    return os.path.splitext(path)[1]


def check_output_location(path: str) -> None:
    """Raise a clear error now, before any computing, if ``path`` cannot be written.

    Creates and deletes an empty temporary file in the folder: permission bits alone do
    not tell (root ignores them; read-only mounts, ``/proc`` and network shares refuse anyway).
    """
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        blocker = _first_existing_non_folder(folder)
        if blocker:
            where = "" if blocker == folder else f"Output folder {folder} cannot be created: "
            raise SegmentationError("output_dir_missing", f"{where}{blocker} is a file, not a folder. Choose another output path.")
        raise SegmentationError("output_dir_missing", f"Output folder does not exist: {folder}. Create it or choose another output path.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SegmentationError("output_not_writable", f"Cannot write to {folder}: the folder is read-only. Choose a folder you can write to.")
    if os.path.isdir(path):
        raise SegmentationError("output_not_writable", f"Output path {path} is a folder; give a file name.")
    try:
        fd, probe = tempfile.mkstemp(prefix=_temp_prefix(), dir=folder)
    except OSError as error:
        raise translate_os_error(error, path) from None
    os.close(fd)
    _remove_quietly(probe)


def _first_existing_non_folder(folder: str) -> str:
    """The deepest existing ancestor of ``folder`` when it is a file (``out.nii.gz/mask.nii.gz``), else ``""``."""
    current = folder
    while current and not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            return ""
        current = parent
    return current if current and not os.path.isdir(current) else ""


def translate_os_error(error: OSError, path: str) -> SegmentationError:
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return SegmentationError("disk_full", f"Disk full (or a file-size limit) while writing {path}. Free some space and run again; no partial file was kept.")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return SegmentationError("output_not_writable", f"Cannot write {path}: permission denied or read-only file system. Choose another folder.")
    if error.errno == errno.ENOENT:
        if os.path.isdir(os.path.dirname(os.path.abspath(path))):  # the folder exists but refuses new files (e.g. /proc)
            return SegmentationError("output_not_writable", f"Cannot create files in the folder of {path}. Choose another folder.")
        return SegmentationError("output_dir_missing", f"Output folder for {path} does not exist. Create it or choose another output path.")
    return SegmentationError("output_not_writable", f"Cannot write {path}: {error.strerror or error}.")


def _temp_prefix() -> str:
    return f"{TEMP_PREFIX}{os.getpid()}.{_HOST_TAG}."


def remove_stale_temp_files(folder: str) -> List[str]:
    """Delete this library's temporary files in ``folder`` left by dead processes on this machine.

    Only names ``.scs-tmp-<pid>.<host>.*`` with this machine's host name and a process id
    that no longer exists are touched, so a run writing into the same folder (here or on
    another machine sharing the folder) is never disturbed. Returns the names removed.
    """
    removed: List[str] = []
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows: keep everything
        return removed
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _TEMP_NAME.match(name)
        if match is None or match.group(2) != _HOST_TAG or _process_exists(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            os.remove(os.path.join(folder, name))
            removed.append(name)
    return removed


def _process_exists(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """Yield a temporary path in the target's folder; on success rename it onto ``path``.

    The temporary file keeps the target's extension (writers choose the format from it).
    On any exception, including cancellation, the temporary file is removed.
    """
    path = os.path.abspath(path)
    check_output_location(path)
    folder = os.path.dirname(path)
    remove_stale_temp_files(folder)
    try:
        fd, temp_path = tempfile.mkstemp(prefix=_temp_prefix(), suffix=output_suffix(path), dir=folder)
    except OSError as error:
        raise translate_os_error(error, path) from None
    os.close(fd)
    try:
        yield temp_path
        # mkstemp creates 0600 files; outputs get the permissions an ordinary write would give
        os.chmod(temp_path, 0o666 & ~_current_umask())
        os.replace(temp_path, path)
    except OSError as error:
        _remove_quietly(temp_path)
        raise translate_os_error(error, path) from None
    except BaseException:
        _remove_quietly(temp_path)
        raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)
