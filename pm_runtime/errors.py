"""The one exception type for bad user input: command lines print its message on one line."""


class UserError(Exception):
    """Bad input (a file, a folder, an option). The message is a complete one-line explanation."""
