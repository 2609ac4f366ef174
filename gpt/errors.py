"""Exceptions the scripts turn into a one-line message and an exit code: user mistakes, and disks that
refuse a write (full, over quota, read-only)."""

from __future__ import annotations

import contextlib
import errno
import sys
from collections.abc import Iterator
from pathlib import Path


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, unknown run id...).

    The message must name the key, file or value and say what would be valid.
    """

    exit_code = 2


def check_file(path: Path, role: str, missing: str | None = None, want: str = "a file") -> Path:
    """`path` when it names a regular file, else a UserError.

    role: what the file is for, to start the message ("config file", "data:"). missing: the message when
    nothing is there (default "<role> not found: <path>"). want: what to give instead, ending the message.
    A folder, device, pipe or socket there is named as such: /dev/null read as a book or config is empty,
    and a pipe can be read once only.
    """
    try:
        if path.is_file():
            return path
        exists, is_dir = path.exists(), path.is_dir()
    except OSError as exc:  # a name too long for the file system, a symlink loop
        raise UserError(f"{role} {path}: {exc.strerror or exc}") from None
    if not exists and path.is_symlink():  # is_file() and exists() say False for a link to nothing, or a loop
        raise UserError(f"{role} {path} is {what_is(path)}; give {want}")
    if not exists:
        raise UserError(missing or f"{role} not found: {path}")
    kind = "a folder" if is_dir else f"not a regular file ({what_is(path)})"
    raise UserError(f"{role} {path} is {kind}; give {want}")


def what_is(path: Path) -> str:
    """What is at `path`, for messages: 'a folder', 'a file', 'a device, pipe or socket', 'a broken symbolic
    link' or 'nothing'. Symbolic links are followed, as opening or creating the path would follow them."""
    if path.is_dir():
        return "a folder"
    if path.is_file():
        return "a file"
    if path.exists():
        return "a device, pipe or socket"
    return "a broken symbolic link (to nothing, or a loop of links)" if path.is_symlink() else "nothing"


class DiskFault(UserError):
    """A write the disk refused: it is full, over its quota, read-only, or not ours to write (exit 5).

    The message is one line that starts with the cause ("disk full", "read-only") and names the path.
    """

    exit_code = 5

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message)
        self.path = path


# errno -> the one-line cause; {path} is the file or folder the write went to
_CAUSES = {
    errno.ENOSPC: "disk full: no space left on the device at {path}",
    errno.EDQUOT: "disk full: the disk quota is exceeded at {path}",
    errno.EROFS: "read-only: {path} is on a read-only file system",
    errno.EACCES: "read-only: no permission to write {path}",
    errno.EPERM: "read-only: no permission to write {path}",
}


def disk_fault(exc: BaseException | None, path: str | Path | None = None) -> DiskFault | None:
    """The DiskFault behind `exc`: itself, or an OSError of a full or read-only disk anywhere in its chain
    of causes (torch reports a full disk as a RuntimeError whose context is the OSError); None otherwise.

    path: the file being written, named rather than the OSError's own (a failed write() names none, and
    a temporary file means less to the user than the file it becomes).
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, DiskFault):
            return exc
        if isinstance(exc, OSError) and exc.errno in _CAUSES:
            where = path or exc.filename or "an unnamed file"
            return DiskFault(_CAUSES[exc.errno].format(path=where), where)
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def cache_write(what: str, path: str | Path) -> Iterator[None]:
    """A write to a cache that may fail: a full or read-only disk, or its folder taken by a file, prints one
    warning line naming `what` and `path` and the work goes on without the cached copy (a cache is only a
    cache; README "When things go wrong")."""
    try:
        yield
    except OSError as exc:
        fault = disk_fault(exc, path)
        reason = str(fault) if fault else f"{exc.strerror or exc}: {exc.filename or path}"
        print(f"warning: the {what} is not kept ({reason}); the work goes on", file=sys.stderr)


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a full or read-only disk met in the block into a DiskFault naming `path`; other errors pass."""
    try:
        yield
    except DiskFault:
        raise
    except OSError as exc:
        fault = disk_fault(exc, path)
        if fault is None:
            raise
        raise fault from None
