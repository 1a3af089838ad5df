// adam.cuh: Adam (Kingma & Ba 2015) and AMSGrad (Reddi et al. 2018) as Keras 3 / TF's
// ApplyAdam: bias corrections folded into alpha, epsilon OUTSIDE the sqrt and not
// bias-corrected; AMSGrad keeps the max of the raw v. AdamW is this rule plus decay.
// Scalars: alpha = lr*sqrt(1-beta_2^t)/(1-beta_1^t), 1-beta_1, 1-beta_2, epsilon, amsgrad.
// Hyperparameters (Hyper.rule): beta_1, beta_2, epsilon, amsgrad,
// epsilon_after_bias_correction (torch.optim.Adam's epsilon placement, see fusedopt.Adam).
#pragma once
#include "step.cuh"

struct adam {
    static FO_HD void scalars(const double* h, long long t, double lr, double, StepValues& v) {
        const double beta_1 = h[0], beta_2 = h[1], epsilon = h[2];
        const double bias_correction_2 = 1 - pow(beta_2, (double)t);
        v.c[0] = lr * sqrt(bias_correction_2) / (1 - pow(beta_1, (double)t));
        v.c[1] = 1 - beta_1, v.c[2] = 1 - beta_2, v.c[4] = h[3];
        // epsilon_after_bias_correction (torch's placement): eps*sqrt(1-beta_2^t).
        v.c[3] = h[4] != 0 ? epsilon * sqrt(bias_correction_2) : epsilon;
    }

    template <typename T>
    static FO_HD void update(T& p, T g, T& m, T& v, T& vhat, const T* c) {
        const T alpha = c[0], one_minus_beta_1 = c[1], one_minus_beta_2 = c[2];
        const T epsilon = c[3], amsgrad = c[4];
        m += (g - m) * one_minus_beta_1;
        v += (g * g - v) * one_minus_beta_2;
        T v_used = v;
        if (amsgrad != T(0)) {
            vhat = fo_max(vhat, v);
            v_used = vhat;
        }
        p -= (m * alpha) / (fo_sqrt(v_used) + epsilon);
    }
};
