"""User-facing errors: the CLI prints these as one line and exits with code 2, no traceback."""


class UserError(Exception):
    """A mistake in the user's input (config, paths, data), reported as one line."""
