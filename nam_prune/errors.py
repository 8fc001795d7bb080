"""The one exception type users see: a one-line message saying what is wrong and how to fix it."""


class NamPruneError(Exception):
    """A bad input or an unmet target. The CLI prints its message on one line and exits non-zero."""


def first_line(error: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type when empty), for a one-line error."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]
