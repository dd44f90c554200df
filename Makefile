# `make run`  : set up .venv, draw the built-in data set, train demo-coca on it (2 CPU cores, ~9 min), evaluate
# `make test` : set up .venv, then run the test suite (CI also runs `make test-slow` and `make test-hf`)
# `make docs` : regenerate docs/config.md and docs/cli.md (a test fails when they are stale)
# `make notebooks` : execute the notebooks in full mode and store them with their outputs (~20 min on 2 cores)
VENV ?= .venv
PY := $(VENV)/bin/python
# These pins are served from local files on the project's machines; any torch >= 2.4 works.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup run test test-slow test-hf docs notebooks clean

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

test: setup
	$(PY) -m pytest

# the long end-to-end tests (marked slow; `make test` leaves them out; slow hf ones run in test-hf)
test-slow: setup
	$(PY) -m pytest -m 'slow and not hf'

# the Hugging Face interop tests, with the optional transformers extra installed
test-hf: setup
	$(PY) -m pip install -q -e ".[hf]"
	$(PY) -m pytest -m hf

docs: setup
	$(PY) -m mm.cli.docs config > docs/config.md
	$(PY) -m mm.cli.docs cli > docs/cli.md

notebooks: setup
	$(PY) -m pip install -q -e ".[notebooks]"
	$(PY) notebooks/refresh.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
