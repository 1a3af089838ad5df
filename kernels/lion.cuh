// lion.cuh: Lion (Chen et al. 2023): the parameter moves by lr times the sign of an
// interpolation of the OLD momentum and g; then the momentum is updated. No epsilon.
// Scalars: lr, beta_1, 1-beta_1, beta_2, 1-beta_2. Slots: m.
// Hyperparameters (Hyper.rule): beta_1, beta_2.
#pragma once
#include "step.cuh"

struct lion {
    static FO_HD void scalars(const double* h, long long, double lr, double, StepValues& v) {
        const double beta_1 = h[0], beta_2 = h[1];
        v.c[0] = lr, v.c[1] = beta_1, v.c[2] = 1 - beta_1, v.c[3] = beta_2, v.c[4] = 1 - beta_2;
    }

    template <typename T>
    static FO_HD void update(T& p, T g, T& m, T&, T&, const T* c) {
        const T lr = c[0], beta_1 = c[1], one_minus_beta_1 = c[2];
        const T beta_2 = c[3], one_minus_beta_2 = c[4];
        p -= lr * fo_sign(m * beta_1 + g * one_minus_beta_1);
        m = m * beta_2 + g * one_minus_beta_2;
    }
};
