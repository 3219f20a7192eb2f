"""The one exception type gpt1 raises for bad input.

Library code raises `Gpt1Error` with a message that names the file, line or field and what
was expected; the CLI prints that message as one line on stderr and exits non-zero.
"""


class Gpt1Error(Exception):
    """A user-facing error: the message is meant to be shown as is, without a traceback."""


def is_compile_error(error: BaseException | None) -> bool:
    """An error of torch.compile's machinery (Dynamo, AOTAutograd, Inductor and its C++/Triton
    builds, e.g. no C++ compiler on the machine), as opposed to one of the model or the data,
    which would fail eagerly too: the first may fall back to eager, the second may not."""
    while error is not None:
        if type(error).__module__.startswith(("torch._dynamo", "torch._inductor", "torch._functorch")):
            return True
        error = error.__cause__
    return False


def first_line(error: BaseException) -> str:
    """'TypeName: the first line of its message' (compile errors run to a hundred lines)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
