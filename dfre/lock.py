"""One writer at a time: a kernel file lock on ``<store>/.dfre.lock``.

A dfre command that writes a store (ingest, sample, featurize, gfre, lfre, cumulants,
...) holds an exclusive ``flock(2)`` on the file ``<store>/.dfre.lock`` for its whole
run. The kernel decides who holds it, atomically, and releases it when the holder
exits in any way (normal exit, exception, ``kill -9``, end of a batch job's wall
time), so there is no stale lock to judge and no race between starters: of several
processes that start at once, exactly one gets the lock, the others are refused with
a one-line error naming the holder's host, PID, command and start time (the holder
writes them into the file).

Creating a store is covered too: the lock of a path where no store exists yet is
taken after creating its (empty) directory, so a second ``ingest`` or ``sample`` into
the same new path is refused instead of interleaving its batches. A directory this
module created is removed again at release when nothing but the lock file is in it.

The lock file is removed at release (while still locked). Left behind, it is the
record of a run that ended without releasing (killed or crashed); the next writer
takes the lock from the kernel, reports the old owner and goes on. A starter that
got the lock on a file that was just removed notices it (the path no longer names
the file it locked) and tries again, so removal cannot create a second holder.

The lock is re-entrant within a process: a library function that writes a store is
decorated with :func:`writes_store` (so notebooks are protected too), and when the
CLI command or a study already holds the lock of that store, the nested call just
runs. Dask worker tasks never take it.

Where the guarantee holds: local file systems; NFS (v4, or v3 with the NLM lock
daemon: Linux emulates ``flock`` with NFS byte-range locks, visible to every client;
a client mounted with ``nolock`` only sees its own locks); Lustre and BeeGFS mounted
with ``flock`` (``localflock`` makes locks node-local: safe only when every writer runs
on one node). A file system without ``flock`` support gives a one-line error; set
``DFRE_STORE_LOCK=off`` there to run unlocked, one writer at a time by your own care.
On NFS a lock of a client that died is released when its lease expires (about 90 s
for NFSv4). Stores behind fsspec URLs are not locked (object stores have no locks).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import functools
import inspect
import json
import os
import socket
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from dfre.errors import DfreError

LOCK_NAME = ".dfre.lock"
#: Environment variable that turns store locking off (``off``) where ``flock`` is missing.
LOCK_ENV = "DFRE_STORE_LOCK"

#: Real paths of the stores whose lock this process holds -> nesting depth.
_HELD: dict[str, int] = {}
_HELD_GUARD = threading.Lock()
#: Stores whose lock file disappeared while this process held it.
_VANISHED: set[str] = set()

F = TypeVar("F", bound=Callable[..., Any])


def _read_owner(fd: int) -> dict:
    """The owner record in the open lock file (empty when there is none)."""
    try:
        text = os.pread(fd, 1 << 16, 0)
        return json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}


def _read_owner_at(lock_path: str) -> dict:
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return {}
    try:
        return _read_owner(fd)
    finally:
        os.close(fd)


def _same_file(fd: int, path: str) -> bool:
    """True while ``path`` still names the file open as ``fd``."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _write_error(path: str, error: OSError) -> DfreError:
    """The one-line error for a store whose lock file cannot be made."""
    if error.errno == errno.EROFS:
        return DfreError(
            f"store {path} is on a read-only file system: this command writes the store; "
            "run it on a writable copy (reading commands such as `dfre info` and `dfre verify` "
            "work here)"
        )
    if error.errno in (errno.EACCES, errno.EPERM):
        return DfreError(
            f"no permission to write store {path}: this command writes the store; use a copy "
            "you own or ask its owner"
        )
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return DfreError(
            f"no space left on the file system of store {path} ({error.strerror}): free space "
            "or move the store, then run the command again"
        )
    return DfreError(f"cannot write store {path}: {error.strerror} ({error.filename or path})")


def _refusal(path: str, lock_path: str) -> DfreError:
    owner = _read_owner_at(lock_path)
    if not owner:  # the holder has not written its record yet
        who = "another dfre process (starting)"
    else:
        who = (
            f"another dfre process (pid {owner.get('pid')} on {owner.get('host')}, "
            f"`{owner.get('command')}`, since {owner.get('started')})"
        )
    return DfreError(
        f"store {path} is being written by {who}: wait for it to finish (the lock is "
        "released when that process ends, however it ends)"
    )


