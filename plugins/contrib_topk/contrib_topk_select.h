// SPDX-FileCopyrightText: Copyright (c) 2026 The capa-export authors
// SPDX-License-Identifier: Apache-2.0
//
// The order and the radix-select step of the top-k kernel, as host+device functions: the CUDA
// kernel (contrib_topk_kernels.cu) and its host emulation (test/topk_emulation.cpp, run by
// tests/test_topk_emulation.py on machines without a GPU) compile this same code.
#ifndef CAPA_CONTRIB_TOPK_SELECT_H
#define CAPA_CONTRIB_TOPK_SELECT_H

#include <stdint.h>

#if defined(__CUDACC__)
#define CAPA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#include <string.h>
#define CAPA_HOST_DEVICE inline
#endif

namespace capa_select {

constexpr int kTopkThreads = 1024; // one block per batch row; also the write-out chunk
constexpr int kRadixBits = 8;
constexpr int kBins = 1 << kRadixBits;
constexpr int kFirstShift = 32 - kRadixBits; // most significant byte first, 4 passes

// Order-preserving map float -> uint32: a larger score gets a larger key. -0 and +0 share a key;
// every NaN (either sign, any payload) gets the largest key, so NaN ranks above +inf and NaNs tie
// (broken by index) -- torch.sort's order. Without the NaN rule a negative NaN would rank below
// -inf and two NaN payloads would not tie.
CAPA_HOST_DEVICE uint32_t ordered_key(float f) {
    if (f != f) return 0xffffffffu;
    if (f == 0.0f) f = 0.0f;
    uint32_t bits;
#if defined(__CUDA_ARCH__)
    bits = __float_as_uint(f);
#else
    memcpy(&bits, &f, sizeof bits);
#endif
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// One radix-select step. `hist` counts, per bin, the keys that match the prefix found so far;
// `remaining` is the rank (1-based, from the largest) of the target key among them. Returns the
// bin holding the target and writes its rank among that bin's keys to *remaining_in_bin.
// Walks the bins from the largest; requires 1 <= remaining <= sum(hist) (k <= N guarantees it).
CAPA_HOST_DEVICE uint32_t select_bin(const uint32_t* hist, int remaining, int* remaining_in_bin) {
    int cum = 0;
    for (int bin = kBins - 1; bin >= 0; --bin) {
        const int count = static_cast<int>(hist[bin]);
        if (cum + count >= remaining) {
            *remaining_in_bin = remaining - cum;
            return static_cast<uint32_t>(bin);
        }
        cum += count;
    }
    *remaining_in_bin = remaining - cum; // unreachable when the precondition holds
    return 0u;
}

} // namespace capa_select

#endif // CAPA_CONTRIB_TOPK_SELECT_H
