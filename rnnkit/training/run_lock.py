"""One writer per run directory: an advisory lock on ``run_dir/.lock`` naming its holder.

The lock is an ``flock`` on the file, which the kernel drops when its process dies, so a lock
left by a killed run is stale by construction and simply taken over. Where the file system
offers no ``flock``, the holder's process id decides: a lock whose process no longer runs on
this host is stale.
"""
from __future__ import annotations

import errno
import os
import socket
import time
from pathlib import Path

from rnnkit.processes import process_alive

try:
    import fcntl
except ImportError:   # not on POSIX: the process-id check alone
    fcntl = None

_HELD: dict[str, int] = {}    # locks this process holds: path -> file descriptor


class RunLockError(RuntimeError):
    """Another live process trains in this run directory; shown as one line, exit code 2."""


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.key = str(self.path.resolve())
        self.created = self.claimed = False    # a lock file this process made for a run that never started goes

    def _holder(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8").strip() or "another process"
        except OSError:
            return "another process"

    def acquire(self) -> "RunLock":
        if self.key in _HELD:          # this process holds it already (e.g. a second Trainer)
            return self
        self.created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as err:
                    if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise RunLockError(self._refusal()) from None
                    self._check_pid()          # no flock on this file system
            else:
                self._check_pid()
        except BaseException:
            os.close(fd)
            raise
        _HELD[self.key] = fd
        return self

    def claim(self) -> "RunLock":
        """Hold the lock and write this process into it (once the run is sure to start)."""
        self.acquire()
        self.claimed = True
        fd = _HELD[self.key]
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        return self

    def _refusal(self) -> str:
        return (f"{self.path.parent} is in use: {self._holder()} is training there; wait for it to finish, "
                f"stop it, or choose another directory with --set run_dir=...")

    def _check_pid(self) -> None:
        parts = self._holder().split()
        if len(parts) >= 4 and parts[0] == "process" and parts[3] == socket.gethostname():
            pid = int(parts[1]) if parts[1].isdigit() else 0
            if pid and pid != os.getpid() and process_alive(pid):
                raise RunLockError(self._refusal())

    def release(self) -> None:
        fd = _HELD.pop(self.key, None)
        if fd is not None:
            if self.created and not self.claimed:
                self.path.unlink(missing_ok=True)
            os.close(fd)    # closing drops the flock; the file stays, naming the last holder
