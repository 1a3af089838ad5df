// harness.h: the rules' arithmetic and the step state functions built for the host
// (ARCHITECTURE.md, principle 7).
// host_step runs the kernel's per-element function, fused_element, over the same tile
// table and clip factors as fused.cu, sequentially. What it cannot test is what needs
// a GPU: thread indexing, vector loads, the launch and the block reductions.
#pragma once
#include <stddef.h>

#include <string>

#include "step.cuh"

template <typename Rule, typename T>
void host_step(T* p, const T* g, T* s0, T* s1, T* s2, const long long* tile_start,
               const int* tile_segment, long long ntiles, const T* factors, int nfactors,
               const Prologue<T>* pro, const StepScalars<T>* st) {
    for (long long k = 0; k < ntiles; ++k) {
        const T factor = factors == nullptr ? T(1) : factors[nfactors == 1 ? 0 : tile_segment[k]];
        for (long long i = tile_start[k]; i < tile_start[k + 1]; ++i) {
            T a = s0 ? s0[i] : T(0), b = s1 ? s1[i] : T(0), c = s2 ? s2[i] : T(0);
            fused_element<Rule>(p[i], g[i], a, b, c, factor, *pro, *st);
            if (s0) s0[i] = a;
            if (s1) s1[i] = b;
            if (s2) s2[i] = c;
        }
    }
}

#define FO_HOST_ENTRY(rule, T, suffix)                                                      \
    extern "C" void host_##rule##_##suffix(                                                  \
        T* p, const T* g, T* s0, T* s1, T* s2, const long long* tile_start,                  \
        const int* tile_segment, long long ntiles, const T* factors, int nfactors,           \
        const Prologue<T>* pro, const StepScalars<T>* st) {                                  \
        host_step<rule, T>(p, g, s0, s1, s2, tile_start, tile_segment, ntiles, factors,      \
                           nfactors, pro, st);                                               \
    }

#define FO_HOST_ENTRIES(rule)                 \
    FO_HOST_ENTRY(rule, float, float32)       \
    FO_HOST_ENTRY(rule, double, float64)

extern "C" double host_clipnorm_factor(double sum_of_squares, double clipnorm) {
    return clipnorm_factor(sum_of_squares, clipnorm);
}

extern "C" double host_global_clipnorm_factor(double sum_of_squares, double clipnorm) {
    return global_clipnorm_factor(sum_of_squares, clipnorm);
}

// The step state functions (kernels/step.cuh), for the tests that tie them to Python.
#define FO_HOST_STEP_VALUES(rule)                                                        \
    extern "C" void host_step_values_##rule(const Hyper* h, const StepState* s,         \
                                            StepValues* out) {                           \
        *out = fo_step_values<rule>(*h, *s);                                             \
    }

extern "C" double host_learning_rate(const LearningRate* r, long long iterations) {
    return fo_learning_rate(*r, iterations);
}

extern "C" void host_advance(StepState* s, const StepValues* v, int skipped) {
    fo_advance(*s, *v, skipped != 0);
}

// "size;field:offset:size;..." as this compiler lays the struct out, for the numpy
// mirrors in fusedopt/_kernels.py.
#define FO_FIELD(S, f) \
    (#f ":" + std::to_string(offsetof(S, f)) + ":" + std::to_string(sizeof(((S*)0)->f)) + ";")

extern "C" const char* host_struct_layout(const char* name) {
    static std::string out;
    const std::string n = name;
    if (n == "LearningRate")
        out = std::to_string(sizeof(LearningRate)) + ";" + FO_FIELD(LearningRate, kind) +
              FO_FIELD(LearningRate, flag) + FO_FIELD(LearningRate, pieces) +
              FO_FIELD(LearningRate, initial) + FO_FIELD(LearningRate, arg) +
              FO_FIELD(LearningRate, decay) + FO_FIELD(LearningRate, boundaries) +
              FO_FIELD(LearningRate, values);
    else if (n == "Hyper")
        out = std::to_string(sizeof(Hyper)) + ";" + FO_FIELD(Hyper, unscale) +
              FO_FIELD(Hyper, clipvalue) + FO_FIELD(Hyper, weight_decay) +
              FO_FIELD(Hyper, coupled_weight_decay) +
              FO_FIELD(Hyper, clipnorm) + FO_FIELD(Hyper, rule) + FO_FIELD(Hyper, lr) +
              FO_FIELD(Hyper, stochastic_rounding) + FO_FIELD(Hyper, seed) +
              FO_FIELD(Hyper, accumulation) + FO_FIELD(Hyper, use_ema) +
              FO_FIELD(Hyper, ema_momentum) + FO_FIELD(Hyper, ema_overwrite_frequency) +
              FO_FIELD(Hyper, dynamic_growth_steps);
    else if (n == "StepState")
        out = std::to_string(sizeof(StepState)) + ";" + FO_FIELD(StepState, iterations) +
              FO_FIELD(StepState, skipped_steps) + FO_FIELD(StepState, last_step_skipped) +
              FO_FIELD(StepState, skip) + FO_FIELD(StepState, blocks_done) +
              FO_FIELD(StepState, product) + FO_FIELD(StepState, loss_scale) +
              FO_FIELD(StepState, scale_counter);
    else if (n == "StepValues")
        out = std::to_string(sizeof(StepValues)) + ";" + FO_FIELD(StepValues, lr) +
              FO_FIELD(StepValues, c) + FO_FIELD(StepValues, product);
    else
        out = "";
    return out.c_str();
}
