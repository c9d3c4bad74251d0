"""The error a user's input raises when it cannot work, found before anything expensive runs."""


class ConfigError(ValueError):
    """A value (a flag, a configuration key, a path, a model) that cannot work; the command line prints it
    as a usage error (exit code 2) naming the argument, instead of a traceback."""
