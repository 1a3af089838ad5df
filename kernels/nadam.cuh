// nadam.cuh: Nadam (Dozat 2016) with Keras 3's momentum schedule; scalars() computes
// u_{t+1}, 1-u_t and the products 1-u_1...u_t, 1-u_1...u_{t+1} once per step from the
// running product u_1...u_{t-1}, which the step state keeps (StepState.product).
// Scalars: lr, 1-beta_1, 1-beta_2, u_t1, 1-u_t, 1-u_product_t, 1-u_product_t1,
// 1-beta_2^t, epsilon. Slots: m, v.
// Hyperparameters (Hyper.rule): beta_1, beta_2, epsilon, schedule_decay (< 0: unset, Keras 3).
#pragma once
#include "step.cuh"

struct nadam {
    // u_k / beta_1: Keras 3's momentum schedule; Keras 2's schedule_decay s scales k.
    static FO_HD double u(const double* h, long long k) {
        const double exponent = h[3] < 0 ? (double)k : h[3] * (double)k;
        return 1.0 - 0.5 * pow(0.96, exponent);
    }

    // `product` is u_1*...*u_{t-1}, multiplied in Keras' order; this step's is kept.
    static FO_HD void scalars(const double* h, long long t, double lr, double product,
                              StepValues& v) {
        const double beta_1 = h[0], beta_2 = h[1], epsilon = h[2];
        const double u_t = beta_1 * u(h, t), u_t1 = beta_1 * u(h, t + 1);
        const double u_product_t = product * beta_1 * u(h, t);
        const double u_product_t1 = u_product_t * u_t1;
        v.c[0] = lr, v.c[1] = 1 - beta_1, v.c[2] = 1 - beta_2, v.c[3] = u_t1, v.c[4] = 1 - u_t;
        v.c[5] = 1 - u_product_t, v.c[6] = 1 - u_product_t1;
        v.c[7] = 1 - pow(beta_2, (double)t), v.c[8] = epsilon;
        v.product = u_product_t;
    }

    template <typename T>
    static FO_HD void update(T& p, T g, T& m, T& v, T&, const T* c) {
        const T lr = c[0], one_minus_beta_1 = c[1], one_minus_beta_2 = c[2];
        const T u_t1 = c[3], one_minus_u_t = c[4];
        const T one_minus_u_product_t = c[5], one_minus_u_product_t1 = c[6];
        const T one_minus_beta_2_power = c[7], epsilon = c[8];
        m += (g - m) * one_minus_beta_1;
        v += (g * g - v) * one_minus_beta_2;
        const T m_hat = (u_t1 * m) / one_minus_u_product_t1
                      + (one_minus_u_t * g) / one_minus_u_product_t;
        const T v_hat = v / one_minus_beta_2_power;
        p -= (m_hat * lr) / (fo_sqrt(v_hat) + epsilon);
    }
};
