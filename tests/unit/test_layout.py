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
            if path.parent == ROOT / "upop" / "models" and path.name not in ("hub.py", "demo.py"):
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
    for name in ("pruning/search.py", "pruning/slim.py", "pruning/masks.py", "pruning/units.py", "training/retrain.py"):
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


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] in ("exporters", "profiles"):  # installed inside the upop namespace
        parts = ["upop", *parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module → the project's modules it imports (at the top or inside functions), relative imports resolved."""
    files = {_module_name(p): p for folder in ("upop", "upop_cli", "exporters", "profiles")
             for p in (ROOT / folder).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    found.add(t)
        graph[name] = found
    return graph


def _outer(name: str) -> bool:
    return name.startswith(("upop.exporters", "upop.profiles", "upop_cli"))


def test_the_core_never_imports_the_exporters_the_profiles_package_or_the_cli():
    upward = [f"{m} → {d}" for m, deps in _import_graph().items() if not _outer(m) for d in deps if _outer(d)]
    assert not upward, upward


def test_there_is_no_import_circle():
    graph = _import_graph()
    circles = []
    for start in graph:  # a path from a module back to itself
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    circles.append(" → ".join(path + [start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    assert not circles, sorted(set(circles))[:5]


def test_the_layout_check_sees_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The two checks above cannot pass by not looking: a planted circle and upward import are found."""
    fake = tmp_path / "repo"
    for folder in ("upop", "upop_cli", "exporters", "profiles"):
        (fake / folder).mkdir(parents=True)
        (fake / folder / "__init__.py").write_text("")
    (fake / "upop" / "a.py").write_text("from .b import x\n")
    (fake / "upop" / "b.py").write_text("def f():\n    from upop.a import y\n    from upop.exporters import get\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", fake)
    graph = _import_graph()
    assert graph["upop.a"] == {"upop.b"} and graph["upop.b"] == {"upop.a", "upop.exporters"}
    import pytest

    with pytest.raises(AssertionError):
        test_there_is_no_import_circle()
    with pytest.raises(AssertionError):
        test_the_core_never_imports_the_exporters_the_profiles_package_or_the_cli()


def test_every_document_a_docstring_names_is_in_the_repository():
    """The repository stands alone: no pointer to a spec or design note it does not hold."""
    generated = {"report.md"}  # written by upop into its output folders
    missing = []
    for folder in ("upop", "upop_cli", "exporters", "profiles", "benchmarks", "scripts", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            if re.search("SP" + r"EC\s*§", text):  # split so this line does not find itself
                missing.append(f"{path.relative_to(ROOT)}: a section of a spec outside the repository")
            for doc in re.findall(r"\b([\w./-]+\.md)\b", text):
                if Path(doc).name not in generated and not (ROOT / doc).is_file():
                    missing.append(f"{path.relative_to(ROOT)}: {doc}")
    assert not missing, missing


def test_every_user_error_is_defined_in_the_one_error_module():
    defined = []
    for folder in ("upop", "upop_cli", "exporters", "profiles"):
        for path in (ROOT / folder).rglob("*.py"):
            if path == ROOT / "upop" / "errors.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and any(getattr(b, "id", "").endswith(("Error", "Mismatch"))
                                                          for b in node.bases):
                    defined.append(f"{path.relative_to(ROOT)}: {node.name}")
    assert not defined, defined


def test_the_core_is_grouped_by_concern():
    """A newcomer finds a thing where its folder's name says: only the public verbs, the errors and the version
    sit at the top of ``upop/``; everything else lives in a folder by concern (pruning, training, latency, run,
    models, datasets, tasks, adapters)."""
    top = sorted(p.name for p in (ROOT / "upop").glob("*.py"))
    assert top == ["__init__.py", "_version.py", "api.py", "errors.py"], top
    for folder in ("pruning", "training", "latency", "run", "models", "datasets", "tasks", "adapters"):
        assert (ROOT / "upop" / folder / "__init__.py").is_file(), folder


def _kind_switches(path: Path, names: set[str], classes: set[str]) -> list[str]:
    """Where ``path`` compares something with a unit kind's name or asks isinstance of a concrete kind."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                items = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                hits = [i.value for i in items if isinstance(i, ast.Constant) and i.value in names]
                found += [f"{path.relative_to(ROOT)}:{node.lineno}: compares with kind {h!r}" for h in hits]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass") \
                and len(node.args) == 2:
            used = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)} | \
                   {n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)}
            found += [f"{path.relative_to(ROOT)}:{node.lineno}: isinstance of kind {c}" for c in sorted(used & classes)]
    return found


def _kind_names_and_classes() -> tuple[set[str], set[str]]:
    from upop.pruning.kinds import KINDS

    return set(KINDS), {cls.__name__ for cls in KINDS.values()}


def test_no_module_outside_the_kinds_switches_on_a_unit_kind():
    """The core iterates unit kinds: a comparison with a kind's name (``== "attn"``) or an isinstance of a
    concrete kind outside ``upop/kinds`` is a switch a new kind would have to edit."""
    names, classes = _kind_names_and_classes()
    offenders = [hit for folder in ("upop", "upop_cli", "exporters", "profiles")
                 for path in (ROOT / folder).rglob("*.py") if "kinds" not in path.relative_to(ROOT).parts
                 for hit in _kind_switches(path, names, classes)]
    assert not offenders, offenders


def test_the_kind_switch_check_sees_a_planted_switch(tmp_path):
    names, classes = _kind_names_and_classes()
    planted = tmp_path / "planted.py"
    planted.write_text('def f(s, sig):\n    if s.kind == "attn" or sig["kind"] in ("mlp", "x"):\n        pass\n'
                       '    return isinstance(s, (AttentionSpec, int)) or isinstance(s, kinds.GQASpec)\n')
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        hits = _kind_switches(planted, names, classes)
    finally:
        ROOT = saved
    assert len(hits) == 4, hits


# -- runtimes: no switch on a runtime's name outside its own file ----------------------------------------

def _runtime_spellings() -> dict[str, Path]:
    """Every name and older spelling of a registered runtime → the file that defines its backend. PyTorch is
    the core's own runtime (it trains and measures in it), not one of the exporters' backends."""
    import sys

    from upop.exporters import backends

    out = {}
    for b in backends():
        if b.name != "torch":
            own = Path(sys.modules[type(b).__module__].__file__).resolve()
            out |= {n: own for n in (b.name, *b.aliases)}
    return out


def _name_comparisons(path: Path, spellings: dict[str, Path]) -> list[str]:
    """``x == "tensorrt"``, ``"trt" != x``, ``x in ("ort", "trt")``: a comparison with a runtime's name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare) or not all(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn))
                                                        for op in node.ops):
            continue
        for side in (node.left, *node.comparators):
            items = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
            for item in items:
                if isinstance(item, ast.Constant) and item.value in spellings \
                        and spellings[item.value] != path.resolve():
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_switches_on_a_runtimes_name_outside_its_own_file():
    """A runtime is one file: code elsewhere asks the registry (``upop.exporters.backends``), never the name."""
    spellings = _runtime_spellings()
    assert {"onnxruntime", "tensorrt", "openvino", "ort", "trt"} <= set(spellings)
    offenders = [hit for folder in ("upop", "upop_cli", "exporters", "profiles", "benchmarks")
                 for path in sorted((ROOT / folder).rglob("*.py")) for hit in _name_comparisons(path, spellings)]
    assert not offenders, offenders


def test_the_runtime_name_check_sees_a_switch(tmp_path):
    spellings = _runtime_spellings()
    bad = ROOT / "exporters" / "_layout_probe.py"  # inside the repository, as a real offender would be
    try:
        bad.write_text('def f(fmt):\n    return fmt == "trt" or fmt in ("x", "openvino")\n')
        assert len(_name_comparisons(bad, spellings)) == 2
    finally:
        bad.unlink()
    own = spellings["openvino"]
    assert not _name_comparisons(own, spellings)
