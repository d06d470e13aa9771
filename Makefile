# The README's two commands:
#   make course   set up .venv, run every lab in quick mode, write results/ (results/SUMMARY.md, summary.png)
#   make test     set up .venv, run the linter (ruff) and the test suite (what CI runs: .ci/run)
# Other targets: make site (the course website from the course run, built offline into results/site/: open
# results/site/index.html), make regrade (the course, then every executed lab regraded with nbval), make
# grade-check (labkit grade on real Lab 01 and 02 submissions, ~15 lab runs; CI grades a small lab instead), make setup,
# make lab LAB=02 ARGS="-p workers 2", make student, make labs (sync each labs/NN_*.ipynb with its jupytext
# labs/NN_*.py source), make lock (rewrite constraints.txt), make clean.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.labkit-installed

# Caps pip itself is configured with (`pip config list`: global.constraint), which make lock honours
# so that the lock installs where it is made; or LOCK_CAPS=file.
LOCK_CAPS ?= $(shell $(PYTHON) -m pip config list 2>/dev/null | sed -n "s/^global\.constraint='\(.*\)'$$/\1/p")

.PHONY: course test site regrade grade-check setup lock lab student labs clean

course: $(STAMP)
	$(BIN)/labkit run --quick

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# CI re-executes only the quickest labs under nbval (the budget); this regrades every lab.
regrade: $(STAMP)
	LABKIT_REGRADE_ALL=1 $(BIN)/python -m pytest tests/course/test_course_flow.py

# labkit grade on the real labs (issue 30's acceptance): ten Lab 01/02 submissions, --jobs 2 and --address.
grade-check: $(STAMP)
	LABKIT_GRADE_REAL_LABS=1 $(BIN)/python -m pytest tests/course/test_grade_labs.py

# Re-executes only the labs whose executed copy is missing or stale, then builds the site offline.
site: $(STAMP)
	$(BIN)/labkit site

setup: $(STAMP)

# Re-install only when the requirements change; a fresh clone builds the venv once. Runtime
# (requirements.txt) and course tools (requirements-dev.txt = labkit[dev]) at the exact versions CI
# tests (constraints.txt).
$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -r requirements.txt -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# constraints.txt: every package's exact version, resolved from the two requirements files (pip-compile
# keeps existing pins unless a requirement changes; delete constraints.txt to re-resolve everything).
lock:
	test -x $(BIN)/pip-compile || { test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); \
	  $(BIN)/python -m pip install --quiet "pip-tools>=7.4"; }
	printf -- '-r requirements.txt\n-r requirements-dev.txt\n$(if $(LOCK_CAPS),-c $(LOCK_CAPS)\n)' > .lock.in
	CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --strip-extras --no-emit-index-url \
	  --no-emit-find-links -o constraints.txt .lock.in; status=$$?; rm -f .lock.in; exit $$status

lab: $(STAMP)
	$(BIN)/labkit run $(LAB) $(ARGS)

student: $(STAMP)
	$(BIN)/labkit student labs/ student/

labs: $(STAMP)
	$(BIN)/labkit labs sync

clean:
	rm -rf results/executed results/0* results/SUMMARY.md results/summary.png results/site
