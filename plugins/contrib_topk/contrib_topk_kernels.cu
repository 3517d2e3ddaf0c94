// SPDX-FileCopyrightText: Copyright (c) 2026 The capa-export authors
// SPDX-License-Identifier: Apache-2.0
//
// CUDA kernels of CapaContribTopK (launch API: contrib_topk.h).
//
// Scores, one of three kernels by variant, written to the workspace as fp32 [B, N]:
//   contrib     one block per (batch, tile of JT keys). For every tile of kTileD output columns
//               it builds U_j^h = v_j^h W_O^h for all heads in shared memory and accumulates the
//               per-key H x H Gram matrix G_j = U_j U_j^T; then c_ij = sqrt(a_ij^T G_j a_ij) is
//               summed over the queries. Working set: shared memory only, O(JT * H * (H + kTileD)).
//   value_norm  one warp per (batch, kv head, key) computes ||v_j^h||, then the attention sum
//               weighted by it.
//   attention   per (batch, 16 keys): 32 row groups sum a over heads and queries, then one thread per key.
// Top-k: one block per batch row, any N: a 4-pass radix select (8 bits per pass) finds the k-th
// largest score; a block-wide scan then writes the kept indices in ascending order, taking the
// lowest-index elements among those equal to the threshold (torch's stable-sort tie rule). The
// key order and the per-pass bin choice live in contrib_topk_select.h, shared with the host
// emulation that tests the algorithm without a GPU.
//
// Every per-key reduction runs in an order that does not depend on the key's position, so two
// identical keys get bit-identical scores and ties break by index, as in the reference.
#include "contrib_topk.h"
#include "contrib_topk_select.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <mutex>

