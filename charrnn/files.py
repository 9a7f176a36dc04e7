"""Files written whole or not at all: a temp file beside the target, fsync, rename."""
import contextlib
import errno
import os
import tempfile
from pathlib import Path

from .errors import CharrnnError


@contextlib.contextmanager
def atomic_write(final):
    """Yield a binary file that replaces ``final`` only once it is complete.

    The data goes to a temp file in the same directory, is fsynced and renamed
    over ``final`` (then the directory is fsynced): killed at any instant,
    ``final`` is either absent, its old self or complete, never partial. On
    any error the temp file is removed and a full disk or an unwritable
    directory becomes a one-line CharrnnError.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".part")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
    except OSError as e:
        raise CharrnnError(f"cannot write to {final.parent}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise CharrnnError(f"cannot write {final}: {why} (the previous file is kept)") from None
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path):
    with contextlib.suppress(OSError):  # not every file system allows it
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
