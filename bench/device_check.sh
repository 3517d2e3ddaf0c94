#!/usr/bin/env bash
# Everything that needs a GPU, in stages that fit the GPU machine's limits (15 device-minutes a
# session, 10 minutes a command, 8 files back from $OUT): build the native op for sm_90, the op
# test's CUDA column (the kernels and the Gram-form candidate), compute-sanitizer memcheck,
# racecheck and synccheck, the op benchmark, tiny-llava engines on ONNX Runtime's CUDA provider
# (edge fp16, datacenter bf16: built, validated, run), the end-to-end benchmark at LLaVA-1.5-7B dims.
#
#   on the device, from the repository root:   bash bench/device_check.sh [--quick] [STAGE ...]
#   stages: op sanitize bench-op engines e2e   (default: all of them, in this order)
#
# Back in $OUT: summary.txt, environment.txt, the benchmark JSONs and logs-<stages>.tar.gz (every log).
# Python packages the machine lacks (KINDS.md's list: polygraphy, jsonschema, cryptography and their
# needs) travel as wheels in .whl/ (6 MB), onnxruntime-gpu (the engines stage) as 6 parts of
# 36 MiB in .carry/ort: a run carries at most 64 MiB with the working tree (21 MB). bench/device_pack.sh
# makes both here. A session with the whole budget, one call after another, in order of what
# matters most (the machine is given back after 30 s idle; each run carries .whl and one part):
#   1. bash .carry/ort/part-1/unpack.sh .carry/ort/part-1; bash bench/device_check.sh op
#   2. bash .carry/ort/part-2/unpack.sh .carry/ort/part-2; bash bench/device_check.sh sanitize
#   3. bash .carry/ort/part-3/unpack.sh .carry/ort/part-3; bash bench/device_check.sh bench-op
#   4. bash .carry/ort/part-4/unpack.sh .carry/ort/part-4; bash bench/device_check.sh --quick e2e
#   5. bash .carry/ort/part-5/unpack.sh .carry/ort/part-5
#   6. bash .carry/ort/part-6/unpack.sh .carry/ort/part-6; bash bench/device_check.sh engines
# A warm machine keeps build/device and the installed capa_export/_native*.so between calls.
#
# NOT YET RUN ON A GPU: written without a GPU machine (2026-11-24, staged 2026-12-07); on CPU the
# op stage builds, skips the CUDA tests, and the other stages say what they need.
set -uo pipefail
OUT=${OUT:-$PWD/out/device}
LOGS=/tmp/capa-device
mkdir -p "$OUT" "$LOGS"
quick=""
if [ "${1:-}" = "--quick" ]; then quick=1; shift; fi
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(op sanitize bench-op engines e2e)
for s in "${stages[@]}"; do
  case $s in op|sanitize|bench-op|engines|e2e) ;; *) echo "device_check: unknown stage '$s' (op sanitize bench-op engines e2e)" >&2; exit 2;; esac
done
step() { echo "== $*" | tee -a "$OUT/summary.txt"; }
run() { local name=$1; shift; "$@" > "$LOGS/$name.log" 2>&1; local rc=$?; echo "   $name: exit $rc" | tee -a "$OUT/summary.txt"; tail -4 "$LOGS/$name.log"; return $rc; }
finish() {
  tar -C "$LOGS" -czf "$OUT/logs-$(IFS=-; echo "${stages[*]}").tar.gz" . 2>/dev/null
  step "done: $(ls "$OUT" | tr '\n' ' ')"
}
trap finish EXIT

if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}  # carried wheels and unpacked onnxruntime-gpu
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1; command -v compute-sanitizer nvcc; \
  python3 - <<'EOF'
import importlib
import importlib.metadata
import torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)
for name, dist in (("polygraphy", "polygraphy"), ("jsonschema", "jsonschema"), ("cryptography", "cryptography"),
                   ("onnxruntime", None), ("onnxruntime_genai", None), ("scipy", "scipy"),
                   ("matplotlib", "matplotlib"), ("PIL", "pillow")):
    try:
        module = importlib.import_module(name)
        extra = module.get_available_providers() if name == "onnxruntime" else ""
        print(name, importlib.metadata.version(dist) if dist else getattr(module, "__version__", "?"), extra)
    except ImportError as exc:
        print(name, "MISSING:", exc)
