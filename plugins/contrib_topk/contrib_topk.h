// SPDX-FileCopyrightText: Copyright (c) 2026 The capa-export authors
// SPDX-License-Identifier: Apache-2.0
//
// CapaContribTopK: C-style API of the CPU reference and of the CUDA launch functions.
// Name, version, namespace, attributes and codes: CapaContribTopK_PluginConfig.yaml (checked
// against this header by tests/test_op_spec.py).
//
// keep_indices[b, :] = the k visual keys with the largest CAPA contribution score, ascending,
// ties to the lower index. Semantics: capa_export/capa/scoring.py (the one definition).
//
//   probs    [B, H, Q, N]     attention probabilities
//   values   [B, H_kv, N, d]  head h reads kv head h / (H / H_kv)
//   o_weight [D, H*d]         nn.Linear layout: W_O^h = o_weight[:, h*d:(h+1)*d]^T
//   out      [B, k]           int32
//
// All three inputs share one element type (fp32, fp16, bf16); accumulation is fp32.
// B = 0 is valid: nothing is computed or launched (an empty batch of a dynamic-shape engine).
// Ranking: NaN scores rank above +inf (all NaNs equal), -0 equals +0, equal scores keep the lower
// index -- torch.sort(descending=True, stable=True)'s order.
// This header needs no CUDA header: streams are passed as void* (a cudaStream_t).
#ifndef CAPA_CONTRIB_TOPK_H
#define CAPA_CONTRIB_TOPK_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Integer encodings, shared with the ONNX/TensorRT INT attributes.
typedef enum capa_variant {
    CAPA_VARIANT_CONTRIB = 0,    // c_ij = || sum_h a_ij^h v_j^h W_O^h ||_2
    CAPA_VARIANT_VALUE_NORM = 1, // c_ij = sum_h a_ij^h || v_j^h ||_2
    CAPA_VARIANT_ATTENTION = 2   // c_ij = sum_h a_ij^h
} capa_variant;

typedef enum capa_dtype {
    CAPA_DTYPE_FP32 = 0,
    CAPA_DTYPE_FP16 = 1,
    CAPA_DTYPE_BF16 = 2
} capa_dtype;

typedef enum capa_status {
    CAPA_OK = 0,
    CAPA_ERR_SHAPE = 1,      // B < 0, another dimension <= 0, H % H_kv != 0, or k not in [1, N]
    CAPA_ERR_VARIANT = 2,    // variant not 0/1/2
    CAPA_ERR_DTYPE = 3,      // dtype not 0/1/2
    CAPA_ERR_WORKSPACE = 4,  // workspace null or smaller than capa_contrib_topk_workspace_size
    CAPA_ERR_UNSUPPORTED = 5, // shape beyond the kernels' limits on this GPU (contrib: H, see README)
    CAPA_ERR_CUDA = 6        // a CUDA call failed; capa_last_error_message() says which and why
} capa_status;

typedef struct capa_contrib_topk_shape {
    int32_t B, H, H_kv, Q, N, d, D, k;
} capa_contrib_topk_shape;

// Validates dimensions (not data). Returns CAPA_OK or the first error.
int capa_contrib_topk_check(const capa_contrib_topk_shape* shape, int variant, int dtype);

// Human-readable name of a capa_status value (static string).
const char* capa_status_string(int status);

// ---- CPU reference (contrib_topk_reference.cpp) -------------------------------------------
// Inputs are dense, row-major, of element type `dtype` (fp16/bf16 as raw 16-bit patterns).
// scores_out: B*N floats. Bounded scratch: O(H*D + H*H) floats per call.
int capa_contribution_scores_cpu(const void* probs, const void* values, const void* o_weight,
    const capa_contrib_topk_shape* shape, int variant, int dtype, float* scores_out);

// Top-k of a [B, N] score matrix: out[B, k] ascending indices, ties to the lower index.
int capa_topk_indices_cpu(const float* scores, int32_t B, int32_t N, int32_t k, int32_t* out);

