"""One training run per `--save` directory.

Two runs writing the same directory interleave checkpoints and metrics (one reported saving an
iteration that held the other's weights). Rank 0 of a run holds `<save>/run.lock` from start to
exit. The lock file is created with O_CREAT | O_EXCL, which is atomic on local file systems and on
NFSv3+/Lustre, and records who holds it:

    {"host": ..., "pid": ..., "process_start": <psutil create_time>, "started": <unix time>}

A lock left by a dead process is stale: on the same host we can tell (the pid is gone, or is now a
different process whose start time differs) and take it over; a lock held from another host
cannot be checked from here, so the message names it and how to clear it.
"""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Optional

import psutil

LOCK_FILE = "run.lock"


def _me() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid,
            "process_start": psutil.Process(pid).create_time(), "started": time.time()}


def _alive(holder: dict) -> bool:
    """Whether the holder process still runs (only answerable on its own host)."""
    try:
        process = psutil.Process(int(holder["pid"]))
        return abs(process.create_time() - float(holder["process_start"])) < 1e-3
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, TypeError, ValueError):
        return False


def _describe(holder: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
    return f"pid {holder.get('pid')} on {holder.get('host')} (since {when})"


class RunLock:
    def __init__(self, save_dir: str):
        self.path = os.path.join(save_dir, LOCK_FILE)
        self.held = False

    def acquire(self) -> None:
        """Take the lock or raise one ValueError naming the run that holds it."""
        for _ in range(2):  # a second try after clearing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read_holder()
                if holder is None or not self._is_stale(holder):
                    raise ValueError(self._busy_message(holder)) from None
                self._clear_stale(holder)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(_me(), f)
            self.held = True
            return
        raise ValueError(self._busy_message(self._read_holder()))

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = self._read_holder()
        if holder is not None and holder.get("pid") == os.getpid() \
                and holder.get("host") == socket.gethostname():
            try:
                os.remove(self.path)
            except OSError:  # read-only or full by now: the next run finds this lock stale
                pass

    def _read_holder(self) -> Optional[dict]:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}  # released between our create and our read: try again
        except (OSError, ValueError):
            return None  # being written, or damaged: treat as held (named in the message)

    def _is_stale(self, holder: dict) -> bool:
        if not holder:
            return True
        return holder.get("host") == socket.gethostname() and not _alive(holder)

    def _clear_stale(self, holder: dict) -> None:
        # Rename, then remove: of two runs clearing the same stale lock only one rename succeeds,
        # and neither deletes a fresh lock the other has just created.
        aside = f"{self.path}.stale.{os.getpid()}"
        try:
            os.rename(self.path, aside)
            os.remove(aside)
        except FileNotFoundError:
            pass

    def _busy_message(self, holder: Optional[dict]) -> str:
        who = _describe(holder) if holder else "an unknown process (unreadable lock file)"
        return (f"--save {os.path.dirname(self.path)!r} is in use by another run: {who}; give "
                f"this run its own --save, or, if that run is dead, delete {self.path}")


def lock_save_dir(save: Optional[str]) -> Optional[RunLock]:
    """Global rank 0 takes `save`'s lock; every rank raises the same one-line error if it could
    not (so no rank is left waiting in a collective). Call after the process group is up."""
    from megatron_rlp import device

    lock, problem = None, ""
    if save and device.is_rank_zero():
        lock = RunLock(save)
        try:
            lock.acquire()
        except ValueError as error:
            problem = str(error)
    first = device.first_problem(problem)
    if first:
        raise ValueError(first)
    return lock
