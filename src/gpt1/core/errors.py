"""The one exception type gpt1 raises for bad input.

Library code raises `Gpt1Error` with a message that names the file, line or field and what
was expected; the CLI prints that message as one line on stderr and exits non-zero.
"""


class Gpt1Error(Exception):
    """A user-facing error: the message is meant to be shown as is, without a traceback."""
