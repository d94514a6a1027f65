# One-command set-up and checks. `make test` and `make demo` work on a fresh clone: they create
# .venv (torch pinned below), build the extension (CUDA kernels whenever nvcc is present) and run.
# On a machine that already has torch, use its Python instead of .venv: `make test PY=python3`.
TORCH_VERSION := 2.14.1
CUDA_HOME ?= /usr/local/cuda
export CUDA_HOME
MAX_JOBS ?= 2
export MAX_JOBS

VENV := .venv
ifdef PY
PYTHON := $(PY)
SETUP_STAMP :=
else
PYTHON := $(VENV)/bin/python
SETUP_STAMP := $(VENV)/.stamp-$(TORCH_VERSION)-7
endif

# Compile the CUDA kernels whenever nvcc exists (and torch is a CUDA build): a CUDA compile error
# then fails `make test`. No GPU is needed to compile; the default arch is Hopper (sm_90).
NVCC := $(wildcard $(CUDA_HOME)/bin/nvcc)
ifneq ($(NVCC),)
BUILD_ENV := FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-9.0}"
CMAKE_CUDA ?= OFF
else
BUILD_ENV := ROBUSTOPS_CPU_ONLY=1
CMAKE_CUDA ?= OFF
endif

SOURCES := $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cu) setup.py
EXT_STAMP := build/.ext-stamp
CMAKE_STAMP := build/.cmake-stamp
WHEEL_STAMP := build/.wheel-stamp
PYTEST_ARGS ?=
# `make test` runs the tests in PYTEST_WORKERS processes at once (pytest-xdist; tests of one xdist_group
# share a worker); PYTEST_WORKERS=0 runs them in this one process. With PY=... and no pytest-xdist there,
# they run in one process too.
PYTEST_WORKERS ?= 2
PYTEST_XDIST := $(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadgroup)

.PHONY: all setup build cmake wheel wheel-check test fuzz demo bench gpu-wheels clean

all: build

# torchattacks (tests/test_torchattacks.py compares against it) is installed without its stale pins
# (requests ~= 2.25, torchvision): it imports neither.
$(VENV)/.stamp-$(TORCH_VERSION)-7:
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION) -r requirements-dev.txt
	$(VENV)/bin/python -m pip install -q --no-deps torchattacks==3.5.1
	touch $@

setup: $(SETUP_STAMP)

$(EXT_STAMP): $(SETUP_STAMP) $(SOURCES)
	mkdir -p build
	$(BUILD_ENV) $(PYTHON) setup.py build_ext --inplace
	$(PYTHON) -c "import robustops, json; print(json.dumps(robustops.build_info(), indent=1))"
	touch $@

# With .venv: the checkout is installed into it, editable, with the `robustops` command
# (.venv/bin/robustops; torchrun and imports from any directory find the package). The extension is
# compiled in place above; the install only registers the package.
ifdef PY
INSTALL_STAMP :=
else
INSTALL_STAMP := $(VENV)/bin/robustops
$(INSTALL_STAMP): $(SETUP_STAMP) setup.py pyproject.toml
	ROBUSTOPS_NO_EXT=1 $(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	test -x $@
endif

build: $(EXT_STAMP) $(INSTALL_STAMP)

# The CMake target (librobustops.so). CPU-only by default here: on a machine without a full CUDA
# toolkit torch's CMake config cannot be satisfied; `make cmake CMAKE_CUDA=ON` where it can.
$(CMAKE_STAMP): $(SETUP_STAMP) $(SOURCES) CMakeLists.txt
	cmake -S . -B build/cmake -G Ninja -DCMAKE_MAKE_PROGRAM="$$($(PYTHON) -c 'import ninja,os;print(os.path.join(ninja.BIN_DIR,"ninja"))')" \
	  -DCMAKE_PREFIX_PATH="$$($(PYTHON) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" \
	  -DROBUSTOPS_WITH_CUDA=$(CMAKE_CUDA)
	cmake --build build/cmake -j $(MAX_JOBS)
	touch $@

cmake: $(CMAKE_STAMP)

# A wheel, installed into a throwaway virtual environment and imported there (from /tmp, so the
# source tree cannot shadow it). With .venv the throwaway venv is clean and pip installs torch and
# the wheel's other requirements into it; with PY=... (a machine without internet) it sees PY's
# packages and only the wheel is installed.
ifdef PY
WHEEL_VENV = $(PY) -m venv --system-site-packages build/wheel-venv
WHEEL_INSTALL = build/wheel-venv/bin/python -m pip install -q --no-deps --no-index dist/robustops-*.whl
else
WHEEL_VENV = python3 -m venv build/wheel-venv
WHEEL_INSTALL = build/wheel-venv/bin/python -m pip install -q dist/robustops-*.whl
endif

$(WHEEL_STAMP): $(EXT_STAMP)
	rm -rf dist build/wheel-venv
	$(BUILD_ENV) $(PYTHON) -m pip wheel -q --no-build-isolation --no-deps . -w dist
	$(WHEEL_VENV)
	$(WHEEL_INSTALL)
	cd /tmp && $(CURDIR)/build/wheel-venv/bin/python -c "import robustops; \
	  assert '/build/wheel-venv/' in robustops.__file__, robustops.__file__; \
	  print('wheel imports:', robustops.__file__, robustops.build_info())"
	touch $@

wheel: $(WHEEL_STAMP)

test: build cmake wheel
	$(PYTHON) -m pytest tests -q $$($(PYTHON) -c "import xdist" 2>/dev/null && echo "$(PYTEST_XDIST)") $(PYTEST_ARGS)

# The property tests at length (3000 examples per property instead of make test's 200).
fuzz: build
	HYPOTHESIS_PROFILE=long $(PYTHON) -m pytest tests/test_fuzz.py -q $(PYTEST_ARGS)

demo: build
	$(PYTHON) -m robustops demo

bench: build
	$(PYTHON) benchmarks/bench_pgd_step.py

# kornia (the blur, spatter and JPEG corruptions, AugMix's ops), POT and normflows (issue 29) for the GPU machine, which has no internet:
# its Python 3.12 wheels in gpu-wheels/ (gitignored), carried there; benchmarks/gpu_session.sh installs them.
gpu-wheels:
	mkdir -p gpu-wheels
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d gpu-wheels \
	  kornia==0.9.0 kornia-rs==0.2.0 POT==0.9.7.post1
	python3 -m pip wheel -q --no-deps --no-build-isolation -w gpu-wheels normflows==1.7.3
	ls -l gpu-wheels

clean:
	rm -rf build dist robustops/_C*.so *.egg-info
