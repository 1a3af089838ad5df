// rmsprop.cuh: RMSprop (Tieleman & Hinton 2012) as Keras 3 writes it: epsilon INSIDE
// the sqrt, optional centering and momentum.
// Scalars: lr, rho, 1-rho, epsilon, momentum, centered (0/1). Slots: v, mom, a.
// Hyperparameters (Hyper.rule): rho, momentum, epsilon, centered.
#pragma once
#include "step.cuh"

struct rmsprop {
    static FO_HD void scalars(const double* h, long long, double lr, double, StepValues& v) {
        const double rho = h[0], momentum = h[1], epsilon = h[2], centered = h[3];
        v.c[0] = lr, v.c[1] = rho, v.c[2] = 1 - rho, v.c[3] = epsilon;
        v.c[4] = momentum, v.c[5] = centered;
    }

    template <typename T>
    static FO_HD void update(T& p, T g, T& v, T& mom, T& a, const T* c) {
        const T lr = c[0], rho = c[1], one_minus_rho = c[2], epsilon = c[3];
        const T momentum = c[4], centered = c[5];
        v = rho * v + one_minus_rho * (g * g);
        T denominator;
        if (centered != T(0)) {
            a = rho * a + one_minus_rho * g;
            denominator = v - a * a + epsilon;
        } else {
            denominator = v + epsilon;
        }
        const T increment = lr * g / fo_sqrt(denominator);
        if (momentum > T(0)) {
            mom = momentum * mom + increment;
            p -= mom;
        } else {
            p -= increment;
        }
    }
};
