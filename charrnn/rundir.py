"""A run directory: the files a training run writes, and who may write them.

One process owns a run directory at a time: it holds an exclusive ``flock``
on ``.lock`` inside it, which the operating system releases however the
process ends (``kill -9`` included), so a dead run's lock never blocks the
next. A directory that already holds a run is only trained into again to
resume that run, or when asked to overwrite it.
"""
import contextlib
import os
from pathlib import Path

from .errors import CharrnnError

try:
    import fcntl
except ImportError:  # not a POSIX system: no locking
    fcntl = None

CHECKPOINTS = ("last.ckpt", "best.ckpt")
RUN_FILES = CHECKPOINTS + ("metrics.jsonl",)  # what makes a directory hold a run
CURVES = "curves.png"  # train --plot's picture, deleted with the run it shows
LOCK = ".lock"


class RunDir:
    """The run directory at ``path``: its files' paths, and ``claim``."""

    def __init__(self, path):
        self.path = Path(path)
        self.last = self.path / "last.ckpt"
        self.best = self.path / "best.ckpt"
        self.metrics = self.path / "metrics.jsonl"
        self.curves = self.path / CURVES
        self._lock_fd = None

    def holds_run(self):
        return any((self.path / name).exists() for name in RUN_FILES)

    @contextlib.contextmanager
    def claim(self, resuming=False, overwrite=False):
        """Own the directory for the block: created if missing, locked
        against every other process, and checked: a directory that holds a
        run is refused unless ``resuming`` it; with ``overwrite`` its run's
        files are deleted first. Each refusal is a one-line CharrnnError."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise CharrnnError(f"cannot write to the output directory {self.path}: "
                               f"{e.strerror or e}") from None
        try:
            self._lock(fd)
            if self.holds_run() and not resuming:
                if not overwrite:
                    raise CharrnnError(
                        f"{self.path} already holds a run; continue it with --resume {self.path}, "
                        f"or start afresh with --overwrite (deletes it) or another --out")
                for name in RUN_FILES + (CURVES,):
                    with contextlib.suppress(FileNotFoundError):
                        (self.path / name).unlink()
            self._lock_fd = fd
            yield self
        finally:
            self._lock_fd = None
            os.close(fd)  # releases the lock

    def _lock(self, fd):
        if fcntl is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            raise CharrnnError(f"{self.path} is in use by another charrnn process (pid {owner}); "
                               f"wait for it to finish, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
