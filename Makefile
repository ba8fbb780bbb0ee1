# Entry points for a fresh machine: `make demo` (the embedded default) and `make test` build the virtual
# environments they need (torch: the CPU build 2.13.0 when no torch is importable; the plugin with
# its test extras), then run the demo or pytest.
#
# `make test` runs ruff (`make lint`), then the whole suite twice, once per supported
# megatron-core line:
#   .venv        megatron-core 0.16.1 (the newest wheel for Python 3.10 / 3.11)
#   .venv-mcore  megatron-core $(MCORE_NEW) (releases from 0.17 declare Python >= 3.12; on an older
#                Python its source distribution is built with --ignore-requires-python, which is
#                how CI covers the new releases' code on Python 3.11; triton is needed on CPU
#                because megatron-core 0.19 imports it at start-up)
PYTHON    ?= python3
VENV      := .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.stag_installed
MCORE_NEW ?= 0.19.2
VENV_NEW  := .venv-mcore
PY_NEW    := $(VENV_NEW)/bin/python
STAMP_NEW := $(VENV_NEW)/.stag_installed_$(MCORE_NEW)
PYTEST    := -m pytest -q tests

.PHONY: install install-mcore-new demo lint test test-mcore-0.16 test-mcore-new example clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) setup.py pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

$(PY_NEW):
	$(PYTHON) -m venv $(VENV_NEW)
	$(PY_NEW) -m pip install --quiet --upgrade pip

$(STAMP_NEW): $(PY_NEW) setup.py pyproject.toml
	$(PY_NEW) -c "import torch" 2>/dev/null || $(PY_NEW) -m pip install torch==2.13.0
	$(PY_NEW) -m pip install --quiet numpy packaging triton
	if $(PY_NEW) -c "import sys; sys.exit(sys.version_info < (3, 12))"; then \
	  $(PY_NEW) -m pip install --quiet "megatron-core==$(MCORE_NEW)"; \
	else \
	  $(PY_NEW) -m pip install --quiet --ignore-requires-python --no-binary megatron-core \
	    "megatron-core==$(MCORE_NEW)"; \
	fi
	$(PY_NEW) -m pip install --quiet -e ".[test]"
	$(PY_NEW) -c "import megatron.core as m; assert m.__version__.startswith('$(MCORE_NEW)'), m.__version__"
	touch $(STAMP_NEW)

install: $(STAMP)

install-mcore-new: $(STAMP_NEW)

demo: $(STAMP)
	$(PY) -m stag_plugin demo --out runs/demo --overwrite

lint: $(STAMP)
	$(PY) -m ruff check stag_plugin tests bench examples

test: lint test-mcore-0.16 test-mcore-new

test-mcore-0.16: $(STAMP)
	$(PY) $(PYTEST)

test-mcore-new: $(STAMP_NEW)
	$(PY_NEW) $(PYTEST)

example: $(STAMP)
	$(PY) examples/quickstart.py

clean:
	rm -rf $(VENV) $(VENV_NEW) build *.egg-info
