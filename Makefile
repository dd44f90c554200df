# `make run`  : set up .venv, draw the built-in data set, train demo-coca on it (2 CPU cores, ~9 min), evaluate
# `make test` : set up .venv, then run the test suite (CI also runs `make test-slow`, `make test-hf` and
#               `make test-benchmark`)
# `make docs` : regenerate docs/config.md and docs/cli.md (a test fails when they are stale)
# `make notebooks` : execute the notebooks in full mode and store them with their outputs (~20 min on 2 cores)
VENV ?= .venv
PY := $(VENV)/bin/python
# These pins are served from local files on the project's machines; any torch >= 2.4 works.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup run test test-slow test-hf test-benchmark docs notebooks clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

run: setup
	test -f data/builtin/info.json || $(VENV)/bin/mm shards builtin data/builtin
	$(VENV)/bin/mm train data/builtin.yaml

# tests in TEST_WORKERS processes (pytest-xdist; 0: in this process), by default one per core, at most 4. Tests that
# share a session's work are grouped (xdist_group), so each group runs in one process. Each worker's torch (and the
# commands it starts) takes one thread (XDIST_ENV): on CI's 2 cores, 2 one-thread workers ran the fast step in
# 467 s and the slow one in 805 s; 2 workers of 2 threads each took 783 s and 1,433 s (4 threads on 2 cores; and
# before every command stopped importing torch._dynamo at start-up), one process ~780 s for the fast step
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup)
XDIST_ENV = $(if $(filter 0,$(TEST_WORKERS)),,OMP_NUM_THREADS=1 MKL_NUM_THREADS=1)

test: setup
	$(XDIST_ENV) $(PY) -m pytest $(XDIST)

# the long end-to-end tests (marked slow; `make test` leaves them out; slow hf ones run in test-hf)
test-slow: setup
	$(XDIST_ENV) $(PY) -m pytest $(XDIST) -m 'slow and not hf'

# the Hugging Face interop tests, with the optional transformers extra installed
test-hf: setup
	$(PY) -m pip install -q -e ".[hf]"
	$(PY) -m pytest -m hf

# mm benchmark against LAION clip_benchmark itself (pytest -m benchmark_peer). clip-benchmark 1.6.2 calls float() on
# a 1-element array, which numpy >= 2.3 refuses: it goes into a directory of its own with an older numpy, which
# only the test's clip_benchmark subprocess puts on its PYTHONPATH
CB_DIR ?= .venv-clip-benchmark
test-benchmark: setup
	test -d $(CB_DIR)/clip_benchmark || $(PY) -m pip install -q --target $(CB_DIR) --no-deps clip-benchmark==1.6.2 \
		'numpy<2.3' 'scikit-learn>=1,<2' scipy joblib threadpoolctl cloudpickle narwhals pycocoevalcap requests \
		urllib3 idna charset-normalizer certifi
	MM_CLIP_BENCHMARK_PATH=$(abspath $(CB_DIR)) $(PY) -m pytest -m benchmark_peer

docs: setup
	$(PY) -m mm.cli.docs config > docs/config.md
	$(PY) -m mm.cli.docs cli > docs/cli.md

notebooks: setup
	$(PY) -m pip install -q -e ".[notebooks]"
	$(PY) notebooks/refresh.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
