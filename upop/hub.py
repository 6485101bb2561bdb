"""Loading models by alias, hub id or local folder, with errors a user can act on.

Code from a model folder is never run: every ``from_pretrained`` passes ``trust_remote_code=False``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from torch import nn

from .adapters import Adapter, get_adapter
from .errors import ModelLoadError, UnsupportedModelError

#: Short names for well-known public checkpoints.
ALIASES: dict[str, str] = {
    "blip": "Salesforce/blip-itm-base-coco",
    "blip-caption": "Salesforce/blip-image-captioning-base",
    "blip-vqa": "Salesforce/blip-vqa-base",
    "clip": "openai/clip-vit-base-patch16",
    "siglip": "google/siglip-base-patch16-224",
    "vit": "google/vit-base-patch16-224",
    "deit": "facebook/deit-small-patch16-224",
}


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


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the hub answers at all. Without it, huggingface_hub retries for ~20 s before failing;
    we go straight to the local cache instead (and an uncached id fails at once)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_config(source: str) -> Any:
    import transformers

    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{source} is a file; a model is a folder with a config.json")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{source} is not a model folder (no config.json)")
    elif _looks_like_path(source):
        raise ModelLoadError(f"model path {source} does not exist")
    try:
        local_only = not path.exists() and not hub_reachable()
        return transformers.AutoConfig.from_pretrained(str(path) if path.exists() else source,
                                                      trust_remote_code=False,
                                                      local_files_only=local_only)
    except (OSError, ValueError) as exc:
        if path.exists():
            raise ModelLoadError(f"could not read the config of {source}: {exc}") from None
        raise ModelLoadError(
            f"could not load {source!r} from the Hugging Face hub (unknown id, or no network); "
            "pass a local model folder or a built-in demo-* model"
        ) from None


def load_pretrained(name: str, task: str | None = None) -> Loaded:
    """Load a supported model by alias, hub id or local folder."""
    source = resolve(name)
    config = load_config(source)
    adapter = get_adapter(config)
    archs = [a for a in (getattr(config, "architectures", None) or []) if a in adapter.classes]
    if task is not None:
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
    try:
        model = cls.from_pretrained(str(path) if path.exists() else source,  # type: ignore[attr-defined]
                                    trust_remote_code=False)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"could not load the weights of {name}: {first}") from None
    return Loaded(model=model, adapter=adapter, processor=load_processor(str(path) if path.exists() else source),
                  source=source)


@dataclass
class Preprocessing:
    """A folder's image processor and tokenizer when no single processor class holds both (ViT, DeiT):
    saved together, so a checkpoint written from it has every file its preprocessing needs."""

    parts: list[Any]

    def save_pretrained(self, out_dir: str) -> None:
        for part in self.parts:
            part.save_pretrained(out_dir)


def load_processor(source: str) -> Any | None:
    """The model folder's own processor (image processor and tokenizer), or None when it has none."""
    import transformers

    errors = (OSError, ValueError, KeyError, TypeError, AttributeError)
    try:
        proc = transformers.AutoProcessor.from_pretrained(source, trust_remote_code=False)
        if isinstance(proc, transformers.ProcessorMixin):
            return proc
    except errors:
        pass
    # No processor class (ViT's folder has a tokenizer and an image processor): AutoProcessor would
    # return just the tokenizer, and the image processor would be lost.
    parts = []
    for auto in (transformers.AutoImageProcessor, transformers.AutoTokenizer):
        try:
            parts.append(auto.from_pretrained(source, trust_remote_code=False))
        except errors:
            pass
    return None if not parts else parts[0] if len(parts) == 1 else Preprocessing(parts)
