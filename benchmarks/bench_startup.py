"""Start-up and no-op times of the command line, each the median of --repeat runs of a
fresh ``dfre`` process:

- ``dfre --help`` (target: under 1 s) and ``dfre models`` (under 2 s);
- ``dfre featurize`` of a model whose features are complete (under 3 s: decided from the
  store, no model loaded, no cluster started);
- ``dfre demo`` run again on a finished demo (every result up to date: only the report).

    python benchmarks/bench_startup.py --repeat 5

The first run prepares the stores (a small demo with two CHGNet models); the times
printed exclude it. Also prints ``python -X importtime``'s five slowest imports of
``dfre --help``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

DFRE = [sys.executable, "-m", "dfre"]
DEMO = ["demo", "--atoms", "300", "--models", "chgnet-0.3.0,chgnet-r2scan"]


def timed(argv: list[str], repeat: int, cwd: str) -> float:
    """Median wall time (s) of ``python -m dfre ARGV`` run ``repeat`` times."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr}")
    return statistics.median(times)


def slowest_imports(cwd: str, count: int = 5) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "dfre", "--help"],
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    rows = []
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cumulative, name = line.split("|")
            if cumulative.strip().isdigit():
                rows.append((int(cumulative), name.rstrip()))
    return [f"{us / 1e3:8.1f} ms {name}" for us, name in sorted(rows)[-count:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--workdir",
        default=os.path.join(tempfile.gettempdir(), "dfre-startup-bench"),
        help="where the small demo goes (default: dfre-startup-bench in the temporary "
        "folder, reused by a later run; never the working tree)",
    )
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    cwd = os.path.abspath(args.workdir)
    local = ["--workers", "2", "--dashboard-address", ":0"]

    print("preparing: a small demo with two CHGNet models ...", flush=True)
    subprocess.run([*DFRE, *DEMO, *local], cwd=cwd, check=True, capture_output=True)
    store = os.path.join(cwd, "demo-store.zarr")

    figures = {
        "dfre --help": timed([*DFRE, "--help"], args.repeat, cwd),
        "dfre models": timed([*DFRE, "models"], args.repeat, cwd),
        "dfre featurize (complete)": timed(
            [*DFRE, "featurize", "--store", store, "--model", "chgnet-0.3.0", *local],
            args.repeat,
            cwd,
        ),
        "dfre demo (re-run, up to date)": timed([*DFRE, *DEMO, *local], args.repeat, cwd),
    }
    print(f"median of {args.repeat} runs each (wall time, this machine as it is now):")
    for what, seconds in figures.items():
        print(f"  {what:32} {seconds:6.2f} s")
    print("slowest imports of `dfre --help` (cumulative):")
    for line in slowest_imports(cwd):
        print(f"  {line}")


if __name__ == "__main__":
    main()
