# Two commands do all the set-up from nothing:
#   make demo   creates .venv if missing, then analyses, builds, validates and runs an engine of the
#               shipped trained model on one of its task's images
#   make test   creates .venv if missing, then runs the tests
# torch is pinned to the local CPU wheel here (a looser spec would pull a multi-GB CUDA build);
# the package itself accepts torch 2.11-2.14.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.capa-installed
OUT ?= out

.PHONY: demo test cuda-check clean

# the op manifest is copied into the package at install time: a changed one needs a reinstall
$(STAMP): pyproject.toml CMakeLists.txt plugins/contrib_topk/CapaContribTopK_PluginConfig.yaml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q "scikit-build-core>=0.10" "nanobind>=2.0" "pytest>=8"
	$(PY) -m pip install -q --no-build-isolation -e ".[test,serve]"
	touch $(STAMP)

# The demo's model is the shipped tiny-llava (trained on the built-in Shapes-VQA task), asked about
# one of the task's test images: the answer it prints can be checked against the image and the
# expected answer printed after it. `analyze` prints its suggestion (K=2 with an FFN map in layer 1);
# the engine is built with what `eval --sweep` showed keeps this model's answers (BENCHMARKS.md):
# prune after layer 3 keeping 64 of 576 visual tokens, no FFN map.
DEMO_MODEL ?= tiny-llava
DEMO_ENGINE ?= engines/$(DEMO_MODEL)-cpu
demo: $(STAMP)
	$(VENV)/bin/capa-export analyze --model $(DEMO_MODEL) --out $(OUT)/analysis --force
	$(VENV)/bin/capa-export calibrate --model $(DEMO_MODEL) --prune 3:64 --ffn-layers none --out $(OUT)/calibration --force
	$(VENV)/bin/capa-export build --model $(DEMO_MODEL) --calibrated $(OUT)/calibration --profile cpu --out $(DEMO_ENGINE) --force
	$(PY) -m capa_export.data --split test --index 0 --out $(OUT)/demo
	$(VENV)/bin/capa-export run $(DEMO_ENGINE) --image $(OUT)/demo/image.png --prompt "$$(cat $(OUT)/demo/question.txt)" --max-new-tokens 12
	@echo "expected answer: $$(cat $(OUT)/demo/answer.txt)"

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build $(OUT)

# Compile the CUDA kernels with nvcc for every shipped architecture, failing on any compile error,
# then report registers / stack / spills per kernel (ptxas -v) and fail on a spill in the contrib
# scores kernels (CI runs this: no GPU there). --clean-first: ptxas reports only what it compiles.
CUDA_CHECK_ARCHS ?= 80;86;87;89;90
CUDA_CHECK_DIR := build/cuda-check
cuda-check:
	cmake -S . -B $(CUDA_CHECK_DIR) -DCAPA_REQUIRE_CUDA=ON -DCAPA_BUILD_PYTHON=OFF \
	  "-DCMAKE_CUDA_ARCHITECTURES=$(CUDA_CHECK_ARCHS)" -DCMAKE_CUDA_FLAGS=--resource-usage > /dev/null
	cmake --build $(CUDA_CHECK_DIR) --target capa_contrib_topk_cuda --clean-first > $(CUDA_CHECK_DIR)/ptxas.log 2>&1 \
	  || { cat $(CUDA_CHECK_DIR)/ptxas.log; exit 1; }
	python3 plugins/contrib_topk/ptxas_report.py $(CUDA_CHECK_DIR)/ptxas.log --no-spill contrib_scores_kernel --no-spill gram_form_kernel
