# One-command entry points. `make demo` and `make test` install everything they need first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch/torchvision pinned to the builds available offline on the project machines
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/promptsam simulate --config simulation/configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
