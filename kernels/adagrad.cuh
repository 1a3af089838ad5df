// adagrad.cuh: Adagrad (Duchi et al. 2011), Keras 3: epsilon INSIDE the sqrt, the
// accumulator starts at initial_accumulator_value and the step uses the updated value.
// Scalars: lr, epsilon. Slots: acc.
// Hyperparameters (Hyper.rule): initial_accumulator_value, epsilon.
#pragma once
#include "step.cuh"

struct adagrad {
    static FO_HD void scalars(const double* h, long long, double lr, double, StepValues& v) {
        v.c[0] = lr, v.c[1] = h[1];
    }

    template <typename T>
    static FO_HD void update(T& p, T g, T& acc, T&, T&, const T* c) {
        const T lr = c[0], epsilon = c[1];
        acc += g * g;
        p -= lr * g / fo_sqrt(acc + epsilon);
    }
};
