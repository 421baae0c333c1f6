"""The one exception type that reaches the user as a one-line message."""


class InputError(Exception):
    """Bad user input or a bad file: the message is one clear line for the user.

    The command-line layer turns it into ``click.ClickException`` (exit code 1);
    library callers catch it like any other exception.
    """


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name if it has none)."""
    lines = str(error).strip().splitlines()
    return lines[0].strip() if lines else type(error).__name__
