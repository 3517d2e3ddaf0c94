// SPDX-FileCopyrightText: Copyright (c) 2026 The capa-export authors
// SPDX-License-Identifier: Apache-2.0
//
// Python extension `capa_export._native`: the C++ CPU reference on host arrays and, when built
// with CUDA, the CUDA launch on raw device pointers (the caller owns the memory and the stream).
#include "contrib_topk.h"

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <cstdint>
#include <string>
#include <vector>

#ifdef CAPA_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace nb = nanobind;

namespace {

using HostArray = nb::ndarray<nb::c_contig, nb::device::cpu>;

int variant_code(nb::handle variant) {
    if (nb::isinstance<nb::str>(variant)) {
        const std::string name = nb::cast<std::string>(variant);
        if (name == "contrib") return CAPA_VARIANT_CONTRIB;
        if (name == "value_norm") return CAPA_VARIANT_VALUE_NORM;
        if (name == "attention") return CAPA_VARIANT_ATTENTION;
        throw nb::value_error(("variant='" + name + "' is unknown; expected contrib, value_norm or attention").c_str());
    }
    if (nb::isinstance<nb::int_>(variant)) {
        const int code = nb::cast<int>(variant);
        if (code < 0 || code > 2)
            throw nb::value_error(("variant=" + std::to_string(code) + " is unknown; expected 0=contrib, 1=value_norm, 2=attention").c_str());
        return code;
    }
    throw nb::value_error("variant must be a str (contrib/value_norm/attention) or an int (0/1/2)");
}

// dtype of a host array: float32, float16, bfloat16 (DLPack), or a 16-bit integer view of bf16
// when the caller says so with bf16_as_uint16=True (numpy has no bfloat16).
int dtype_code(const HostArray& a, const char* name, bool bf16_as_uint16) {
    const nb::dlpack::dtype dt = a.dtype();
    const auto code = static_cast<nb::dlpack::dtype_code>(dt.code);
    if (dt.lanes == 1) {
        if (code == nb::dlpack::dtype_code::Float && dt.bits == 32) return CAPA_DTYPE_FP32;
        if (code == nb::dlpack::dtype_code::Float && dt.bits == 16) return CAPA_DTYPE_FP16;
        if (code == nb::dlpack::dtype_code::Bfloat && dt.bits == 16) return CAPA_DTYPE_BF16;
        if (bf16_as_uint16 && dt.bits == 16 &&
            (code == nb::dlpack::dtype_code::UInt || code == nb::dlpack::dtype_code::Int))
            return CAPA_DTYPE_BF16;
    }
    throw nb::value_error((std::string(name) + " must be float32, float16 or bfloat16 (or uint16 with bf16_as_uint16=True)").c_str());
}

struct Prepared {
    capa_contrib_topk_shape shape{};
    int variant = 0;
    int dtype = 0;
};

Prepared prepare(const HostArray& probs, const HostArray& values, const HostArray& o_weight, int k,
    nb::handle variant, bool bf16_as_uint16, bool check_k) {
    Prepared p;
    p.variant = variant_code(variant);
    if (probs.ndim() != 4) throw nb::value_error("probs must be [B, H, Q, N] (rank 4)");
    if (values.ndim() != 4) throw nb::value_error("values must be [B, H_kv, N, d] (rank 4)");
    if (o_weight.ndim() != 2) throw nb::value_error("o_weight must be [D, H*d] (rank 2, nn.Linear layout)");
    auto dim = [](const HostArray& a, size_t i) { return static_cast<int64_t>(a.shape(i)); };
    const int64_t B = dim(probs, 0), H = dim(probs, 1), Q = dim(probs, 2), N = dim(probs, 3);
    const int64_t H_kv = dim(values, 1), d = dim(values, 3), D = dim(o_weight, 0);
    if (dim(values, 0) != B) throw nb::value_error("values batch does not match probs batch");
    if (dim(values, 2) != N) throw nb::value_error("values has a different number of keys N than probs");
    if (H_kv <= 0 || H % H_kv != 0) throw nb::value_error("probs heads H must be a multiple of values heads H_kv");
    if (dim(o_weight, 1) != H * d) throw nb::value_error("o_weight must have H*d input columns");
    // B == 0 is an empty batch (an empty result); every other dimension must be positive.
    if (B < 0 || H <= 0 || Q <= 0 || N <= 0 || d <= 0 || D <= 0) throw nb::value_error("probs/values/o_weight have an empty dimension other than the batch");
    if (check_k && (k <= 0 || k > N))
        throw nb::value_error(("k=" + std::to_string(k) + " must be in [1, " + std::to_string(N) + "] (the number of visual keys)").c_str());
    const int dp = dtype_code(probs, "probs", bf16_as_uint16);
    const int dv = dtype_code(values, "values", bf16_as_uint16);
    const int dw = dtype_code(o_weight, "o_weight", bf16_as_uint16);
    if (dp != dv || dp != dw) throw nb::value_error("probs, values and o_weight must share one dtype");
    p.dtype = dp;
    p.shape = capa_contrib_topk_shape{static_cast<int32_t>(B), static_cast<int32_t>(H), static_cast<int32_t>(H_kv),
        static_cast<int32_t>(Q), static_cast<int32_t>(N), static_cast<int32_t>(d), static_cast<int32_t>(D),
        static_cast<int32_t>(check_k ? k : 1)};
    return p;
}

template <typename T>
nb::ndarray<nb::numpy, T, nb::ndim<2>> owned_2d(std::vector<T>&& data, size_t rows, size_t cols) {
    auto* heap = new std::vector<T>(std::move(data));
    nb::capsule owner(heap, [](void* ptr) noexcept { delete static_cast<std::vector<T>*>(ptr); });
    return nb::ndarray<nb::numpy, T, nb::ndim<2>>(heap->data(), {rows, cols}, owner);
}

void raise_status(int status, const char* what) {
    if (status != CAPA_OK) throw nb::value_error((std::string(what) + ": " + capa_status_string(status)).c_str());
}

#ifdef CAPA_WITH_CUDA
// The launcher consumed the CUDA error (cudaGetLastError would now say "no error"); it recorded
// which call failed and why.
[[noreturn]] void raise_launch_failure(int status, const char* what) {
    const std::string detail = capa_last_error_message();
    const std::string message = std::string(what) + ": " + capa_status_string(status) + (detail.empty() ? "" : ": " + detail);
    if (status == CAPA_ERR_UNSUPPORTED) throw nb::value_error(message.c_str());
    throw std::runtime_error(message);
}
#endif

}  // namespace

