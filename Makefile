# Two commands do all the set-up from nothing:
#   make demo   creates .venv if missing, then runs the main job on the embedded default model
#   make test   creates .venv if missing, then runs the tests
# torch is pinned to the local CPU wheel here (a looser spec would pull a multi-GB CUDA build);
# the package itself accepts torch 2.11-2.14.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.capa-installed
OUT ?= out

.PHONY: demo test cuda-check clean

$(STAMP): pyproject.toml CMakeLists.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q "scikit-build-core>=0.10" "nanobind>=2.0" "pytest>=8"
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/capa-export analyze --out $(OUT)/analysis
	$(VENV)/bin/capa-export build --model tiny-llava --profile cpu
	$(VENV)/bin/capa-export run engines/build/tiny-llava-cpu --prompt "What is in the picture?" --max-new-tokens 12

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build $(OUT)

# Compile the CUDA kernels with nvcc, failing on any compile error (CI runs this: no GPU there).
cuda-check:
	cmake -S . -B build/cuda-check -DCAPA_REQUIRE_CUDA=ON -DCAPA_BUILD_PYTHON=OFF -DCMAKE_CUDA_ARCHITECTURES=90 > /dev/null
	cmake --build build/cuda-check --target capa_contrib_topk_cuda
