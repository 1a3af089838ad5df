// adadelta.cuh: Adadelta (Zeiler 2012), Keras 3: the step uses the OLD delta
// accumulator and the NEW gradient accumulator, and is scaled by lr afterwards.
// Scalars: lr, rho, 1-rho, epsilon. Slots: eg (E[g^2]), ed (E[delta^2]).
// Hyperparameters (Hyper.rule): rho, epsilon.
#pragma once
#include "step.cuh"

struct adadelta {
    static FO_HD void scalars(const double* h, long long, double lr, double, StepValues& v) {
        const double rho = h[0], epsilon = h[1];
        v.c[0] = lr, v.c[1] = rho, v.c[2] = 1 - rho, v.c[3] = epsilon;
    }

    template <typename T>
    static FO_HD void update(T& p, T g, T& eg, T& ed, T&, const T* c) {
        const T lr = c[0], rho = c[1], one_minus_rho = c[2], epsilon = c[3];
        eg = rho * eg + one_minus_rho * (g * g);
        const T delta = -(fo_sqrt(ed + epsilon) * g) / fo_sqrt(eg + epsilon);
        ed = rho * ed + one_minus_rho * (delta * delta);
        p += lr * delta;
    }
};
