"""Loading models by alias, hub id or local folder, with errors a user can act on.

Code from a model folder is never run: every ``from_pretrained`` passes ``trust_remote_code=False``.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from ..adapters import Adapter, get_adapter
from ..adapters.base import all_aliases
from ..errors import ModelLoadError, UnsupportedModelError

class _Aliases(Mapping[str, str]):
    """Short names for well-known public checkpoints, as the registered families declare them (read at each
    use, so a family registered later is included)."""

    def __getitem__(self, name: str) -> str:
        return all_aliases()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(all_aliases())

    def __len__(self) -> int:
        return len(all_aliases())


ALIASES: Mapping[str, str] = _Aliases()


@dataclass
class Loaded:
    model: nn.Module
    adapter: Adapter
    processor: Any | None
    source: str


def resolve(name: str) -> str:
    """Alias -> hub id; demo name -> its installed folder; anything else unchanged."""
    from .demo import demo_path, is_demo

    if is_demo(name):
        return str(demo_path(name))
    return ALIASES.get(name, name)


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or os.sep in name and name.count(os.sep) > 1


_PROBED: dict[str, bool] = {}


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false")


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the hub answers at all, probed once per process and endpoint. Without it,
    huggingface_hub retries with back-off for minutes before failing; we go straight to the local cache
    instead (and an uncached id fails at once)."""
    import socket
    from urllib.parse import urlparse

    if _offline_env():
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if endpoint not in _PROBED:
        url = urlparse(endpoint)
        try:
            with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
                _PROBED[endpoint] = True
        except OSError:
            _PROBED[endpoint] = False
    return _PROBED[endpoint]


def needs_hub(name: str | os.PathLike[str] | None) -> bool:
    """Whether opening ``name`` may need the hub: not for a demo name, nor for a local path."""
    from .demo import is_demo

    if name is None or str(name) == "":
        return False
    name = str(name)
    if is_demo(name) or Path(name).expanduser().exists() or _looks_like_path(name):
        return False
    return True


def go_offline() -> None:
    """The rest of this process reads the local Hugging Face cache only: no request, no retries."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a dependency of transformers
        return
    constants.HF_HUB_OFFLINE = True
    import sys

    hub_utils = sys.modules.get("transformers.utils.hub")  # older transformers read the flag once, at import
    if hub_utils is not None and hasattr(hub_utils, "_is_offline_mode"):
        hub_utils._is_offline_mode = True


def network_rule(*names: str | os.PathLike[str] | None) -> bool:
    """The one rule of every command that opens models: demo names and local folders never touch the
    network; a hub id (or alias) probes the hub once, and without an answer the process reads the local
    cache only, so an id that is not cached fails at once instead of after minutes of retries.
    Returns whether the hub may be used."""
    if any(needs_hub(ALIASES.get(str(n), n) if n is not None else None) for n in names) and hub_reachable():
        return True
    go_offline()
    return False


def _stored_values(folder: Path) -> int | None:
    """Values the folder's safetensors files hold (read from their headers), None when it has none."""
    from ..run.checkpoint import stored_elements
    from ..errors import CheckpointError

    files = sorted(folder.glob("*.safetensors"))
    try:
        return sum(stored_elements(f) for f in files) if files else None
    except (CheckpointError, OSError) as exc:
        raise ModelLoadError(f"could not load the weights of {folder}: {exc}") from None


def check_folder(path: Path, source: str) -> None:
    """A local model folder before transformers reads it: its config.json (depth-limited JSON, sizes in
    range and near what the weights hold, no custom code, a known model_type) and safetensors weights
    (a folder whose only weights are a pickle is refused: upop never unpickles a user's file)."""
    from ..run.safety import check_config_dict, read_json

    raw = read_json(path / "config.json", ModelLoadError)
    stored = _stored_values(path)
    check_config_dict(raw, path / "config.json", ModelLoadError, stored)
    model_type = raw.get("model_type")  # type: ignore[union-attr]
    if not isinstance(model_type, str) or not _known_type(model_type):
        raise ModelLoadError(f"{path / 'config.json'}: model_type {model_type!r} is not an architecture upop "
                             "knows (it compresses blip, clip, siglip, vit and deit)")
    if stored is None and any(path.glob("pytorch_model*.bin")):
        raise ModelLoadError(f"{source} holds its weights only as pytorch_model.bin, a pickle, which upop never "
                             "loads: save the model with safetensors (model.save_pretrained) and try again")


