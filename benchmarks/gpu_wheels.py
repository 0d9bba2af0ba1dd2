"""The wheels the GPU machine lacks, for Python 3.12 on manylinux x86_64: fetch and check.

The GPU machine (benchmarks/gpu/machine-packages.txt) has torch, CuPy, numpy, pandas,
scikit-learn, e3nn, torch_geometric, matplotlib, ... but none of Dask, Zarr, ASE,
scikit-matter, the CHGNet and SevenNet packages or their own needs, and it has no
network. ``fetch`` downloads :data:`PINS` into a folder (default ``.whl``) by calling
``../shared/gpu/fetch-wheels.sh`` (the project-wide fetcher) with the pins, then

- removes every wheel not pinned here (the fetcher's unpinned defaults: other versions,
  and the dashboard's bokeh and xyzservices, see :data:`NOT_CARRIED`),
- trims the large model wheels to what the GPU check runs (:data:`TRIMS`): SevenNet-0
  and CHGNet 0.3.0 weights only, about 40 MB less,
- builds ``nvidia-ml-py3`` (an sdist only, whose ``nvidia_smi`` module CHGNet imports)
  into a wheel without its old ``pynvml.py``, which would hide the machine's current
  one that dask-cuda needs,

and ``check`` (also run by ``fetch``) proves the folder installs as one set: one version
of each pinned project, every requirement (``Requires-Dist`` evaluated for CPython 3.12
on Linux x86_64) met by a carried wheel of a matching version or by a package of the
machine, or named in :data:`NOT_CARRIED` with the reason; and the folder plus the git
working tree stay within the device tool's 64 MiB.

The versions are those of the development .venv, which the test suite runs, except
where the GPU stack pins others (noted). ``make gpu-wheels`` runs ``fetch``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MACHINE_PACKAGES = ROOT / "benchmarks" / "gpu" / "machine-packages.txt"
FETCHER = ROOT.parent / "shared" / "gpu" / "fetch-wheels.sh"
#: What one device call may carry: the working tree and the carried folders together.
CARRY_LIMIT_BYTES = 64 << 20

#: Carried projects and versions (the import chain of dfre, its CHGNet and SevenNet
#: adapters, dask-cuda and RMM, less what the machine has).
PINS = {
    # Dask: the versions rapids-dask-dependency 26.10 (dask-cuda's pin) requires
    "dask": "2026.7.1",
    "distributed": "2026.7.1",
    "dask-cuda": "26.10.0",
    "rapids-dask-dependency": "26.10.0",
    "partd": "1.4.2",
    "locket": "1.0.0",
    "tblib": "3.2.2",
    "tornado": "6.6.1",
    "zict": "3.0.0",
    # RMM pool for the dask-cuda workers (--rmm-pool-size), CUDA 13 as the machine's CuPy
    "rmm-cu13": "26.10.0",
    "librmm-cu13": "26.10.0",
    "rapids-logger": "0.3.0",
    # the store
    "zarr": "3.1.6",
    "numcodecs": "0.16.6",
    "donfig": "0.8.1.post1",
    "google-crc32c": "1.9.0",
    # structures, references, study files
    "ase": "3.29.0",
    "skmatter": "0.4.1",
    "tomli-w": "1.2.0",
    # CHGNet and what its import needs
    "chgnet": "0.4.2",
    "nvidia-ml-py3": "7.352.0",
    "pymatgen": "2026.10.24",
    "pymatgen-core": "2026.10.16",
    "monty": "2026.10.21",
    "ruamel-yaml": "0.19.1",
    "spglib": "2.8.0",
    "orjson": "3.13.0",
    "palettable": "3.3.3",
    "uncertainties": "3.2.3",
    # SevenNet and what its import needs
    "sevenn": "0.13.0",
    "matscipy": "1.3.1",
    "braceexpand": "0.1.7",
}

#: Projects built here from their source distribution (no wheel exists), and the files
#: left out of the built wheel.
FROM_SOURCE = {"nvidia-ml-py3": ["pynvml.py"]}

#: Files left out of carried wheels (glob patterns inside the wheel), and why.
TRIMS = {
    "sevenn": (
        [
            "sevenn/pretrained_potentials/SevenNet_0__22May2024/*",
            "sevenn/pretrained_potentials/SevenNet_MF_0/*",
            "sevenn/pretrained_potentials/SevenNet_l3i5/*",
        ],
        "the GPU check runs SevenNet-0 (11Jul2024) only; the other checkpoints are 35 MB",
    ),
    "chgnet": (
        ["chgnet/pretrained/0.2.0/*", "chgnet/pretrained/r2scan/*"],
        "the GPU check runs CHGNet 0.3.0 only",
    ),
}

#: Requirements of carried wheels that are not carried: the import chain never needs
#: them (benchmarks/gpu_check.py lists what the check imported, to prove it).
NOT_CARRIED = {
    "bokeh": "the Dask dashboard only (the GPU check starts none); 6.7 MB",
    "xyzservices": "bokeh's map tiles",
    "plotly": "pymatgen's plotting only; 9.7 MB",
    "bibtexparser": "pymatgen's BibTeX references only (and 1.x comes as source only)",
    "msgspec": "zarr 3.2 and later; the pinned zarr 3.1 does not use it",
}

#: Environment markers of the GPU machine's Python.
MARKERS = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}


def normalise(name: str) -> str:
    """A project name in PEP 503 normal form."""
    return re.sub(r"[-_.]+", "-", name).lower()


def machine_packages() -> set[str]:
    """Normalised names of the packages installed on the GPU machine."""
    lines = MACHINE_PACKAGES.read_text().splitlines()
    return {normalise(line) for line in lines if line.strip() and not line.startswith("#")}


def wheel_name_version(path: Path) -> tuple[str, str]:
    """(normalised project name, version) from a wheel's file name."""
    name, version = path.name.split("-")[:2]
    return normalise(name), version


