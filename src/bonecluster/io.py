"""Atomic file writes: a temp file in the same folder, fsync, then rename.

A reader (or a crash) therefore sees either the old file or the new one, never half of it.
Errors name the path, so a full disk or a read-only folder reads clearly on the console.

A process killed between creating its temp file and the rename (SIGKILL, OOM killer) leaves the
temp file behind. Temp names carry the writer's pid and host (``.NAME.pidPID-HOST.XXXX.tmp``),
so the next write into that folder removes the temps of writers that are gone
(:func:`remove_stale_temps`) and never those of a live writer.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


class WriteError(OSError):
    """Writing an output failed; the message names the path and the reason."""

    def __str__(self) -> str:  # "cannot write PATH: REASON", without OSError's "[Errno N]"
        return self.strerror or super().__str__()

    @classmethod
    def of(cls, path: str | Path, err: OSError, doing: str = "write") -> "WriteError":
        """``cannot <doing> PATH: reason`` for the OSError ``err``, keeping its errno."""
        return cls(err.errno, f"cannot {doing} {path}: {err.strerror or err}")


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside ``path``; on success it replaces ``path``, on error it vanishes."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_owner_tag()}.", suffix=".tmp", dir=path.parent)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
    except OSError as err:
        raise WriteError.of(path, err) from err
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        _remove_quietly(tmp)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise WriteError.of(path, err) from err
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temps(folder: str | Path) -> int:
    """Remove the temp files in ``folder`` left by dead writers on this host; returns how many.

    Best effort: an unreadable folder or a file that cannot be removed is left alone.
    """
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    host = _host()
    for entry in entries:
        m = _TEMP_NAME.match(entry.name)
        if not m or m["host"] != host or _pid_alive(int(m["pid"])):
            continue
        try:
            os.remove(entry.path)
            removed += 1
        except OSError:
            pass
    return removed


_TEMP_NAME = re.compile(r"^\..+\.pid(?P<pid>\d+)-(?P<host>[A-Za-z0-9-]*)\.[^.]+\.tmp$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40]


def _owner_tag() -> str:
    return f"pid{os.getpid()}-{_host()}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
