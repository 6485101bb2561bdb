"""Exceptions that carry a message meant for the user.

The CLI turns every ``UpopError`` into one line on stderr; anything else is a bug
and keeps its traceback.
"""


class UpopError(Exception):
    """Base class: an error the user can act on."""


class ConfigError(UpopError, ValueError):
    """A setting is out of range or inconsistent."""


class NoEvaluationDataError(ConfigError):
    """An evaluation has no data: not a demo's export, and no ``--data``."""


class UnsupportedModelError(UpopError):
    """The architecture has no registered adapter, or the class is not one it handles."""


class ModelLoadError(UpopError):
    """A model id or folder could not be loaded."""


class CheckpointError(UpopError):
    """A slim checkpoint folder is missing, corrupt, mismatched or from a newer format."""


class OutputError(UpopError):
    """An output path upop must not write: a folder it did not create, the source itself, a locked,
    read-only or full destination."""


class OutputExistsError(OutputError, CheckpointError):
    """The output already exists (a ``CheckpointError`` too, as before it had its own class)."""


# -- data, profiles, distribution --------------------------------------------------------------------

class DataError(UpopError):
    """Missing or malformed data."""


class ProfileError(UpopError):
    """A hardware profile file or name that cannot be used."""


class ProfileMismatch(UpopError):
    """A calibrated profile measured other blocks than this model has."""


class DivergedError(UpopError):
    """The training loss became NaN or infinite: the run stops (its last good state is kept)."""


class MaskDivergenceError(UpopError):
    """Ranks hold different masks: they would slim the model differently."""


class PeerLostError(UpopError):
    """A collective failed: another rank died or hung (torchrun restarts the group if allowed)."""


# -- export and runtimes -------------------------------------------------------------------------------

class ExportError(UpopError):
    """A graph could not be exported or checked."""


class ParityError(ExportError):
    """An exported graph's output differs from PyTorch beyond the tolerance."""

    def __init__(self, graph: str, output: str, max_abs: float, tol: float, batch: int):
        super().__init__(f"graph {graph}: output {output} differs from PyTorch by {max_abs:.3g} at batch {batch} "
                         f"(tolerance {tol:.3g})")


class UnknownFormatError(UpopError):
    """An export format no backend is registered for."""


class UnknownRuntimeError(ConfigError):
    """A runtime name no backend is registered for."""


class RuntimeUnavailable(UpopError):
    """A runtime's package (or the device it needs) is not installed here."""


class TensorRTUnavailable(RuntimeUnavailable):
    """TensorRT (or a CUDA GPU for it) is not installed here."""


class TensorRTBuildError(UpopError):
    """TensorRT could not parse, build or run an engine."""


class ExportFolderError(UpopError):
    """An export folder that is missing, damaged or from a newer format."""


class GraphInputError(ExportError):
    """Exported graphs fed inputs that do not fit together (a past length the mask does not cover, a missing cache)."""
