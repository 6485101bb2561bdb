"""Family adapters, registered by ``config.model_type``. Importing this package registers them all: every
module of the package is imported, so a family is one new file here and no list to edit."""

import importlib
import pkgutil

from .base import Adapter, RetrievalHooks, TaskHooks, all_adapters, get_adapter, register, supported_model_types
from .factories import ModelFactory

#: modules of this package that define no family
_NOT_FAMILIES = {"base", "factories", "graphs", "capabilities"}

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name not in _NOT_FAMILIES:
        importlib.import_module(f"{__name__}.{_info.name}")  # a family module registers itself

__all__ = ["Adapter", "ModelFactory", "RetrievalHooks", "TaskHooks", "all_adapters", "get_adapter", "register",
           "supported_model_types"]
