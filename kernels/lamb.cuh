// lamb.cuh: LAMB (You et al. 2020) as Keras 3 writes it: Adam's direction r, epsilon
// outside the sqrt of the bias-corrected v, scaled per variable by the trust ratio
// ||p||/||r|| (1 unless both norms are > 0); no decay term inside r.
// A whole-variable rule: its kernels are lamb.cu (GPU) and lamb_host.cpp (CPU), two
// passes over the elements with per-segment sums between them.
// Scalars: lr, 1-beta_1, 1-beta_2, 1-beta_1^t, 1-beta_2^t, epsilon. Slots: m, v.
// Hyperparameters (Hyper.rule): beta_1, beta_2, epsilon.
#pragma once
#include "step.cuh"

struct lamb {
    static FO_HD void scalars(const double* h, long long t, double lr, double, StepValues& v) {
        v.c[0] = lr, v.c[1] = 1 - h[0], v.c[2] = 1 - h[1];
        v.c[3] = 1 - pow(h[0], (double)t), v.c[4] = 1 - pow(h[1], (double)t), v.c[5] = h[2];
    }

    // Pass 1: the moments; returns the direction r.
    template <typename T>
    static FO_HD T moments(T g, T& m, T& v, const T* c) {
        m += (g - m) * c[1];
        v += (g * g - v) * c[2];
        return direction(m, v, c);
    }

    // r from the new moments: pass 2 recomputes it, to the bit, from the stored m and v.
    template <typename T>
    static FO_HD T direction(T m, T v, const T* c) {
        return (m / c[3]) / (fo_sqrt(v / c[4]) + c[5]);
    }

    // Pass 2: p (already decayed) moves by the segment's trust ratio.
    template <typename T>
    static FO_HD void apply(T& p, T r, T ratio, const T* c) {
        p -= (ratio * c[0]) * r;
    }
};

// ||p||/||r|| from the segment's sums of squares (double), as reference.trust_ratio:
// 1 unless both norms are > 0, so NaN gives 1.
FO_HD double lamb_trust_ratio(double p_sum_of_squares, double r_sum_of_squares) {
    const double p_norm = sqrt(p_sum_of_squares), r_norm = sqrt(r_sum_of_squares);
    return (p_norm > 0.0 && r_norm > 0.0) ? p_norm / r_norm : 1.0;
}
