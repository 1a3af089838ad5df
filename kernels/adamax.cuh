// adamax.cuh: Adamax (Kingma & Ba 2015, section 7), Adam with the infinity norm u.
// Scalars: lr, 1-beta_1, beta_2, 1-beta_1^t, epsilon. Slots: m, u.
// Hyperparameters (Hyper.rule): beta_1, beta_2, epsilon.
#pragma once
#include "step.cuh"

struct adamax {
    static FO_HD void scalars(const double* h, long long t, double lr, double, StepValues& v) {
        const double beta_1 = h[0], beta_2 = h[1], epsilon = h[2];
        v.c[0] = lr, v.c[1] = 1 - beta_1, v.c[2] = beta_2;
        v.c[3] = 1 - pow(beta_1, (double)t), v.c[4] = epsilon;
    }

    template <typename T>
    static FO_HD void update(T& p, T g, T& m, T& u, T&, const T* c) {
        const T lr = c[0], one_minus_beta_1 = c[1], beta_2 = c[2];
        const T one_minus_beta_1_power = c[3], epsilon = c[4];
        m += (g - m) * one_minus_beta_1;
        u = fo_max(beta_2 * u, fo_abs(g));
        p -= (lr * m) / (one_minus_beta_1_power * (u + epsilon));
    }
};
