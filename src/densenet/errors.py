"""Errors a user can act on. The command line prints their message as one line and exits with code 2."""


class DenseNetError(Exception):
    """Bad input from the user: a configuration, a file, a data set. Never a bug of ours."""


class ConfigError(DenseNetError, ValueError):
    """An impossible model or training configuration; a ValueError so plain Python callers can catch it."""
