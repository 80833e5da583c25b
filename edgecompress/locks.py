"""Advisory file locks (flock) and the liveness test that tells a dead writer's leftovers from a live one's.

A lock is a small file beside what it guards (`.NAME.lock`, holding the owner's pid), removed when released. The
classic race of removing a lock file (a waiter locks the unlinked inode) is closed by checking, once the lock is
held, that the path still names the inode we locked. flock is per host: a cache on a network file system shared
by several machines is not protected. Layering: imports only errors.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from edgecompress.errors import BusyError

# What this process is writing right now (staged bundles, cache temp entries, lock files): removed by
# `remove_in_flight` when the process must exit without unwinding (cli's SIGTERM watchdog).
_IN_FLIGHT: set[Path] = set()


def in_flight(path: Path, active: bool = True) -> None:
    (_IN_FLIGHT.add if active else _IN_FLIGHT.discard)(path)


def remove_in_flight() -> None:
    import shutil

    for p in list(_IN_FLIGHT):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
    _IN_FLIGHT.clear()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (a pid we may not signal still exists)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_PID_IN_NAME = re.compile(r"-(\d+)-[0-9a-f]{8}$")


def owner_pid(name: str) -> int | None:
    """The pid in a leftover's name `...-<pid>-<8 hex>` (partial bundles, cache temp entries), or None."""
    m = _PID_IN_NAME.search(name)
    return int(m.group(1)) if m else None


def dead_owner(name: str) -> bool:
    pid = owner_pid(name)
    return pid is not None and pid != os.getpid() and not pid_alive(pid)


@contextlib.contextmanager
def locked(path: Path, *, wait: bool, what: str, timeout_s: float | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing, removed on release).

    wait=False: a BusyError naming the holder's pid if another process holds it. wait=True: block until it is
    free (or `timeout_s` passes, then BusyError)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            _acquire(fd, path, wait=wait, what=what, deadline=deadline)
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the holder removed the file after we opened it: lock the new one
    in_flight(path)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        in_flight(path, False)
        os.close(fd)


def _acquire(fd: int, path: Path, *, wait: bool, what: str, deadline: float | None) -> None:
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
        if not wait or (deadline is not None and time.monotonic() > deadline):
            holder = _holder(path)
            raise BusyError(f"{what} is being written by another edgecompress process{holder}",
                            hint="wait for it to finish, or choose another path")
        time.sleep(0.1)


def _holder(path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        return f" (pid {int(path.read_text().strip())})"
    return ""
