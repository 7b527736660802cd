"""Files: atomic writes, the run directory's lock, and one clear error for an output that cannot be written.

Every file the package writes (checkpoints, netCDF, JSON, PNG) goes through :func:`atomic_path`: a
temporary file beside the target, fsynced and renamed over it, so a crash leaves the old file or the
new one, never a partial file. A training run holds :class:`RunLock` on its directory, so a second
writer is refused instead of silently interleaving its checkpoints and logs, and removes the
temporaries that interrupted saves left behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import tempfile
from pathlib import Path

TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{6,}\.tmp$")  # what atomic_path names its temporaries
LOCK_NAME = ".pyro-ddpm.lock"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def output_error(path: str | os.PathLike, error: OSError) -> ValueError:
    """One line naming why ``path`` cannot be written (disk full, read-only, a file in the way, ...)."""
    reasons = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENOTDIR: "a file stands where a folder is needed",
        errno.EISDIR: "it is a folder",
        errno.EEXIST: "a file stands where a folder is needed",
    }
    reason = reasons.get(error.errno, error.strerror or str(error))
    return ValueError(f"cannot write {path}: {reason}")


def check_directory(directory: str | os.PathLike, what: str = "output folder", create: bool = True) -> Path:
    """Check that files can be written in ``directory`` (created if needed); one ValueError otherwise.

    Called before any work whose results would be lost on a failed write (evaluation, sampling).

    :param create: create the folder now; with False a missing folder is not created: its nearest
        existing parent must be a folder where files can be written (the folder is made when the
        first file is written), so a refused command leaves nothing behind.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"the {what} {directory} is a file, not a folder")
    probe_in = directory
    if not create:
        while not probe_in.exists() and probe_in != probe_in.parent:
            probe_in = probe_in.parent
        if not probe_in.is_dir():
            raise ValueError(f"cannot write {directory}: a file stands where a folder is needed ({probe_in})")
    try:
        if create:
            directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", suffix=".tmp", dir=probe_in)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise output_error(directory, e) from None
    return directory


def check_output_file(path: str | os.PathLike, what: str = "output file", create: bool = True) -> Path:
    """Check that ``path`` can be written as a file (its folder writable, not itself a folder)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"the {what} {path} is a folder; give a file name")
    check_directory(path.parent if str(path.parent) else ".", f"folder of the {what}", create=create)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    A crash at any point leaves either the old file or the new one, never a partial file; on an
    exception the temporary file is removed. An OS error (disk full, read-only, ...) becomes one
    ValueError naming the path and the reason.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"cannot write {path}: it is a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise output_error(path, e) from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise output_error(path, e) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(file)`` on a binary file that replaces ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return Path(path)


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove what interrupted atomic writes left in ``directory`` and its sub-folders one level down
    (``samples/``): files named ``.NAME.XXXXXX.tmp``; return them.

    Call it only while holding the directory's :class:`RunLock`: no other writer is then mid-save.
    """
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for folder in [directory] + [p for p in directory.iterdir() if p.is_dir()]:
        for p in folder.iterdir():
            if p.is_file() and TEMPORARY.match(p.name):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


class RunLock:
    """An exclusive lock on a run directory, held while a process writes to it.

    ``fcntl.flock`` on ``DIR/.pyro-ddpm.lock``: the operating system releases it when the process ends,
    however it ends, so a lock left by a killed run is never mistaken for a live one (no stale locks).
    The file holds the holder's PID, named in the error a second writer gets.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None

    def _lock(self) -> int:
        """An open descriptor of the lock file holding the lock; ValueError naming the holder's PID if held."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise output_error(self.path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(
                f"the run directory {self.directory} is in use by another pyro-ddpm process "
                f"(PID {holder}); wait for it to finish or choose another --out"
            ) from None
        return fd

    def acquire(self) -> RunLock:
        check_directory(self.directory, "run directory")
        fd = self._lock()
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    @classmethod
    def check_free(cls, directory: str | os.PathLike) -> None:
        """Raise the in-use ValueError if a live process holds ``directory``'s lock (nothing is created
        where there is no lock file yet; a lock file a dead process left is free)."""
        lock = cls(directory)
        if not lock.path.is_file():
            return
        fd = lock._lock()
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
