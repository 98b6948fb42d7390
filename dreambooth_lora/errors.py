"""The one exception type for mistakes a person can make; the CLI and UI show its sentence."""


class UserError(Exception):
    """A problem with the person's input (a file, a flag, a name), worded for them."""
