// adagrad.cuh: Adagrad (Duchi et al. 2011), Keras 3: epsilon INSIDE the sqrt, the
// accumulator starts at initial_accumulator_value and the step uses the updated value.
// Scalars: lr, epsilon. Slots: acc.
#pragma once
#include "common.cuh"

struct adagrad {
    template <typename T>
    static FO_HD void update(T& p, T g, T& acc, T&, T&, const T* c) {
        const T lr = c[0], epsilon = c[1];
        acc += g * g;
        p -= lr * g / fo_sqrt(acc + epsilon);
    }
};
