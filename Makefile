# The two commands of the README. Both create or reuse ./.venv (scripts/setup.sh).
.PHONY: setup demo test lint bench clean

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

clean:
	rm -rf .venv runs .pytest_cache .mypy_cache .ruff_cache
