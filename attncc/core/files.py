"""Reading the files of attncc's caches (tuned configs, compiled modules), which anyone who can
write the cache folder may have replaced by something else than a file."""
from __future__ import annotations

import errno
import os
import stat


def read_regular_text(path) -> str:
    """The UTF-8 text of the regular file ``path``. Opened without blocking and checked before it is
    read: a named pipe there hung the reader (the first call of every process, or ``attncc tune
    --show``) until something wrote to it, and a device such as /dev/zero would read forever; those,
    and folders, are an OSError ``not a regular file``. Other OSErrors and UnicodeDecodeError
    as ``open`` and ``bytes.decode`` raise them."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        with os.fdopen(fd, "rb") as f:
            fd = None  # closed by f
            data = f.read()
    finally:
        if fd is not None:
            os.close(fd)
    return data.decode("utf-8")