def wheel_requirements(path: Path) -> list[str]:
    """The ``Requires-Dist`` lines of a wheel's METADATA."""
    with zipfile.ZipFile(path) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        message = Parser().parsestr(archive.read(meta).decode())
    return message.get_all("Requires-Dist") or []


def trim_wheel(path: Path, patterns: list[str]) -> int:
    """Rewrite ``path`` without the members matching ``patterns`` (and their RECORD
    lines); return the number of members removed."""
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
        dropped = {m.filename for m in members if any(fnmatch(m.filename, p) for p in patterns)}
        if not dropped:
            return 0
        trimmed = path.with_suffix(".trimmed")
        with zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as out:
            for member in members:
                if member.filename in dropped:
                    continue
                data = archive.read(member)
                if member.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines()
                    kept = [line for line in lines if line.split(",")[0] not in dropped]
                    data = ("\n".join(kept) + "\n").encode()
                out.writestr(member, data)
    trimmed.replace(path)
    return len(dropped)


def working_tree_bytes() -> int:
    """Bytes of what a device call sends besides carried folders: tracked files and
    untracked files git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    paths = [ROOT / os.fsdecode(p) for p in listed if p]
    return sum(path.stat().st_size for path in paths if path.is_file())


def check(dest: Path) -> list[str]:
    """Problems of the wheel folder ``dest`` (empty when it is complete and consistent)."""
    from packaging.requirements import Requirement

    problems = []
    wheels = sorted(dest.glob("*.whl"))
    found: dict[str, list[str]] = {}
    for path in wheels:
        name, version = wheel_name_version(path)
        found.setdefault(name, []).append(version)
    pins = {normalise(k): v for k, v in PINS.items()}
    for name, versions in sorted(found.items()):
        if len(versions) > 1:
            problems.append(f"{name}: {len(versions)} versions {versions} (pip stops on two)")
        elif name not in pins:
            problems.append(f"{name} {versions[0]} is not pinned in benchmarks/gpu_wheels.py")
        elif versions[0] != pins[name]:
            problems.append(f"{name} {versions[0]} instead of the pinned {pins[name]}")
    problems += [f"{name} {pins[name]} is missing" for name in pins if name not in found]
    machine = machine_packages()
    skipped = {normalise(k) for k in NOT_CARRIED}
    carried = {name: versions[0] for name, versions in found.items()}
    for path in wheels:
        owner = wheel_name_version(path)[0]
        for line in wheel_requirements(path):
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(MARKERS):
                continue
            name = normalise(req.name)
            if name in carried:
                if carried[name] not in req.specifier:
                    problems.append(f"{owner} needs {line}, carried {name} {carried[name]}")
            elif name not in machine and name not in skipped:
                problems.append(f"{owner} needs {line}: neither carried nor on the GPU machine")
    total = sum(p.stat().st_size for p in wheels) + working_tree_bytes()
    if total > CARRY_LIMIT_BYTES:
        problems.append(
            f"wheels and working tree are {total / 2**20:.1f} MiB, over the device tool's "
            f"{CARRY_LIMIT_BYTES >> 20} MiB"
        )
    return problems


def report(dest: Path) -> None:
    wheels = sorted(dest.glob("*.whl"), key=lambda p: -p.stat().st_size)
    size = sum(p.stat().st_size for p in wheels)
    tree = working_tree_bytes()
    for path in wheels:
        print(f"  {path.stat().st_size / 2**20:6.2f} MiB  {path.name}")
    print(
        f"{len(wheels)} wheels, {size / 2**20:.1f} MiB; with the working tree "
        f"({tree / 2**20:.1f} MiB) {(size + tree) / 2**20:.1f} of the "
        f"{CARRY_LIMIT_BYTES >> 20} MiB a device call carries"
    )


def fetch(dest: Path, fetcher: Path) -> None:
    if not fetcher.is_file():
        raise SystemExit(f"{fetcher} not found: pass --fetcher PATH of fetch-wheels.sh")
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    pins = [f"{name}=={version}" for name, version in PINS.items() if name not in FROM_SOURCE]
    subprocess.run(["bash", str(fetcher), str(dest), *pins], check=True)
    for name, left_out in FROM_SOURCE.items():
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-binary", ":all:"]
            + ["-w", str(dest), f"{name}=={PINS[name]}"],
            check=True,
        )
        (built,) = [p for p in dest.glob("*.whl") if wheel_name_version(p)[0] == name]
        trim_wheel(built, left_out)
        print(f"built {built.name} from its source distribution, without {left_out}")
    pins_normal = {normalise(k): v for k, v in PINS.items()}
    for path in sorted(dest.glob("*.whl")):
        name, version = wheel_name_version(path)
        if pins_normal.get(name) != version:
            why = NOT_CARRIED.get(name, f"not the pinned version {pins_normal.get(name)}")
            print(f"removed {path.name}: {why}")
            path.unlink()
    for name, (patterns, why) in TRIMS.items():
        for path in dest.glob("*.whl"):
            if wheel_name_version(path)[0] == name:
                print(f"trimmed {trim_wheel(path, patterns)} files from {path.name}: {why}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("fetch", "check"))
    p.add_argument("--dest", type=Path, default=ROOT / ".whl")
    p.add_argument("--fetcher", type=Path, default=FETCHER, help="fetch-wheels.sh to call")
    args = p.parse_args(argv)
    if args.command == "fetch":
        fetch(args.dest, args.fetcher)
    problems = check(args.dest)
    report(args.dest)
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
