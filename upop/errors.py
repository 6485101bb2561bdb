"""Exceptions that carry a message meant for the user.

The CLI turns every ``UpopError`` into one line on stderr; anything else is a bug
and keeps its traceback.
"""


class UpopError(Exception):
    """Base class: an error the user can act on."""


class ConfigError(UpopError, ValueError):
    """A setting is out of range or inconsistent."""


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
