// sgd.cuh: gradient descent with optional momentum and Nesterov momentum (Keras 3).
// The velocity m is kept in units of lr and is negative-signed: m <- momentum*m - lr*g.
// momentum_in_gradient_units (torch.optim.SGD's form): m <- a*m + b*g holds gradients
// (a, b = 0, 1 on the first step, else momentum, 1 - dampening) and p <- p - lr*m.
// Scalars: lr, momentum, nesterov (0/1), gradient_units (0/1), a, b.
// Slots: m (absent when momentum == 0).
// Hyperparameters (Hyper.rule): momentum, nesterov, dampening, momentum_in_gradient_units.
#pragma once
#include "step.cuh"

struct sgd {
    static FO_HD void scalars(const double* h, long long t, double lr, double, StepValues& v) {
        const bool first = t == 1;
        v.c[0] = lr, v.c[1] = h[0], v.c[2] = h[1], v.c[3] = h[3];
        v.c[4] = first ? 0.0 : h[0];
        v.c[5] = first ? 1.0 : 1 - h[2];
    }

    template <typename T>
    static FO_HD void update(T& p, T g, T& m, T&, T&, const T* c) {
        const T lr = c[0], momentum = c[1], nesterov = c[2], gradient_units = c[3];
        if (momentum == T(0)) {
            p -= g * lr;
            return;
        }
        if (gradient_units != T(0)) {
            m = m * c[4] + g * c[5];
            p -= (nesterov != T(0) ? g + m * momentum : m) * lr;
            return;
        }
        m = m * momentum - g * lr;
        if (nesterov != T(0)) p += m * momentum - g * lr;
        else p += m;
    }
};
