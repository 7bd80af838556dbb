"""User-facing errors: the CLI prints these as one line, without a traceback."""


class TritpressError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class UnsafeCheckpointError(TritpressError):
    """The checkpoint needs full unpickling, which can run arbitrary code."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says at which step and how to continue."""


class CorruptCheckpointError(TritpressError):
    """A packed checkpoint is truncated, tampered with or inconsistent with its metadata."""
