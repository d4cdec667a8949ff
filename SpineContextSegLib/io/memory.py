"""Memory this process can still use, and the check that refuses work which would not fit.

:func:`check_memory` raises ``input_too_large`` before anything large is allocated, so a run
too big for the machine ends with a clear message instead of being killed by the operating
system. Callers estimate the bytes they need: the header check of an input
(:func:`SpineContextSegLib.io.validation.check_header`) and the segmentation's own estimate
(:func:`SpineContextSegLib.inference.preprocessing.check_segmentation_memory`).
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

from SpineContextSegLib.errors import SegmentationError


def available_memory_bytes() -> Optional[int]:
    """Memory this process can still use: MemAvailable + SwapFree, capped by a cgroup limit; None if unknown.

    Linux reads ``/proc/meminfo`` and the cgroup (v2 or v1) files; other systems use
    ``os.sysconf`` where it exists (free physical pages), else None (no check).
    """
    available: Optional[int] = None
    fields = {}
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:  # "MemAvailable:   22645592 kB"
                key, _, value = line.partition(":")
                fields[key] = int(value.split()[0]) * 1024
    if "MemAvailable" in fields:
        available = fields["MemAvailable"] + fields.get("SwapFree", 0)
    if available is None:
        try:
            available = int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, ValueError, OSError):
            return None
    cgroup_free = _cgroup_free_bytes()
    if cgroup_free is not None:
        available = min(available, cgroup_free)
    return available


def _cgroup_free_bytes() -> Optional[int]:
    """limit - (usage - inactive file cache) of this process's memory cgroup, or None without a limit."""
    for limit_file, usage_file, stat_file, cache_key in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat", "inactive_file"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes", "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"),
    ):
        try:
            with open(limit_file, encoding="ascii") as handle:
                limit_text = handle.read().strip()
            with open(usage_file, encoding="ascii") as handle:
                usage = int(handle.read().strip())
        except (OSError, ValueError):
            continue
        if not limit_text.isdigit() or int(limit_text) >= 1 << 60:
            return None  # "max", or v1's "unlimited" sentinel
        reclaimable = 0
        with contextlib.suppress(OSError, ValueError):
            with open(stat_file, encoding="ascii") as handle:
                for line in handle:
                    key, _, value = line.partition(" ")
                    if key == cache_key:
                        reclaimable = int(value)
        return max(0, int(limit_text) - max(0, usage - reclaimable))
    return None


def check_memory(needed_bytes: int, what: str) -> None:
    """Raise ``input_too_large`` when ``needed_bytes`` exceeds :func:`available_memory_bytes` (never guess high)."""
    available = available_memory_bytes()
    if available is not None and needed_bytes > available:
        raise SegmentationError(
            "input_too_large",
            f"{what} needs about {_gigabytes(needed_bytes)} of memory but only {_gigabytes(available)} is free. "
            f"Crop the CT to the spine region, or use a machine with more memory.",
            details={"needed_bytes": int(needed_bytes), "available_bytes": int(available)},
        )


def _gigabytes(count: float) -> str:
    for unit, power in (("PB", 50), ("TB", 40)):
        if count >= 2 ** power:
            return f"{count / 2 ** power:.3g} {unit}"
    return f"{count / 2 ** 30:.1f} GB"
