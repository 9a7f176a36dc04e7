"""The one exception type that interfaces turn into a one-line message."""


class CharrnnError(Exception):
    """A problem the user can fix (bad input, bad file, impossible size).

    The CLI prints ``error: <message>`` on one line and exits non-zero;
    anything else escaping is a bug and shows a traceback only with ``--debug``.
    """
