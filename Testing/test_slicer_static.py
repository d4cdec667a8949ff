"""Static checks of the Slicer extension: what Slicer would only reveal at build or load time.

Runs anywhere (no Slicer, no Qt): parses the .ui XML, the CMake files and the Python AST.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import py_compile
import re
import struct
import xml.etree.ElementTree as ET
from typing import Dict, List, Set

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE_DIR = os.path.join(ROOT, "SpineContextSeg")
MODULE_PY = os.path.join(MODULE_DIR, "SpineContextSeg.py")
HELPERS_DIR = os.path.join(MODULE_DIR, "SpineContextSegSlicerLib")
PARAMETERS_PY = os.path.join(HELPERS_DIR, "parameters.py")  # the parameter node the .ui binds to
SELFTEST_PY = os.path.join(HELPERS_DIR, "selftest.py")  # the steps SpineContextSegTest runs
UI_FILE = os.path.join(MODULE_DIR, "Resources", "UI", "SpineContextSeg.ui")
MODULE_CMAKE = os.path.join(MODULE_DIR, "CMakeLists.txt")
TOP_CMAKE = os.path.join(ROOT, "CMakeLists.txt")
LIBRARY_DIR = os.path.join(ROOT, "SpineContextSegLib")
SAMPLE_CT = os.path.join(LIBRARY_DIR, "resources", "sample", "ct.nii.gz")
TERMINOLOGY_FILE = os.path.join(MODULE_DIR, "Resources", "SegmentationCategoryTypeModifier-SpineContextSeg.term.json")

#: "Firstname Lastname (Organisation)": one contributor, as Slicer's extension template writes it.
CONTRIBUTOR_RE = r"[^,()]*\S \([^,()]+\)"

#: From Slicer/ExtensionsIndex scripts/check_description_files.py.
ICON_URL_RE = r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)'
SCREENSHOT_URLS_RE = r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)'
PROJECT_RE = r"project\s*\(\s*([^\s\)\n\r]+)"

#: Designer classes with a setMRMLScene(vtkMRMLScene*) slot that the .ui must connect.
NO_SCENE_SLOT = {"qMRMLWidget", "qMRMLSegmentationShow3DButton"}

#: Imports that must not run when Slicer loads the module at startup.
HEAVY_MODULES = {"torch", "onnxruntime", "openvino", "numpy", "scipy", "SimpleITK", "matplotlib", "SpineContextSegLib", "SpineContextSegSlicerLib", "nrrd", "imp"}

#: parameterNodeWrapper connector per widget class -> the annotation it needs.
CONNECTABLE = {
    "QComboBox": "Choice",
    "QCheckBox": "bool",
    "QSpinBox": "int",
    "QDoubleSpinBox": "float",
    "QLineEdit": "str",
    "ctkDirectoryButton": "pathlib.Path",
    "qMRMLNodeComboBox": "node",
}


def read(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


@pytest.fixture(scope="module")
def module_ast() -> ast.Module:
    return ast.parse(read(MODULE_PY), filename=MODULE_PY)


@pytest.fixture(scope="module")
def parameters_ast() -> ast.Module:
    return ast.parse(read(PARAMETERS_PY), filename=PARAMETERS_PY)


@pytest.fixture(scope="module")
def ui_root() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def ui_widgets(ui_root) -> Dict[str, ET.Element]:
    return {w.get("name"): w for w in ui_root.iter("widget")}


def widget_property(widget: ET.Element, name: str):
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            return prop
    return None


def parameter_fields(parameters_ast) -> Dict[str, str]:
    """Annotated fields of the @parameterNodeWrapper class: name -> annotation source."""
    for node in parameters_ast.body:
        if isinstance(node, ast.ClassDef) and any(ast.unparse(d) == "parameterNodeWrapper" for d in node.decorator_list):
            return {
                statement.target.id: ast.unparse(statement.annotation)
                for statement in node.body
                if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
            }
    raise AssertionError("no @parameterNodeWrapper class in SpineContextSegSlicerLib/parameters.py")


def cmake_list(text: str, variable: str) -> List[str]:
    match = re.search(r"set\(\s*" + variable + r"\s+(.*?)\)", text, re.S)
    assert match, f"{variable} not set in CMake"
    return [item for item in match.group(1).split() if not item.startswith("#")]


# ----------------------------------------------------------------------------- the .ui file
def test_ui_root_is_the_module_widget(ui_root):
    root_widget = ui_root.find("widget")
    assert root_widget.get("class") == "qMRMLWidget" and root_widget.get("name") == "SpineContextSeg"
    assert ui_root.findtext("class") == "SpineContextSeg"


def test_every_ui_attribute_used_in_the_code_exists(module_ast, ui_root):
    trees = [module_ast] + [ast.parse(read(os.path.join(HELPERS_DIR, f))) for f in sorted(os.listdir(HELPERS_DIR)) if f.endswith(".py")]
    used = {
        node.attr
        for tree in trees
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
    }
    assert len(used) > 10  # the walk found the widget accesses
    missing = sorted(used - set(ui_widgets(ui_root)))
    assert not missing, f"self.ui.<name> used but not in the .ui: {missing}"


def test_every_custom_widget_class_is_declared(ui_root):
    declared = {c.findtext("class") for c in ui_root.iter("customwidget")}
    used = {w.get("class") for w in ui_root.iter("widget")}
    custom = {c for c in used if c.startswith(("qMRML", "qSlicer", "ctk"))}
    assert not custom - declared, f"undeclared custom widgets: {sorted(custom - declared)}"
    for widget in ui_root.iter("customwidget"):
        assert widget.findtext("header") == widget.findtext("class") + ".h"


def test_every_parameter_binding_is_a_wrapper_field_of_a_compatible_type(parameters_ast, ui_root):
    fields = parameter_fields(parameters_ast)
    bound = {}
    for name, widget in ui_widgets(ui_root).items():
        prop = widget_property(widget, "SlicerParameterName")
        if prop is None:
            continue
        assert prop.get("stdset") == "0", f"{name}: SlicerParameterName must be a dynamic property (stdset=0)"
        parameter = prop.findtext("string")
        assert parameter in fields, f"{name} binds to '{parameter}', which is not a parameter node field"
        assert parameter not in bound, f"'{parameter}' bound twice ({bound.get(parameter)}, {name})"
        bound[parameter] = name
        kind = CONNECTABLE.get(widget.get("class"))
        assert kind, f"{name}: no parameterNodeWrapper connector for {widget.get('class')}"
        annotation = fields[parameter]
        if kind == "Choice":
            assert "Choice(" in annotation, f"{name}: a QComboBox needs Annotated[..., Choice([...])]"
            assert not widget.findall("item"), f"{name}: the connector fills the combo box; remove the .ui items"
        elif kind == "node":
            assert annotation.startswith("vtkMRML"), f"{name}: {annotation} is not a node type"
        else:
            assert annotation == kind or annotation.startswith(f"Annotated[{kind},"), f"{name} ({widget.get('class')}) needs {kind}, field is {annotation}"
    # the invertThreshold-style template bug: a property that was meant to be SlicerParameterName
    for name, widget in ui_widgets(ui_root).items():
        for prop in widget.findall("property"):
            if prop.get("stdset") == "0" and prop.get("name") != "SlicerParameterName":
                assert prop.get("name") not in fields, f"{name}: property '{prop.get('name')}' looks like a misspelt binding"
    assert set(bound) == set(fields), f"fields without a widget: {sorted(set(fields) - set(bound))}"


def test_every_mrml_widget_gets_the_scene(ui_root):
    connected = {
        c.findtext("receiver")
        for c in ui_root.iter("connection")
        if c.findtext("sender") == "SpineContextSeg"
        and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
        and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    mrml = {name for name, w in ui_widgets(ui_root).items() if w.get("class").startswith("qMRML") and w.get("class") not in NO_SCENE_SLOT}
    assert {"inputVolumeSelector", "outputSegmentationSelector"} <= mrml
    assert mrml == connected, f"missing mrmlSceneChanged->setMRMLScene for {sorted(mrml - connected)}"


def test_segmentation_output_defaults_to_create_new(ui_root):
    output = ui_widgets(ui_root)["outputSegmentationSelector"]
    assert widget_property(output, "noneEnabled").findtext("bool") == "true"
    assert "Create new" in widget_property(output, "noneDisplay").findtext("string")
    volume = ui_widgets(ui_root)["inputVolumeSelector"]
    assert widget_property(volume, "showChildNodeTypes").findtext("bool") == "false"  # no label maps


# ----------------------------------------------------------------------------- the module file
def test_one_python_file_directly_in_the_module_folder():
    assert sorted(f for f in os.listdir(MODULE_DIR) if f.endswith(".py")) == ["SpineContextSeg.py"]


def test_module_classes_exist_with_slicer_bases(module_ast):
    bases = {node.name: [ast.unparse(b) for b in node.bases] for node in module_ast.body if isinstance(node, ast.ClassDef)}
    assert "ScriptedLoadableModule" in bases["SpineContextSeg"]
    assert "ScriptedLoadableModuleWidget" in bases["SpineContextSegWidget"]
    assert "ScriptedLoadableModuleLogic" in bases["SpineContextSegLogic"]
    assert "ScriptedLoadableModuleTest" in bases["SpineContextSegTest"]
    test_methods = [n.name for n in next(c for c in module_ast.body if isinstance(c, ast.ClassDef) and c.name == "SpineContextSegTest").body if isinstance(n, ast.FunctionDef)]
    assert sum(name.startswith("test_") for name in test_methods) >= 2


def test_process_signature(module_ast):
    logic = next(c for c in module_ast.body if isinstance(c, ast.ClassDef) and c.name == "SpineContextSegLogic")
    process = next(f for f in logic.body if isinstance(f, ast.FunctionDef) and f.name == "process")
    assert [a.arg for a in process.args.args] == ["self", "inputVolume", "outputSegmentation"]
    keyword_only = {a.arg: ast.unparse(d) for a, d in zip(process.args.kwonlyargs, process.args.kw_defaults)}
    assert keyword_only["device"] == "'auto'"
    assert keyword_only["waitForCompletion"] == "True"
    assert keyword_only["eventCallback"] == "None"


def module_level_imports(tree: ast.Module) -> Set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_heavy_imports_at_module_level(module_ast):
    heavy = module_level_imports(module_ast) & HEAVY_MODULES
    assert not heavy, f"SpineContextSeg.py imports {sorted(heavy)} at load time (Slicer imports every module at startup)"
    source = read(MODULE_PY)
    assert 'slicer.app.connect("startupCompleted()", registerSampleData)' in source
    assert 'slicer.app.connect("startupCompleted()", loadTerminology)' in source


def module_function(module_ast, name: str, class_name: str = None) -> ast.FunctionDef:
    body = module_ast.body
    if class_name:
        body = next(c for c in body if isinstance(c, ast.ClassDef) and c.name == class_name).body
    return next(f for f in body if isinstance(f, ast.FunctionDef) and f.name == name)


def module_constant(module_ast, name: str):
    for node in module_ast.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"no module-level constant {name} in SpineContextSeg.py")


# ----------------------------------------------------------------------------- start-up and sample data
def test_sample_checksum_is_a_constant_that_matches_the_shipped_file(module_ast):
    """The expected SHA-256 is written in the code, not computed from the very file it should check."""
    with open(SAMPLE_CT, "rb") as handle:
        actual = hashlib.sha256(handle.read()).hexdigest()
    assert module_constant(module_ast, "SAMPLE_SHA256") == actual, "update SAMPLE_SHA256 in SpineContextSeg.py (the sample CT changed)"
    register = module_function(module_ast, "registerSampleData")
    source = ast.unparse(register)
    assert "hashlib" not in source and "open(" not in source, "registerSampleData must not hash the file it checks"
    assert "SAMPLE_SHA256" in source


def test_startup_functions_catch_an_incomplete_install(module_ast):
    """samplePath() (which imports the library) and the terminology loading run inside a try."""
    for name, call in (("registerSampleData", "samplePath"), ("loadTerminology", "_libraries")):
        function = module_function(module_ast, name)
        calls_in_try = {
            ast.unparse(node.func)
            for statement in ast.walk(function)
            if isinstance(statement, ast.Try) and statement.handlers
            for inner in statement.body
            for node in ast.walk(inner)
            if isinstance(node, ast.Call)
        }
        all_calls = {ast.unparse(node.func) for node in ast.walk(function) if isinstance(node, ast.Call)}
        assert call in all_calls and call in calls_in_try, f"{name}: {call}() must be called inside try/except"


# ----------------------------------------------------------------------------- the self-test
def test_self_test_works_without_the_module_entered_and_offline(module_ast):
    """Reload & Test (or ctest) may run while the module was never entered, and without network."""
    test_class = next(c for c in module_ast.body if isinstance(c, ast.ClassDef) and c.name == "SpineContextSegTest")
    source = ast.unparse(test_class) + "\n" + read(SELFTEST_PY)  # the class and the steps it runs
    assert "._parameterNode" not in source, "the self-test must not read widget._parameterNode (None until the module is entered)"
    assert "ensureParameterNode()" in source
    for network in ("installDependencies", "pip_install", "pip_ensure", "urlopen", "requests."):
        assert network not in source, f"the self-test must not need the network ({network})"
    helpers = [f.name for f in test_class.body if isinstance(f, ast.FunctionDef) and not f.name.startswith("test_")]
    assert not [h for h in helpers if "test" in h], f"Slicer runs every method whose name contains 'test': {helpers}"
    # widget actions the self-test drives get the parameter node through ensureParameterNode()
    plumbing = {"__init__", "initializeParameterNode", "setParameterNode", "ensureParameterNode", "exit", "_onParameterNodeModified", "updateButtons"}
    widget = next(c for c in module_ast.body if isinstance(c, ast.ClassDef) and c.name == "SpineContextSegWidget")
    direct = sorted(f.name for f in widget.body if isinstance(f, ast.FunctionDef) and f.name not in plumbing and "self._parameterNode" in ast.unparse(f))
    assert not direct, f"use self.ensureParameterNode() in {direct}"


def all_imports(path: str) -> Set[str]:
    names = set()
    for node in ast.walk(ast.parse(read(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_helper_packages_stay_testable_without_qt():
    helpers = HELPERS_DIR
    for name in ("worker_command.py", "worker_events.py", "worker_process.py"):
        assert all_imports(os.path.join(helpers, name)) & {"qt", "ctk", "slicer", "vtk"} == set(), name
    assert all_imports(os.path.join(helpers, "mrml_io.py")) & {"qt", "ctk"} == set()
    for folder, _dirs, files in os.walk(LIBRARY_DIR):
        for name in files:
            if name.endswith(".py"):
                assert not all_imports(os.path.join(folder, name)) & {"slicer", "qt", "ctk"}, f"{name} imports Slicer/Qt"


def module_python_files() -> List[str]:
    paths = []
    for folder, dirs, files in os.walk(MODULE_DIR):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        paths += [os.path.join(folder, f) for f in files if f.endswith(".py")]
    return sorted(paths)


@pytest.mark.parametrize("path", module_python_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_module_code_compiles_for_python_3_9(path, tmp_path):
    source = read(path)
    ast.parse(source, filename=path, feature_version=(3, 9))  # Slicer 5.8 runs Python 3.9
    py_compile.compile(path, cfile=str(tmp_path / "x.pyc"), doraise=True)
    assert "from __future__ import annotations" in source
    assert not re.search(r"^\s*import imp\b", source, re.M)  # removed in Python 3.12


# ----------------------------------------------------------------------------- CMake
def shipped_files(folder: str, skip_names=()) -> Set[str]:
    files = set()
    for current, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "__pycache__" and not d.startswith(".")]
        for name in names:
            if name.endswith((".pyc", ".pyo")) or name in skip_names or name.startswith("."):
                continue
            files.add(os.path.relpath(os.path.join(current, name), folder).replace(os.sep, "/"))
    return files


def test_module_cmake_lists_every_module_file():
    text = read(MODULE_CMAKE)
    listed = {item.replace("${MODULE_NAME}", "SpineContextSeg") for item in cmake_list(text, "MODULE_PYTHON_SCRIPTS") + cmake_list(text, "MODULE_PYTHON_RESOURCES")}
    present = shipped_files(MODULE_DIR, skip_names=("CMakeLists.txt", "README-slicer.md"))
    assert present - listed == set(), f"not listed in SpineContextSeg/CMakeLists.txt (would be missing when installed): {sorted(present - listed)}"
    assert listed - present == set(), f"listed but missing: {sorted(listed - present)}"
    assert "WITH_GENERIC_TESTS" in text
    assert re.search(r"slicer_add_python_unittest\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py", text)


def test_module_cmake_installs_every_library_file_next_to_the_module():
    text = read(MODULE_CMAKE)
    listed = set(cmake_list(text, "LIBRARY_PYTHON_SCRIPTS") + cmake_list(text, "LIBRARY_PYTHON_RESOURCES"))
    not_shipped = set(cmake_list(text, "LIBRARY_NOT_SHIPPED"))
    present = {"SpineContextSegLib/" + f for f in shipped_files(LIBRARY_DIR)}
    assert present - listed - not_shipped == set(), f"add to SpineContextSeg/CMakeLists.txt (LIBRARY_PYTHON_*): {sorted(present - listed - not_shipped)}"
    assert listed - present == set(), f"listed but missing: {sorted(listed - present)}"
    assert not listed & not_shipped
    scripts = cmake_list(text, "LIBRARY_PYTHON_SCRIPTS")
    assert all(s.endswith(".py") for s in scripts) and "SpineContextSegLib/worker.py" in scripts
    # rooted at the project so the package lands in qt-scripted-modules/SpineContextSegLib
    macro = re.search(r"ctkMacroCompilePythonScript\((.*?)\n  \)", text, re.S).group(1)
    assert "SOURCE_DIR ${PROJECT_SOURCE_DIR}" in macro
    assert "DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}" in macro
    assert "INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}" in macro


def test_extension_ships_the_onnx_model_and_not_the_torch_weights():
    """The worker runs ONNX Runtime: model.pt (6.9 MB, PyTorch only) stays out of the extension."""
    text = read(MODULE_CMAKE)
    shipped = cmake_list(text, "LIBRARY_PYTHON_RESOURCES") + cmake_list(text, "MODULE_PYTHON_RESOURCES")
    assert "SpineContextSegLib/resources/models/spine/model.onnx" in shipped
    assert "SpineContextSegLib/resources/models/spine/model.json" in shipped
    assert not [f for f in shipped if f.endswith((".pt", ".pth", ".ckpt"))], "PyTorch weights must not be installed"
    assert "SpineContextSegLib/resources/models/spine/model.pt" in cmake_list(text, "LIBRARY_NOT_SHIPPED")


def test_testing_cmake_subdirectory_as_in_slicers_template():
    """Slicer's scripted-module template: add_subdirectory(Testing) under BUILD_TESTING, Testing/Python inside."""
    text = read(MODULE_CMAKE)
    block = re.search(r"if\(BUILD_TESTING\)(.*?)endif\(\)", text, re.S)
    assert block and "add_subdirectory(Testing)" in block.group(1)
    assert re.search(r"slicer_add_python_unittest\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py", block.group(1))
    testing = os.path.join(MODULE_DIR, "Testing")
    assert "add_subdirectory(Python)" in read(os.path.join(testing, "CMakeLists.txt"))
    python = read(os.path.join(testing, "Python", "CMakeLists.txt"))
    assert "Testing/test_slicer_static.py" in python and "add_test(" in python
    assert os.path.isfile(os.path.join(ROOT, "Testing", "test_slicer_static.py"))


