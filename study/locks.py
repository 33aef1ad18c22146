"""One writer at a time: an exclusive file lock that names its holder, for run folders (study/runs.py) and a
grid's launch (study/launch/submit.py), and the time stamp every record carries."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from study.errors import UserError


def now() -> str:
    """The time stamp of every record (ISO, to the second: they compare as strings)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def job_identity() -> dict:
    """Who this process is, for a lock file: host, pid and, inside a job, its id (Slurm or submitit local)."""
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return {"host": socket.gethostname(), "pid": os.getpid(), "job_id": job}


# flock errors that mean "this file system cannot lock" (some NFS / Lustre mounts), not "someone holds it"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class FolderLock:
    """An exclusive ``fcntl.flock`` on one lock file, held by at most one process, released by the kernel
    when its holder dies (flock works on the shared file systems Slurm sites use; NFS maps it to a
    byte-range lock). Re-entrant within a process: the pipeline holds a run's lock and the trainer it calls
    takes it again. After taking it the holder writes its name (:func:`job_identity`, what it does, since
    when) into the file; a second writer reads it for its refusal."""

    _held: dict[str, list] = {}  # resolved lock path -> [file object, depth] of the locks this process holds

    def __init__(self, path: str | Path, what: str = "the folder"):
        self.path, self.what = Path(path), what

    def _key(self) -> str:
        return str(self.path.resolve())

    def holder(self) -> dict:
        """The name the last holder wrote ({} when none could be read)."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def state(self) -> Optional[str]:
        """"held" (by this process or another), "free", or None when the file system cannot lock."""
        if self._key() in self._held:
            return "held"
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return "free"
        with f:
            try:  # a shared lock: probing never blocks a holder (a writer taking it retries for a moment)
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return "held"
            except OSError as e:
                if e.errno in _NO_LOCKS:
                    return None
                raise
            fcntl.flock(f, fcntl.LOCK_UN)
        return "free"

    @contextmanager
    def hold(self, doing: str, wait_s: float = 3.0) -> Iterator[bool]:
        """Hold the lock for the block (yields whether it was newly taken here, False when re-entered or
        when the file system cannot lock, which is warned about). Refused with a UserError naming the
        holder when another process has it for longer than ``wait_s`` (a status probe holds it for
        microseconds)."""
        key = self._key()
        if key in self._held:
            self._held[key][1] += 1
            try:
                yield False
            finally:
                self._held[key][1] -= 1
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        deadline = time.monotonic() + wait_s
        try:
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise UserError(f"{self.what} is being written by {describe_holder(self.holder())}; "
                                        f"one writer at a time: wait for it to end, or stop that process or "
                                        f"job (its lock {self.path} is released when it dies)") from None
                    time.sleep(0.05)
                except OSError as e:
                    if e.errno not in _NO_LOCKS:
                        raise
                    print(f"warning: the file system of {self.path} cannot lock files ({e.strerror}); "
                          f"nothing stops a second writer of {self.what}", file=sys.stderr)
                    f.close()
                    yield False
                    return
        except BaseException:
            f.close()
            raise
        try:
            f.seek(0)
            f.truncate()
            f.write(json.dumps({**job_identity(), "doing": doing, "since": now()}) + "\n")
            f.flush()
            self._held[key] = [f, 1]
            yield True
        finally:
            self._held.pop(key, None)
            f.close()  # releases the flock


def describe_holder(holder: dict) -> str:
    """"host h, pid 12, job 345 (train, since ...)" from a lock file's content."""
    if not holder:
        return "another process (its lock file names none yet)"
    job = f", job {holder['job_id']}" if holder.get("job_id") else ""
    return (f"host {holder.get('host')}, pid {holder.get('pid')}{job} ({holder.get('doing', 'writing')}, since "
            f"{holder.get('since', '?')})")
