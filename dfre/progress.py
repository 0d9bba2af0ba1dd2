"""What a long step is doing: a live bar on a terminal, one timestamped line otherwise.

Every step that may take more than a few seconds runs inside :func:`phase`::

    with phase("GFRE statistics pass (2,495 rows)") as step:
        ...                       # Dask computations, or step.advance(n) for counted work

While it runs, a terminal (stderr a TTY, or a Jupyter kernel) shows one bar line with
the work done, the time elapsed and the estimated time left::

    GFRE statistics pass (2,495 rows) [#######.......] 12/25 tasks | 3.1 s, ETA 3.4 s

When it ends, the bar is replaced by one timestamped line, which is all a log file
(stderr not a terminal) gets for the step::

    14:03:07 dfre: GFRE statistics pass (2,495 rows): done in 6.2 s, 25 tasks

Dask work inside a phase is counted task by task from the scheduler itself
(:func:`compute`, :func:`persist`): the distributed scheduler reports its progress
over its own connection, so the bar works the same on a local cluster, on an external
scheduler (``--scheduler-file``) and on SLURM workers; without a distributed client,
Dask's local scheduler reports through a callback. Counted work that happens inside
tasks (e.g. atoms featurized within a chunk) is sent from the tasks with
:func:`report`, which reaches the phase through the scheduler's event log.

``DFRE_PROGRESS=lines`` forces the log-file behaviour on a terminal, ``bar`` the bar
elsewhere. Nested phases are indented. This module imports Dask only when a Dask
computation runs, so the command line starts fast.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

#: Environment variable choosing the display: ``bar``, ``lines`` (default: by terminal).
MODE_ENV = "DFRE_PROGRESS"
#: Seconds between two redraws of a bar.
REDRAW_SECONDS = 0.2
#: How often the scheduler reports task counts (a computation ends at most this late).
FEED_INTERVAL = "50ms"
BAR_WIDTH = 24

_PHASES: list[Phase] = []
_LOCAL_TOPICS: dict[str, Callable[[float], None]] = {}
_WRITE_LOCK = threading.RLock()


def live() -> bool:
    """Whether progress is drawn as a live bar (a terminal or a Jupyter kernel)."""
    mode = os.environ.get(MODE_ENV, "").strip().lower()
    if mode in ("bar", "lines"):
        return mode == "bar"
    return _in_kernel() or _isatty(sys.stderr)


def _in_kernel() -> bool:
    """Whether this code runs in a Jupyter kernel (whose output shows ``\r`` redraws)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return getattr(shell, "kernel", None) is not None


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def clock() -> str:
    """The wall-clock time of a progress line, ``HH:MM:SS``."""
    return time.strftime("%H:%M:%S")


def say(message: str, *, prefix: str = "dfre") -> None:
    """One timestamped line on stderr: ``14:03:07 dfre: message``."""
    _write_line(f"{clock()} {prefix}: {message}")


