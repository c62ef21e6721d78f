"""Project error types: one exception per bad input, naming the file or field at fault."""


class LowmemEraserError(Exception):
    """Base class of every error this package raises on bad input."""


class EraserFormatError(LowmemEraserError, ValueError):
    """An eraser checkpoint (file, folder or state) that cannot be used; the message names file and key."""


class ConfigError(LowmemEraserError, ValueError):
    """A bad configuration value; the message names the field."""
