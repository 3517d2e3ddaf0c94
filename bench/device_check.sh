#!/usr/bin/env bash
# Everything that needs a GPU, in one call of the GPU machine (15 device-minutes a session: few,
# full calls). Builds the native op for sm_90, runs the op test's CUDA column, compute-sanitizer
# memcheck, racecheck and synccheck on the kernels, the op benchmark, and the prefill benchmarks; all output under $OUT.
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

step "compute-sanitizer memcheck, racecheck, synccheck on the kernels"
# Cases: every variant and dtype; N not a multiple of a block (577), LLaVA-NeXT's 2,880 and 8,192
# keys; 64 heads; a batch of 16; ties across blocks; NaN/inf inputs. racecheck and synccheck
# instrument every shared-memory access (10-100x slower): they get the small cases only.
cat > "$OUT/sanitizer_cases.py" <<'EOF'
import sys
import torch
import capa_export.ops  # noqa: F401  registers torch.ops.capa.contrib_topk
from capa_export.ops.torch_op import contribution_scores_gram_cuda
small = sys.argv[1:] == ["--small"]
# (B, H, H_kv, Q, N, d, D)
cases = [(2, 8, 2, 5, 577, 64, 512), (16, 4, 4, 3, 100, 8, 16), (1, 64, 8, 4, 300, 16, 256)]
if not small:
    cases += [(1, 8, 8, 40, 2880, 64, 512), (1, 2, 1, 2, 8192, 8, 32)]
for B, H, H_kv, Q, N, d, D in cases:
    for variant in ("contrib", "value_norm", "attention"):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            probs = torch.softmax(torch.randn(B, H, Q, N, device="cuda"), -1).to(dtype)
            values = torch.randn(B, H_kv, N, d, device="cuda", dtype=dtype)
            weight = torch.randn(D, H * d, device="cuda", dtype=dtype)
            half = N // 2
            values[:, :, half : 2 * half] = values[:, :, :half]  # ties across blocks
            values[0, 0, 3, 0] = float("nan")
            probs[-1, 0, 0, 5] = float("inf")
            torch.ops.capa.contrib_topk(probs, values, weight, min(64, N), variant)
            if variant == "contrib" and dtype != torch.float32 and d % 16 == 0 and 256 % d == 0:
                contribution_scores_gram_cuda(probs, values, weight)  # the Gram-form candidate
torch.cuda.synchronize()
print("sanitizer cases ran:", len(cases), "shapes x 3 variants x 3 dtypes")
EOF
if command -v compute-sanitizer > /dev/null; then
  run memcheck compute-sanitizer --tool memcheck --error-exitcode 3 python3 "$OUT/sanitizer_cases.py"
  run racecheck compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 3 python3 "$OUT/sanitizer_cases.py" --small
  run synccheck compute-sanitizer --tool synccheck --error-exitcode 3 python3 "$OUT/sanitizer_cases.py" --small
else
  step "compute-sanitizer not found: memcheck, racecheck, synccheck skipped"
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
