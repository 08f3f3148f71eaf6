# One entry point for the README's two commands. Everything is installed from this repo's files into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CMAKE_BUILD ?= cmake-build
BENCH_OUT ?= bench-results

.PHONY: setup build lint test test-python test-cpp bench peers gpu-wheels clean

setup: $(VENV)/.deps-installed

$(VENV)/.deps-installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# The extension (CPU and, when a toolkit is found, CUDA parts), installed editable into the venv.
build: setup
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

test-python: build
	$(PY) -m pytest -q

# The same csrc/ built with CMake against the pip torch, and its C++ tests.
test-cpp: setup
	$(PY) tools/cmake_build.py --build-dir $(CMAKE_BUILD)
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

# ruff, configured in pyproject.toml: seconds, so it runs first and a lint error fails fast.
lint: setup
	$(VENV)/bin/ruff check .

test: lint test-cpp test-python

bench: build peers
	$(PY) -m mixprec bench --quick --output $(BENCH_OUT)

# Optional peers of the benchmarks (bitsandbytes, torchao), without their dependencies: the pinned torch stays.
peers: setup
	$(PY) -m pip install -q --no-deps -r requirements-peers.txt

# Test dependencies the lent GPU machine lacks (Python 3.12, x86-64, no network), installed by tools/gpu_check.sh.
gpu-wheels: setup
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
		-d .gpu-wheels $$(grep -E '^(hypothesis|sortedcontainers|packaging)==' \
		requirements-dev.txt) sortedcontainers==2.4.0

clean:
	rm -rf build $(CMAKE_BUILD) mixprec/*.so *.egg-info
