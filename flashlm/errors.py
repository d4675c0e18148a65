"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class FlashLMError(Exception):
    """A mistake in the user's input (config, paths, data, checkpoints): say what, where, and what to do."""


class ConfigError(FlashLMError):
    """An invalid configuration value or key."""


class DataError(FlashLMError):
    """Unreadable, empty or mismatched input data."""


class CheckpointError(FlashLMError):
    """A missing, truncated or inconsistent checkpoint."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty): what a
    one-line error quotes of a library's multi-line complaint."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
