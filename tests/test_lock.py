"""The store write lock: one writer at a time, stale locks of dead processes cleared."""

import os
import re
import signal
import subprocess
import sys
import time

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


# ---------------------------------------------------------------------- library and command level
def _xyz(tmp_path):
    from ase.build import bulk
    from ase.io import write

    path = tmp_path / "si.xyz"
    write(path, [bulk("Si", "diamond", 5.43)] * 2)
    return str(path)


def test_library_writers_take_the_lock(holder, tmp_path):
    from dfre.data.ingest import ingest
    from dfre.data.sample import write_sample

    path, proc = holder
    content = sorted(os.listdir(path))
    with pytest.raises(DfreError, match=rf"written by another dfre process \(pid {proc.pid} "):
        ingest([_xyz(tmp_path)], path)
    with pytest.raises(DfreError, match=rf"pid {proc.pid} .*`holder`"):
        write_sample(path, 10)
    assert sorted(os.listdir(path)) == content


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    from dfre.data.ingest import ingest

    path = tmp_path / "s.zarr"
    Store.create(path)
    with store_lock(path, "dfre run study.toml"):
        ingest([_xyz(tmp_path)], path)  # a nested writer: runs under the outer lock
        assert f'"pid": {os.getpid()}' in (path / LOCK_NAME).read_text()
    assert not (path / LOCK_NAME).exists()
    assert Store.open(path).n_structures == 2


def _dfre(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "dfre", *args], capture_output=True, text=True, timeout=120, **kwargs
    )


def test_two_dfre_commands_on_one_store(tmp_path):
    path = tmp_path / "s.zarr"
    Store.create(path)
    first = subprocess.Popen(
        [sys.executable, "-m", "dfre", "sample", "--atoms", "150000", "--store", str(path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (path / LOCK_NAME).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGSTOP)  # frozen while holding the lock
        second = _dfre("ingest", _xyz(tmp_path), "--store", str(path))
        assert second.returncode == 2
        assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
        assert re.fullmatch(
            rf"dfre: error: store {re.escape(str(path))} is being written by another dfre "
            rf"process \(pid {first.pid} on \S+, `dfre sample --atoms 150000`, since \S+\): wait "
            rf"for it to finish, or delete {re.escape(str(path / LOCK_NAME))} if that process "
            r"no longer runs\n",
            second.stderr,
        ), second.stderr
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # a job killed at its wall-time limit
        first.wait()
    assert (path / LOCK_NAME).exists()
    third = _dfre("ingest", _xyz(tmp_path), "--store", str(path))
    assert third.returncode == 0, third.stderr
    assert f"clearing stale lock of {path} (pid {first.pid}" in third.stderr
    assert not (path / LOCK_NAME).exists()
