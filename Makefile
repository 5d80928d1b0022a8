# datared: two commands for an instructor.
#   make book   build the tutorial website (_build/html) from executed notebooks; executions
#               are cached: a notebook runs again when its code, an earlier chapter's code,
#               config.py, datared/ or a DATARED_* variable changed (book/_ext/datared_book.py)
#   make book FORCE=1   the same, re-executing every notebook (CI=true does this too)
#   make test   lint, unit tests, chapter tests against the sample night's truth, book build
#               (the test build always executes every notebook, see tests/conftest.py)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install sample book test test-other-night lint bench clean

# A second simulated night (another seed) on which `make test` runs the chapters again.
OTHER_SEED ?= 7

# Non-empty: `make book` forgets the cached executions and runs every notebook.
FORCE ?= $(CI)
# jupyter-cache's folder for `make book` (myst-nb's default); `make clean` removes it too.
EXEC_CACHE := _build/.jupyter_cache

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# Print one setting of config.py (the DATARED_* environment variables apply): $(CONFIG) data_dir
CONFIG := $(BIN)/python -c 'import sys, config; print(getattr(config, sys.argv[1]))'

# Generate the simulated night where config.py's data_dir points, unless it exists.
sample: $(STAMP)
	out="$$($(CONFIG) data_dir)" && preset="$$($(CONFIG) sample_preset)" && \
	seed="$$($(CONFIG) sample_seed)" && \
	$(BIN)/python -m datared.sim --if-missing --out "$$out" --preset "$$preset" --seed "$$seed"

book: sample
	$(if $(FORCE),rm -rf $(EXEC_CACHE))
	$(BIN)/jupyter-book build . -W -n --keep-going

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint sample
	$(BIN)/python -m pytest
	$(MAKE) --no-print-directory test-other-night

# The book built and checked against the truth on another night of the simulator, so that
# no chapter is tuned to one night. DATARED_SAMPLE_SEED gives that night its own folder.
test-other-night: $(STAMP)
	DATARED_SAMPLE_SEED=$(OTHER_SEED) $(MAKE) --no-print-directory sample
	DATARED_SAMPLE_SEED=$(OTHER_SEED) $(BIN)/python -m pytest \
	  tests/test_chapter_02_prereduction.py tests/test_chapter_03_astrometry.py \
	  tests/test_chapter_04_photometry.py tests/test_chapter_05_cmd.py \
	  tests/test_chapter_06_lightcurve.py \
	  tests/test_chapter_07_stack.py tests/test_book.py

bench: sample
	$(BIN)/python -m benchmarks

clean:
	rm -rf _build work
