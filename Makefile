# Two commands do all setup on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dfre-installed

.PHONY: demo test lint bench clean envs test-families

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
# virtual environment .envs/<family>/: torch==2.13.0 (the CPU build on this disk, unless
# deploy/envs/<family>.txt names torch itself), dfre editable with pytest, then the
# family's requirements, then deploy/envs/<family>.sh ENV_PYTHON if it exists.
ENVS := .envs
FAMILIES := $(sort $(basename $(notdir $(wildcard deploy/envs/*.txt))))
TORCH := torch==2.13.0

.SECONDEXPANSION:
.PRECIOUS: $(ENVS)/%/.dfre-env
env-%: $(ENVS)/%/.dfre-env ;

$(ENVS)/%/.dfre-env: deploy/envs/%.txt pyproject.toml $$(wildcard deploy/envs/$$*.sh)
	rm -rf $(ENVS)/$*
	$(PYTHON) -m venv $(ENVS)/$*
	$(ENVS)/$*/bin/python -m pip install --quiet \
	    $$(grep -qiE '^torch([ =<>!~;[]|$$)' $< || echo $(TORCH)) -e . pytest -r $<
	if [ -f deploy/envs/$*.sh ]; then bash deploy/envs/$*.sh $(ENVS)/$*/bin/python; fi
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

clean:
	rm -rf $(VENV) $(ENVS) demo-store.zarr demo-report
