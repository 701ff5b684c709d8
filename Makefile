# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv first if it is missing.
SHELL := /bin/bash
PY := .venv/bin/python
STAMP := .venv/.stamp-$(shell cat requirements.txt pyproject.toml | sha1sum | cut -c1-12)
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS := 0
export DS_ACCELERATOR ?= cpu
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export NLTK_DATA := $(CURDIR)/.venv/nltk_data
# PyTorch's CPU wheel (pip's default index would pull the multi-GB CUDA build). On a GPU machine `make setup
# TORCH_INDEX=` (empty: pip's default index, whose Linux wheel is the CUDA build) or PyTorch's index for its CUDA.
# One retry: where that index cannot be reached, pip takes torch and its dependencies from its other configured
# sources after a few seconds (22 s for the step in a fresh venv here, against 92 s with pip's default five retries).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@if { [ ! -f /usr/share/wordnet/index.sense ] || ! command -v chromedriver >/dev/null; } && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			wordnet-base wordnet-sense-index chromium chromium-driver >/dev/null) \
		|| echo "warning: could not install wordnet-base wordnet-sense-index chromium chromium-driver"; fi
	@[ -x $(PY) ] || python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check -U pip
	$(PY) -m pip install -q --disable-pip-version-check --retries 1 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m med3dvlm.eval.nltk_data
	@rm -f .venv/.stamp-*; touch $(STAMP)

demo: setup
	$(PY) -m pipelines.demo

test: setup
	set -o pipefail; timeout 4800 $(PY) -m pytest tests --durations=25 2>&1 | tee .venv/last-test.log

test-fast: setup
	$(PY) -m pytest tests -m "not ray"

bench: setup
	$(PY) bench/preprocess.py
	$(PY) bench/encoder.py
	$(PY) bench/eval.py
	$(PY) bench/train.py
	@[ -d out/demo/ckpt/stage3 ] || $(MAKE) demo
	$(PY) bench/serve.py

clean:
	rm -rf .venv build *.egg-info runs out
