# The two commands of the README. Both create or reuse ./.venv (scripts/setup.sh).
.PHONY: setup demo test lint bench clean mutate

setup:
	@bash scripts/setup.sh dev

demo: setup
	.venv/bin/sftlens demo

# Two pytest-xdist workers (tests/conftest.py gives each one torch thread): ~3.5 min here instead
# of ~5 in one process on 2 cores; TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: setup
	.venv/bin/python -m pytest -q -n $(TEST_WORKERS)

lint: setup
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/ruff format --check src tests benchmarks
	.venv/bin/mypy

bench: setup
	.venv/bin/python benchmarks/bench_weights.py

# Mutation testing of the core modules ([tool.mutmut] in pyproject.toml), kept out of CI.
# `make mutate` tests a seeded 10% sample of every core module's mutants (~30 min on 2 cores) and
# prints the sample's survivors and the core's estimated score; SAMPLE=1 tests all of them
# (3-4 h: mutation/after-s7.md), MUTANTS='sftlens.run.*' all of those, SEED=1 another sample.
# A rerun resumes (mutants with a result are not run again; mutmut resets those of a function
# whose source changed); RERUN=1 also retests the sample's survivors, after tests were written.
# One torch thread per mutant worker: more threads oversubscribe the cores. mutmut runs the tests
# from its copy in ./mutants, so the GSM8K folder beside the repository is passed by its path.
MUTANTS ?=
SAMPLE ?=
SEED ?= 0
RERUN ?=
mutate:
	@bash scripts/setup.sh dev,mutate
	SFTLENS_GSM8K_DIR=$${SFTLENS_GSM8K_DIR:-$(abspath ../shared/data/gsm8k)} \
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python scripts/mutate.py --seed $(SEED) \
		$(if $(SAMPLE),--sample $(SAMPLE)) $(if $(RERUN),--rerun) $(MUTANTS)
	.venv/bin/python scripts/mutation_score.py --sample mutants/sample.txt

clean:
	rm -rf .venv runs mutants .pytest_cache .mypy_cache .ruff_cache
