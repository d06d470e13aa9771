# The README's two commands:
#   make course   set up .venv, run every lab in quick mode, write results/ (results/SUMMARY.md, summary.png)
#   make test     set up .venv, run the test suite (what CI runs: .ci/run)
# Other targets: make regrade (the course, then every executed lab regraded with nbval), make setup, make lab LAB=02 ARGS="-p workers 2", make student, make labs (sync each
# labs/NN_*.ipynb with its jupytext labs/NN_*.py source), make clean.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.labkit-installed

.PHONY: course test regrade setup lab student labs clean

course: $(STAMP)
	$(BIN)/labkit run --quick

test: $(STAMP)
	$(BIN)/python -m pytest

# CI re-executes only the quickest labs under nbval (the budget); this regrades every lab.
regrade: $(STAMP)
	LABKIT_REGRADE_ALL=1 $(BIN)/python -m pytest tests/test_course_flow.py

setup: $(STAMP)

# Re-install only when the requirements change; a fresh clone builds the venv once.
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

lab: $(STAMP)
	$(BIN)/labkit run $(LAB) $(ARGS)

student: $(STAMP)
	$(BIN)/labkit student labs/ student/

labs: $(STAMP)
	$(BIN)/labkit labs sync

clean:
	rm -rf results/executed results/0* results/SUMMARY.md results/summary.png student/
