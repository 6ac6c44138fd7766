"""What every ``attncc`` command does at the console (the command line and ``python -m``)."""
from __future__ import annotations

import os
import sys


SIGPIPE_STATUS = 128 + 13  # what a shell reports for a command that a closed pipe stopped


def exit_quietly_on_broken_pipe(command, *args) -> int:
    """``command(*args)``, stopping quietly when the reader of stdout has gone away
    (``attncc explain ... | head``), as Unix tools do: no traceback, exit status 141."""
    try:
        status = command(*args)
        sys.stdout.flush()  # output still buffered meets the closed pipe here, inside the try
        return status
    except BrokenPipeError:
        # Python flushes stdout once more at exit: let that write go to /dev/null, not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return SIGPIPE_STATUS
