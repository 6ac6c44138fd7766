"""Reading and writing the files attncc keeps: its caches (tuned configs, compiled modules), which
anyone who can write the cache folder may have replaced by something else than a file, and the
modules ``attncc build`` writes."""
from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path


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


def write_atomic(path, text: str) -> None:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` so that a reader sees the old file or
    the whole new one, never a part of it: a unique temporary file in the same folder (made if
    missing), flushed to disk, then ``os.replace`` (a symlink at ``path`` is replaced, not written
    through; a failed write leaves the old file and no temporary one). The file is an ordinary one,
    ``0o666`` less the umask, as ``open`` makes it (``attncc tune``'s cache files were mkstemp's
    0600: a cache folder shared by a team was unreadable to all but the one who tuned)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


CACHE_VARIABLE = "ATTNCC_CACHE_DIR"


def cache_folder(inside_variable: str, default: str) -> Path:
    """Where one of attncc's caches is: ``$ATTNCC_CACHE_DIR/<inside_variable>`` (``""``: the folder
    itself), else ``~/.cache/attncc/<default>``. A ValueError naming what to set when the folder
    cannot be known: a ``~user`` of no user in the variable, or no home folder (``HOME`` unset and a
    user id without an account, as containers run); Python's RuntimeError "Could not determine home
    directory" came out of ``attncc.compile``, ``attncc tune`` and, on a GPU, every call."""
    text = os.environ.get(CACHE_VARIABLE)
    try:
        if text:
            return Path(text).expanduser() / inside_variable
        return Path.home() / ".cache" / "attncc" / default
    except RuntimeError:
        if text:
            raise ValueError(f"{CACHE_VARIABLE}={text!r}: cannot expand its ~ (no such user, or no home folder): "
                             f"give the folder's path") from None
        raise ValueError(f"attncc: no home folder for its cache ~/.cache/attncc (HOME is unset and this user id has "
                         f"no account): set {CACHE_VARIABLE} (or HOME) to a writable folder") from None


def spec_file(text: str) -> Path:
    """A spec argument of the command line: the path itself, or ``specs/<text>.toml`` where no file
    ``text`` exists and that one does (``attncc build causal``, ``explain causal``, ``tune causal``)."""
    path = Path(text)
    if not path.exists() and path.suffix != ".toml" and Path("specs", f"{text}.toml").exists():
        return Path("specs", f"{text}.toml")
    return path
