#!/usr/bin/env bash
# Make deepmd-kit's wheel work with the environment's torch (2.13.0, CPU build).
#
# The wheel carries PyTorch custom operators, deepmd/lib/libdeepmd_op_pt.so, compiled
# against the torch its [torch] extra pins (2.11.0); with another torch, importing
# deepmd.pt refuses to load them and fails. deepmd-kit's Python code runs without
# that library (it then defines pure-PyTorch fallbacks): the operators serve only
# compressed (tabulated) models and multi-rank LAMMPS runs, neither of which dfre
# uses. So the library is set aside when its torch version differs from the one
# installed. (To keep the operators, rebuild deepmd-kit against this torch instead:
# `pip install deepmd-kit --no-binary deepmd-kit`, a C++ build of several minutes.)
set -euo pipefail
python="$1"
"$python" - <<'PY'
import configparser
import importlib.metadata
import importlib.util
import pathlib

lib = pathlib.Path(importlib.util.find_spec("deepmd.lib").submodule_search_locations[0])
config = configparser.ConfigParser()
config.read(lib / "run_config.ini")
built_for = config["CONFIG"]["pt_version"]
installed = importlib.metadata.version("torch").split("+")[0]
op = lib / "libdeepmd_op_pt.so"
if op.exists() and built_for != installed:
    op.rename(op.with_name(f"{op.name}.built-for-torch-{built_for}"))
    print(f"deepmd-kit: set aside {op.name} (built for torch {built_for}, not {installed})")
PY
"$python" -c "import deepmd.pt.cxx_op, deepmd.infer"
