"""The package boundaries the architecture promises."""

import ast
import importlib
import re
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


FAMILY_NAME = re.compile(r"(Blip|CLIP|Clip|Siglip|ViT|Vit|DeiT|Deit)")


def test_no_module_outside_the_adapters_uses_a_family_class():
    """Neither imports from transformers.models nor family classes (BlipConfig, ViTImageProcessor...).

    Exempt: the adapters, and ``upop/models`` (model definitions transformers lacks, built from its
    family modules; only adapters refer to them)."""
    offenders = []
    for folder in ("upop", "upop_cli", "exporters", "profiles"):
        for path in (ROOT / folder).rglob("*.py"):
            if "adapters" in path.parts and path.name not in ("base.py", "__init__.py"):
                continue
            if path.parent == ROOT / "upop" / "models":
                continue
            text = path.read_text()
            for name in _imports(path):
                if name.startswith("transformers.models"):
                    offenders.append(f"{path.relative_to(ROOT)}: {name}")
            for m in re.finditer(r"transformers\.(\w+)", text):
                if FAMILY_NAME.match(m.group(1)):
                    offenders.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
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


def test_every_package_folder_is_listed_for_installation():
    """A folder missing from pyproject's packages imports in a checkout but not from a wheel."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {"upop." + ".".join(p.parent.relative_to(ROOT / "upop").parts) if p.parent != ROOT / "upop" else "upop"
             for p in (ROOT / "upop").rglob("__init__.py")}
    found |= {"upop_cli", "upop.exporters", "upop.profiles"}
    assert found <= listed, sorted(found - listed)