namespace {

// The calling thread's description of its last failure (see capa_last_error_message).
thread_local char t_last_error[512];

void clear_error() { t_last_error[0] = '\0'; }

int cuda_failure(const char* what, cudaError_t err) {
    std::snprintf(t_last_error, sizeof t_last_error, "%s failed: %s (%s)", what, cudaGetErrorString(err),
        cudaGetErrorName(err));
    return CAPA_ERR_CUDA;
}

// A launch's error: the launch configuration's, or a sticky error of earlier work on the device.
int check_launch(const char* kernel) {
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? CAPA_OK : cuda_failure(kernel, err);
}

constexpr int kThreads = 256;                  // contrib kernel block size
constexpr int kTileD = 64;                     // output columns (of D) per step
constexpr int kTileK = 32;                     // inner-dimension (of d) chunk
constexpr int kHeadGroups = kThreads / kTileD; // heads computed concurrently
constexpr int kTopkThreads = capa_select::kTopkThreads;
constexpr int kRowThreads = 256;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

size_t align_up(size_t bytes) { return (bytes + 255) & ~static_cast<size_t>(255); }

// Shared-memory floats of the contrib kernel for JT keys per block.
size_t contrib_smem_floats(int jt, int heads) {
    const size_t h = static_cast<size_t>(heads);
    return jt * (h * h + 1)                               // Gram, padded stride per key
        + jt * h * (kTileD + 1)                           // U tile (reused for probs)
        + static_cast<size_t>(kHeadGroups) * kTileD * (kTileK + 1) // W_O tile (reused for c_ij)
        + static_cast<size_t>(kHeadGroups) * jt * kTileK; // v tile
}

// minBlocksPerSM = 1: shared memory (JT * H * (H + kTileD) floats) already limits residency to one
// or two blocks per SM, so registers are not the constraint. With __launch_bounds__(kThreads) alone
// ptxas aims at more resident blocks, caps the kernel at 64 registers and spills acc[] (ptxas -v,
// sm_90); `make cuda-check` fails on any spill here.
template <typename T, int JT>
__global__ void __launch_bounds__(kThreads, 1) contrib_scores_kernel(const T* __restrict__ probs,
    const T* __restrict__ values, const T* __restrict__ o_weight, float* __restrict__ scores, int H, int H_kv,
    int Q, int N, int d, int D) {
    extern __shared__ float smem[];
    const int gram_stride = H * H + 1;
    float* gram = smem;
    float* u_s = gram + JT * gram_stride;
    float* w_s = u_s + JT * H * (kTileD + 1);
    float* v_s = w_s + kHeadGroups * kTileD * (kTileK + 1);

    const int b = blockIdx.y;
    const int j0 = blockIdx.x * JT;
    const int tid = threadIdx.x;
    const int col = tid % kTileD;
    const int hg = tid / kTileD;
    const int group = H / H_kv;
    const size_t hd = static_cast<size_t>(H) * d;

    for (int e = tid; e < JT * gram_stride; e += kThreads) gram[e] = 0.0f;

    for (int c0 = 0; c0 < D; c0 += kTileD) {
        // U tile: u_s[jj][h][c] = sum_t v[b, h/group, j0+jj, t] * o_weight[c0+c, h*d + t]
        for (int hbase = 0; hbase < H; hbase += kHeadGroups) {
            const int h = hbase + hg;
            float acc[JT];
#pragma unroll
            for (int jj = 0; jj < JT; ++jj) acc[jj] = 0.0f;
            for (int t0 = 0; t0 < d; t0 += kTileK) {
                __syncthreads(); // previous readers of w_s / v_s / u_s are done
                for (int e = tid; e < kHeadGroups * kTileD * kTileK; e += kThreads) {
                    const int t = e % kTileK;
                    const int c = (e / kTileK) % kTileD;
                    const int g = e / (kTileK * kTileD);
                    const int hh = hbase + g, cc = c0 + c, tt = t0 + t;
                    float x = 0.0f;
                    if (hh < H && cc < D && tt < d) x = to_float(o_weight[static_cast<size_t>(cc) * hd + static_cast<size_t>(hh) * d + tt]);
                    w_s[(g * kTileD + c) * (kTileK + 1) + t] = x;
                }
                for (int e = tid; e < kHeadGroups * JT * kTileK; e += kThreads) {
                    const int t = e % kTileK;
                    const int jj = (e / kTileK) % JT;
                    const int g = e / (kTileK * JT);
                    const int hh = hbase + g, j = j0 + jj, tt = t0 + t;
                    float x = 0.0f;
                    if (hh < H && j < N && tt < d)
                        x = to_float(values[((static_cast<size_t>(b) * H_kv + hh / group) * N + j) * d + tt]);
                    v_s[(g * JT + jj) * kTileK + t] = x;
                }
                __syncthreads();
                const float* w_row = w_s + (hg * kTileD + col) * (kTileK + 1);
                const float* v_rows = v_s + hg * JT * kTileK;
#pragma unroll 8
                for (int t = 0; t < kTileK; ++t) {
                    const float wv = w_row[t];
#pragma unroll
                    for (int jj = 0; jj < JT; ++jj) acc[jj] = fmaf(v_rows[jj * kTileK + t], wv, acc[jj]);
                }
            }
            if (h < H) {
#pragma unroll
                for (int jj = 0; jj < JT; ++jj) u_s[(jj * H + h) * (kTileD + 1) + col] = acc[jj];
            }
        }
        __syncthreads();
        // Gram: G_j[h][g] += sum_c U[j][h][c] * U[j][g][c]  (columns past D are zero)
        for (int e = tid; e < JT * H * H; e += kThreads) {
            const int jj = e / (H * H);
            const int r = e % (H * H);
            const int h = r / H, g = r % H;
            const float* p = u_s + (jj * H + h) * (kTileD + 1);
            const float* q = u_s + (jj * H + g) * (kTileD + 1);
            float s = 0.0f;
#pragma unroll 8
            for (int c = 0; c < kTileD; ++c) s = fmaf(p[c], q[c], s);
            gram[jj * gram_stride + r] += s;
        }
        __syncthreads();
    }

    // c_ij = sqrt(a^T G_j a), summed over queries in chunks of kQChunk.
    constexpr int kQChunk = kTileD;
    float* a_s = u_s; // [h][qi][jj], JT * H * kQChunk floats <= U tile size
    float* c_s = w_s; // [qi][jj], JT * kQChunk floats <= W tile size
    float total = 0.0f;
    for (int i0 = 0; i0 < Q; i0 += kQChunk) {
        __syncthreads();
        for (int e = tid; e < JT * H * kQChunk; e += kThreads) {
            const int jj = e % JT;
            const int qi = (e / JT) % kQChunk;
            const int h = e / (JT * kQChunk);
            const int i = i0 + qi, j = j0 + jj;
            float x = 0.0f;
            if (i < Q && j < N) x = to_float(probs[((static_cast<size_t>(b) * H + h) * Q + i) * N + j]);
            a_s[e] = x;
        }
        __syncthreads();
        for (int p = tid; p < JT * kQChunk; p += kThreads) {
            const int jj = p % JT;
            const int qi = p / JT;
            const float* G = gram + jj * gram_stride;
            float quad = 0.0f;
            for (int h = 0; h < H; ++h) {
                const float ah = a_s[(h * kQChunk + qi) * JT + jj];
                if (ah == 0.0f) continue;
                float row = 0.0f;
                for (int g = 0; g < H; ++g) row = fmaf(G[h * H + g], a_s[(g * kQChunk + qi) * JT + jj], row);
                quad = fmaf(ah, row, quad);
            }
            // Not fmaxf(quad, 0): it returns 0 for a NaN quad, which would drop a NaN key instead of
            // ranking it first as the reference (std::max, clamp_min) does.
            c_s[p] = (i0 + qi < Q) ? sqrtf(quad < 0.0f ? 0.0f : quad) : 0.0f;
        }
        __syncthreads();
        if (tid < JT) {
            for (int qi = 0; qi < kQChunk; ++qi) total += c_s[qi * JT + tid];
        }
    }
    if (tid < JT && j0 + tid < N) scores[static_cast<size_t>(b) * N + j0 + tid] = total;
}

template <typename T>
__global__ void value_norms_kernel(const T* __restrict__ values, float* __restrict__ norms, long long rows, int d) {
    const long long row = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return; // whole warps exit together: rows are warp-aligned
    const T* v = values + row * d;
    float sq = 0.0f;
    for (int t = lane; t < d; t += 32) {
        const float x = to_float(v[t]);
        sq = fmaf(x, x, sq);
    }
    for (int o = 16; o > 0; o >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, o);
    if (lane == 0) norms[row] = sqrtf(sq);
}

// attention (norms == nullptr) and value_norm: score[b, j] = sum_h norm_h(j) sum_i a[b, h, i, j].
// One block per (batch row, 16 keys), 32 row groups: thread (group, key) sums rows group, group + 32,
// ... of the H*Q rows, then one thread per key adds the 32 partial sums in group order. A thread
// per key over all H*Q rows (the first version) left 3 blocks busy at N = 576 and ran H*Q dependent
// loads each; every key still sums in the same order wherever it sits (ties stay bit-equal).
constexpr int kSumKeys = 16;      // half a warp: 32-byte row segments in fp16/bf16
constexpr int kSumRowGroups = 32;
template <typename T>
__global__ void __launch_bounds__(kSumKeys * kSumRowGroups) weighted_attention_kernel(const T* __restrict__ probs,
    const float* __restrict__ norms, float* __restrict__ scores, int H, int H_kv, int Q, int N) {
    __shared__ float partial[kSumRowGroups][kSumKeys + 1];
    const int b = blockIdx.y;
    const int lane = threadIdx.x % kSumKeys;
    const int row_group = threadIdx.x / kSumKeys;
    const int j = blockIdx.x * kSumKeys + lane;
    const int group = H / H_kv;
    const int rows = H * Q; // row r = h * Q + i of probs[b]
    float sum = 0.0f;
    if (j < N) {
        const T* a = probs + static_cast<size_t>(b) * rows * N + j;
        for (int r = row_group; r < rows; r += kSumRowGroups) {
            const float weight = norms ? norms[(static_cast<size_t>(b) * H_kv + (r / Q) / group) * N + j] : 1.0f;
            sum = fmaf(to_float(a[static_cast<size_t>(r) * N]), weight, sum);
        }
    }
    partial[row_group][lane] = sum;
    __syncthreads();
    if (row_group == 0 && j < N) {
        float total = 0.0f;
        for (int g = 0; g < kSumRowGroups; ++g) total += partial[g][lane];
        scores[static_cast<size_t>(b) * N + j] = total;
    }
}

// Exclusive block scan of one int per thread; *total receives the block sum. All threads call.
__device__ int block_exclusive_scan(int value, int* warp_sums /* 33 */, int* total) {
    const int lane = threadIdx.x % 32;
    const int warp = threadIdx.x / 32;
    const int nwarps = blockDim.x / 32;
    int x = value;
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) warp_sums[warp] = x;
    __syncthreads();
    if (warp == 0) {
        const int w = lane < nwarps ? warp_sums[lane] : 0;
        int incl = w;
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += y;
        }
        warp_sums[lane] = incl - w;
        if (lane == 31) warp_sums[32] = incl;
    }
    __syncthreads();
    const int result = x - value + warp_sums[warp];
    *total = warp_sums[32];
    __syncthreads(); // warp_sums is reused by the next call
    return result;
}

