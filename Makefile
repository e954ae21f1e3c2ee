.PHONY: install test lint bench-smoke demo

install:  ## CPU machines: the CPU torch first, so pip never resolves a CUDA build
	python3 -m pip install torch==2.13.0 && python3 -m pip install -e ".[dev]"

test:
	python3 -m pytest -q -n 2

lint:
	python3 -m ruff check zipvl tests bench && python3 -m pyright zipvl

bench-smoke:  ## CPU pytest-benchmark suites (host-side costs)
	python3 -m pytest -q bench/bench_planning.py bench/bench_quant.py bench/bench_cache.py --benchmark-only

demo:
	zipvl demo
