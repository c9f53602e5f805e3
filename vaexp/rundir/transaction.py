"""A run directory as a transaction: one process at a time, and what it created undone on failure.

Invariants: a process writes into a run directory only while it holds the exclusive lock on
.vaexp.lock (:func:`begin`; its pid inside); what existed when it began is recorded, so a
rollback removes only what this process created (nothing at all once the directory holds a
checkpoint or metrics.json, beyond new scratch files); temp files of dead writers are removed
by the next holder. Holds are reentrant within one process.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple


from vaexp.errors import VaexpError, one_line

from vaexp.rundir.layout import CHECKPOINT, HYDRA_DIR, LOCK, METRICS, TEMP_FILE, warn


class RunDirBusy(VaexpError):
    pass


@dataclass(frozen=True)
class Snapshot:
    """What was in a directory when a command took it (before anything of the command's)."""
    existed: bool                 # whether the folder itself existed
    entries: frozenset            # names in it, and ".hydra/<name>" inside an existing .hydra
    created_from: Optional[Path]  # the topmost folder that did not exist (removed on rollback)


def _entries(path: Path) -> frozenset:
    names = set(os.listdir(path))
    if (path / HYDRA_DIR).is_dir():
        names |= {f"{HYDRA_DIR}/{n}" for n in os.listdir(path / HYDRA_DIR)}
    return frozenset(names)


def _missing_from(path: Path) -> Optional[Path]:
    """The topmost folder of `path` that does not exist (None when it exists)."""
    if path.exists():
        return None
    top = path
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    return top


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(path: Path) -> List[str]:
    """Temp files of writes whose process died (SIGKILL, power loss): .<name>.tmp-<pid>."""
    removed = []
    for name in os.listdir(path):
        match = TEMP_FILE.match(name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(path / name)
                removed.append(name)
    return removed


class Transaction:
    """One command's hold on a run directory: the lock, and what existed before (see begin)."""

    def __init__(self, path: Path, keep: Tuple[str, ...], scratch: Tuple[str, ...]):
        self.path = Path(os.path.abspath(path))
        self.keep, self.scratch = keep, scratch
        self.depth, self._fd = 0, None
        self.before = Snapshot(self.path.is_dir(), frozenset(), _missing_from(self.path))

    def _acquire(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        lock_existed = (self.path / LOCK).exists()
        try:
            self._lock()
        except RunDirBusy:
            raise  # another process's directory: touch nothing
        except BaseException:
            if self._fd is not None:  # interrupted after the lock was taken
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = None
            if not lock_existed:  # the lock file this command made, then the folders
                with contextlib.suppress(OSError):
                    (self.path / LOCK).unlink()
            self._remove_created_folders()  # made just now for nothing
            raise
        # The entries are listed under the lock: what appears after this is this command's.
        entries = _entries(self.path) - (frozenset() if lock_existed else {LOCK})
        self.before = Snapshot(self.before.existed, entries, self.before.created_from)

    def _remove_created_folders(self) -> None:
        """rmdir the run folder and the parents this command created, as far as they are empty."""
        top = self.before.created_from
        if top is None:
            return
        folder = self.path
        while folder.is_relative_to(top) and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()  # out_root/train/<run>, then out_root/train, ... up to what existed
            if folder == top:
                break
            folder = folder.parent

    def _lock(self) -> None:
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirBusy(f"{self.path} is in use by another vaexp process (pid {holder}); wait for it to "
                             f"finish (or stop it), or use another run directory") from None
        except OSError as err:  # a file system without locks (some network mounts): go on, and say so
            warn(f"cannot lock {self.path} ({one_line(err)}); nothing stops another vaexp process from "
                  f"writing there at the same time")
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            os.close(fd)
            raise
        self._fd = fd
        remove_stale_temp_files(self.path)

    def holds_result(self) -> bool:
        return any((self.path / name).exists() for name in self.keep)

    def rollback(self) -> bool:
        """Remove what this command created, unless the directory holds a result (a checkpoint
        or metrics.json: then only new scratch files go). True when nothing of it is left."""
        before = self.before
        if self.holds_result():
            for name in self.scratch:
                if name not in before.entries:
                    with contextlib.suppress(OSError):
                        (self.path / name).unlink()
            return False
        with contextlib.suppress(OSError):
            for name in os.listdir(self.path):
                entry = self.path / name
                if name == HYDRA_DIR and name in before.entries and entry.is_dir():
                    for child in os.listdir(entry):
                        if f"{HYDRA_DIR}/{child}" not in before.entries:
                            _remove(entry / child)
                elif name not in before.entries:
                    _remove(entry)
            if not before.existed:
                self._remove_created_folders()
        return True

    def end(self) -> None:
        """Release one hold (begin is reentrant); the last one unlocks."""
        self.depth -= 1
        if self.depth > 0:
            return
        _OPEN.pop(_key(self.path), None)
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.end()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _key(path: Path) -> str:
    return os.path.realpath(os.path.abspath(path))


_OPEN: Dict[str, Transaction] = {}  # this process's holds, by real path


def begin(path: Path, keep: Tuple[str, ...] = (CHECKPOINT, METRICS), scratch: Tuple[str, ...] = ()) -> Transaction:
    """Hold run directory `path` for this process: snapshot what exists, create it, take the
    exclusive lock (RunDirBusy, naming the holder's pid, when another process has it) and remove
    stale temp files. Reentrant: a path this process holds already gets the same Transaction.
    `keep`: files that make the directory a result, kept on rollback; `scratch`: files removed on
    rollback anyway when new (e.g. a command's log). Raises OSError when it cannot be created."""
    tx = _OPEN.get(_key(path))
    if tx is None:
        tx = Transaction(path, tuple(keep), tuple(scratch))
        tx._acquire()
        _OPEN[_key(path)] = tx
    tx.depth += 1
    return tx


def held(path: Path) -> Optional[Transaction]:
    return _OPEN.get(_key(path))


def locked(path: Path) -> Transaction:
    """`with rundir.locked(d):` - begin/end around a block (the trainer's own hold)."""
    return begin(path)


def abandon_all() -> None:
    """At the end of a command: roll back and release what is still held (a failure before the
    command's own boundary could end it, e.g. inside Hydra before the task ran)."""
    for tx in list(_OPEN.values()):
        tx.rollback()
        tx.depth = 1
        tx.end()