__global__ void __launch_bounds__(kTopkThreads) topk_kernel(const float* __restrict__ scores, int N, int k,
    int32_t* __restrict__ out) {
    __shared__ uint32_t hist[capa_select::kBins];
    __shared__ uint32_t s_bin;
    __shared__ int s_remaining;
    __shared__ int warp_sums[33];
    const int b = blockIdx.x;
    const int tid = threadIdx.x;
    const float* row = scores + static_cast<size_t>(b) * N;

    // Radix select of the k-th largest key, most significant byte first.
    uint32_t prefix = 0, mask = 0;
    int remaining = k; // rank of the target among the keys matching prefix under mask
    for (int shift = capa_select::kFirstShift; shift >= 0; shift -= capa_select::kRadixBits) {
        for (int i = tid; i < capa_select::kBins; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        for (int j = tid; j < N; j += blockDim.x) {
            const uint32_t key = capa_select::ordered_key(row[j]);
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & (capa_select::kBins - 1)], 1u);
        }
        __syncthreads();
        if (tid == 0) {
            int in_bin = 0;
            s_bin = capa_select::select_bin(hist, remaining, &in_bin);
            s_remaining = in_bin;
        }
        __syncthreads();
        prefix |= s_bin << shift;
        mask |= static_cast<uint32_t>(capa_select::kBins - 1) << shift;
        remaining = s_remaining;
        __syncthreads();
    }
    // Now: #keys > prefix == k - remaining, and #keys == prefix >= remaining.
    const uint32_t threshold = prefix;
    int eq_base = 0, out_base = 0;
    for (int base = 0; base < N; base += blockDim.x) {
        const int j = base + tid;
        const uint32_t key = j < N ? capa_select::ordered_key(row[j]) : 0u;
        const int gt = (j < N && key > threshold) ? 1 : 0;
        const int eq = (j < N && key == threshold) ? 1 : 0;
        int eq_total = 0;
        const int eq_rank = block_exclusive_scan(eq, warp_sums, &eq_total);
        const int keep = (gt || (eq && eq_base + eq_rank < remaining)) ? 1 : 0;
        int keep_total = 0;
        const int pos = block_exclusive_scan(keep, warp_sums, &keep_total);
        if (keep) out[static_cast<size_t>(b) * k + out_base + pos] = j;
        eq_base += eq_total;
        out_base += keep_total;
    }
}