def _acquire(path: str, lock_path: str, command: str, create: bool) -> tuple[int, bool]:
    """Take the kernel lock of ``lock_path``; return its open descriptor and whether
    this call made the store's folder (``create``: make it when missing)."""
    made_folder = False
    for _ in range(100):
        if create and not os.path.isdir(path):
            try:
                os.makedirs(path)
                made_folder = True
            except FileExistsError:
                pass
            except OSError as error:
                raise _write_error(path, error) from None
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            if create:
                continue  # the folder was removed by a starter that gave up: make it again
            raise
        except OSError as error:
            raise _write_error(path, error) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _refusal(path, lock_path) from None
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise DfreError(
                    f"the file system of store {path} does not support file locks "
                    f"({error.strerror}): mount it with locking (NFS: without nolock; Lustre: "
                    f"-o flock), or set {LOCK_ENV}=off and run one writer at a time"
                ) from None
            raise _write_error(path, error) from None
        if _same_file(fd, lock_path):
            break
        os.close(fd)  # locked a file its previous holder had just removed: try again
    else:
        raise DfreError(f"could not take the write lock {lock_path}: retry the command")
    previous = _read_owner(fd)
    if previous:
        print(
            f"dfre: taking over the lock of {path}: its last holder (pid {previous.get('pid')} "
            f"on {previous.get('host')}, `{previous.get('command')}`) ended without releasing it",
            file=sys.stderr,
        )
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "command": command,
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    with contextlib.suppress(OSError):  # the record is for messages only
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
    return fd, made_folder


def _release(fd: int, lock_path: str, folder: str, made_folder: bool) -> None:
    """Remove the lock file (and a folder made for it, if still empty), then unlock."""
    try:
        if _same_file(fd, lock_path):
            with contextlib.suppress(OSError):
                os.remove(lock_path)
        else:  # the store went away while we held its lock (unmounted, removed)
            _VANISHED.add(os.path.abspath(folder))
        if made_folder:
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only if nothing else was put there
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


@contextlib.contextmanager
def store_lock(path: str | os.PathLike, command: str, *, create: bool = False) -> Iterator[None]:
    """Hold the write lock of the store at ``path`` while the block runs.

    With ``create`` (commands that may create the store) a missing directory is made
    first so that its creation is locked too; without it a path with nothing there is
    not locked (the command fails opening it).
    """
    path = os.fspath(path)
    if "://" in path or os.environ.get(LOCK_ENV, "").lower() == "off":
        yield
        return
    kind = _kind(path)  # one look: another starter may create the folder meanwhile
    if kind == "other" or (kind == "missing" and not create):
        yield  # nothing there to lock: the command fails opening it
        return
    key = os.path.realpath(path)
    with _HELD_GUARD:
        nested = _HELD.get(key, 0) > 0
        if nested:
            _HELD[key] += 1
    if nested:
        try:
            yield
        finally:
            with _HELD_GUARD:
                _HELD[key] -= 1
        return
    lock_path = os.path.join(path, LOCK_NAME)
    fd, made_folder = _acquire(path, lock_path, command, create)
    with _HELD_GUARD:
        _HELD[key] = 1
    try:
        yield
    finally:
        with _HELD_GUARD:
            _HELD.pop(key, None)
        _release(fd, lock_path, path, made_folder)


def _kind(path: str) -> str:
    """``"dir"``, ``"missing"`` or ``"other"`` (a file, ...) at ``path``, from one stat."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing"
    return "dir" if stat.S_ISDIR(mode) else "other"


def vanished(path: str | os.PathLike) -> bool:
    """True if the lock file of store ``path`` disappeared while this process held it:
    the store's file system was unmounted or the store removed under the command."""
    return os.path.abspath(os.fspath(path)) in _VANISHED


def store_path_of(value: Any) -> str | None:
    """The local path of a store given as a path, a :class:`dfre.store.Store`, or an
    object with a ``store`` attribute (a study); None when there is none."""
    from dfre.store import Store

    if isinstance(value, Store):
        return os.fspath(value.path)
    if isinstance(value, str | os.PathLike):
        return os.fspath(value)
    inner = getattr(value, "store", None)
    return None if inner is None or inner is value else store_path_of(inner)


def writes_store(
    command: str, argument: str = "store", *, create: bool = False
) -> Callable[[F], F]:
    """Decorate a public function that writes the store passed as ``argument``: the
    call holds that store's write lock (re-entrant, see the module docstring). With
    ``create`` the function may create the store, and its creation is locked."""

    def decorate(function: F) -> F:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind_partial(*args, **kwargs)
            path = store_path_of(bound.arguments.get(argument))
            if path is None:
                return function(*args, **kwargs)
            with store_lock(path, command, create=create):
                return function(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return decorate
