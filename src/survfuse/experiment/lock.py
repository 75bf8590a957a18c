"""One run per run folder: a lock file holding the owner's PID and host.

`RUN_DIR/.survfuse.lock` is locked exclusively (`flock`) by the running process and records
`{"pid", "host", "started"}`. A second `survfuse run` on the same folder fails at once with
`RunLockedError` ("run folder ... is in use by PID N"). The kernel releases the lock when its
process dies (even `kill -9`), so the record a crashed run leaves behind is detected as stale and
taken over: a crashed run resumes without manual cleanup. (On network file systems `flock` is
only as good as the server's lock support.)

Crash debris (temp folders of a killed run) is removed only while we hold the lock, so a live
run's in-progress folders are never mistaken for leftovers.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

__all__ = ["LOCK_NAME", "RunLock", "RunLockedError"]

LOCK_NAME = ".survfuse.lock"


class RunLockedError(RuntimeError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """Context manager holding `folder/.survfuse.lock` for this process.

    The lock is an exclusive `flock` on the file (the kernel drops it when the process dies,
    however it dies), and the file records who holds it. A non-empty file whose lock is free
    was left by a run that crashed: `stale` then holds that run's record.

    >>> with RunLock(run_dir) as lock:   # doctest: +SKIP
    ...     lock.stale   # {"pid", "host", "started"} of a crashed run, else None
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.stale: dict[str, Any] | None = None
        self._fd: int | None = None

    def _read(self, fd: int) -> dict[str, Any]:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        try:
            info: dict[str, Any] = json.loads(raw) if raw.strip() else {}
        except ValueError:
            info = {"unreadable": raw[:80].decode(errors="replace")}
        return info

    def acquire(self) -> RunLock:
        """Take the lock or raise RunLockedError naming the owner's PID and host."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                raise PermissionError(
                    exc.errno, f"cannot write the run folder {self.folder}: {exc.strerror}"
                ) from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = self._read(fd)
            os.close(fd)
            if not owner:  # the owner is between taking the lock and writing its record
                time.sleep(0.2)
                owner = json.loads(self.path.read_text() or "{}")
            where = f" on host {owner['host']}" if owner.get("host") else ""
            raise RunLockedError(
                f"run folder {self.folder} is in use by PID {owner.get('pid', '?')}{where} "
                "(another survfuse run; wait for it or use another --out)"
            ) from None
        previous = self._read(fd)
        self.stale = previous or None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(me).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the record and drop the lock.

        The file stays: unlinking it would let a waiting process lock the removed file while a
        third locks a new one.
        """
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