// Keys per block (8, 4, 2 or 1) of the contrib kernel for H heads under `limit` bytes of shared
// memory; 0 when even one key does not fit. More keys per block, fewer re-reads of W_O.
int contrib_keys_per_block(int heads, size_t limit) {
    for (int jt = 8; jt >= 1; jt /= 2)
        if (contrib_smem_floats(jt, heads) * sizeof(float) <= limit) return jt;
    return 0;
}

// The device's opt-in shared memory per block: what the contrib kernel may use (it declares no
// static shared memory, so the whole opt-in amount is available to the dynamic allocation).
int device_smem_limit(int device, int* smem_limit) {
    const cudaError_t err = cudaDeviceGetAttribute(smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    return err == cudaSuccess ? CAPA_OK : cuda_failure("cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)", err);
}

int unsupported_heads(int heads, int device, int smem_limit) {
    std::snprintf(t_last_error, sizeof t_last_error,
        "contrib with H=%d heads needs %zu bytes of shared memory per block; device %d allows %d, so H <= %d",
        heads, contrib_smem_floats(1, heads) * sizeof(float), device, smem_limit,
        static_cast<int>(capa_contrib_max_heads(static_cast<size_t>(smem_limit))));
    return CAPA_ERR_UNSUPPORTED;
}

// cudaFuncSetAttribute is per (function, device): done once per device for each kernel
// instantiation, under a lock, always with the device's full opt-in amount. Every caller asks for
// the same value, so two plugin instances with different H (or two threads) cannot undo each
// other's setting between the attribute call and the launch, and no enqueue pays for it twice.
struct SmemOptIn {
    static constexpr int kTrackedDevices = 64; // devices beyond: set under the lock every launch
    std::mutex mutex;
    std::atomic<uint64_t> done{0};
};

template <typename Kernel>
int allow_opt_in_smem(Kernel kernel, SmemOptIn& state, int device, int smem_limit) {
    const uint64_t bit = device < SmemOptIn::kTrackedDevices ? (uint64_t{1} << device) : 0;
    if (bit != 0 && (state.done.load(std::memory_order_acquire) & bit) != 0) return CAPA_OK;
    std::lock_guard<std::mutex> lock(state.mutex);
    if (bit != 0 && (state.done.load(std::memory_order_relaxed) & bit) != 0) return CAPA_OK;
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_limit);
    if (err != cudaSuccess) return cuda_failure("cudaFuncSetAttribute(MaxDynamicSharedMemorySize)", err);
    state.done.fetch_or(bit, std::memory_order_release);
    return CAPA_OK;
}

template <typename T, int JT>
int launch_contrib(const void* probs, const void* values, const void* o_weight, float* scores,
    const capa_contrib_topk_shape& s, int device, int smem_limit, cudaStream_t stream) {
    static SmemOptIn opt_in; // one per instantiation, i.e. per kernel
    auto kernel = contrib_scores_kernel<T, JT>;
    const int rc = allow_opt_in_smem(kernel, opt_in, device, smem_limit);
    if (rc != CAPA_OK) return rc;
    const size_t smem = contrib_smem_floats(JT, s.H) * sizeof(float);
    const dim3 grid((s.N + JT - 1) / JT, s.B);
    kernel<<<grid, kThreads, smem, stream>>>(static_cast<const T*>(probs), static_cast<const T*>(values),
        static_cast<const T*>(o_weight), scores, s.H, s.H_kv, s.Q, s.N, s.d, s.D);
    return check_launch("contrib_scores_kernel launch");
}

template <typename T>
int launch_scores_typed(const void* probs, const void* values, const void* o_weight, float* scores,
    const capa_contrib_topk_shape& s, int variant, float* norms, cudaStream_t stream) {
    if (variant == CAPA_VARIANT_CONTRIB) {
        int device = 0, smem_limit = 0;
        const cudaError_t err = cudaGetDevice(&device);
        if (err != cudaSuccess) return cuda_failure("cudaGetDevice", err);
        const int rc = device_smem_limit(device, &smem_limit);
        if (rc != CAPA_OK) return rc;
        switch (contrib_keys_per_block(s.H, static_cast<size_t>(smem_limit))) {
        case 8: return launch_contrib<T, 8>(probs, values, o_weight, scores, s, device, smem_limit, stream);
        case 4: return launch_contrib<T, 4>(probs, values, o_weight, scores, s, device, smem_limit, stream);
        case 2: return launch_contrib<T, 2>(probs, values, o_weight, scores, s, device, smem_limit, stream);
        case 1: return launch_contrib<T, 1>(probs, values, o_weight, scores, s, device, smem_limit, stream);
        default: return unsupported_heads(s.H, device, smem_limit);
        }
    }
    if (variant == CAPA_VARIANT_VALUE_NORM) {
        const long long rows = static_cast<long long>(s.B) * s.H_kv * s.N;
        const long long blocks = (rows * 32 + kRowThreads - 1) / kRowThreads;
        value_norms_kernel<T><<<static_cast<unsigned>(blocks), kRowThreads, 0, stream>>>(
            static_cast<const T*>(values), norms, rows, s.d);
        const int rc = check_launch("value_norms_kernel launch");
        if (rc != CAPA_OK) return rc;
    }
    const dim3 grid((s.N + kSumKeys - 1) / kSumKeys, s.B);
    weighted_attention_kernel<T><<<grid, kSumKeys * kSumRowGroups, 0, stream>>>(static_cast<const T*>(probs),
        variant == CAPA_VARIANT_VALUE_NORM ? norms : nullptr, scores, s.H, s.H_kv, s.Q, s.N);
    return check_launch("weighted_attention_kernel launch");
}

