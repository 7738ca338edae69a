# pf2lora: `make demo` runs the default experiment, `make test` the test suite.
# Both install into .venv first if needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pf2lora run configs/synthetic_rank.toml --out runs/demo/synthetic_rank --overwrite
	$(VENV)/bin/pf2lora run configs/synthetic_rank_lowdata.toml --out runs/demo/synthetic_rank_lowdata --overwrite

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/step_cost.py

clean:
	rm -rf $(VENV) runs .pytest_cache
