"""The library's layout: data flows one way, so no module imports from a layer above its own.

Layers, lowest first (README, "Development"): the vocabulary every layer speaks (``errors``,
``progress``, ``labels``), ``io``, then ``anatomy`` and ``phantoms`` (independent of each other),
``inference``, ``evaluation``, ``training``, and the entry points ``cli`` and ``worker``. A module
may import its own subpackage, the vocabulary, and any lower layer; nothing else. Imports inside
functions count: a lazy import is still a dependency.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = os.path.join(ROOT, "SpineContextSegLib")
PACKAGE = "SpineContextSegLib"

LAYER_OF = {
    "": 0, "errors": 0, "progress": 0, "labels": 0,
    "io": 1,
    "anatomy": 2, "phantoms": 2,
    "inference": 3,
    "evaluation": 4,
    "training": 5,
    "cli": 6, "worker": 6,
}
TOP_LEVEL_MODULES = {"errors", "progress", "labels", "cli", "worker"}
MAX_MODULE_LINES = 600


def library_modules():
    for folder, _, files in os.walk(LIBRARY):
        if "resources" in os.path.relpath(folder, LIBRARY).split(os.sep):
            continue
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def unit_of(dotted: str) -> str:
    """``SpineContextSegLib.io.images`` -> ``io``; ``SpineContextSegLib.errors`` -> ``errors``; the package -> ``""``."""
    parts = dotted.split(".")
    assert parts[0] == PACKAGE, dotted
    return parts[1] if len(parts) > 1 else ""


def module_name(path: str) -> str:
    relative = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return relative[: -len(".__init__")] if relative.endswith(".__init__") else relative


def imported_modules(path: str):
    """Every ``SpineContextSegLib...`` name that ``path`` imports (absolute or relative), with its line."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = module_name(path) if path.endswith("__init__.py") else module_name(path).rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            # "from SpineContextSegLib import io" imports the subpackage io, not the package itself
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                yield (candidate if unit_of(candidate) in LAYER_OF and target == PACKAGE else target), node.lineno


def test_every_unit_of_the_library_has_a_layer():
    units = {unit_of(module_name(path)) for path in library_modules()}
    assert units <= set(LAYER_OF), f"modules or subpackages without a layer: {sorted(units - set(LAYER_OF))}"


def test_no_module_imports_from_a_layer_above_its_own():
    wrong = set()
    for path in library_modules():
        here = unit_of(module_name(path))
        for target, line in imported_modules(path):
            there = unit_of(target)
            if there == here or there == "" or LAYER_OF[there] < LAYER_OF[here]:
                continue
            if LAYER_OF[there] == LAYER_OF[here] and TOP_LEVEL_MODULES >= {here, there}:
                continue  # top-level modules of one layer (the vocabulary; cli and worker) may use each other
            wrong.add(f"{os.path.relpath(path, ROOT)}:{line} imports {target} ({there}, layer {LAYER_OF[there]}) from layer {LAYER_OF[here]}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(sorted(wrong))


def test_the_checker_sees_relative_lazy_and_package_imports(tmp_path):
    # The test above passes vacuously if imported_modules finds nothing: prove it finds each form.
    module = tmp_path / "SpineContextSegLib" / "io" / "example.py"
    module.parent.mkdir(parents=True)
    module.write_text(
        "from SpineContextSegLib.inference import pipeline\n"
        "def f():\n    from ..training.trainer import run\n"
        "from SpineContextSegLib import labels, anatomy\n"
    )
    global ROOT
    saved, ROOT = ROOT, str(tmp_path)
    try:
        found = sorted(target for target, _ in imported_modules(str(module)))
    finally:
        ROOT = saved
    assert found == ["SpineContextSegLib.anatomy", "SpineContextSegLib.inference", "SpineContextSegLib.labels", "SpineContextSegLib.training.trainer"]


def slicer_module_files():
    folder = os.path.join(ROOT, "SpineContextSeg")
    for name in ["SpineContextSeg.py"] + sorted(os.listdir(os.path.join(folder, "SpineContextSegSlicerLib"))):
        path = os.path.join(folder, name) if name == "SpineContextSeg.py" else os.path.join(folder, "SpineContextSegSlicerLib", name)
        if name.endswith(".py"):
            yield path


@pytest.mark.parametrize("path", list(library_modules()) + list(slicer_module_files()), ids=lambda p: os.path.relpath(p, ROOT))
def test_no_module_is_longer_than_a_reader_holds_in_mind(path):
    with open(path, encoding="utf-8") as handle:
        lines = sum(1 for _ in handle)
    assert lines <= MAX_MODULE_LINES, f"{os.path.relpath(path, ROOT)} has {lines} lines (limit {MAX_MODULE_LINES}): split it by concept"