// ---- Candidate: contrib scores in the Gram form on tensor cores (issue 16; NOT YET RUN ON A GPU) ----
// With M = o_weight^T o_weight ([H*d, H*d], precomputed) and K[h,g] = M's (h, g) block of d x d,
// the per-key Gram matrix of the direct form is G_j[h,g] = v_j^h^T K[h,g] v_j^g. One block of
// gram_form_kernel takes 64 keys, one head g and up to 256 columns of M (256 / d heads h >= g,
// M symmetric: half the work) and computes Z = V^g_tile (64 x d) . M[g rows, h cols] (d x 256)
// with wmma 16x16x16 (fp16/bf16 in, fp32 accumulate); the epilogue dots each d-segment of Z with
// v_j^h and writes G_j[h,g] and G_j[g,h] (fp32, to the workspace). gram_quad_kernel then sums
// sqrt(a_ij^T G_j a_ij) over the queries. Work: N * H(H+1)/2 * d^2 MACs (5.0 G at LLaVA-1.5-7B's
// N = 576) instead of the direct form's N * H * d * D + N * H^2 * D (12.1 G); no U is stored.
// Every key's reduction runs in the same order wherever it sits in a tile: ties stay bit-equal.
constexpr int kGramKeys = 64;     // keys (product rows) per block
constexpr int kGramCols = 256;    // product columns per block: 256 / d heads
constexpr int kGramThreads = 256; // 8 warps: 4 groups of 16 keys x 2 halves of 128 columns
constexpr int kGramPadHalf = 8;   // smem row padding in 16-bit elements (wmma: ldm % 8 == 0)
constexpr int kGramPadFloat = 4;  // smem row padding in floats (wmma: ldm % 4 == 0)
constexpr int kQuadThreads = 64;

// Dynamic shared memory of gram_form_kernel: the V and M tiles, then Z aliased over them.
size_t gram_form_smem_bytes(int d) {
    const size_t tiles = (static_cast<size_t>(kGramKeys) * (d + kGramPadHalf) +
                          static_cast<size_t>(d) * (kGramCols + kGramPadHalf)) * 2;
    const size_t z = static_cast<size_t>(kGramKeys) * (kGramCols + kGramPadFloat) * sizeof(float);
    return tiles > z ? tiles : z;
}

size_t gram_quad_smem_bytes(int heads) {
    return (static_cast<size_t>(heads) * heads + static_cast<size_t>(heads) * kQuadThreads) * sizeof(float);
}

// Largest H whose quad kernel fits the default 48 KiB (dynamic + its static kQuadThreads floats): 83.
int gram_max_heads() {
    int heads = 0;
    while (gram_quad_smem_bytes(heads + 1) + kQuadThreads * sizeof(float) <= 48 * 1024) ++heads;
    return heads;
}

template <typename T>
__global__ void __launch_bounds__(kGramThreads) gram_form_kernel(const T* __restrict__ values,
    const T* __restrict__ o_gram, float* __restrict__ gram, int H, int H_kv, int N, int d, int slices) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap(); // wmma has no bf16 fragments before sm_80; launch_gram_typed refuses such devices
