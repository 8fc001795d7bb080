"""The one exception type users see: a one-line message saying what is wrong and how to fix it."""


class NamPruneError(Exception):
    """A bad input or an unmet target. The CLI prints its message on one line and exits non-zero."""
