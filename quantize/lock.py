"""One `dsq quantize` run per output folder: an exclusive flock(2) on `OUT/.dsq-lock`, held for the whole run.

The kernel releases a flock when its holder exits, however it exits (kill -9 included), so a lock left by a
dead run is simply taken over; the file's text (pid and start time) only names the holder in the refusal.
The file is removed before the lock is released, and a run that gets the lock checks that the path still
names the file it locked (same inode), so no two runs can ever hold locks on two different files.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dsq.errors import DsqError

LOCK = ".dsq-lock"


def _holder(path: Path) -> str:
    """Who holds the lock, as its file says (empty or unreadable while a holder is still writing it)."""
    try:
        info = json.loads(path.read_text())
        return f"pid {int(info['pid'])}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet written its pid"


def _refuse(out: Path, e: OSError) -> DsqError:
    return DsqError(f"{out}: cannot write the output folder ({e.strerror or e}); choose a writable folder")


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold the exclusive lock of `out` (a folder that exists) for the body; refuse if another run holds it."""
    path = out / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise _refuse(out, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise _refuse(out, e) from None
            raise DsqError(f"{out}: another dsq quantize is writing this folder ({_holder(path)}); wait for it "
                           "to finish, or stop it and run this command again to resume") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:  # the previous holder removed it between our open and our flock
            same = False
        if same:
            break
        os.close(fd)
    try:
        record = json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
    except OSError as e:
        os.close(fd)
        raise _refuse(out, e) from None
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked: see the module docstring
        os.close(fd)