#else
    namespace wmma = nvcuda::wmma;
    extern __shared__ __align__(128) unsigned char gram_smem[];
    const int heads_per_block = kGramCols / d;
    const int g = blockIdx.y;
    const int b = blockIdx.z / slices;
    const int h0 = (blockIdx.z % slices) * heads_per_block;
    if (h0 + heads_per_block - 1 < g) return; // every head of this block is below g: the mirror's
    const int j0 = blockIdx.x * kGramKeys;
    const int tid = threadIdx.x;
    const int group = H / H_kv;
    const size_t HD = static_cast<size_t>(H) * d;
    const int ldv = d + kGramPadHalf, ldm = kGramCols + kGramPadHalf, ldz = kGramCols + kGramPadFloat;
    T* v_s = reinterpret_cast<T*>(gram_smem);
    T* m_s = v_s + static_cast<size_t>(kGramKeys) * ldv;
    float* z_s = reinterpret_cast<float*>(gram_smem); // after the products: aliases v_s and m_s

    // V^g tile: 64 keys x d, 8 elements (16 bytes) per load; keys past N are zero.
    const T* v_g = values + (static_cast<size_t>(b) * H_kv + g / group) * N * d;
    const int d8 = d / 8;
    for (int e = tid; e < kGramKeys * d8; e += kGramThreads) {
        const int r = e / d8, c = (e % d8) * 8, j = j0 + r;
        uint4 x = make_uint4(0, 0, 0, 0);
        if (j < N) x = *reinterpret_cast<const uint4*>(v_g + static_cast<size_t>(j) * d + c);
        *reinterpret_cast<uint4*>(v_s + r * ldv + c) = x;
    }
    // M tile: rows g*d .. g*d+d-1, columns h0*d .. h0*d+255; columns past H*d are zero.
    const T* m_g = o_gram + static_cast<size_t>(g) * d * HD + static_cast<size_t>(h0) * d;
    for (int e = tid; e < d * (kGramCols / 8); e += kGramThreads) {
        const int t = e / (kGramCols / 8), c = (e % (kGramCols / 8)) * 8;
        uint4 x = make_uint4(0, 0, 0, 0);
        if (static_cast<size_t>(h0) * d + c < HD) x = *reinterpret_cast<const uint4*>(m_g + t * HD + c);
        *reinterpret_cast<uint4*>(m_s + t * ldm + c) = x;
    }
    __syncthreads();

    const int warp = tid / 32;
    const int row0 = (warp % 4) * 16;
    const int col0 = (warp / 4) * (kGramCols / 2);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kGramCols / 32];
#pragma unroll
    for (int f = 0; f < kGramCols / 32; ++f) wmma::fill_fragment(acc[f], 0.0f);
    for (int k0 = 0; k0 < d; k0 += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::load_matrix_sync(a, v_s + row0 * ldv + k0, ldv);
#pragma unroll
        for (int f = 0; f < kGramCols / 32; ++f) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> m;
            wmma::load_matrix_sync(m, m_s + k0 * ldm + col0 + 16 * f, ldm);
            wmma::mma_sync(acc[f], a, m, acc[f]);
        }
    }
    __syncthreads(); // every warp is done with v_s / m_s before z_s overwrites them
#pragma unroll
    for (int f = 0; f < kGramCols / 32; ++f)
        wmma::store_matrix_sync(z_s + row0 * ldz + col0 + 16 * f, acc[f], ldz, wmma::mem_row_major);
    __syncthreads();

    // G_j[h,g] = Z_j[(h - h0) d : (h - h0 + 1) d] . v_j^h, t ascending; mirrored to G_j[g,h].
    const int heads_here = min(heads_per_block, H - h0);
    for (int e = tid; e < kGramKeys * heads_here; e += kGramThreads) {
        const int jj = e % kGramKeys, hl = e / kGramKeys;
        const int h = h0 + hl, j = j0 + jj;
        if (j >= N || h < g) continue;
        const T* v_h = values + ((static_cast<size_t>(b) * H_kv + h / group) * N + j) * d;
        const float* z = z_s + jj * ldz + hl * d;
        float sum = 0.0f;
        for (int t = 0; t < d; ++t) sum = fmaf(z[t], to_float(v_h[t]), sum);
        float* G = gram + (static_cast<size_t>(b) * N + j) * H * H;
        G[h * H + g] = sum;
        G[g * H + h] = sum;
    }
#endif
}

// scores[b, j] = sum_i sqrt(a_ij^T G_j a_ij): one block of kQuadThreads per (key, batch row).
template <typename T>
__global__ void __launch_bounds__(kQuadThreads) gram_quad_kernel(const T* __restrict__ probs,
    const float* __restrict__ gram, float* __restrict__ scores, int H, int Q, int N) {
    extern __shared__ float quad_smem[];
    __shared__ float partial[kQuadThreads];
    float* g_s = quad_smem;          // H x H
    float* a_s = quad_smem + H * H;  // H x kQuadThreads: this thread's query, every head
    const int j = blockIdx.x, b = blockIdx.y, tid = threadIdx.x;
    const float* G = gram + (static_cast<size_t>(b) * N + j) * H * H;
    for (int e = tid; e < H * H; e += kQuadThreads) g_s[e] = G[e];
    __syncthreads();
    float total = 0.0f;
    for (int i0 = 0; i0 < Q; i0 += kQuadThreads) {
        const int i = i0 + tid;
        for (int h = 0; h < H; ++h)
            a_s[h * kQuadThreads + tid] = i < Q ? to_float(probs[((static_cast<size_t>(b) * H + h) * Q + i) * N + j]) : 0.0f;
        float quad = 0.0f;
        for (int h = 0; h < H; ++h) {
            float row = 0.0f;
            for (int g = 0; g < H; ++g) row = fmaf(g_s[h * H + g], a_s[g * kQuadThreads + tid], row);
            quad = fmaf(a_s[h * kQuadThreads + tid], row, quad);
        }
        if (i < Q) total += sqrtf(quad < 0.0f ? 0.0f : quad); // NaN stays NaN
    }
    partial[tid] = total;
    __syncthreads();
    if (tid == 0) {
        float sum = 0.0f;
        for (int t = 0; t < kQuadThreads; ++t) sum += partial[t];
        scores[static_cast<size_t>(b) * N + j] = sum;
    }
}

