"""benchmarks/gpu_wheels.py: the checks that make .whl/ one installable set, and trimming.

Fetching needs the registry (``make gpu-wheels``); what it produces is checked here on
wheels written for the test: one version of each pinned project, every requirement met
by a carried wheel of a matching version, by a package of the GPU machine, or named in
NOT_CARRIED, requirements for other Pythons ignored; trimming drops files and their
RECORD lines.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_wheels  # noqa: E402


def write_wheel(folder: Path, name: str, version: str, requires=(), files=None) -> Path:
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    info = f"{name.replace('-', '_')}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    files = dict(files or {})
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
        archive.writestr(f"{info}/METADATA", meta)
        record = [f"{m},sha256=x,{len(t)}" for m, t in files.items()] + [f"{info}/RECORD,,"]
        archive.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path


@pytest.fixture
def complete(tmp_path) -> Path:
    for name, version in gpu_wheels.PINS.items():
        write_wheel(tmp_path, name, version)
    return tmp_path


def test_a_complete_consistent_set_has_no_problems(complete):
    assert gpu_wheels.check(complete) == []


def test_two_versions_unpinned_and_missing_projects_are_problems(complete):
    write_wheel(complete, "dask", "2026.8.0")
    write_wheel(complete, "bokeh", "3.10.2")
    next(complete.glob("zict-*.whl")).unlink()
    problems = "\n".join(gpu_wheels.check(complete))
    assert "dask: 2 versions" in problems
    assert "bokeh 3.10.2 is not pinned" in problems
    assert "zict 3.0.0 is missing" in problems


def test_requirements_are_met_by_the_set_the_machine_or_a_stated_reason(complete):
    next(complete.glob("zarr-*.whl")).unlink()
    write_wheel(
        complete,
        "zarr",
        gpu_wheels.PINS["zarr"],
        requires=[
            "numcodecs>=0.14",  # carried, version matches
            "numpy>=2",  # on the GPU machine
            "msgspec>=0.19",  # not carried, with its reason
            'importlib_metadata>=4; python_version < "3.12"',  # not for Python 3.12
            'pytest; extra == "test"',  # an extra
            "donfig>=9",  # carried, but too old
            "left-pad>=1",  # nowhere
        ],
    )
    problems = gpu_wheels.check(complete)
    assert problems == [
        "zarr needs donfig>=9, carried donfig 0.8.1.post1",
        "zarr needs left-pad>=1: neither carried nor on the GPU machine",
    ]


def test_trim_drops_files_and_their_record_lines(tmp_path):
    path = write_wheel(
        tmp_path,
        "sevenn",
        "0.13.0",
        files={"sevenn/a.py": "x", "sevenn/pretrained_potentials/SevenNet_l3i5/c.pth": "big"},
    )
    assert gpu_wheels.trim_wheel(path, ["sevenn/pretrained_potentials/SevenNet_l3i5/*"]) == 1
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        record = archive.read("sevenn-0.13.0.dist-info/RECORD").decode()
    assert "sevenn/a.py" in names and not any("l3i5" in n for n in names)
    assert "sevenn/a.py" in record and "l3i5" not in record
