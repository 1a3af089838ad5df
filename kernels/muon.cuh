// muon.cuh: Muon (Jordan et al. 2024) as Keras 3 writes it, the element-wise parts:
// 2-D variables take the momentum m <- m + (g + m(momentum-1)), d = g + momentum*m
// (nesterov) or m, orthogonalised by Newton-Schulz matrix products (not here: NumPy
// on the host, cuBLAS through CuPy on the GPU; reference.newton_schulz) and applied
// as p <- p - (lr*NS(d))*rms_scale; the other variables take AdamW (adam.cuh, with
// lr*adam_lr_ratio and adam_weight_decay). A whole-variable rule: its kernels are
// muon.cu (GPU) and muon_host.cpp (CPU).
// Scalars, reference.muon's order: lr, momentum, nesterov, ns_steps, muon_a, muon_b,
// muon_c, alpha = lr*adam_lr_ratio*sqrt(1-beta_2^t)/(1-beta_1^t), 1-beta_1, 1-beta_2,
// epsilon; c[11] = 0, so c + 7 is adam.cuh's scalars with amsgrad off.
// Hyperparameters (Muon._device_hyperparameters): adam_beta_1, adam_beta_2, epsilon,
// muon_a, muon_b, muon_c, adam_lr_ratio, momentum, ns_steps, nesterov, adam_weight_decay.
#pragma once
#include "adam.cuh"

struct muon {
    static FO_HD void scalars(const double* h, long long t, double lr, double, StepValues& v) {
        const double beta_1 = h[0], beta_2 = h[1];
        v.c[0] = lr, v.c[1] = h[7], v.c[2] = h[9], v.c[3] = h[8];
        v.c[4] = h[3], v.c[5] = h[4], v.c[6] = h[5];
        v.c[7] = lr * h[6] * sqrt(1 - pow(beta_2, (double)t)) / (1 - pow(beta_1, (double)t));
        v.c[8] = 1 - beta_1, v.c[9] = 1 - beta_2, v.c[10] = h[2], v.c[11] = 0.0;
    }

    // A Muon variable's momentum; returns d, what Newton-Schulz orthogonalises.
    template <typename T>
    static FO_HD T momentum(T g, T& m, const T* c) {
        const T momentum = c[1];
        m += g + m * (momentum - T(1));
        return c[2] != T(0) ? g + momentum * m : m;
    }

    // p (already decayed) moves along the orthogonalised d, u = NS(d).
    template <typename T>
    static FO_HD void apply(T& p, T u, T rms_scale, const T* c) {
        p -= (c[0] * u) * rms_scale;
    }

    // An AdamW variable: Adam's update with Muon's Adam scalars.
    template <typename T>
    static FO_HD void adamw(T& p, T g, T& m, T& v, const T* c) {
        T unused = T(0);
        adam::update(p, g, m, v, unused, c + 7);
    }
};

// The prologue of an AdamW segment: Muon's Prologue with adam_weight_decay in place of
// weight_decay (none when the segment group's decay is off, or it is None: -1).
template <typename T>
FO_HD Prologue<T> muon_adamw_prologue(const Hyper& h, const StepPhase& phase, bool decay) {
    Prologue<T> pro = fo_prologue<T>(h, phase, decay);
    pro.weight_decay = decay ? (T)h.rule[10] : T(-1);
    return pro;
}
