# One-command entry points for a fresh machine with only Python and pip.
#   make demo   set up .venv, then train (with a follower analysing beside it), extract, plot and
#               report on the embedded digits
#   make test   set up .venv, then run the test suite
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; override, e.g. TORCH_SPEC="torch>=2.13", for a CUDA machine.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
DEMO := runs/demo

.PHONY: venv demo test lint clean-demo

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

# The follower analyses each checkpoint while the next epoch trains; on one CPU each process
# gets one thread (two processes with a thread per core slow each other down).
DEMO_THREADS ?= 1

demo: venv
	rm -rf $(DEMO)
	OMP_NUM_THREADS=$(DEMO_THREADS) $(BIN)/analyzer reaction --ckpt-dir $(DEMO)/checkpoints \
	    --follow -q & follower=$$!; \
	OMP_NUM_THREADS=$(DEMO_THREADS) $(BIN)/trainer run --out $(DEMO) \
	    || { kill $$follower; exit 1; }; \
	wait $$follower
	$(BIN)/analyzer extract $(DEMO)/run.h5 --threshold 0.3
	$(BIN)/analyzer plot $(DEMO)/run.h5 --out $(DEMO)/figures
	$(BIN)/analyzer report $(DEMO)/run.h5 --out $(DEMO)/report
	@echo "open $(DEMO)/report/index.html"

# Two pytest workers, a test file each at a time (module fixtures built once): on 2 cores the
# suite takes 15 min instead of 26, most tests waiting on single-threaded subprocesses.
TEST_WORKERS ?= 2

test: venv
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: venv
	$(BIN)/ruff check .

clean-demo:
	rm -rf $(DEMO)
