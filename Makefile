# Every target sets itself up on a fresh clone: creates .venv and installs the pinned packages.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: run test lint typecheck unit outbound demo console-demo fleet bench image clean

# Says what it does (the first run takes ~30 s): one line, then a dot per line pip prints; pip's
# whole output goes to $(VENV)/install.log and its end is shown if pip fails. Later runs skip it.
$(STAMP): pyproject.toml
	@if test -x $(BIN)/python; then echo "updating $(VENV): installing the packages pyproject.toml pins now ..."; \
	else echo "setting up $(VENV): installing the pinned packages (first run only, ~30 s) ..."; fi
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@{ $(BIN)/python -m pip install --disable-pip-version-check --progress-bar off --upgrade pip && \
	   $(BIN)/python -m pip install --disable-pip-version-check --progress-bar off -e '.[dev]'; \
	   echo $$? >$(VENV)/install.rc; } 2>&1 | tee $(VENV)/install.log | { while IFS= read -r line; do printf .; done; echo; }
	@test "$$(cat $(VENV)/install.rc)" = 0 || { echo "pip failed; the end of $(VENV)/install.log:"; \
	  tail -n 30 $(VENV)/install.log; exit 1; }
	@rm -f $(VENV)/.installed-* $(VENV)/install.rc && touch $@
	@echo "$(VENV) is ready (pip's log: $(VENV)/install.log)"

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

demo: $(STAMP)  ## offline demo: bridge + fake agent + simulated call -> demo-call.wav and the call's record; KEEP=1 keeps the console up
	@$(BIN)/python -m tools.demo $(if $(KEEP),--keep)

console-demo: $(STAMP)  ## the console with a simulated call now and every 60 s, until Ctrl-C
	@$(BIN)/python -m tools.console_demo

fleet: $(STAMP)  ## a local fleet: redis-server, two instances sharing it and nginx in front, until Ctrl-C
	@$(BIN)/python -m tools.fleet

bench: $(STAMP)  ## load benchmark: writes bench-results/ and prints the table
	@$(BIN)/python -m tools.loadtest

image:  ## container image with podman (as root): Debian base via debootstrap, then the Containerfile
	@tools/build_image.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .hypothesis bench-results demo-call.wav
