"""One training run per checkpoint folder: a lock file in ``ckpt_dir`` for the duration of a run.

Two runs writing into one ``ckpt_dir`` remove each other's per-epoch checkpoints and overwrite each other's best
model. :py:class:`RunLock` is a file ``<ckpt_dir>/groupdistil.lock``, created with ``O_CREAT | O_EXCL`` (so of two
runs starting together exactly one gets it) and holding the owner's pid, host, start time and command. A run that
finds the lock of a live process refuses to start, naming the folder and that process; the lock of a process that
is gone (same host, pid not alive; e.g. a run killed with SIGKILL) is replaced with a WARNING. The bundles take it in
:py:func:`scripts.attach_resume` (rank 0 only in a multi-process run) and release it when the
trainer completes, at interpreter exit, or when the attach fails.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from monai_groupdistil.engines.checkpoint_saver import process_alive

__all__ = ["LOCK_NAME", "RunLock"]

logger = logging.getLogger("monai_groupdistil.bundle")  # the bundles' logger

LOCK_NAME = "groupdistil.lock"
_UNREADABLE_GRACE_S = 30.0  # a lock file that cannot be parsed is being written, unless older than this


class RunLock:
    """An exclusive lock on a checkpoint folder for the duration of one run.

    Args:
        folder: the checkpoint folder (created if missing).
        name: the lock file's name in ``folder``. Defaults to ``groupdistil.lock``.

    Example::

        with RunLock("models"):
            trainer.run()
    """

    def __init__(self, folder: str | os.PathLike, name: str = LOCK_NAME) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.owner: dict[str, Any] | None = None  # what this object wrote, while it holds the lock

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self.owner is not None

    def _create(self, owner: dict[str, Any]) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as file:
            json.dump(owner, file)
            file.flush()
            os.fsync(file.fileno())
        return True

    def _read(self, path: Path | None = None) -> dict[str, Any] | None:
        try:
            text = (path or self.path).read_text()
            owner = json.loads(text)
            return owner if isinstance(owner, dict) and {"pid", "host"} <= set(owner) else None
        except (OSError, ValueError):
            return None

    def _stale_reason(self, owner: dict[str, Any] | None) -> str | None:
        """Why the current lock file is stale, or None when its owner may be running."""
        if owner is None:
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return "it is gone"
            if age > _UNREADABLE_GRACE_S:
                return f"it cannot be read (an interrupted write, {age:.0f} s old)"
            return None
        if owner["host"] != socket.gethostname():
            return None  # cannot tell whether a process of another host is alive
        pid = int(owner["pid"])
        if pid == os.getpid():  # this process: a run that ended by an exception without releasing it
            return "it was taken by an earlier run of this process, which ended without releasing it"
        if not process_alive(pid):
            return f"its process {pid} is not running (killed?)"
        return None

    def _take_over(self, stale: dict[str, Any] | None) -> None:
        """Remove the stale lock file ``stale``, unless it was replaced meanwhile (then leave that one in place)."""
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if self._read(aside) != stale:  # another run replaced the stale lock just now: put its lock back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def acquire(self) -> RunLock:
        """Take the lock, replacing a stale one (logged at WARNING level).

        Returns:
            this object.

        Raises:
            RuntimeError: when another live process holds the lock, naming the folder, that process (pid, host,
                since when, its command) and what to do; nothing is written.
        """
        if self.held:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(sys.argv),
            "token": uuid.uuid4().hex,
        }
        for _ in range(5):
            if self._create(owner):
                self.owner = owner
                atexit.register(self.release)
                return self
            current = self._read()
            reason = self._stale_reason(current)
            if reason is None:
                break
            logger.warning(
                "replacing the lock %s of an earlier run (%s): %s",
                self.path,
                "unreadable" if current is None else f"pid {current['pid']} on {current['host']}",
                reason,
            )
            self._take_over(current)
        current = self._read() or {}
        raise RuntimeError(
            f"the checkpoint folder '{self.folder}' is in use by another run: process {current.get('pid', '?')} on "
            f"host {current.get('host', '?')}, since {current.get('since', '?')}"
            + (f" ({current['command']})" if current.get("command") else "")
            + f". Two runs in one folder would remove each other's checkpoints. Wait for that run to end, or give "
            f"this run another ckpt_dir; if no run uses the folder any more (e.g. a run on another host was killed), "
            f"delete '{self.path}'."
        )

    def release(self) -> None:
        """Remove the lock file if this object holds it (and it is still this object's); safe to call twice."""
        if self.owner is None:
            return
        if self._read() == self.owner:
            self.path.unlink(missing_ok=True)
        self.owner = None
        atexit.unregister(self.release)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
