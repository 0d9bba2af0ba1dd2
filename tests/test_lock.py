"""The store write lock: one writer at a time, stale locks of dead processes cleared."""

import os
import signal
import subprocess
import sys

import pytest

from dfre.errors import DfreError
from dfre.lock import LOCK_NAME, store_lock
from dfre.store import Store

HOLDER = """
import sys, time
from dfre.lock import store_lock
with store_lock(sys.argv[1], "holder"):
    print("locked", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def holder(tmp_path):
    Store.create(tmp_path / "s.zarr")
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "s.zarr")], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    yield tmp_path / "s.zarr", proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_second_writer_is_refused_with_the_owner_named(holder):
    path, proc = holder
    with pytest.raises(DfreError, match=rf"pid {proc.pid} .*`holder`"):
        with store_lock(path, "ingest"):
            pass
    assert os.path.exists(path / LOCK_NAME)


def test_stale_lock_of_a_killed_process_is_cleared(holder, capsys):
    path, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with store_lock(path, "ingest"):
        assert f'"pid": {os.getpid()}' in (path / LOCK_NAME).read_text()
    assert "clearing stale lock" in capsys.readouterr().err
    assert not os.path.exists(path / LOCK_NAME)


def test_lock_is_released_after_an_error(tmp_path):
    Store.create(tmp_path / "s.zarr")
    with pytest.raises(RuntimeError):
        with store_lock(tmp_path / "s.zarr", "x"):
            raise RuntimeError("boom")
    assert not (tmp_path / "s.zarr" / LOCK_NAME).exists()
    with store_lock(tmp_path / "s.zarr", "y"):
        assert (tmp_path / "s.zarr" / LOCK_NAME).exists()
