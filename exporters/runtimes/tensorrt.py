"""TensorRT: ``upop export --format tensorrt`` (older spelling ``trt``) builds one strongly typed engine per
ONNX graph (``exporters/tensorrt.py``); profiling and calibration build engines for the shapes they time.
Needs an NVIDIA GPU: untested on this CPU machine beyond its stubs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from upop.errors import ConfigError, ExportFolderError, UpopError

from ..registry import Backend, register

DEFAULT_BATCH = "1:8:32"


class TensorRT(Backend):
    name, aliases, title = "tensorrt", ("trt",), "TensorRT"
    package, extra, exports, devices = "tensorrt", "trt", True, ("cuda",)

    def require(self) -> None:
        from ..tensorrt import require_tensorrt

        require_tensorrt()  # the package and a CUDA GPU, each with its own line

    def export(self, source: str | Path, out_dir: str | Path, **options: Any) -> dict[str, Any]:
        from ..tensorrt import export_trt

        return export_trt(source, out_dir, **options)

    def takes_batch(self, batch: str | None, precision: str | None) -> str | None:
        """The engines' optimization profile MIN:OPT:MAX (or N)."""
        from ..tensorrt import ShapeRange

        ShapeRange.parse(batch or DEFAULT_BATCH)
        return batch or DEFAULT_BATCH

    def export_options(self, fp16: bool, precision: str | None, batch: str | None, precision_options: Any) -> dict[str, Any]:
        if fp16 and precision not in (None, "fp16"):
            raise ConfigError(f"--fp16 is --precision fp16: give one of --fp16 and --precision {precision}")
        mode = "fp16" if fp16 else (precision or "fp32")
        if mode not in ("fp32", "fp16", "int8"):
            raise ConfigError(f"--format {self.name} builds fp32, fp16 or int8 engines, not {mode} (int8-dynamic is "
                              "ONNX Runtime's own operators; auto measures in ONNX Runtime: export --format onnxruntime)")
        return {"batch": batch, "fp16": mode == "fp16", "precision": precision_options(False) if mode == "int8" else None}

    def summary(self, manifest: dict[str, Any], source: str, out_dir: Path, opset: int) -> list[Any]:
        return [f"wrote {len(manifest['engines'])} TensorRT engine(s) to {out_dir}"]

    def profile(self, target: str, batches: list[int], device: str, precision: str, warmup: int,
                runs: int) -> list[Any]:
        from ..timing import profile_trt

        return profile_trt(target, batches, device, precision, warmup, runs)

    def block_timer(self, device: Any, precision: str) -> Any:
        from ..timing import trt_timer

        self.require()
        if device.type != "cuda":
            raise ConfigError("TensorRT calibration runs on a CUDA device: --device cuda")
        return trt_timer(precision == "fp16")

    def owns(self, folder: Path) -> bool:
        return (folder / "engines.json").is_file()

    def open_graphs(self, folder: Path, device: str) -> Any:
        from ..runtime import TrtModel, read_engines_manifest
        from ..tensorrt import ShapeRange

        meta = read_engines_manifest(folder)
        try:
            max_batch = ShapeRange.parse(str(meta.get("batch", DEFAULT_BATCH))).max
        except UpopError:
            raise ExportFolderError(f"{folder / 'engines.json'} is damaged (batch is not MIN:OPT:MAX)") from None
        return TrtModel(folder), folder / "onnx", max_batch


register(TensorRT())
