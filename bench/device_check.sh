#!/usr/bin/env bash
# Everything that needs a GPU, in one call of the GPU machine (30 device-minutes a session: few,
# full calls). Builds the native op for sm_90, runs the op test's CUDA column, compute-sanitizer
# memcheck on the kernels, the op benchmark, and the prefill benchmarks; all output under $OUT.
#
#   on the device, from the repository root:   bash bench/device_check.sh [--quick]
#   missing Python packages there (polygraphy): bring them as wheels in
#   .whl/ (see the device tool's notes) and carry .whl; they are installed into /tmp/site first.
#
# NOT YET RUN: written without a GPU machine (2026-11-24); on CPU it builds, skips the CUDA tests
# and reports that the benchmarks need a GPU.
set -uo pipefail
OUT=${OUT:-$PWD/out/device}
mkdir -p "$OUT"
quick=${1:-}
step() { echo "== $*" | tee -a "$OUT/summary.txt"; }
run() { local name=$1; shift; "$@" > "$OUT/$name.log" 2>&1; local rc=$?; echo "   $name: exit $rc" | tee -a "$OUT/summary.txt"; tail -4 "$OUT/$name.log"; return $rc; }

if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1; \
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"; } \
  > "$OUT/environment.txt" 2>&1

step "build the native op for sm_90 (in place: capa_export/_native*.so)"
run build bash -c "cmake -S . -B build/device -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DCAPA_REQUIRE_CUDA=ON -DPython_EXECUTABLE=$(command -v python3) && cmake --build build/device && \
  cmake --install build/device --prefix $PWD" || exit 1

step "CapaContribTopK op test, every implementation incl. CUDA"
run op_test python3 -m pytest -q -rs tests/test_contrib_topk_op.py

step "compute-sanitizer memcheck on the kernels (all variants, N not a multiple of the block, N = 2880)"
cat > "$OUT/memcheck_case.py" <<'EOF'
import torch
import capa_export.ops  # noqa: F401  registers torch.ops.capa.contrib_topk
for n in (577, 2880):
    for variant in ("contrib", "value_norm", "attention"):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            probs = torch.softmax(torch.randn(2, 8, 5, n, device="cuda"), -1).to(dtype)
            values = torch.randn(2, 2, n, 64, device="cuda", dtype=dtype)
            weight = torch.randn(512, 8 * 64, device="cuda", dtype=dtype)
            torch.ops.capa.contrib_topk(probs, values, weight, 64, variant)
torch.cuda.synchronize()
print("memcheck cases ran")
EOF
if command -v compute-sanitizer > /dev/null; then
  run memcheck compute-sanitizer --tool memcheck --error-exitcode 3 python3 "$OUT/memcheck_case.py"
else
  step "compute-sanitizer not found: memcheck skipped"
fi

step "op benchmark (LLaVA-1.5-7B dims, N = 576 and 2880, k = 64)"
run bench_op python3 bench/bench_contrib_topk.py --dtype bf16 --out "$OUT/bench_op.json"

step "end-to-end benchmark, eager peers on the GPU (random weights, LLaVA-1.5-7B dims, 576 and 2880 visual tokens)"
# bf16 engines do not build yet (the runtime passes numpy arrays) and this machine has neither
# onnxruntime-gpu nor onnxruntime-genai by default: the eager peers only.
repeats=10
[ "$quick" = "--quick" ] && repeats=3
run bench_llava-1.5-7b python3 -m capa_export.cli bench --device cuda --size llava-1.5-7b --dtype bf16 \
  --visual 576 2880 --peers hf_sdpa fastv_eager capa_eager capa_eager_affine --repeats $repeats \
  --work "$OUT/bench-work" --out "$OUT/bench_llava-1.5-7b.json"
rm -rf "$OUT/bench-work"
step "done: $(ls "$OUT" | tr '\n' ' ')"
