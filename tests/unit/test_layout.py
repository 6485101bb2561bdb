"""The package boundaries the architecture promises."""

import ast
import importlib
from pathlib import Path

import upop

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def test_no_module_outside_the_adapters_imports_a_model_class():
    offenders = []
    for folder in ("upop", "upop_cli", "exporters", "profiles"):
        for path in (ROOT / folder).rglob("*.py"):
            if "adapters" in path.parts and path.name != "base.py" and path.name != "__init__.py":
                continue
            for name in _imports(path):
                if name.startswith("transformers.models") or (
                    name.startswith("transformers.") and name.split(".")[-1][:1].isupper()
                    and name.split(".")[-1] not in ("AutoConfig", "AutoProcessor")
                ):
                    offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert not offenders, offenders


def test_search_and_slim_do_not_import_transformers():
    for name in ("search.py", "slim.py", "masks.py", "units.py", "retrain.py"):
        assert not [n for n in _imports(ROOT / "upop" / name) if n.startswith("transformers")], name


def test_exporters_and_profiles_live_in_the_upop_namespace():
    exp = importlib.import_module("upop.exporters")
    prof = importlib.import_module("upop.profiles")
    assert Path(exp.__file__).resolve().parent == ROOT / "exporters"
    assert Path(prof.__file__).resolve().parent == ROOT / "profiles"
    assert Path(upop.__file__).resolve().parent == ROOT / "upop"


def test_exporter_registry_names_the_known_formats():
    import pytest

    from upop.errors import UpopError

    exp = importlib.import_module("upop.exporters")
    with pytest.raises(UpopError, match="export format 'tflite' is not supported"):
        exp.get("tflite")
