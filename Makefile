# Entry points for a fresh machine: `make demo` (the embedded default) and `make test` build the virtual
# environments they need (torch: the CPU build 2.13.0 when no torch is importable; the plugin with
# its test extras), then run the demo or pytest.
#
# `make test` runs ruff (`make lint`), the whole suite twice, once per supported megatron-core
# line, then the multi-node and Slurm tests once (`make test-cluster`):
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

.PHONY: install install-mcore-new demo lint test test-mcore-0.16 test-mcore-new test-cluster \
	test-megatron-lm example clean

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

test: lint test-mcore-0.16 test-mcore-new test-cluster

test-mcore-0.16: $(STAMP)
	$(PY) $(PYTEST)

test-mcore-new: $(STAMP_NEW)
	$(PY_NEW) $(PYTEST)

# Multi-node pretraining on two simulated nodes (network namespaces, needs root) through the
# shipped launch scripts: torchrun across the nodes, faults (a node killed, a link cut, folders
# not shared), and a real Slurm cluster (Debian's slurm-wlm, which the tests install with
# apt-get when it is missing). Heavy, so once (megatron-core 0.16), not per line: about
# 5 minutes on 2 cores. tests/test_multinode.py skips without STAG_CLUSTER_TESTS=1.
test-cluster: $(STAMP)
	STAG_CLUSTER_TESTS=1 $(PY) -m pytest -q tests/test_multinode.py

# The tests against real Megatron-LM checkouts (its pretrain(), optimizer, train_step,
# save/load, pretrain_gpt.py and the patches), each with the megatron-core of its line:
#   make test-megatron-lm MEGATRON_LM_016=/path/to/Megatron-LM@core_v0.16.1 \
#                         MEGATRON_LM_019=/path/to/Megatron-LM@core_v0.19.0
# Either may be left out; CI has no checkout (the tests skip there).
MEGATRON_LM_TESTS := tests/test_megatron_lm.py tests/test_megatron_lm_training.py \
	tests/test_convert_upcycle.py tests/test_megatron_lm_flags.py

test-megatron-lm: $(STAMP) $(STAMP_NEW)
	@test -n "$(MEGATRON_LM_016)$(MEGATRON_LM_019)" || \
	  { echo "set MEGATRON_LM_016 and/or MEGATRON_LM_019 to Megatron-LM checkouts"; exit 2; }
	if [ -n "$(MEGATRON_LM_016)" ]; then \
	  MEGATRON_LM_PATH=$(MEGATRON_LM_016) $(PY) -m pytest -q $(MEGATRON_LM_TESTS); fi
	if [ -n "$(MEGATRON_LM_019)" ]; then \
	  MEGATRON_LM_PATH=$(MEGATRON_LM_019) $(PY_NEW) -m pytest -q $(MEGATRON_LM_TESTS); fi

example: $(STAMP)
	$(PY) examples/quickstart.py

clean:
	rm -rf $(VENV) $(VENV_NEW) build *.egg-info
