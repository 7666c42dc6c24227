# The two commands of the README:
#   make demo   set up .venv and run the whole pipeline on the built-in shapes data
#   make test   set up .venv and run the test suite
#   make serve  (after make demo) the search service on the demo's artefacts: http://127.0.0.1:8000/
# Both need only Python 3.10+ (and make). RECIPE=shapes_video make demo runs the video pipeline.

PYTHON ?= python3
VENV ?= .venv
RECIPE ?= shapes
BIN := $(VENV)/bin
LAUNCH := $(BIN)/accelerate launch --config_file accelerate_config.yaml --num_processes 1
STAMP := $(VENV)/.installed

.PHONY: demo test test-fault install lint clean-runs serve

# -qq: pip prints errors only (some pip configs warn once per configured index). The serve extra (fastapi, uvicorn,
# httpx) is installed with dev: tests/test_service.py needs it, and `make serve` runs it.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq -e '.[dev,serve]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@echo "== 1/5 data: the built-in $(RECIPE) scenes"
	$(BIN)/python tools/make_shapes.py recipe=$(RECIPE)
	@echo "== 2/5 Slow teacher: bi-directional captioner"
	$(BIN)/python tools/train_teacher.py recipe=$(RECIPE)
	@echo "== 3/5 Fast student: distillation under accelerate + DeepSpeed ZeRO-2"
	$(LAUNCH) tools/distill.py recipe=$(RECIPE)
	@echo "== 4/5 faiss index over the test gallery, with the teacher's cached visual tokens"
	$(BIN)/python tools/build_index.py recipe=$(RECIPE)
	@echo "== 5/5 Fast, Slow and Fast+Slow@k on the test split"
	$(BIN)/python tools/rerank_eval.py recipe=$(RECIPE)

# After `make demo`: the search service on the demo's artefacts, http://127.0.0.1:8000/ (Ctrl-C stops it).
serve: $(STAMP)
	$(BIN)/python tools/serve.py recipe=$(RECIPE)

# Two workers (pytest-xdist), a test file each at a time (--dist loadfile: a module's fixtures, such as the smoke
# pipeline that most of test_tools.py reads, are built once). Most of the suite's time is subprocesses on one core.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

# Only the fault tests (SIGKILL distill and build_index at several points, resume; also part of `make test`).
test-fault: $(STAMP)
	$(BIN)/python -m pytest -q -m fault tests/test_faults.py

lint: $(STAMP)
	$(BIN)/ruff check .