template <typename T>
int launch_gram_typed(const void* probs, const void* values, const void* o_gram, float* scores, float* gram,
    const capa_contrib_topk_shape& s, cudaStream_t stream) {
    int device = 0, smem_limit = 0, major = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return cuda_failure("cudaGetDevice", err);
    err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    if (err != cudaSuccess) return cuda_failure("cudaDeviceGetAttribute(ComputeCapabilityMajor)", err);
    if (major < 8) {
        std::snprintf(t_last_error, sizeof t_last_error, "the gram form needs compute capability 8.0 or newer "
            "(bf16 tensor-core fragments); device %d is %d.x", device, major);
        return CAPA_ERR_UNSUPPORTED;
    }
    int rc = device_smem_limit(device, &smem_limit);
    if (rc != CAPA_OK) return rc;
    const size_t form_smem = gram_form_smem_bytes(s.d);
    if (form_smem > static_cast<size_t>(smem_limit)) {
        std::snprintf(t_last_error, sizeof t_last_error,
            "gram form with d=%d needs %zu bytes of shared memory per block; device %d allows %d", s.d, form_smem,
            device, smem_limit);
        return CAPA_ERR_UNSUPPORTED;
    }
    static SmemOptIn opt_in;
    rc = allow_opt_in_smem(gram_form_kernel<T>, opt_in, device, smem_limit);
    if (rc != CAPA_OK) return rc;
    const int slices = (s.H + kGramCols / s.d - 1) / (kGramCols / s.d);
    const dim3 form_grid((s.N + kGramKeys - 1) / kGramKeys, s.H, s.B * slices);
    gram_form_kernel<T><<<form_grid, kGramThreads, form_smem, stream>>>(static_cast<const T*>(values),
        static_cast<const T*>(o_gram), gram, s.H, s.H_kv, s.N, s.d, slices);
    rc = check_launch("gram_form_kernel launch");
    if (rc != CAPA_OK) return rc;
    gram_quad_kernel<T><<<dim3(s.N, s.B), kQuadThreads, gram_quad_smem_bytes(s.H), stream>>>(
        static_cast<const T*>(probs), gram, scores, s.H, s.Q, s.N);
    return check_launch("gram_quad_kernel launch");
}

size_t scores_bytes(const capa_contrib_topk_shape& s) {
    return align_up(static_cast<size_t>(s.B) * s.N * sizeof(float));
}

size_t scratch_bytes(const capa_contrib_topk_shape& s, int variant) {
    return variant == CAPA_VARIANT_VALUE_NORM ? align_up(static_cast<size_t>(s.B) * s.H_kv * s.N * sizeof(float)) : 0;
}

} // namespace

