# Two commands do all setup on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dfre-installed

.PHONY: demo test lint bench clean gpu-wheels envs test-families

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[models,hpc,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dfre demo

test: $(STAMP)
	$(BIN)/ruff check dfre tests benchmarks
	$(BIN)/python -m pytest tests

# Model families whose packages cannot share the main environment each get an isolated
# virtual environment .envs/<family>/ from deploy/envs/<family>.txt (and <family>.sh):
# torch==2.13.0 (the CPU build on this disk), dfre editable with pytest, the family's
# requirements; deploy/build-env.sh does it, with uv (installed into .venv) for speed.
ENVS := .envs
FAMILIES := $(sort $(basename $(notdir $(wildcard deploy/envs/*.txt))))
UV := $(BIN)/uv

$(UV): $(STAMP)
	$(BIN)/python -m pip install --quiet uv

.SECONDEXPANSION:
.PRECIOUS: $(ENVS)/%/.dfre-env
env-%: $(ENVS)/%/.dfre-env ;

$(ENVS)/%/.dfre-env: deploy/envs/%.txt $$(wildcard deploy/envs/$$*.sh) deploy/build-env.sh \
        pyproject.toml | $(UV)
	bash deploy/build-env.sh $* $(PYTHON) $(UV)
	touch $@

envs: $(addprefix env-,$(FAMILIES))

# Each family's tests (tests/families/test_<family>.py) with its environment's python;
# all families run, and the target fails if any failed.
test-families: $(STAMP) envs
	@failed=""; for family in $(FAMILIES); do \
	    echo "== tests/families/test_$$family.py in $(ENVS)/$$family"; \
	    $(ENVS)/$$family/bin/python -m pytest tests/families/test_$$family.py \
	        || failed="$$failed $$family"; \
	done; \
	if [ -n "$$failed" ]; then echo "family tests failed:$$failed"; exit 1; fi

lint: $(STAMP)
	$(BIN)/ruff check dfre tests benchmarks
	$(BIN)/ruff format --check dfre tests benchmarks

# Wheels the GPU machine lacks (Python 3.12, manylinux x86_64) into .whl/, trimmed to fit
# the device tool's 64 MiB; then a device call carries .whl and runs
# `bash benchmarks/gpu_check.sh` (README, "GPUs").
gpu-wheels: $(STAMP)
	$(BIN)/python benchmarks/gpu_wheels.py fetch --dest .whl

clean:
	rm -rf $(VENV) $(ENVS) demo-store.zarr demo-report
