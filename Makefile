# Every target sets itself up on a fresh clone: creates .venv and installs the pinned packages.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: run test lint typecheck unit outbound demo bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	@$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

run: $(STAMP)  ## start the bridge (reads the environment and an optional .env)
	@$(BIN)/python -m bridge serve

test: $(STAMP) lint typecheck unit  ## lint, type-check and run the whole test suite

lint: $(STAMP)
	@$(BIN)/ruff check bridge tests tools examples

typecheck: $(STAMP)
	@$(BIN)/mypy

unit: $(STAMP)
	@$(BIN)/python -m pytest -q

outbound: $(STAMP)  ## place an outbound call: make outbound [TO=+1555...] [FROM=+1555...]
	@$(BIN)/python -m bridge call $(if $(TO),--to $(TO)) $(if $(FROM),--from $(FROM))

demo: $(STAMP)  ## offline demo: bridge + fake agent + simulated call -> demo-call.wav
	@$(BIN)/python -m tools.demo

bench: $(STAMP)  ## load benchmark: writes bench-results/ and prints the table
	@$(BIN)/python -m tools.loadtest

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .hypothesis bench-results demo-call.wav
