// sgd.cuh: gradient descent with optional momentum and Nesterov momentum (Keras 3).
// The velocity m is kept in units of lr and is negative-signed: m <- momentum*m - lr*g.
// Scalars: lr, momentum, nesterov (0/1). Slots: m (absent when momentum == 0).
// Hyperparameters (Hyper.rule): momentum, nesterov.
#pragma once
#include "step.cuh"

struct sgd {
    static FO_HD void scalars(const double* h, long long, double lr, double, StepValues& v) {
        v.c[0] = lr, v.c[1] = h[0], v.c[2] = h[1];
    }

    template <typename T>
    static FO_HD void update(T& p, T g, T& m, T&, T&, const T* c) {
        const T lr = c[0], momentum = c[1], nesterov = c[2];
        if (momentum == T(0)) {
            p -= g * lr;
            return;
        }
        m = m * momentum - g * lr;
        if (nesterov != T(0)) p += m * momentum - g * lr;
        else p += m;
    }
};
