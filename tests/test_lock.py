"""The store write lock: one writer at a time, also while a store is being created; a
lock left by a killed process is taken over by exactly one of the processes that start
next (kernel file locks, real processes)."""

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


def test_stale_lock_of_a_killed_process_is_taken_over(holder, capsys):
    path, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert f'"pid": {proc.pid}' in (path / LOCK_NAME).read_text()  # the file stays behind
    with store_lock(path, "ingest"):
        assert f'"pid": {os.getpid()}' in (path / LOCK_NAME).read_text()
    err = capsys.readouterr().err
    assert f"taking over the lock of {path}: its last holder (pid {proc.pid} " in err
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
            r"for it to finish \(the lock is released when that process ends, however it ends\)\n",
            second.stderr,
        ), second.stderr
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # a job killed at its wall-time limit
        first.wait()
    assert (path / LOCK_NAME).exists()
    third = _dfre("ingest", _xyz(tmp_path), "--store", str(path))
    assert third.returncode == 0, third.stderr
    assert f"taking over the lock of {path}: its last holder (pid {first.pid}" in third.stderr
    assert not (path / LOCK_NAME).exists()


# ---------------------------------------------------------------------- races between starters
#: A long-lived starter: for every store path read from stdin it tries to take the lock
#: (creating the store's folder if needed), holds it HOLD seconds and prints what happened
#: with the monotonic (system-wide) times at which it held the lock.
STARTER = """
import sys, time
from dfre.errors import DfreError
from dfre.lock import store_lock
for line in sys.stdin:
    try:
        with store_lock(line.strip(), "starter", create=True):
            start = time.monotonic()
            time.sleep(float(sys.argv[1]))
            end = time.monotonic()
        print("held", start, end, flush=True)
    except DfreError as error:
        print("refused", str(error).replace(chr(10), " "), flush=True)
"""
STARTERS, TRIALS, HOLD = 6, 20, 0.3


@pytest.fixture(scope="module")
def stale_record(tmp_path_factory):
    """The lock file a holder leaves behind when it is killed."""
    path = tmp_path_factory.mktemp("stale") / "s.zarr"
    Store.create(path)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"locked"
    proc.kill()
    proc.wait()
    return (path / LOCK_NAME).read_bytes()


@pytest.mark.parametrize("situation", ["stale lock", "new store"])
def test_simultaneous_starters_never_hold_the_lock_together(tmp_path, stale_record, situation):
    starters = [
        subprocess.Popen(
            [sys.executable, "-c", STARTER, str(HOLD)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(STARTERS)
    ]
    try:
        for trial in range(TRIALS):
            path = tmp_path / f"trial-{trial}.zarr"
            if situation == "stale lock":
                Store.create(path)
                (path / LOCK_NAME).write_bytes(stale_record)
            for proc in starters:  # all six get the path within microseconds
                proc.stdin.write(f"{path}\n")
            for proc in starters:
                proc.stdin.flush()
            outcomes = [proc.stdout.readline().split(maxsplit=1) for proc in starters]
            held = sorted(
                tuple(map(float, rest.split())) for kind, rest in outcomes if kind == "held"
            )
            refused = [rest for kind, rest in outcomes if kind == "refused"]
            assert len(held) + len(refused) == STARTERS, outcomes
            assert held, f"trial {trial}: nobody got the lock: {refused}"
            for (_, end), (start, _) in zip(held[:-1], held[1:], strict=True):
                assert end <= start, f"trial {trial}: two holders at once: {held}"
            for message in refused:
                assert message.startswith(f"store {path} is being written by another dfre process")
            assert not (path / LOCK_NAME).exists()
            if situation == "new store":  # nothing was written into the new folder
                assert not path.exists() or os.listdir(path) == []
    finally:
        for proc in starters:
            proc.stdin.close()
            proc.wait(30)


def _big_xyz(path, n: int, symbol: str):
    from ase.build import bulk
    from ase.io import write

    frames = []
    for i in range(n):
        atoms = bulk(symbol, "fcc", 4.0, cubic=True)
        atoms.rattle(0.01, seed=i)
        frames.append(atoms)
    write(path, frames)
    return str(path)


@pytest.mark.parametrize("command", ["ingest", "sample"])
def test_second_command_into_the_same_new_store_is_refused(tmp_path, command):
    """The creation of a store is locked: a second ingest (or sample) into the path that
    the first is creating is refused, and the store holds exactly the first one's data."""
    path = tmp_path / "new.zarr"
    if command == "ingest":
        first_args = ["ingest", _big_xyz(tmp_path / "big.xyz", 2000, "Cu"), "--chunk-atoms", "512"]
        second_args = ["ingest", _big_xyz(tmp_path / "other.xyz", 50, "Al")]
    else:
        first_args = ["sample", "--atoms", "20000", "--seed", "1", "--chunk-atoms", "512"]
        second_args = ["sample", "--atoms", "500", "--seed", "2"]
    first = subprocess.Popen(
        [sys.executable, "-m", "dfre", *first_args, "--store", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (path / LOCK_NAME).exists():
        assert first.poll() is None and time.monotonic() < deadline, "no lock was taken"
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)  # frozen in the middle of creating the store
    try:
        second = _dfre(*second_args, "--store", str(path))
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode == 2
    assert re.fullmatch(
        rf"dfre: error: store {re.escape(str(path))} is being written by another dfre process "
        rf"\((pid {first.pid} .*|starting)\): wait for it to finish .*\n",
        second.stderr,
    ), second.stderr
    store = Store.open(path)
    assert len(store.provenance) == 1
    record = store.provenance[0]
    assert record["complete"]
    if command == "ingest":
        assert record["source"] == first_args[1]
        assert store.n_structures == 2000 and set(store.numbers().tolist()) == {29}
    else:
        assert record["source"].startswith("dfre sample seed=1 atoms=20000")
        assert store.n_atoms >= 20000 and (store.numbers() > 0).all()
    assert not (path / LOCK_NAME).exists()