def cmake_value(text: str, variable: str) -> str:
    match = re.search(r"set\(" + variable + r'\s+"([^"]*)"\)', text)
    assert match, f"{variable} not set"
    return match.group(1)


def test_top_level_cmake_metadata():
    text = read(TOP_CMAKE)
    assert re.findall(PROJECT_RE, text, re.I | re.M)[0] == "SpineContextSeg"
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        match = re.search(r"set\(EXTENSION_" + key + r'\s+"([^"]*)"\)', text)
        assert match and match.group(1).strip(), f"EXTENSION_{key} is missing or empty"
    assert re.search(r'set\(EXTENSION_CATEGORY\s+"Segmentation"\)', text)
    icon = re.findall(ICON_URL_RE, text, re.I | re.M)
    assert icon and icon[0].startswith("https://") and icon[0].endswith("/SpineContextSeg.png")
    screenshots = re.findall(SCREENSHOT_URLS_RE, text, re.I | re.M)
    assert screenshots and all(url.startswith("http") for url in screenshots[0].split())
    assert "add_subdirectory(SpineContextSeg)" in text
    assert "include(${Slicer_EXTENSION_CPACK})" in text
    assert not "SpineContextSeg".startswith("Slicer")  # the index refuses names starting with Slicer


def test_metadata_fields_are_slicer_fields_and_contributors_name_their_organisation(module_ast):
    text = read(TOP_CMAKE)
    slicer_fields = {"HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS", "STATUS", "BUILD_SUBDIRECTORY", "ENABLED"}
    used = set(re.findall(r"set\(EXTENSION_([A-Z_]+)\s", text))
    assert used <= slicer_fields, f"not Slicer extension fields: {sorted(used - slicer_fields)}"
    contributors = [c.strip() for c in cmake_value(text, "EXTENSION_CONTRIBUTORS").split(",")]
    for contributor in contributors:
        assert re.fullmatch(CONTRIBUTOR_RE, contributor), f"{contributor!r}: write contributors as 'Firstname Lastname (Organisation)'"
    assert module_constant(module_ast, "CONTRIBUTORS") == contributors, "the module's contributors differ from EXTENSION_CONTRIBUTORS"
    assert "self.parent.contributors = list(CONTRIBUTORS)" in read(MODULE_PY)


