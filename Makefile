# The two commands of the README:
#   make run    set up (first time only) and run the pipeline on the built-in generated dataset
#   make test   set up (first time only) and run the CPU test suite
# Extra arguments for run.py go in ARGS, e.g.  make run ARGS="class=02Airplane scorer=pixel"
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup run test test-all
setup: $(VENV)/.installed

# torch and torchvision first, as a pair: the CUDA 2.14.1 + 0.29.1 wheels also run on CPU, and
# installing them before the project stops any dependency from dragging in a second torch.
# uv installs the same versions as pip in a fraction of the time (pip still works: the README's
# manual install uses it). Like pip it compiles the bytecode at install time: without it every process
# (each test's run.py too) would compile torch's sources on import, 13 instead of 7 s.
# requirements.lock holds the version of every dependency that pyproject.toml leaves open, so that a fresh setup
# (and CI) installs what the last one did; after changing pyproject.toml's dependencies, write it again:
#   .venv/bin/uv pip compile pyproject.toml --extra all --extra test -o requirements.lock
UV := $(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python --constraint requirements.lock
$(VENV)/.installed: pyproject.toml requirements.lock
	@bash .ci/system-packages
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check uv==0.13.9
	@echo "setup: installing torch, torchvision and the project into $(VENV) (about half a minute)"
	$(UV) torch==2.14.1 torchvision==0.29.1
	$(UV) -e '.[all,test]'
	touch $@

run: setup
	$(BIN)/python run.py $(ARGS)

test: setup
	$(BIN)/python -m pytest $(ARGS)

# The slow tests too (accuracy targets on the generated dataset); GPU tests skip without CUDA.
test-all: setup
	$(BIN)/python -m pytest -m "not gpu" $(ARGS)
