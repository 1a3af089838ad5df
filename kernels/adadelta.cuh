// adadelta.cuh: Adadelta (Zeiler 2012), Keras 3: the step uses the OLD delta
// accumulator and the NEW gradient accumulator, and is scaled by lr afterwards.
// Scalars: lr, rho, 1-rho, epsilon. Slots: eg (E[g^2]), ed (E[delta^2]).
#pragma once
#include "common.cuh"

struct adadelta {
    template <typename T>
    static FO_HD void update(T& p, T g, T& eg, T& ed, T&, const T* c) {
        const T lr = c[0], rho = c[1], one_minus_rho = c[2], epsilon = c[3];
        eg = rho * eg + one_minus_rho * (g * g);
        const T delta = -(fo_sqrt(ed + epsilon) * g) / fo_sqrt(eg + epsilon);
        ed = rho * ed + one_minus_rho * (delta * delta);
        p += lr * delta;
    }
};
