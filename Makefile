# The two commands of the README. Both create or reuse ./.venv (scripts/setup.sh).
.PHONY: setup demo test lint bench clean mutate

setup:
	@bash scripts/setup.sh dev

demo: setup
	.venv/bin/sftlens demo

test: setup
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/ruff format --check src tests benchmarks
	.venv/bin/mypy

bench: setup
	.venv/bin/python benchmarks/bench_weights.py

# Mutation testing of the core modules ([tool.mutmut] in pyproject.toml), kept out of CI: the whole
# core is 3-4 h on 2 cores (mutation/after-s7.md); run a module at a time with MUTANTS=.
# A rerun resumes from ./mutants and retests only the functions whose source changed, not survivors that a new test may now kill:
# name them, e.g. make mutate MUTANTS='sftlens.run.*' (or rm -rf mutants to start over).
# One torch thread per mutant worker: more threads oversubscribe the cores. mutmut runs the tests
# from its copy in ./mutants, so the GSM8K folder beside the repository is passed by its path.
MUTANTS ?=
mutate:
	@bash scripts/setup.sh dev,mutate
	SFTLENS_GSM8K_DIR=$${SFTLENS_GSM8K_DIR:-$(abspath ../shared/data/gsm8k)} \
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/mutmut run $(MUTANTS)
	.venv/bin/python scripts/mutation_score.py

clean:
	rm -rf .venv runs mutants .pytest_cache .mypy_cache .ruff_cache
