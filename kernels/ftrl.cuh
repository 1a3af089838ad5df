// ftrl.cuh: FTRL-proximal (McMahan et al. 2013) as Keras 3: the parameter is
// overwritten in closed form from z; the accumulator n takes the raw g, z the
// shrinkage-augmented g. n^0.5 (the default power) is a correctly rounded sqrt, as in
// TF and the NumPy reference: n'^0.5 - n^0.5 cancels, so it must round the same.
// Scalars: lr, learning_rate_power, l1, l2 + beta/(2 lr), 2*l2_shrinkage. Slots: n, z.
// Hyperparameters (Hyper.rule): learning_rate_power, initial_accumulator_value, l1, l2,
// l2_shrinkage, beta.
#pragma once
#include "step.cuh"

struct ftrl {
    static FO_HD void scalars(const double* h, long long, double lr, double, StepValues& v) {
        const double l2 = h[3], beta = h[5];
        v.c[0] = lr, v.c[1] = h[0], v.c[2] = h[2], v.c[3] = l2 + beta / (2.0 * lr);
        v.c[4] = 2 * h[4];
    }

    template <typename T>
    static FO_HD void update(T& p, T g, T& n, T& z, T&, const T* c) {
        const T lr = c[0], power = -c[1], l1 = c[2], l2_eff = c[3], two_shrinkage = c[4];
        const T g_tilde = g + two_shrinkage * p;
        const T n_new = n + g * g;
        const T n_new_power = power_of(n_new, power);
        z += g_tilde - ((n_new_power - power_of(n, power)) / lr) * p;
        const T quadratic = n_new_power / lr + T(2) * l2_eff;
        p = (fo_clip(z, -l1, l1) - z) / quadratic;
        n = n_new;
    }

    template <typename T>
    static FO_HD T power_of(T x, T exponent) {
        return exponent == T(0.5) ? fo_sqrt(x) : fo_pow(x, exponent);
    }
};