def raw_github_prefix(text: str) -> str:
    """``https://raw.githubusercontent.com/<owner>/<repo>/main/`` of the repository EXTENSION_HOMEPAGE names."""
    homepage = re.fullmatch(r"https://github\.com/([^/#]+)/([^/#]+)(?:#.*)?", cmake_value(text, "EXTENSION_HOMEPAGE"))
    assert homepage, "EXTENSION_HOMEPAGE is not a GitHub repository page"
    return f"https://raw.githubusercontent.com/{homepage.group(1)}/{homepage.group(2)}/main/"


def test_icon_and_screenshot_urls_name_files_in_this_repository():
    """Each URL is the raw GitHub address of a PNG in this tree (the Extensions Manager downloads them)."""
    text = read(TOP_CMAKE)
    prefix = raw_github_prefix(text)
    icon = re.findall(ICON_URL_RE, text, re.I | re.M)
    screenshots = re.findall(SCREENSHOT_URLS_RE, text, re.I | re.M)
    assert len(icon) == 1 and len(screenshots) == 1
    urls = icon + screenshots[0].split()
    assert len(urls) >= 3, "give at least two screenshots"
    for url in urls:
        assert url.startswith(prefix), f"{url} is not a raw URL of {prefix}"
        path = os.path.join(ROOT, *url[len(prefix):].split("/"))
        assert os.path.isfile(path), f"{url} names {os.path.relpath(path, ROOT)}, which is not in the repository"
        png_size(path)  # a real PNG
        assert os.path.getsize(path) < 300 * 1024, f"{os.path.relpath(path, ROOT)} is over 300 KB"
    for url in screenshots[0].split():
        width, height = png_size(os.path.join(ROOT, *url[len(prefix):].split("/")))
        assert width >= 640 and height >= 400, f"{url}: {width}x{height} is too small for a screenshot"


