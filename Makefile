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

# The main job: ~1M-parameter versions of each recipe, trained on the same 200K tokens of the built-in
# corpus, then evaluated side by side (about 7 minutes on 2 CPU cores; rerunning resumes).
COMPARE_ARGS ?= --threads 1 --budget 200K --match-params 1M --set train.seq_len=256 train.batch_size=8 \
	--contexts 256,512,1024,2048 --schemes blocks,sliding,streaming --max-tokens 8192 --memory decode,train \
	--repeats 1 --passkey-lengths 256,1024 --passkey-trials 4

compare: install
	$(PY) scripts/compare.py $(RECIPES) --out runs/compare $(COMPARE_ARGS)

bench: install
	$(PY) scripts/bench_attention.py

clean:
	rm -rf .venv build *.egg-info
