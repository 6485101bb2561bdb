"""Family adapters, registered by ``config.model_type``. Importing this package registers them all."""

from .base import Adapter, RetrievalHooks, TaskHooks, all_adapters, get_adapter, register, supported_model_types
from .factories import ModelFactory
from . import blip, blip_nlvr, clip, deit, siglip, vit  # noqa: F401  (registration side effect)

__all__ = ["Adapter", "ModelFactory", "RetrievalHooks", "TaskHooks", "all_adapters", "get_adapter", "register",
           "supported_model_types"]