def png_size(path: str):
    with open(path, "rb") as handle:
        head = handle.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_icons_are_png_of_the_right_size():
    assert png_size(os.path.join(ROOT, "SpineContextSeg.png")) == (128, 128)
    assert png_size(os.path.join(MODULE_DIR, "Resources", "Icons", "SpineContextSeg.png")) == (128, 128)
    width, height = png_size(os.path.join(MODULE_DIR, "Resources", "Icons", "SpineContextSegSampleCT.png"))
    assert 200 <= width <= 300 and 200 <= height <= 300  # Sample Data thumbnails are about 260x280


# ----------------------------------------------------------------------------- terminology
def test_terminology_file_is_generated_from_the_label_table():
    """The shipped .term.json is exactly what labels.slicer_terminology_json() writes."""
    from SpineContextSegLib import labels

    assert os.path.basename(TERMINOLOGY_FILE) == labels.TERMINOLOGY_FILE_NAME
    assert read(TERMINOLOGY_FILE) == labels.slicer_terminology_json(), (
        "regenerate: python -c \"from SpineContextSegLib.labels import slicer_terminology_json as t; "
        f"open('{os.path.relpath(TERMINOLOGY_FILE, ROOT)}', 'w').write(t())\""
    )
    assert f'TERMINOLOGY_FILE = os.path.join(MODULE_DIR, "Resources", "{labels.TERMINOLOGY_FILE_NAME}")' in read(MODULE_PY)