def duration(seconds: float) -> str:
    """``4.2 s``, ``3 min 05 s`` or ``1 h 02 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Phase:
    """One step in progress: its label, the work done so far and the bar drawing it."""

    def __init__(self, label: str, *, total: float | None = None, unit: str = "tasks"):
        self.label = label
        self.total = total
        self.unit = unit
        self.done = 0.0
        self.depth = len(_PHASES)
        self.start = time.perf_counter()
        self.live = live()
        self._drawn = 0.0
        self._shown = False
        self._lock = threading.Lock()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def update(
        self, done: float | None = None, total: float | None = None, unit: str | None = None
    ) -> None:
        """Set the work done (and the total, the unit) and redraw if it is time to."""
        with self._lock:
            if total is not None:
                self.total = total
            if done is not None:
                self.done = done
            if unit is not None:
                self.unit = unit
        self._redraw()

    def advance(self, amount: float = 1) -> None:
        """Add ``amount`` to the work done (thread-safe)."""
        with self._lock:
            self.done += amount
        self._redraw()

    def bar_line(self, width: int = 1000) -> str:
        """The live line: label, bar, counts, elapsed time and estimated time left, at
        most ``width`` characters (the label is shortened first)."""
        elapsed = self.elapsed
        indent = "  " * self.depth
        if not self.total:
            tail = f" | {duration(elapsed)}"
        else:
            done = min(self.done, self.total)
            filled = int(BAR_WIDTH * done / self.total)
            eta = duration(elapsed * (self.total - done) / done) if done else "?"
            tail = (
                f" [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] "
                f"{_count(done)}/{_count(self.total)} {self.unit} | {duration(elapsed)}, ETA {eta}"
            )
        room = width - len(indent) - len(tail)
        label = self.label if len(self.label) <= room else self.label[: max(room - 1, 0)] + "…"
        return f"{indent}{label}{tail}"[:width]

    def _redraw(self, force: bool = False) -> None:
        if not self.live:
            return
        now = time.perf_counter()
        if not force and now - self._drawn < REDRAW_SECONDS:
            return
        self._drawn = now
        if _PHASES and _PHASES[-1] is not self:
            return  # an inner phase owns the line
        width = shutil.get_terminal_size((100, 20)).columns - 1
        with _WRITE_LOCK:
            sys.stderr.write("\r\x1b[K" + self.bar_line(width))
            sys.stderr.flush()
            self._shown = True

    def finish(self, outcome: str = "done") -> None:
        """Replace the bar by the phase's one timestamped line."""
        details = ""
        if self.total:
            details = f", {_count(min(self.done, self.total))} {self.unit}"
        elif self.done:
            details = f", {_count(self.done)} {self.unit}"
        indent = "  " * self.depth
        _write_line(
            f"{clock()} dfre: {indent}{self.label}: {outcome} in {duration(self.elapsed)}{details}"
        )


def _count(value: float) -> str:
    return f"{int(round(value)):,}"


def _write_line(line: str) -> None:
    with _WRITE_LOCK:
        if live():
            sys.stderr.write("\r\x1b[K")
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    for outer in _PHASES:
        outer._drawn = 0.0


def current() -> Phase | None:
    """The innermost phase running in this process, if any."""
    return _PHASES[-1] if _PHASES else None


@contextlib.contextmanager
def phase(label: str, *, total: float | None = None, unit: str = "tasks") -> Iterator[Phase]:
    """Run a step as a :class:`Phase`: a live bar meanwhile, one timestamped line at the end
    (``failed`` instead of ``done`` if the step raised; nothing for a
    :class:`~dfre.errors.DfreError`, whose own one line says what went wrong)."""
    from dfre.errors import DfreError

    step = Phase(label, total=total, unit=unit)
    _PHASES.append(step)
    step._redraw(force=True)
    outcome: str | None = "failed"
    try:
        yield step
        outcome = "done"
    except KeyboardInterrupt:
        outcome = "interrupted"
        raise
    except DfreError:
        outcome = None
        raise
    finally:
        _PHASES.remove(step)
        if outcome is not None:
            step.finish(outcome)
        elif step._shown:
            with _WRITE_LOCK:
                sys.stderr.write("\r\x1b[K")
                sys.stderr.flush()
        if _PHASES:
            _PHASES[-1]._redraw(force=True)


