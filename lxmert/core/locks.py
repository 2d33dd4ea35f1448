"""Locks between the processes that share an experiment's folders."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Optional

from .files import UMASK, make_folder


class FileLock:
    """An exclusive lock (flock) on `path`: held by one process at a time, released when the holder
    releases it, exits or is killed, so a lock is never left behind by a dead holder. flock works across
    the processes of one machine and, on Linux, over NFS (emulated there with POSIX locks)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fd: Optional[int] = None

    def acquire(self, blocking: bool = True) -> bool:
        if self.fd is not None:
            return True
        make_folder(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~UMASK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            # Unlock explicitly: a forked worker shares the open file description, and closing only this
            # descriptor would leave the lock held until every copy is closed.
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