// scores + top-k. out: B*k int32.
int capa_contrib_topk_cpu(const void* probs, const void* values, const void* o_weight,
    const capa_contrib_topk_shape* shape, int variant, int dtype, int32_t* out);

// ---- CUDA (contrib_topk_kernels.cu; present only when built with CUDA) ---------------------
// Every function below that returns CAPA_ERR_CUDA or CAPA_ERR_UNSUPPORTED first records, for the
// calling thread, which call failed and cudaGetErrorString's text (the CUDA error itself is
// consumed by the launcher, so cudaGetLastError() afterwards says "no error").
// Empty string after a call that succeeded.
const char* capa_last_error_message(void);

// Largest H (attention heads) the contrib scores kernel runs with `smem_optin_bytes` of shared
// memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin); 0 when none. Host-only arithmetic.
int32_t capa_contrib_max_heads(size_t smem_optin_bytes);

// Whether the kernels can run `shape` with `variant` on CUDA device `device`: CAPA_OK,
// CAPA_ERR_UNSUPPORTED (contrib: H above capa_contrib_max_heads for this device) or CAPA_ERR_CUDA
// (the device could not be queried). Shape/variant errors as capa_contrib_topk_check (dtype
// is not checked). For build time (TensorRT's configurePlugin), before any launch.
int capa_contrib_topk_check_device(const capa_contrib_topk_shape* shape, int variant, int device);

// Bytes of device workspace the launch needs (scores, and per-key norms for value_norm).
size_t capa_contrib_topk_workspace_size(const capa_contrib_topk_shape* shape, int variant);

// Enqueues the scores kernel(s) then the top-k kernel on `stream`; asynchronous.
// All pointers are device pointers; `workspace` holds >= capa_contrib_topk_workspace_size bytes,
// and its first B*N floats receive the scores.
int capa_contrib_topk_launch(const void* probs, const void* values, const void* o_weight,
    int32_t* out, const capa_contrib_topk_shape* shape, int variant, int dtype,
    void* workspace, size_t workspace_size, void* stream);

// Scores only: scores_out B*N floats on the device; workspace as above (may be null for
// contrib/attention; value_norm needs B*H_kv*N floats of scratch in it).
int capa_contribution_scores_launch(const void* probs, const void* values, const void* o_weight,
    float* scores_out, const capa_contrib_topk_shape* shape, int variant, int dtype,
    void* workspace, size_t workspace_size, void* stream);

// Block-level top-k over a device [B, N] score matrix (one block per row, any N).
int capa_topk_indices_launch(const float* scores, int32_t B, int32_t N, int32_t k, int32_t* out,
    void* stream);

// ---- Candidate, not yet run on a GPU (issue 16): the contrib scores in the Gram form ---------
// o_gram [H*d, H*d] = o_weight^T o_weight (the blocks K[h,g] = W_O^h W_O^g^T), in the inputs'
// dtype, precomputed by the caller. Tensor cores (wmma): fp16/bf16 only, d in {16, 32, 64, 128,
// 256} (256: sm_90's shared memory only), H <= 83, B * ceil(H / (256 / d)) <= 65535, compute
// capability 8.0+, values and o_gram 16-byte aligned; otherwise CAPA_ERR_UNSUPPORTED with the reason
// in capa_last_error_message(). Not used by the plugin or the torch op: bench_contrib_topk.py and
// the op test's CUDA column measure it against the kernels above.
// Workspace: B*N*H*H floats (the per-key Gram matrices).
size_t capa_contrib_gram_workspace_size(const capa_contrib_topk_shape* shape);

int capa_contribution_scores_gram_launch(const void* probs, const void* values, const void* o_gram,
    float* scores_out, const capa_contrib_topk_shape* shape, int dtype, void* workspace,
    size_t workspace_size, void* stream);

#ifdef __cplusplus
}
#endif

#endif // CAPA_CONTRIB_TOPK_H