NB_MODULE(_native, m) {
    m.doc() = "CapaContribTopK native implementations (C++ CPU reference; CUDA when compiled in)";

    m.def("cuda_compiled", []() {
#ifdef CAPA_WITH_CUDA
        return true;
#else
        return false;
#endif
    }, "True when this build contains the CUDA kernels.");

    m.def("contribution_scores_cpu",
        [](HostArray probs, HostArray values, HostArray o_weight, nb::handle variant, bool bf16_as_uint16) {
            const Prepared p = prepare(probs, values, o_weight, 1, variant, bf16_as_uint16, false);
            std::vector<float> scores(static_cast<size_t>(p.shape.B) * p.shape.N);
            int rc;
            {
                nb::gil_scoped_release release;
                rc = capa_contribution_scores_cpu(probs.data(), values.data(), o_weight.data(), &p.shape, p.variant,
                    p.dtype, scores.data());
            }
            raise_status(rc, "contribution_scores_cpu");
            return owned_2d<float>(std::move(scores), p.shape.B, p.shape.N);
        },
        nb::arg("probs"), nb::arg("values"), nb::arg("o_weight"), nb::arg("variant") = "contrib",
        nb::arg("bf16_as_uint16") = false,
        "fp32 [B, N] contribution scores of C-contiguous host arrays (float32/float16/bfloat16).");

    m.def("contrib_topk_cpu",
        [](HostArray probs, HostArray values, HostArray o_weight, int k, nb::handle variant, bool bf16_as_uint16) {
            const Prepared p = prepare(probs, values, o_weight, k, variant, bf16_as_uint16, true);
            std::vector<int32_t> out(static_cast<size_t>(p.shape.B) * p.shape.k);
            int rc;
            {
                nb::gil_scoped_release release;
                rc = capa_contrib_topk_cpu(probs.data(), values.data(), o_weight.data(), &p.shape, p.variant, p.dtype,
                    out.data());
            }
            raise_status(rc, "contrib_topk_cpu");
            return owned_2d<int32_t>(std::move(out), p.shape.B, p.shape.k);
        },
        nb::arg("probs"), nb::arg("values"), nb::arg("o_weight"), nb::arg("k"), nb::arg("variant") = "contrib",
        nb::arg("bf16_as_uint16") = false,
        "int32 [B, k] kept key indices, ascending, ties to the lower index.");

#ifdef CAPA_WITH_CUDA
    m.def("contrib_max_heads", [](size_t smem_optin_bytes) { return capa_contrib_max_heads(smem_optin_bytes); },
        nb::arg("smem_optin_bytes"),
        "Largest H the contrib kernel runs with this much opt-in shared memory per block (host arithmetic).");

    m.def("contrib_topk_workspace_size",
        [](int B, int H, int H_kv, int Q, int N, int d, int D, int k, nb::handle variant) {
            const capa_contrib_topk_shape s{B, H, H_kv, Q, N, d, D, k};
            return capa_contrib_topk_workspace_size(&s, variant_code(variant));
        },
        nb::arg("B"), nb::arg("H"), nb::arg("H_kv"), nb::arg("Q"), nb::arg("N"), nb::arg("d"), nb::arg("D"),
        nb::arg("k"), nb::arg("variant"), "Device workspace bytes of contrib_topk_cuda.");

    m.def("contrib_topk_cuda",
        [](uintptr_t probs, uintptr_t values, uintptr_t o_weight, uintptr_t out, int B, int H, int H_kv, int Q, int N,
            int d, int D, int k, nb::handle variant, int dtype, uintptr_t stream, uintptr_t workspace,
            size_t workspace_bytes) {
            const capa_contrib_topk_shape s{B, H, H_kv, Q, N, d, D, k};
            const int v = variant_code(variant);
            raise_status(capa_contrib_topk_check(&s, v, dtype), "contrib_topk_cuda");
            const size_t need = capa_contrib_topk_workspace_size(&s, v);
            void* st = reinterpret_cast<void*>(stream);
            void* ws = reinterpret_cast<void*>(workspace);
            bool owned = false;
            if (ws == nullptr && need > 0) {  // no caller workspace: stream-ordered allocation, freed after the launch
                const cudaError_t err = cudaMallocAsync(&ws, need, static_cast<cudaStream_t>(st));
                if (err != cudaSuccess)
                    throw std::runtime_error(std::string("contrib_topk_cuda: cudaMallocAsync of the workspace failed: ") +
                        cudaGetErrorString(err));
                workspace_bytes = need;
                owned = true;
            }
            const int rc = capa_contrib_topk_launch(reinterpret_cast<const void*>(probs),
                reinterpret_cast<const void*>(values), reinterpret_cast<const void*>(o_weight),
                reinterpret_cast<int32_t*>(out), &s, v, dtype, ws, workspace_bytes, st);
            if (owned) cudaFreeAsync(ws, static_cast<cudaStream_t>(st));
            if (rc == CAPA_ERR_CUDA || rc == CAPA_ERR_UNSUPPORTED) raise_launch_failure(rc, "contrib_topk_cuda");
            raise_status(rc, "contrib_topk_cuda");
        },
        nb::arg("probs_ptr"), nb::arg("values_ptr"), nb::arg("o_weight_ptr"), nb::arg("out_ptr"), nb::arg("B"),
        nb::arg("H"), nb::arg("H_kv"), nb::arg("Q"), nb::arg("N"), nb::arg("d"), nb::arg("D"), nb::arg("k"),
        nb::arg("variant"), nb::arg("dtype"), nb::arg("stream_ptr"), nb::arg("workspace_ptr") = 0,
        nb::arg("workspace_bytes") = 0,
        "Enqueue the CUDA op on raw device pointers (dtype 0=fp32, 1=fp16, 2=bf16); asynchronous.");

    m.def("contrib_gram_workspace_size",
        [](int B, int H, int H_kv, int Q, int N, int d, int D) {
            const capa_contrib_topk_shape s{B, H, H_kv, Q, N, d, D, 1};
            return capa_contrib_gram_workspace_size(&s);
        },
        nb::arg("B"), nb::arg("H"), nb::arg("H_kv"), nb::arg("Q"), nb::arg("N"), nb::arg("d"), nb::arg("D"),
        "Device workspace bytes of contribution_scores_gram_cuda (the per-key Gram matrices).");

    m.def("contribution_scores_gram_cuda",
        [](uintptr_t probs, uintptr_t values, uintptr_t o_gram, uintptr_t scores, int B, int H, int H_kv, int Q,
            int N, int d, int D, int dtype, uintptr_t stream, uintptr_t workspace, size_t workspace_bytes) {
            const capa_contrib_topk_shape s{B, H, H_kv, Q, N, d, D, 1};
            const int rc = capa_contribution_scores_gram_launch(reinterpret_cast<const void*>(probs),
                reinterpret_cast<const void*>(values), reinterpret_cast<const void*>(o_gram),
                reinterpret_cast<float*>(scores), &s, dtype, reinterpret_cast<void*>(workspace), workspace_bytes,
                reinterpret_cast<void*>(stream));
            if (rc == CAPA_ERR_CUDA || rc == CAPA_ERR_UNSUPPORTED) raise_launch_failure(rc, "contribution_scores_gram_cuda");
            raise_status(rc, "contribution_scores_gram_cuda");
        },
        nb::arg("probs_ptr"), nb::arg("values_ptr"), nb::arg("o_gram_ptr"), nb::arg("scores_ptr"), nb::arg("B"),
        nb::arg("H"), nb::arg("H_kv"), nb::arg("Q"), nb::arg("N"), nb::arg("d"), nb::arg("D"), nb::arg("dtype"),
        nb::arg("stream_ptr"), nb::arg("workspace_ptr"), nb::arg("workspace_bytes"),
        "Candidate (not yet run on a GPU): fp32 [B, N] contrib scores in the Gram form on tensor cores; asynchronous.");
#endif
}
