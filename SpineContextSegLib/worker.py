"""The background worker the Slicer module starts: ``python -m SpineContextSegLib.worker ...``.

It is exactly ``spinecontextseg segment ... --progress json`` (same arguments, same code
path); its stdout carries only JSON lines (see :mod:`SpineContextSegLib.progress`).
"""
from __future__ import annotations

import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None, *, process_exit: bool = False) -> int:
    from SpineContextSegLib.cli import main as cli_main

    arguments = list(sys.argv[1:] if argv is None else argv)
    return cli_main(["segment", "--progress", "json", *arguments], process_exit=process_exit)


if __name__ == "__main__":
    sys.exit(main(process_exit=True))
