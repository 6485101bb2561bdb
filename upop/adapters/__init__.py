"""Family adapters, registered by ``config.model_type``. Importing this package registers them all."""

from .base import Adapter, all_adapters, get_adapter, register, supported_model_types
from . import blip, blip_nlvr, clip, deit, siglip, vit  # noqa: F401  (registration side effect)

__all__ = ["Adapter", "all_adapters", "get_adapter", "register", "supported_model_types"]
