# Everything runs inside .venv, created on first use. On a CPU-only machine torch is pinned to the
# local CPU build first so that the unpinned dependency in pyproject.toml installs nothing more.
PY      := .venv/bin/python
TORCH   ?= torch==2.13.0
RECIPES ?= transformer swa mamba2 taipan samba

.PHONY: install test compare describe bench clean

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: .venv/.installed

test: install
	$(PY) -m pytest tests

describe: install
	$(PY) scripts/describe.py recipes/*.yaml

compare: install
	$(PY) scripts/describe.py recipes/*.yaml

bench: install
	$(PY) scripts/bench_attention.py

clean:
	rm -rf .venv build *.egg-info
