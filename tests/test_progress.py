"""What a long step shows: one timestamped line per phase in a log, a live bar with counts,
elapsed time and ETA on a terminal, task counts from Dask's local scheduler and from a
real distributed cluster, counts sent from inside tasks on worker processes, and graphs
that carry no large constants (labels, weights) to the scheduler."""

from __future__ import annotations

import re
import time
import warnings

import dask
import dask.array as da
import numpy as np
import pytest

from dfre import cluster, progress
from dfre.errors import DfreError

LINE = re.compile(r"^\d\d:\d\d:\d\d dfre: (?P<indent> *)(?P<label>.+): (?P<outcome>\w+) in ")


@pytest.fixture
def lines(monkeypatch):
    monkeypatch.setenv(progress.MODE_ENV, "lines")


@pytest.fixture
def bars(monkeypatch):
    monkeypatch.setenv(progress.MODE_ENV, "bar")
    monkeypatch.setattr(progress, "REDRAW_SECONDS", 0.0)


def test_a_log_gets_one_timestamped_line_per_phase(lines, capsys):
    with progress.phase("outer step"), progress.phase("inner step", total=10, unit="atoms") as s:
        s.advance(4)
        s.advance(6)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    inner, outer = (LINE.match(line) for line in err)
    assert inner["label"] == "inner step" and inner["indent"] == "  "
    assert err[0].endswith(", 10 atoms")
    assert outer["label"] == "outer step" and outer["indent"] == ""
    assert "\r" not in "".join(err)


def test_a_failed_phase_says_so(lines, capsys):
    with pytest.raises(ValueError), progress.phase("doomed"):
        raise ValueError("x")
    assert LINE.match(capsys.readouterr().err)["outcome"] == "failed"
    with pytest.raises(DfreError), progress.phase("bad input found"):
        raise DfreError("one line says it")  # and nothing more: the CLI prints that line
    assert capsys.readouterr().err == ""


def test_a_terminal_gets_a_bar_with_counts_elapsed_time_and_eta(bars, capsys):
    with progress.phase("featurize m", total=200, unit="atoms") as step:
        step.advance(50)
    err = capsys.readouterr().err
    bar = re.search(r"featurize m \[(#*)(\.*)\] 50/200 atoms \| [\d.]+ s, ETA [\d.]+ s", err)
    assert bar and len(bar.group(1)) == progress.BAR_WIDTH // 4
    end = r"\r\x1b\[K\d\d:\d\d:\d\d dfre: featurize m: done in [\d.]+ s, 50 atoms\n$"
    assert re.search(end, err)


def test_tasks_of_the_local_scheduler_are_counted(lines, capsys):
    x = da.ones((100, 4), chunks=(10, 4))
    (total,) = progress.compute(x.sum(), label="sum")
    assert total == 400
    err = capsys.readouterr().err
    n_tasks = int(re.search(r"sum: done in [\d.]+ s, (\d+) tasks", err).group(1))
    assert 10 < n_tasks <= len(x.sum().__dask_graph__())


def test_compute_computes_inside_lists_as_dask_does():
    parts = [dask.delayed(np.ones)(3), dask.delayed(np.zeros)(2)]
    assert [list(p) for p in progress.compute(parts, 7)[0]] == [[1, 1, 1], [0, 0]]
    with cluster.connected(n_workers=1, dashboard_address=":0", quiet=True, gpu=False):
        got, seven = progress.compute(parts, 7)
    assert [list(p) for p in got] == [[1, 1, 1], [0, 0]] and seven == 7


def _reporting_task(topic: str, amount: int) -> int:
    from dfre import progress as task_progress

    for _ in range(amount):
        task_progress.report(topic, 1)
    return amount


def test_counts_sent_from_tasks_reach_the_phase(lines, capsys):
    """From worker processes of a real cluster (through the scheduler) and in-process."""
    with cluster.connected(n_workers=2, dashboard_address=":0", quiet=True, gpu=False) as client:
        with progress.phase("work", total=30, unit="items") as step:
            with progress.listening(step) as topic:
                futures = client.map(_reporting_task, [topic] * 3, [10, 10, 10], pure=False)
                assert sum(client.gather(futures)) == 30
                deadline = time.monotonic() + 10
                while step.done < 30 and time.monotonic() < deadline:
                    time.sleep(0.1)  # events trail the results a little
        assert step.done == 30
    with progress.phase("local", total=5, unit="items") as step:
        with progress.listening(step) as topic:
            dask.compute(dask.delayed(_reporting_task)(topic, 5), scheduler="threads")
    assert step.done == 5


def test_large_arrays_travel_outside_the_graph():
    """GFRE's weights (8 MB here) and labels are scattered: a graph above 4 MB would warn.

    (The 2.5 MB of in-memory features themselves do travel in the graph.)
    """
    from dfre.metrics.gfre import gfre_matrix

    rng = np.random.default_rng(0)
    sets = {f"x{i}": rng.normal(size=(300, 256)) for i in range(4)}
    split = (np.arange(200), np.arange(200, 300))
    with (
        cluster.connected(n_workers=1, dashboard_address=":0", quiet=True, gpu=False),
        dask.config.set({"distributed.admin.large-graph-warning-threshold": "4MB"}),
        warnings.catch_warnings(),
    ):
        warnings.filterwarnings("error", message="Sending large graph")
        on_cluster = gfre_matrix(sets, split, pointwise=True)
    local = gfre_matrix(sets, split, pointwise=True)
    np.testing.assert_allclose(on_cluster.pointwise, local.pointwise, rtol=1e-9)