def _known_type(model_type: str) -> bool:
    from transformers import CONFIG_MAPPING

    # upop's own architectures (``upop.models``) are registered with transformers by their family's adapter
    # module, which ``upop.adapters`` imported with every family
    return model_type in CONFIG_MAPPING


def load_config(source: str) -> Any:
    import transformers

    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{source} is a file; a model is a folder with a config.json")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{source} is not a model folder (no config.json)")
        check_folder(path, source)
    elif _looks_like_path(source):
        raise ModelLoadError(f"model path {source} does not exist")
    try:
        local_only = not path.exists() and not hub_reachable()
        return transformers.AutoConfig.from_pretrained(str(path) if path.exists() else source,
                                                      trust_remote_code=False,
                                                      local_files_only=local_only)
    except (OSError, ValueError) as exc:
        if path.exists():
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ModelLoadError(f"could not read the config of {source}: {first}") from None
        raise ModelLoadError(
            f"could not load {source!r} from the Hugging Face hub (unknown id, or no network); "
            "pass a local model folder or a built-in demo-* model"
        ) from None


def _task_class(adapter: Any, task: str, archs: list[str]) -> str | None:
    from ..tasks import model_class_for

    return model_class_for(adapter, task, archs)


def load_pretrained(name: str, task: str | None = None) -> Loaded:
    """Load a supported model by alias, hub id or local folder."""
    source = resolve(name)
    config = load_config(source)
    adapter = get_adapter(config)
    archs = [a for a in (getattr(config, "architectures", None) or []) if a in adapter.classes]
    # a task that names the classes it trains (a task added in a file of its own) picks the class itself
    claimed = _task_class(adapter, task, archs) if task is not None and task not in adapter.classes.values() else None
    if claimed is not None:
        class_name = claimed
    elif task is not None:
        class_name = adapter.class_for_task(task)
        if archs and adapter.classes[archs[0]] != task:
            raise UnsupportedModelError(
                f"{name} is a {archs[0]} ({adapter.classes[archs[0]]}); it cannot do task {task!r}"
            )
    elif archs:
        class_name = archs[0]
    elif getattr(config, "architectures", None):
        raise UnsupportedModelError(
            f"{name} is a {config.architectures[0]}, which upop does not compress; "
            f"supported {adapter.family} classes: {', '.join(sorted(adapter.classes))}"
        )
    else:
        class_name = next(iter(adapter.classes))
    cls = adapter.model_class(class_name)
    path = Path(source).expanduser()
    local_only = path.exists() or not hub_reachable()  # probed once: load_config asked already
    try:
        # fp32 weights whatever the checkpoint's dtype (SmolVLM's and LLaVA's are published in bf16): AMP computes
        # in bf16 and trains fp32 masters, since an update at the search's lr is below bf16's resolution
        model = cls.from_pretrained(str(path) if path.exists() else source,  # type: ignore[attr-defined]
                                    trust_remote_code=False, local_files_only=local_only, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError, pickle.UnpicklingError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"could not load the weights of {name}: {first}") from None
    return Loaded(model=model, adapter=adapter,
                  processor=load_processor(str(path) if path.exists() else source, local_only=local_only),
                  source=source)


@dataclass
class Preprocessing:
    """A folder's image processor and tokenizer when no single processor class holds both (ViT, DeiT):
    saved together, so a checkpoint written from it has every file its preprocessing needs."""

    parts: list[Any]

    def save_pretrained(self, out_dir: str) -> None:
        for part in self.parts:
            part.save_pretrained(out_dir)


def load_processor(source: str, local_only: bool | None = None) -> Any | None:
    """The model folder's own processor (image processor and tokenizer), or None when it has none.
    ``local_only`` (default: when ``source`` is a local folder) reads no file from the hub."""
    import transformers

    if local_only is None:
        local_only = Path(source).expanduser().exists()
    errors = (OSError, ValueError, KeyError, TypeError, AttributeError)
    try:
        proc = transformers.AutoProcessor.from_pretrained(source, trust_remote_code=False, local_files_only=local_only)
        if isinstance(proc, transformers.ProcessorMixin):
            return proc
    except errors:
        pass
    # No processor class (ViT's folder has a tokenizer and an image processor): AutoProcessor would
    # return just the tokenizer, and the image processor would be lost.
    parts = []
    for auto in (transformers.AutoImageProcessor, transformers.AutoTokenizer):
        try:
            parts.append(auto.from_pretrained(source, trust_remote_code=False, local_files_only=local_only))
        except errors:
            pass
    return None if not parts else parts[0] if len(parts) == 1 else Preprocessing(parts)