extern "C" {

const char* capa_last_error_message(void) { return t_last_error; }

int32_t capa_contrib_max_heads(size_t smem_optin_bytes) {
    int32_t heads = 0;
    while (contrib_keys_per_block(heads + 1, smem_optin_bytes) > 0) ++heads;
    return heads;
}

int capa_contrib_topk_check_device(const capa_contrib_topk_shape* shape, int variant, int device) {
    clear_error();
    const int status = capa_contrib_topk_check(shape, variant, CAPA_DTYPE_FP32);
    if (status != CAPA_OK || variant != CAPA_VARIANT_CONTRIB) return status;
    int smem_limit = 0;
    const int rc = device_smem_limit(device, &smem_limit);
    if (rc != CAPA_OK) return rc;
    if (contrib_keys_per_block(shape->H, static_cast<size_t>(smem_limit)) == 0)
        return unsupported_heads(shape->H, device, smem_limit);
    return CAPA_OK;
}

size_t capa_contrib_topk_workspace_size(const capa_contrib_topk_shape* shape, int variant) {
    if (shape == nullptr) return 0;
    return scores_bytes(*shape) + scratch_bytes(*shape, variant);
}

int capa_contribution_scores_launch(const void* probs, const void* values, const void* o_weight,
    float* scores_out, const capa_contrib_topk_shape* shape, int variant, int dtype, void* workspace,
    size_t workspace_size, void* stream) {
    // k is not used by the scores: validate the rest with k = 1.
    clear_error();
    if (shape == nullptr) return CAPA_ERR_SHAPE;
    capa_contrib_topk_shape s = *shape;
    s.k = 1;
    const int status = capa_contrib_topk_check(&s, variant, dtype);
    if (status != CAPA_OK) return status;
    if (s.B == 0) return CAPA_OK; // empty batch: a zero-block grid would be a launch error
    const size_t scratch = scratch_bytes(s, variant);
    if (scratch > 0 && (workspace == nullptr || workspace_size < scratch)) return CAPA_ERR_WORKSPACE;
    float* norms = static_cast<float*>(workspace);
    cudaStream_t st = static_cast<cudaStream_t>(stream);
    switch (dtype) {
    case CAPA_DTYPE_FP16: return launch_scores_typed<__half>(probs, values, o_weight, scores_out, s, variant, norms, st);
    case CAPA_DTYPE_BF16:
        return launch_scores_typed<__nv_bfloat16>(probs, values, o_weight, scores_out, s, variant, norms, st);
    default: return launch_scores_typed<float>(probs, values, o_weight, scores_out, s, variant, norms, st);
    }
}

int capa_topk_indices_launch(const float* scores, int32_t B, int32_t N, int32_t k, int32_t* out, void* stream) {
    clear_error();
    if (B < 0 || N <= 0 || k <= 0 || k > N) return CAPA_ERR_SHAPE;
    if (B == 0) return CAPA_OK;
    topk_kernel<<<B, kTopkThreads, 0, static_cast<cudaStream_t>(stream)>>>(scores, N, k, out);
    return check_launch("topk_kernel launch");
}

int capa_contrib_topk_launch(const void* probs, const void* values, const void* o_weight, int32_t* out,
    const capa_contrib_topk_shape* shape, int variant, int dtype, void* workspace, size_t workspace_size,
    void* stream) {
    clear_error();
    const int status = capa_contrib_topk_check(shape, variant, dtype);
    if (status != CAPA_OK) return status;
    if (shape->B == 0) return CAPA_OK; // empty batch: nothing to launch, no workspace needed
    const size_t need = capa_contrib_topk_workspace_size(shape, variant);
    if (workspace == nullptr || workspace_size < need) return CAPA_ERR_WORKSPACE;
    float* scores = static_cast<float*>(workspace);
    const size_t head = scores_bytes(*shape);
    int rc = capa_contribution_scores_launch(probs, values, o_weight, scores, shape, variant, dtype,
        static_cast<char*>(workspace) + head, workspace_size - head, stream);
    if (rc != CAPA_OK) return rc;
    return capa_topk_indices_launch(scores, shape->B, shape->N, shape->k, out, stream);
}

size_t capa_contrib_gram_workspace_size(const capa_contrib_topk_shape* shape) {
    if (shape == nullptr) return 0;
    return align_up(static_cast<size_t>(shape->B) * shape->N * shape->H * shape->H * sizeof(float));
}

int capa_contribution_scores_gram_launch(const void* probs, const void* values, const void* o_gram,
    float* scores_out, const capa_contrib_topk_shape* shape, int dtype, void* workspace, size_t workspace_size,
    void* stream) {
    clear_error();
    if (shape == nullptr) return CAPA_ERR_SHAPE;
    capa_contrib_topk_shape s = *shape;
    s.k = 1;
    const int status = capa_contrib_topk_check(&s, CAPA_VARIANT_CONTRIB, dtype);
    if (status != CAPA_OK) return status;
    if (dtype != CAPA_DTYPE_FP16 && dtype != CAPA_DTYPE_BF16) {
        std::snprintf(t_last_error, sizeof t_last_error, "the gram form runs fp16 and bf16 only (dtype code %d)", dtype);
        return CAPA_ERR_UNSUPPORTED;
    }
    if (s.d % 16 != 0 || kGramCols % s.d != 0) {
        std::snprintf(t_last_error, sizeof t_last_error, "the gram form needs d in {16, 32, 64, 128, 256}, got d=%d", s.d);
        return CAPA_ERR_UNSUPPORTED;
    }
    if (s.H > gram_max_heads()) {
        std::snprintf(t_last_error, sizeof t_last_error,
            "the gram form's quad kernel holds H*H + 64*H floats: H=%d is too many (H <= %d)", s.H, gram_max_heads());
        return CAPA_ERR_UNSUPPORTED;
    }
    const long long slices = (s.H + kGramCols / s.d - 1) / (kGramCols / s.d);
    if (static_cast<long long>(s.B) * slices > 65535) {
        std::snprintf(t_last_error, sizeof t_last_error,
            "the gram form's grid has B * ceil(H / (256 / d)) = %lld blocks in z; at most 65535", s.B * slices);
        return CAPA_ERR_UNSUPPORTED;
    }
    const auto misaligned = [](const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) != 0; };
    if (misaligned(values) || misaligned(o_gram)) {
        std::snprintf(t_last_error, sizeof t_last_error, "the gram form loads 16 bytes at a time: values and o_gram must be 16-byte aligned");
        return CAPA_ERR_UNSUPPORTED;
    }
    if (s.B == 0) return CAPA_OK;
    if (workspace == nullptr || workspace_size < capa_contrib_gram_workspace_size(&s)) return CAPA_ERR_WORKSPACE;
    float* gram = static_cast<float*>(workspace);
    cudaStream_t st = static_cast<cudaStream_t>(stream);
    if (dtype == CAPA_DTYPE_FP16) return launch_gram_typed<__half>(probs, values, o_gram, scores_out, gram, s, st);
    return launch_gram_typed<__nv_bfloat16>(probs, values, o_gram, scores_out, gram, s, st);
}

} // extern "C"
