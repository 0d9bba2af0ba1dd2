"""One writer at a time: an advisory lock file inside a local store.

A dfre command that writes a store (ingest, featurize, gfre, lfre, cumulants, ...)
holds ``<store>/.dfre.lock`` for its whole run. The file is created atomically
(``O_CREAT | O_EXCL``) and records the owner's host, PID, command and start time.
A second writer is refused with a one-line error naming the owner. A lock whose
owner process is gone (same host, PID no longer alive) is stale: it is reported
and cleared. Dask workers of the owning command write without taking the lock.

The lock is re-entrant within a process: a library function that writes a store is
decorated with :func:`writes_store` (so notebooks are protected too), and when the
CLI command or a study already holds the lock of that store, the nested call just
runs. Dask worker tasks never take it.

Stores behind fsspec URLs are not locked (object stores have no atomic create);
run one writer at a time there.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import inspect
import json
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from dfre.errors import DfreError

LOCK_NAME = ".dfre.lock"

#: Real paths of the stores whose lock this process holds -> nesting depth.
_HELD: dict[str, int] = {}
_HELD_GUARD = threading.Lock()

F = TypeVar("F", bound=Callable[..., Any])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_owner(lock_path: str) -> dict | None:
    try:
        with open(lock_path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _is_stale(owner: dict) -> bool:
    if not owner:  # unreadable or half-written lock file
        return False
    return owner.get("host") == socket.gethostname() and not _pid_alive(int(owner.get("pid", -1)))


@contextlib.contextmanager
def store_lock(path: str | os.PathLike, command: str) -> Iterator[None]:
    """Hold the write lock of the store at ``path`` while the block runs."""
    path = os.fspath(path)
    if "://" in path or not os.path.isdir(path):
        yield
        return
    key = os.path.realpath(path)
    with _HELD_GUARD:
        nested = _HELD.get(key, 0) > 0 and _held_by_me(os.path.join(path, LOCK_NAME))
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
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "command": command,
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    for _ in range(2):
        try:
            fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read_owner(lock_path)
            if owner is None:
                continue  # released between our attempt and the read
            if _is_stale(owner):
                print(
                    f"dfre: clearing stale lock of {path} (pid {owner.get('pid')} "
                    f"`{owner.get('command')}` is gone)",
                    file=sys.stderr,
                )
                with contextlib.suppress(FileNotFoundError):
                    os.remove(lock_path)
                continue
            raise DfreError(
                f"store {path} is being written by another dfre process (pid {owner.get('pid')} "
                f"on {owner.get('host')}, `{owner.get('command')}`, since {owner.get('started')}): "
                f"wait for it to finish, or delete {lock_path} if that process no longer runs"
            ) from None
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        break
    else:
        raise DfreError(f"could not take the write lock {lock_path}: retry the command")
    with _HELD_GUARD:
        _HELD[key] = 1
    try:
        yield
    finally:
        with _HELD_GUARD:
            _HELD.pop(key, None)
        owner = _read_owner(lock_path)
        if owner and owner.get("pid") == me["pid"] and owner.get("host") == me["host"]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock_path)


def _held_by_me(lock_path: str) -> bool:
    owner = _read_owner(lock_path)
    return (
        bool(owner)
        and owner.get("pid") == os.getpid()
        and owner.get("host") == socket.gethostname()
    )


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


def writes_store(command: str, argument: str = "store") -> Callable[[F], F]:
    """Decorate a public function that writes the store passed as ``argument``: the
    call holds that store's write lock (re-entrant, see the module docstring)."""

    def decorate(function: F) -> F:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind_partial(*args, **kwargs)
            path = store_path_of(bound.arguments.get(argument))
            if path is None:
                return function(*args, **kwargs)
            with store_lock(path, command):
                return function(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return decorate
