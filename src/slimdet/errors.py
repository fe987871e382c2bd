"""User-facing errors. Each names the file, the field or record, and what was expected."""


class SlimdetError(Exception):
    """Base class for errors caused by the user's input; the CLI prints these without a traceback."""


class ConfigError(SlimdetError):
    """A recipe, config or command-line value is invalid."""


class DatasetError(SlimdetError):
    """A dataset file or record is invalid."""


class CheckpointError(SlimdetError):
    """A checkpoint file is missing, unreadable, or does not match the model."""


class ExportError(SlimdetError):
    """A model could not be exported, or the exported graph disagrees with PyTorch."""


class OutputError(SlimdetError, OSError):
    """An output file or folder cannot be written: no space left, a read-only place, a file in the way.

    Also an OSError (with the original ``errno``), so code that handles OS errors keeps working.
    """
