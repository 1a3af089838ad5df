// schedule_free_adamw.cuh: Schedule-Free AdamW (Defazio et al. 2024) as Keras 3 writes it.
// p holds y (where gradients are taken); z is the SGD sequence (the "momentum" slot,
// started at a copy of the params); the average x is recovered from the old y and z.
// Scalars: lr*min(t/warmup_steps, 1), beta_1, 1-beta_1, 1-beta_2, 1-beta_2^t, epsilon,
// 1/t, 1-1/t. Slots: z, v.
// Hyperparameters (Hyper.rule): beta_1, beta_2, epsilon, warmup_steps.
#pragma once
#include "step.cuh"

struct schedule_free_adamw {
    static FO_HD void scalars(const double* h, long long t, double lr, double, StepValues& v) {
        const double beta_1 = h[0], beta_2 = h[1], warmup_steps = h[3];
        if (warmup_steps > 0) lr = lr * fo_min((double)t / warmup_steps, 1.0);
        const double weight = 1.0 / (double)t;
        v.c[0] = lr, v.c[1] = beta_1, v.c[2] = 1 - beta_1, v.c[3] = 1 - beta_2;
        v.c[4] = 1 - pow(beta_2, (double)t), v.c[5] = h[2], v.c[6] = weight, v.c[7] = 1 - weight;
    }

    template <typename T>
    static FO_HD void update(T& p, T g, T& z, T& v, T&, const T* c) {
        const T lr = c[0], beta_1 = c[1], one_minus_beta_1 = c[2], one_minus_beta_2 = c[3];
        const T one_minus_beta_2_power = c[4], epsilon = c[5];
        const T weight = c[6], one_minus_weight = c[7];
        T x = (p - one_minus_beta_1 * z) / beta_1;  // from the old y and z
        v += (g * g - v) * one_minus_beta_2;
        z -= (lr * g) / (fo_sqrt(v / one_minus_beta_2_power) + epsilon);
        x = one_minus_weight * x + weight * z;
        p = one_minus_beta_1 * z + beta_1 * x;
    }
};
