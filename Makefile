# Set-up and the everyday commands. `make quickstart` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch pinned to the CPU build that installs from local disk; on a GPU machine install the CUDA build first.
TORCH ?= torch==2.13.0

.PHONY: setup quickstart test docs docs-serve bench clean

$(BIN)/rnnkit: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/rnnkit

quickstart: setup
	rm -rf runs/quickstart runs/translate_sample
	$(BIN)/rnnkit train configs/quickstart.yaml
	$(BIN)/rnnkit generate runs/quickstart/best.pt --prime "The lamp" --length 300 --temperature 0.7 --seed 1
	$(BIN)/rnnkit train configs/translate_sample.yaml
	head -5 data/parallel/test.en | $(BIN)/rnnkit translate runs/translate_sample/best.pt --beam 5
	$(BIN)/rnnkit eval runs/translate_sample/best.pt --src data/parallel/test.en --ref data/parallel/test.fr --beam 5

test: setup
	$(BIN)/python -m pytest tests

# the documentation site (docs/, mkdocs.yml): reference pages are generated from the code at build time
$(BIN)/mkdocs: $(BIN)/rnnkit
	$(BIN)/pip install -q -e ".[docs]"
	touch $@

docs: $(BIN)/mkdocs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

docs-serve: $(BIN)/mkdocs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf runs .pytest_cache site
