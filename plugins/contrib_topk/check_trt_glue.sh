#!/usr/bin/env bash
# Compile and link the TensorRT plugin library against a TensorRT installation (or only its
# headers) named by the user, with -Wall -Wextra, and check the exported entry points.
#
#   plugins/contrib_topk/check_trt_glue.sh /path/to/TensorRT [build-dir]
#   CUDAARCHS=90 plugins/contrib_topk/check_trt_glue.sh "$TensorRT_ROOT"
#
# With headers only (no lib/libnvinfer.so) TensorRT's symbols stay undefined in the library,
# as a shared library may leave them; a TensorRT process resolves them when it loads it.
set -euo pipefail
trt_root="${1:-${TensorRT_ROOT:-}}"
if [[ -z "${trt_root}" || ! -f "${trt_root}/include/NvInfer.h" ]]; then
  echo "usage: $0 <TensorRT_ROOT holding include/NvInfer.h> [build-dir]" >&2
  exit 2
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build="${2:-${repo}/build/trt-plugin}"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S "${repo}" -B "${build}" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
  -DTensorRT_ROOT="${trt_root}" -DCAPA_BUILD_PYTHON=OFF -DCAPA_REQUIRE_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="${CUDAARCHS:-90}" -DCMAKE_COMPILE_WARNING_AS_ERROR=ON
cmake --build "${build}" --target capa_contrib_topk_plugin --parallel
lib="${build}/libcapa_contrib_topk_plugin.so"
for symbol in getCreators setLoggerFinder; do
  nm -D --defined-only "${lib}" | grep -qw "${symbol}" || { echo "FAIL: ${symbol} not exported by ${lib}" >&2; exit 1; }
done
echo "OK: ${lib} built against ${trt_root}; exports getCreators, setLoggerFinder"
echo "TensorRT symbols left undefined: $(nm -D --undefined-only "${lib}" | awk '{print $2}' | grep -E '^(getLogger|getPluginRegistry|createInfer)' | tr '\n' ' ')"
