# Two commands do all setup on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dfre-installed

.PHONY: demo test lint bench clean gpu-wheels

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[models,hpc,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dfre demo

test: $(STAMP)
	$(BIN)/ruff check dfre tests benchmarks
	$(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check dfre tests benchmarks
	$(BIN)/ruff format --check dfre tests benchmarks

# Wheels the GPU machine lacks (Python 3.12, manylinux x86_64) into .whl/, trimmed to fit
# the device tool's 64 MiB; then a device call carries .whl and runs
# `bash benchmarks/gpu_check.sh` (README, "GPUs").
gpu-wheels: $(STAMP)
	$(BIN)/python benchmarks/gpu_wheels.py fetch --dest .whl

clean:
	rm -rf $(VENV) demo-store.zarr demo-report