EOF
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"
has_stage() { local s; for s in "${stages[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
native_built() { python3 -c "from capa_export.ops import native; import sys; sys.exit(not native.cuda_compiled())" 2>/dev/null; }

if has_stage op || ! native_built; then
  step "build the native op for sm_90 (in place: capa_export/_native*.so)"
  run build bash -c "cmake -S . -B build/device -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DCAPA_REQUIRE_CUDA=ON -DPython_EXECUTABLE=$(command -v python3) -DCMAKE_CUDA_FLAGS=--resource-usage && \
    cmake --build build/device && cmake --install build/device --prefix $PWD" || exit 1
fi

if has_stage op; then
  step "CapaContribTopK op test, every implementation incl. CUDA and the Gram-form candidate"
  run op_test python3 -m pytest -q -rs -p no:cacheprovider tests/test_contrib_topk_op.py tests/test_topk_emulation.py
fi

if has_stage sanitize; then
  step "compute-sanitizer memcheck, racecheck, synccheck on the kernels"
  # Cases: every variant and dtype; N not a multiple of a block (577), LLaVA-NeXT's 2,880 and 8,192
  # keys; 64 heads; a batch of 16; ties across blocks; NaN/inf inputs. racecheck and synccheck
  # instrument every shared-memory access (10-100x slower): they get the small cases only.
  cat > "$LOGS/sanitizer_cases.py" <<'EOF'
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
    run memcheck compute-sanitizer --tool memcheck --error-exitcode 3 python3 "$LOGS/sanitizer_cases.py"
    run racecheck compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 3 python3 "$LOGS/sanitizer_cases.py" --small
    run synccheck compute-sanitizer --tool synccheck --error-exitcode 3 python3 "$LOGS/sanitizer_cases.py" --small
  else
    step "compute-sanitizer not found: memcheck, racecheck, synccheck skipped"
  fi
fi

if has_stage bench-op; then
  step "op benchmark (LLaVA-1.5-7B dims, N = 576 and 2880, k = 64; floors and the Gram-form candidate)"
  run bench_op python3 bench/bench_contrib_topk.py --dtype bf16 --out "$OUT/bench_op.json"
fi

ort_cuda() { python3 -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; }

if has_stage engines; then
  if ort_cuda; then
    step "tiny-llava engines on ONNX Runtime's CUDA provider: edge (fp16) and datacenter (bf16), built + validated, then run"
    python3 -m capa_export.data --split test --index 0 --out "$LOGS/demo" > /dev/null
    for profile in edge datacenter; do
      run "build_$profile" python3 -m capa_export.cli build --model tiny-llava --profile $profile \
        --out "/tmp/engines/tiny-llava-$profile" --force
      run "run_$profile" python3 -m capa_export.cli run "/tmp/engines/tiny-llava-$profile" --image "$LOGS/demo/image.png" \
        --prompt "$(cat "$LOGS/demo/question.txt")" --max-new-tokens 8
      echo "   expected answer: $(cat "$LOGS/demo/answer.txt")" | tee -a "$OUT/summary.txt"
      cp "/tmp/engines/tiny-llava-$profile/manifest.json" "$LOGS/manifest-$profile.json" 2>/dev/null
    done
  else
    step "engines skipped: onnxruntime here has no CUDAExecutionProvider (carry .carry/ort's 4 parts; bench/device_pack.sh)"
  fi
fi

if has_stage e2e; then
  repeats=10
  [ -n "$quick" ] && repeats=3
  peers="hf_sdpa fastv_eager capa_eager capa_eager_affine"
  # The engine peers export and build the 7B graphs first (minutes): only with --quick off and onnxruntime-gpu present.
  # --no-profile: the engine profile feeds numpy arrays (no bfloat16 in numpy); the bench's timings do not.
  profile=""
  if [ -z "$quick" ] && ort_cuda; then peers="$peers ort_unpruned capa_engine"; profile="--no-profile"; fi
  step "end-to-end benchmark on the GPU (random weights, LLaVA-1.5-7B dims, bf16, 576 and 2880 visual tokens): $peers"
  run bench_llava-1.5-7b python3 -m capa_export.cli bench --device cuda --size llava-1.5-7b --dtype bf16 \
    --visual 576 2880 --peers $peers $profile --repeats $repeats --work /tmp/bench-work --out "$OUT/bench_llava-1.5-7b.json"
fi
