"""Type-check exporters/tensorrt.py against the ``tensorrt-stubs`` package (TensorRT 10 API).

The stubs install as a plain ``tensorrt/`` folder without ``py.typed`` (so mypy ignores them in
site-packages) and contain a few syntax errors (a parameter named ``in``, a default before a
non-default). This copies them to a temporary folder, repairs those, and runs mypy on the module
with errors inside the stubs themselves ignored. Exit status: mypy's.

    pip install --no-deps tensorrt-stubs && python scripts/typecheck_tensorrt.py [FILE ...]

With no FILE it checks upop's TensorRT code (the exporter and its runtime backend).
"""

import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "exporters" / "tensorrt.py", ROOT / "exporters" / "runtimes" / "tensorrt.py"]


def main(files: list[str]) -> int:
    spec = importlib.util.find_spec("tensorrt_stubs")
    if spec is None or spec.origin is None:
        print("tensorrt-stubs is not installed: pip install --no-deps tensorrt-stubs", file=sys.stderr)
        return 2
    site = Path(spec.origin).parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        for pkg in ("tensorrt", "tensorrt_bindings"):
            shutil.copytree(site / pkg, Path(tmp) / pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
        stub = Path(tmp) / "tensorrt_bindings" / "tensorrt.pyi"
        text = stub.read_text()
        text = re.sub(r"([(,] )in: ", r"\1in_: ", text)
        text = re.sub(r"(power: Weights = None, channel_axis: int)\)", r"\1 = 0)", text)
        stub.write_text(text)
        cfg = Path(tmp) / "mypy.ini"
        cfg.write_text("[mypy]\nfollow_imports = silent\nignore_missing_imports = True\n"
                       "[mypy-tensorrt_bindings.*]\nignore_errors = True\n[mypy-tensorrt.*]\nignore_errors = True\n")
        cmd = [sys.executable, "-m", "mypy", "--config-file", str(cfg), "--cache-dir", str(Path(tmp) / "cache"),
               *(files or map(str, FILES))]
        return subprocess.run(cmd, env={"MYPYPATH": tmp, "PATH": "/usr/bin:/bin"}).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
