# The README's commands. `make train` and `make test` install first when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install train test test-full bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

train: install
	$(BIN)/python train.py experiment=demo

# test files run in TEST_WORKERS processes (each file whole in one: its fixtures are built once)
TEST_WORKERS ?= 2

test: install
	$(BIN)/pytest -m "not slow" -q -n $(TEST_WORKERS) --dist loadfile

test-full: install
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: install
	$(BIN)/python bench/freqconv.py
	$(BIN)/python bench/loader.py
	$(BIN)/python bench/train_step.py --steps 24 --rounds 4 --models freq_dep probe
	$(BIN)/python bench/prepare.py
	$(BIN)/python bench/predict.py
	$(BIN)/python bench/download.py --unpack

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
