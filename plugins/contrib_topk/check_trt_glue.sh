#!/usr/bin/env bash
# SPDX-FileCopyrightText: Copyright (c) 2026 The capa-export authors
# SPDX-License-Identifier: Apache-2.0
#
# Compile and link both TensorRT plugin libraries against a TensorRT installation (or only its
# public headers) named by the user, with -Wall -Wextra -Werror and --no-undefined, then check
# what they export and need:
#   libcapa_contrib_topk_plugin.so          exports exactly getCreators and setLoggerFinder
#   libcapa_contrib_topk_plugin_autoreg.so  exports nothing
#   both                                    no undefined TensorRT symbol, no DT_NEEDED on libnvinfer*
#
#   plugins/contrib_topk/check_trt_glue.sh /path/to/TensorRT [build-dir]
#   CUDAARCHS=90 plugins/contrib_topk/check_trt_glue.sh "$TensorRT_ROOT"
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
cmake --build "${build}" --target capa_contrib_topk_plugin capa_contrib_topk_plugin_autoreg --parallel

fail() { echo "FAIL: $*" >&2; exit 1; }
for name in capa_contrib_topk_plugin capa_contrib_topk_plugin_autoreg; do
  lib="${build}/lib${name}.so"
  [[ -f "${lib}" ]] || fail "${lib} was not built"
  exported="$(nm -D --defined-only "${lib}" | awk '$2 ~ /^[TDBRVWiu]$/ {print $3}' | sort | tr '\n' ' ')"
  if [[ "${name}" == capa_contrib_topk_plugin ]]; then
    [[ "${exported}" == "getCreators setLoggerFinder " ]] || fail "${lib} exports '${exported}', expected exactly getCreators setLoggerFinder"
  else
    [[ -z "${exported}" ]] || fail "${lib} exports '${exported}', expected nothing"
  fi
  # Every strong undefined symbol must come from the C/C++ runtime (versioned GLIBC_/GLIBCXX_/
  # CXXABI_/GCC_); weak ones (w: __gmon_start__, _ITM_*) may stay unresolved.
  unversioned="$(nm -D --undefined-only "${lib}" | awk '$1 == "U" {print $2}' | grep -v '@' || true)"
  [[ -z "${unversioned}" ]] || fail "${lib} leaves unversioned symbols undefined: ${unversioned}"
  if readelf -d "${lib}" | grep NEEDED | grep -q 'libnvinfer'; then
    fail "${lib} has a DT_NEEDED on libnvinfer: $(readelf -d "${lib}" | grep NEEDED | tr -s ' ')"
  fi
  echo "OK: ${lib}: exports [${exported% }], needs [$(readelf -d "${lib}" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ' | sed 's/ $//')]"
done
echo "OK: both plugin libraries built against ${trt_root} with --no-undefined; no TensorRT symbol left undefined"
