// adamax.cuh: Adamax (Kingma & Ba 2015, section 7), Adam with the infinity norm u.
// Scalars: lr, 1-beta_1, beta_2, 1-beta_1^t, epsilon. Slots: m, u.
#pragma once
#include "common.cuh"

struct adamax {
    template <typename T>
    static FO_HD void update(T& p, T g, T& m, T& u, T&, const T* c) {
        const T lr = c[0], one_minus_beta_1 = c[1], beta_2 = c[2];
        const T one_minus_beta_1_power = c[3], epsilon = c[4];
        m += (g - m) * one_minus_beta_1;
        u = fo_max(beta_2 * u, fo_abs(g));
        p -= (lr * m) / (one_minus_beta_1_power * (u + epsilon));
    }
};
