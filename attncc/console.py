"""What every ``attncc`` command does at the console (the command line and ``python -m``)."""
from __future__ import annotations

import os
import sys


SIGPIPE_STATUS = 128 + 13  # what a shell reports for a command that a closed pipe stopped


def exit_quietly_on_broken_pipe(command, *args) -> int:
    """``command(*args)``, stopping quietly when the reader of stdout has gone away
    (``attncc explain ... | head``), as Unix tools do: no traceback, exit status 141.

    Text stdout cannot encode (a path of undecodable bytes, ``\udcff`` in Python, under a UTF-8 locale
    whose stdout is strict; non-ASCII under an ASCII one) is written as a backslash escape, as Python
    writes it to stderr, instead of a UnicodeEncodeError after the files were written."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)  # a TextIOWrapper (not a replaced stdout)
    if reconfigure is not None and getattr(sys.stdout, "errors", None) == "strict":
        reconfigure(errors="backslashreplace")
    try:
        status = command(*args)
        sys.stdout.flush()  # output still buffered meets the closed pipe here, inside the try
        return status
    except BrokenPipeError:
        # Python flushes stdout once more at exit: let that write go to /dev/null, not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return SIGPIPE_STATUS
