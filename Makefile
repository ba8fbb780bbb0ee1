# Entry points for a fresh machine: `make demo` (the main job) and `make test` build .venv,
# install torch (the CPU build 2.13.0 when no torch is importable) and the plugin with its test
# extras, then run the demo or pytest.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stag_installed

.PHONY: install demo test example clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) setup.py pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m stag_plugin.demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q tests

example: $(STAMP)
	$(PY) examples/quickstart.py

clean:
	rm -rf $(VENV) build *.egg-info
