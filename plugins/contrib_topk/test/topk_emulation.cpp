// SPDX-FileCopyrightText: Copyright (c) 2026 The capa-export authors
// SPDX-License-Identifier: Apache-2.0
//
// Host emulation of topk_kernel (contrib_topk_kernels.cu), step for step, for machines without a
// GPU: the same key map and bin choice (contrib_topk_select.h, compiled here for the host), the
// same four histogram passes, and the same write-out in chunks of kTopkThreads "threads" whose
// exclusive scans the loops below compute sequentially. tests/test_topk_emulation.py builds it as
// a shared library and compares it with a stable sort over adversarial rows.
#include "contrib_topk_select.h"

#include <cstdint>
#include <vector>

using namespace capa_select;

extern "C" int capa_topk_emulate(const float* scores, int32_t B, int32_t N, int32_t k, int32_t* out) {
    if (B < 0 || N <= 0 || k <= 0 || k > N) return 1;
    std::vector<uint32_t> hist(kBins);
    std::vector<int> eq(kTopkThreads), keep(kTopkThreads);
    for (int32_t b = 0; b < B; ++b) {
        const float* row = scores + static_cast<size_t>(b) * N;
        uint32_t prefix = 0, mask = 0;
        int remaining = k;
        for (int shift = kFirstShift; shift >= 0; shift -= kRadixBits) {
            std::fill(hist.begin(), hist.end(), 0u);
            for (int32_t j = 0; j < N; ++j) {
                const uint32_t key = ordered_key(row[j]);
                if ((key & mask) == prefix) ++hist[(key >> shift) & (kBins - 1)];
            }
            int in_bin = 0;
            const uint32_t bin = select_bin(hist.data(), remaining, &in_bin);
            prefix |= bin << shift;
            mask |= static_cast<uint32_t>(kBins - 1) << shift;
            remaining = in_bin;
        }
        const uint32_t threshold = prefix;
        int eq_base = 0, out_base = 0;
        for (int32_t base = 0; base < N; base += kTopkThreads) {
            // Thread t handles j = base + t: first the scan of "equal to the threshold" flags...
            int eq_total = 0;
            for (int t = 0; t < kTopkThreads; ++t) {
                const int32_t j = base + t;
                const uint32_t key = j < N ? ordered_key(row[j]) : 0u;
                eq[t] = eq_total; // exclusive rank
                eq_total += (j < N && key == threshold) ? 1 : 0;
            }
            // ...then the scan of "kept" flags gives each kept index its output slot.
            int keep_total = 0;
            for (int t = 0; t < kTopkThreads; ++t) {
                const int32_t j = base + t;
                const uint32_t key = j < N ? ordered_key(row[j]) : 0u;
                const bool gt = j < N && key > threshold;
                const bool is_eq = j < N && key == threshold;
                const bool kept = gt || (is_eq && eq_base + eq[t] < remaining);
                keep[t] = keep_total;
                if (kept) {
                    out[static_cast<size_t>(b) * k + out_base + keep[t]] = j;
                    ++keep_total;
                }
            }
            eq_base += eq_total;
            out_base += keep_total;
        }
    }
    return 0;
}
