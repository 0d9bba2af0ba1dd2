"""One-line reports of failures that come from the machine, not from dfre's input checks.

:func:`describe_failure` turns an exception that reached the command line into the
one line ``dfre: error: ...`` prints, or returns None for a genuine bug (which then
keeps its traceback):

* the file system refused a write or read: full disk or quota (``ENOSPC``,
  ``EDQUOT``), read-only file system (``EROFS``), permissions, and a store that
  vanished or became unreachable (unmounted, removed, stale NFS handle, I/O error);
* any other error while a store is involved: the store is checked (every chunk
  decoded, see :mod:`dfre.verify`) and a corrupted or missing chunk is named with the
  array, chunk index and file, and what to do.

A store stays consistent through all of these: appends commit their counts last,
featurize records a chunk done only after its write, results are marked complete
last, and every file is written to a temporary name and renamed into place (Zarr's
local store), so a failed write leaves the previous file whole.
"""

from __future__ import annotations

import argparse
import errno
import os

from dfre.errors import DfreError

#: errno values that mean the store's file system is gone or unreachable.
LOST = {errno.ENOENT, errno.ESTALE, errno.EIO, errno.ENOTCONN, errno.ENODEV, errno.EHOSTDOWN}
#: Stated at the end of every report of a failed write.
KEPT = "what was committed before the failure is kept; run the command again to continue"


def store_path(args: argparse.Namespace) -> str | None:
    """The store a command works on, if it names one."""
    path = getattr(args, "store", None) or getattr(args, "store_path", None)
    return os.fspath(path) if path else None


def note_store(args: argparse.Namespace) -> None:
    """Remember whether the command's local store exists as the command starts."""
    store = store_path(args)
    exists = bool(store) and "://" not in store
    args._store_existed = exists and os.path.exists(os.path.join(store, "zarr.json"))


def store_gone(args: argparse.Namespace, error: BaseException | None = None) -> str | None:
    """The report for a local store that vanished during the command, else None: its
    metadata is gone now, and it existed when the command started, or its lock file
    vanished while held, or a file operation failed (a store this command created)."""
    store = store_path(args)
    if store is None or "://" in store or os.path.exists(os.path.join(store, "zarr.json")):
        return None
    from dfre.lock import vanished

    existed = getattr(args, "_store_existed", False) or vanished(store)
    if not (existed or isinstance(error, OSError)):
        return None
    return (
        f"store {store} is no longer reachable: its file system was unmounted or the store "
        f"was removed while the command ran; mount it again, then run the command again to "
        "continue (what was committed before is kept)"
    )


def _describe_os_error(error: OSError, store: str | None) -> str | None:
    where = error.filename or store or "a file"
    what = error.strerror or str(error)
    target = f"store {store}" if store else where
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left for {target} ({what}: {where}): free space or move the store; {KEPT}"
    if error.errno == errno.EROFS:
        return (
            f"{target} is on a read-only file system ({where}): writing commands need a "
            f"writable store; {KEPT}"
        )
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to access {where} ({what}): check its owner and permissions"
    if error.errno in LOST - {errno.ENOENT}:
        return f"{what} on {where}: check the file system of {target}; {KEPT}"
    return None


def describe_failure(args: argparse.Namespace, error: BaseException) -> str | None:
    """The one-line report of ``error``, or None when it is not the machine's doing."""
    gone = store_gone(args, error)
    if gone is not None:
        return gone
    store = store_path(args)
    if isinstance(error, OSError):  # the machine's doing, or a bug: the store is not checked
        return _describe_os_error(error, store)
    if store is None:
        return None
    try:
        from dfre.store import Store
        from dfre.verify import corruption_error, verify_store

        opened = Store.open(store)
        problems = verify_store(opened)
    except DfreError as failure:  # the store itself cannot be opened any more
        return str(failure)
    except Exception:  # checking failed too: keep the original traceback
        return None
    return str(corruption_error(opened, problems)) if problems else None