def track(items: Iterable[Any], label: str, *, total: int | None = None, unit: str = "items"):
    """Iterate over ``items`` as one phase, counting them."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with phase(label, total=total, unit=unit) as step:
        for item in items:
            yield item
            step.advance(1)


# ---------------------------------------------------------------------------- Dask work
def _client():
    """The current distributed client, or None (then Dask's local scheduler computes)."""
    if "distributed" not in sys.modules:
        return None
    from distributed import default_client

    try:
        return default_client()
    except ValueError:
        return None


def compute(*collections: Any, label: str | None = None, **kwargs: Any) -> tuple:
    """``dask.compute(*collections)`` with its tasks counted in a phase.

    With ``label`` the computation is a phase of its own; without, it is counted in
    the current phase (if any). ``kwargs`` go to the compute call.
    """
    if label is not None:
        with phase(label):
            return compute(*collections, **kwargs)
    import dask

    step = current()
    client = _client()
    # as dask.compute: dask collections inside lists, tuples and dicts are computed too
    found, repack = dask.base.unpack_collections(*collections)
    scheduler = dask.base.get_scheduler(collections=found, scheduler=kwargs.get("scheduler"))
    if client is None or scheduler != client.get:  # Dask's local schedulers
        with _LocalTasks(step):
            return dask.compute(*collections, **kwargs)
    kwargs.pop("scheduler", None)
    futures = client.compute(found, **kwargs)
    try:
        _follow(futures, step)
        return repack(client.gather(futures))
    except BaseException:
        client.cancel(futures)
        raise


def persist(obj: Any, label: str | None = None) -> Any:
    """``obj`` (a dask collection, or futures) persisted and waited for, tasks counted."""
    if label is not None:
        with phase(label):
            return persist(obj)
    import dask

    step = current()
    client = _client()
    if dask.is_dask_collection(obj):
        if client is None:
            with _LocalTasks(step):
                return obj.persist()
        obj = client.persist(obj)
    from distributed import futures_of, wait

    futures = futures_of(obj)
    _follow(futures, step)
    wait(futures)
    return obj


def _follow(futures: list, step: Phase | None) -> None:
    """Wait for ``futures``; the scheduler reports their tasks to ``step`` meanwhile
    (unless the phase counts other work, e.g. atoms, that tasks report themselves)."""
    if not futures:
        return
    if step is None or (step.unit != "tasks" and step.total):
        from distributed import wait

        wait(futures)
        return
    _scheduler_feed()(futures, step)


@functools.cache
def _scheduler_feed():
    """A subclass of distributed's text progress bar that draws into a :class:`Phase`."""
    from distributed.diagnostics.progressbar import TextProgressBar

    class SchedulerFeed(TextProgressBar):
        """distributed's task-level progress feed, drawn into a :class:`Phase`.

        The scheduler sends the counts over a connection of its own every
        :data:`FEED_INTERVAL`, so this works with any scheduler the client reaches.
        Blocks until the tasks end. Counts add to the tasks the phase counted before.
        """

        def __init__(self, futures: list, step: Phase):
            self.step = step
            self.base = step.done if step.unit == "tasks" else 0.0
            super().__init__(
                futures, scheduler=futures[0].client.scheduler.address, interval=FEED_INTERVAL
            )

        def _draw_bar(self, remaining: int, all: int, **kwargs: Any) -> None:
            self.step.update(done=self.base + all - remaining, total=self.base + all, unit="tasks")

        def _draw_stop(self, remaining: int = 0, all: int = 0, **kwargs: Any) -> None:
            self._draw_bar(remaining, all)

    return SchedulerFeed


class _LocalTasks:
    """Counts the tasks of Dask's local schedulers into a phase (a dask Callback)."""

    def __init__(self, step: Phase | None):
        self.step = step
        self.callback = None

    def __enter__(self):
        if self.step is None or (self.step.unit != "tasks" and self.step.total):
            return self
        from dask.callbacks import Callback

        step = self.step
        base = step.done

        class Counter(Callback):
            def _start_state(self, dsk, state):
                waiting = sum(len(state[k]) for k in ("ready", "waiting", "running"))
                self.total = waiting + len(state["finished"])
                step.update(done=base, total=base + self.total)

            def _posttask(self, key, result, dsk, state, worker_id):
                step.update(done=base + len(state["finished"]))

        self.callback = Counter()
        self.callback.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.callback is not None:
            self.callback.__exit__(*exc)


# ---------------------------------------------------------------------------- inside tasks
def report(topic: str | None, amount: float) -> None:
    """Inside a task: add ``amount`` to the phase that listens to ``topic``.

    On a distributed worker the amount travels through the scheduler's event log
    (``Worker.log_event``); in the process of the phase (Dask's local scheduler) it is
    added directly. Does nothing without ``topic`` or without a listener.
    """
    if topic is None:
        return
    handler = _LOCAL_TOPICS.get(topic)
    if handler is not None:
        handler(amount)
        return
    if "distributed" not in sys.modules:
        return
    from distributed import get_worker

    try:
        worker = get_worker()
    except ValueError:
        return
    worker.log_event(topic, amount)


@contextlib.contextmanager
def listening(step: Phase) -> Iterator[str]:
    """A topic for :func:`report` whose amounts are added to ``step`` while the block runs."""
    topic = f"dfre-progress-{uuid.uuid4().hex}"
    _LOCAL_TOPICS[topic] = step.advance
    client = _client()
    if client is not None:
        client.subscribe_topic(topic, lambda event: step.advance(float(event[1])))
    try:
        yield topic
    finally:
        _LOCAL_TOPICS.pop(topic, None)
        if client is not None:
            with contextlib.suppress(Exception):
                client.unsubscribe_topic(topic)
