"""upop: UPop structured pruning for vision-language Transformers, from search to deployment."""

from ._version import __version__
from .api import CompressResult, compress, load
from .run.config import CompressConfig, DistillConfig, RetrainConfig, SearchConfig
from .errors import CheckpointError, ConfigError, ModelLoadError, UnsupportedModelError, UpopError

__all__ = [
    "__version__",
    "compress",
    "load",
    "CompressConfig",
    "CompressResult",
    "SearchConfig",
    "RetrainConfig",
    "DistillConfig",
    "UpopError",
    "ConfigError",
    "ModelLoadError",
    "UnsupportedModelError",
    "CheckpointError",
]
