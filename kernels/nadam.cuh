// nadam.cuh: Nadam (Dozat 2016) with Keras 3's momentum schedule; the host computes
// u_{t+1}, 1-u_t and the products 1-u_1...u_t, 1-u_1...u_{t+1} once per step.
// Scalars: lr, 1-beta_1, 1-beta_2, u_t1, 1-u_t, 1-u_product_t, 1-u_product_t1,
// 1-beta_2^t, epsilon. Slots: m, v.
#pragma once
#include "common.cuh"

struct nadam {
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
