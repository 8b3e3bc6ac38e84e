# The README's Quick start: `make demo` runs the main job, `make test` the whole suite.
PY := .venv/bin/python

.PHONY: setup demo test test-fast bench clean

setup:
	./scripts/setup.sh

demo: setup
	$(PY) -m proxy demo

test: setup
	$(PY) -m pytest -v --durations=15

test-fast: setup
	$(PY) -m pytest -v -m "not slow"

bench: setup
	$(PY) bench/bench_api.py --rounds 5 --seconds 3

clean:
	rm -rf .venv .pytest_cache
