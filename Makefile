# One-command entry points. `make demo` and `make test` install everything they need first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench lint clean

# torch/torchvision pinned to the builds available offline on the project machines;
# -qq on the editable install: without setuptools' editable-install banner.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "error: PYTHON=$(PYTHON) is not Python 3.11+ (flwr 1.42 needs it); run e.g. make PYTHON=python3.11"; exit 1; }
	@echo "installing promptsam and its dependencies into $(VENV) ..."
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q --upgrade pip
	@$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	@$(BIN)/pip install -qq -e ".[test]"
	@touch $(STAMP)
	@echo "installed: the command is $(BIN)/promptsam (or run: source $(BIN)/activate)"

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/promptsam simulate --config simulation/configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Regenerates docs/bench/*.json (the figures README.md and deploy/PRIVACY.md quote): run on an idle machine.
bench: $(STAMP)
	PROMPTSAM=$(BIN)/promptsam scripts/bench_all.sh

clean:
	rm -rf runs .pytest_cache
