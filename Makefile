# Two commands a new user needs:  `make demo`  (the main job)  and  `make test`  (the test suite).
# Each creates .venv and installs what it needs on first use: the demo needs the package alone; the tests also
# need pytest and, for the parity checks against Hugging Face models, transformers with the CPU build of torch.
VENV ?= .venv
PY := $(VENV)/bin/python
BASE_STAMP := $(VENV)/.installed-base
TEST_STAMP := $(VENV)/.installed-test
# 8 fake CPU devices so that the sharding tests run on one CPU host. XLA's in-process CPU collectives abort a
# program whose devices wait 40 s for each other: on 2 cores shared by two test workers that happens, so wait longer.
TEST_ENV := XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_cpu_collective_call_terminate_timeout_seconds=600 --xla_cpu_collective_timeout_seconds=600" JAX_PLATFORMS=cpu
DEMO_OUT ?= runs/demo

.PHONY: install test demo bench bench-clutrr clean

install: $(TEST_STAMP)

$(BASE_STAMP): setup.cfg requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(TEST_STAMP): $(BASE_STAMP)
	# The CPU build of torch first: asked for later (through transformers) pip would pull a multi-GB CUDA build.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,hf]"
	touch $@

test: $(TEST_STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -n 2 --dist loadfile tests

demo: $(BASE_STAMP)
	JAX_PLATFORMS=cpu $(PY) -m jaxalign.cli demo --out $(DEMO_OUT)

bench: $(BASE_STAMP)
	$(PY) bench/retrieval.py

# CLUTRR teacher and students on ../shared/data/clutrr (about 100 min on 2 CPU cores).
bench-clutrr: $(BASE_STAMP)
	$(PY) bench/clutrr_distill.py

clean:
	rm -rf $(VENV) .pytest_cache .jax_cache
