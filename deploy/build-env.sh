#!/usr/bin/env bash
# Build the isolated environment of one model family, .envs/FAMILY (what `make env-FAMILY`
# runs): deploy/build-env.sh FAMILY [PYTHON] [UV]
#
# 1. a new virtual environment from PYTHON (default python3);
# 2. torch by pip, which takes the CPU build torch==2.13.0 from this machine's disk
#    (uv does not look there), or the torch line of deploy/envs/FAMILY.txt if it has one;
# 3. dfre editable, pytest and deploy/envs/FAMILY.txt, by UV if given (much faster) or
#    pip, with torch held at the installed build so nothing swaps it for a CUDA download;
# 4. deploy/envs/FAMILY.sh ENV_PYTHON, if that file exists, for steps a requirements file
#    cannot express.
set -euo pipefail
family="$1"
python="${2:-python3}"
uv="${3:-}"
requirements="deploy/envs/$family.txt"
env=".envs/$family"
if [ ! -f "$requirements" ]; then
    known=$(cd deploy/envs && ls ./*.txt | sed 's|^\./||; s|\.txt$||' | tr '\n' ' ')
    echo "dfre: no $requirements: the families with an environment are: $known" >&2
    exit 2
fi
rm -rf "$env"
"$python" -m venv "$env"
torch=$(grep -iE '^[[:space:]]*torch[[:space:]]*([=<>!~;[]|$)' "$requirements" | head -1 || true)
"$env/bin/python" -m pip install --quiet "${torch:-torch==2.13.0}"
pin="$env/torch-constraint.txt"
"$env/bin/python" -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' >"$pin"
if [ -n "$uv" ]; then
    "$uv" pip install --quiet --python "$env/bin/python" --constraint "$pin" \
        -e . pytest -r "$requirements"
else
    "$env/bin/python" -m pip install --quiet --constraint "$pin" -e . pytest -r "$requirements"
fi
if [ -f "deploy/envs/$family.sh" ]; then
    bash "deploy/envs/$family.sh" "$env/bin/python"
fi
