// SPDX-FileCopyrightText: Copyright (c) 2026 The capa-export authors
// SPDX-License-Identifier: Apache-2.0
//
// CPU reference of CapaContribTopK: plain loops, fp32 accumulation, bounded scratch.
// It is the oracle the CUDA kernel and the TensorRT plugin are compared with on machines that
// have no PyTorch; the Python definition (capa_export/capa/scoring.py) remains the spec.
#include "contrib_topk.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

namespace {

float half_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu;
    uint32_t mantissa = h & 0x3ffu;
    uint32_t bits;
    if (exponent == 0) {
        if (mantissa == 0) {
            bits = sign;
        } else {  // subnormal: renormalise
            exponent = 127 - 15 + 1;
            while ((mantissa & 0x400u) == 0) {
                mantissa <<= 1;
                --exponent;
            }
            mantissa &= 0x3ffu;
            bits = sign | (exponent << 23) | (mantissa << 13);
        }
    } else if (exponent == 0x1f) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else {
        bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

float bf16_to_float(uint16_t h) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

// Reads element i of a buffer of the given dtype as float.
struct Loader {
    const void* data;
    int dtype;
    float operator[](size_t i) const {
        switch (dtype) {
        case CAPA_DTYPE_FP16: return half_to_float(static_cast<const uint16_t*>(data)[i]);
        case CAPA_DTYPE_BF16: return bf16_to_float(static_cast<const uint16_t*>(data)[i]);
        default: return static_cast<const float*>(data)[i];
        }
    }
};

}  // namespace

extern "C" {

int capa_contrib_topk_check(const capa_contrib_topk_shape* s, int variant, int dtype) {
    if (s == nullptr) return CAPA_ERR_SHAPE;
    if (variant < CAPA_VARIANT_CONTRIB || variant > CAPA_VARIANT_ATTENTION) return CAPA_ERR_VARIANT;
    if (dtype < CAPA_DTYPE_FP32 || dtype > CAPA_DTYPE_BF16) return CAPA_ERR_DTYPE;
    // B == 0 is an empty batch (nothing to do), every other dimension must be positive.
    if (s->B < 0 || s->H <= 0 || s->H_kv <= 0 || s->Q <= 0 || s->N <= 0 || s->d <= 0 || s->D <= 0)
        return CAPA_ERR_SHAPE;
    if (s->H % s->H_kv != 0) return CAPA_ERR_SHAPE;
    if (s->k <= 0 || s->k > s->N) return CAPA_ERR_SHAPE;
    return CAPA_OK;
}

const char* capa_status_string(int status) {
    switch (status) {
    case CAPA_OK: return "ok";
    case CAPA_ERR_SHAPE: return "invalid shape (a dimension <= 0, H not a multiple of H_kv, or k not in [1, N])";
    case CAPA_ERR_VARIANT: return "unknown variant (expected 0=contrib, 1=value_norm, 2=attention)";
    case CAPA_ERR_DTYPE: return "unknown dtype (expected 0=fp32, 1=fp16, 2=bf16)";
    case CAPA_ERR_WORKSPACE: return "workspace missing or too small";
    case CAPA_ERR_UNSUPPORTED: return "shape beyond the CUDA kernel's limits (H * H and d, see README)";
    case CAPA_ERR_CUDA: return "CUDA error";
    default: return "unknown status";
    }
}

int capa_contribution_scores_cpu(const void* probs, const void* values, const void* o_weight,
    const capa_contrib_topk_shape* s, int variant, int dtype, float* scores_out) {
    const int status = capa_contrib_topk_check(s, variant, dtype);
    if (status != CAPA_OK) return status;
    const Loader a{probs, dtype}, v{values, dtype}, w{o_weight, dtype};
    const size_t B = s->B, H = s->H, H_kv = s->H_kv, Q = s->Q, N = s->N, d = s->d, D = s->D;
    const size_t group = H / H_kv;
    const size_t hd = H * d;
    // a[b, h, i, j]
    auto a_at = [&](size_t b, size_t h, size_t i, size_t j) { return a[((b * H + h) * Q + i) * N + j]; };
    // v[b, kv, j, t]
    auto v_at = [&](size_t b, size_t kv, size_t j, size_t t) { return v[((b * H_kv + kv) * N + j) * d + t]; };

    std::vector<float> u(H * D), gram(H * H), norms(H_kv), a_col(H);
    for (size_t b = 0; b < B; ++b) {
        for (size_t j = 0; j < N; ++j) {
            float score = 0.0f;
            if (variant == CAPA_VARIANT_ATTENTION) {
                for (size_t h = 0; h < H; ++h)
                    for (size_t i = 0; i < Q; ++i) score += a_at(b, h, i, j);
            } else if (variant == CAPA_VARIANT_VALUE_NORM) {
                for (size_t kv = 0; kv < H_kv; ++kv) {
                    float sq = 0.0f;
                    for (size_t t = 0; t < d; ++t) {
                        const float x = v_at(b, kv, j, t);
                        sq += x * x;
                    }
                    norms[kv] = std::sqrt(sq);
                }
                for (size_t i = 0; i < Q; ++i)
                    for (size_t h = 0; h < H; ++h) score += a_at(b, h, i, j) * norms[h / group];
            } else {
                // U_j^h = v_j^h W_O^h (a D-vector per head), G_j = U_j U_j^T, c_ij^2 = a^T G_j a.
                for (size_t h = 0; h < H; ++h) {
                    const size_t kv = h / group;
                    for (size_t c = 0; c < D; ++c) {
                        float acc = 0.0f;
                        for (size_t t = 0; t < d; ++t) acc += v_at(b, kv, j, t) * w[c * hd + h * d + t];
                        u[h * D + c] = acc;
                    }
                }
                for (size_t h = 0; h < H; ++h) {
                    for (size_t g = h; g < H; ++g) {
                        float acc = 0.0f;
                        for (size_t c = 0; c < D; ++c) acc += u[h * D + c] * u[g * D + c];
                        gram[h * H + g] = acc;
                        gram[g * H + h] = acc;
                    }
                }
                for (size_t i = 0; i < Q; ++i) {
                    for (size_t h = 0; h < H; ++h) a_col[h] = a_at(b, h, i, j);
                    float quad = 0.0f;
                    for (size_t h = 0; h < H; ++h) {
                        if (a_col[h] == 0.0f) continue;
                        float row = 0.0f;
                        for (size_t g = 0; g < H; ++g) row += gram[h * H + g] * a_col[g];
                        quad += a_col[h] * row;
                    }
                    score += std::sqrt(std::max(quad, 0.0f));
                }
            }
            scores_out[b * N + j] = score;
        }
    }
    return CAPA_OK;
}

int capa_topk_indices_cpu(const float* scores, int32_t B, int32_t N, int32_t k, int32_t* out) {
    if (B < 0 || N <= 0 || k <= 0 || k > N) return CAPA_ERR_SHAPE;
    std::vector<int32_t> order(static_cast<size_t>(N));
    // A strict weak order even with NaN (a plain `>` is not one, and std::stable_sort's result is
    // then undefined): NaN ranks above everything and all NaNs are equal, as in torch.sort;
    // -0.0 == +0.0 compares equal.
    auto ranks_above = [](float x, float y) {
        if (std::isnan(x)) return !std::isnan(y);
        if (std::isnan(y)) return false;
        return x > y;
    };
    for (int32_t b = 0; b < B; ++b) {
        const float* row = scores + static_cast<size_t>(b) * N;
        std::iota(order.begin(), order.end(), 0);
        // Stable descending order: equal scores keep index order, so ties favour the lower index.
        std::stable_sort(order.begin(), order.end(),
            [row, &ranks_above](int32_t x, int32_t y) { return ranks_above(row[x], row[y]); });
        std::sort(order.begin(), order.begin() + k);
        std::copy(order.begin(), order.begin() + k, out + static_cast<size_t>(b) * k);
    }
    return CAPA_OK;
}

int capa_contrib_topk_cpu(const void* probs, const void* values, const void* o_weight,
    const capa_contrib_topk_shape* s, int variant, int dtype, int32_t* out) {
    const int status = capa_contrib_topk_check(s, variant, dtype);
    if (status != CAPA_OK) return status;
    std::vector<float> scores(static_cast<size_t>(s->B) * s->N);
    const int rc = capa_contribution_scores_cpu(probs, values, o_weight, s, variant, dtype, scores.data());
    if (rc != CAPA_OK) return rc;
    return capa_topk_indices_cpu(scores.data(), s->B, s->N, s->k, out);
}

}  // extern "C"
