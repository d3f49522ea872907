"""One writer per run directory: an OS file lock (``fcntl.flock``) on ``RUN/.lock``.

The kernel drops the lock when the holding process dies (even by ``kill -9``), so a stale
lock file never blocks a resume; the file only records the holder's pid for the error line.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from ettin.errors import EttinError

LOCK_FILE = ".lock"
_held: set[str] = set()  # run directories this process holds (a nested run_lock is a no-op)


@contextlib.contextmanager
def run_lock(root: str | os.PathLike, enabled: bool = True):
    """Hold the lock of run directory ``root`` (created if needed) for the ``with`` body."""
    if not enabled:
        yield
        return
    import fcntl

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    key = str(root.resolve())
    if key in _held:
        yield
        return
    path = root / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            except OSError:
                holder = "unknown"
            raise EttinError(f"{root}: is in use by another ettin process (pid {holder}); wait for it or stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held.add(key)
        try:
            yield
        finally:
            _held.discard(key)
    finally:
        os.close(fd)  # releases the lock