def test_terminology_file_has_every_code_a_segment_names():
    from SpineContextSegLib import labels

    terminology = json.loads(read(TERMINOLOGY_FILE))
    context = terminology["SegmentationCategoryTypeContextName"]
    assert context == labels.TERMINOLOGY_CONTEXT and "General Anatomy" not in context
    categories = {(c["CodingSchemeDesignator"], c["CodeValue"]): c for c in terminology["SegmentationCodes"]["Category"]}
    for info in [labels.SPINE] + list(labels.VERTEBRAE):
        fields = info.terminology_entry().split("~")
        assert fields[0] == context, f"{info.name}: tag names context {fields[0]!r}"
        category = categories[tuple(fields[1].split("^")[:2])]
        types = {(t["CodingSchemeDesignator"], t["CodeValue"]): t for t in category["Type"]}
        scheme, code, meaning = fields[2].split("^")
        assert (scheme, code) in types, f"{info.name}: type {code} is not in {os.path.basename(TERMINOLOGY_FILE)}"
        assert types[(scheme, code)]["CodeMeaning"] == meaning
        rgb = types[(scheme, code)]["recommendedDisplayRGBValue"]
        assert len(rgb) == 3 and all(0 <= c <= 255 for c in rgb)
    names = {t["CodeMeaning"] for c in categories.values() for t in c["Type"]}
    assert {f"{p}{i} vertebra" for p, n in (("C", 7), ("T", 12), ("L", 5)) for i in range(1, n + 1)} | {"Sacrum", "Vertebral column"} <= names


def test_license_is_apache_2():
    text = read(os.path.join(ROOT, "LICENSE"))
    assert "Apache License" in text and "Version 2.0, January 2004" in text
