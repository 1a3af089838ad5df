// harness.h: the rules' arithmetic built for the host (ARCHITECTURE.md, principle 7).
// host_step runs the kernel's per-element function, fused_element, over the same tile
// table and clip factors as fused.cu, sequentially. What it cannot test is what needs
// a GPU: thread indexing, vector loads, the launch and the block reductions.
#pragma once
#include "common.cuh"

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
