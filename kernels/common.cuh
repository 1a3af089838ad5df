// common.cuh: what every rule shares. Portability (the same code builds for the GPU
// with NVRTC and for the host with a C++ compiler), NaN-propagating helpers matching
// NumPy, the per-step scalar structs, and the gradient prologue of the pipeline:
// unscale -> norm-clip factor -> clip by value -> coupled (L2) decay -> decoupled decay.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define FO_HD __host__ __device__ __forceinline__
#else
#include <math.h>
#define FO_HD inline
#endif

// Every load and store of a kernel's element buffers goes through fo_load/fo_store, so
// the emulator (tests/host/cuda_emulator.h) can count accesses by width and check their
// alignment. Elsewhere FO_ACCESS is nothing and these are plain accesses.
#ifndef FO_ACCESS
#define FO_ACCESS(is_store, pointer, bytes)
#endif

template <typename V>
FO_HD V fo_load(const V* pointer) {
    FO_ACCESS(false, pointer, sizeof(V));
    return *pointer;
}

template <typename V>
FO_HD void fo_store(V* pointer, V value) {
    FO_ACCESS(true, pointer, sizeof(V));
    *pointer = value;
}

// Room for the longest rule's scalars (Muon has 11, and a 0 after them: adam.cuh's
// amsgrad off for its AdamW segments).
#define FO_MAX_SCALARS 12

// Threads per block of every kernel (fusedopt/_kernels.py reads it from here).
#define FO_BLOCK 256

// Segment groups a step can hold (fusedopt/segments.py): the distinct (learning-rate
// multiplier, weight decay on/off) pairs of the segment table. Each block of the update
// keeps every group's scalars in shared memory, computed by one thread per group.
#define FO_MAX_GROUPS 64

// How the gradient is prepared before the rule, in the math type (from Hyper, step.cuh).
// weight_decay < 0 means "no weight decay" (Keras' None, or a segment group with decay
// off); 0 still computes p - p*0*lr.
template <typename T>
struct Prologue {
    T unscale;       // 1 / loss_scale_factor (1 when unset: multiplying by 1 is exact)
    T clipvalue;     // clip g to [-clipvalue, clipvalue] when > 0
    T weight_decay;  // p <- p - p*weight_decay*lr before the rule, when >= 0
    T coupled_weight_decay;  // g <- g + coupled_weight_decay*p (L2 in the gradient), when > 0
};

// One step's learning rate (for weight decay) and the rule's scalars in the order of its
// reference function (fusedopt/reference.py), in the math type: step.cuh computes them,
// once per segment group (its learning-rate multiplier times the step's rate).
template <typename T>
struct StepScalars {
    T lr;
    T c[FO_MAX_SCALARS];
};

// NumPy semantics: np.maximum and np.clip propagate NaN; np.sign(0) = 0, np.sign(nan) = nan.
template <typename T>
FO_HD T fo_max(T a, T b) { return (a != a) ? a : ((b != b) ? b : (a > b ? a : b)); }

template <typename T>
FO_HD T fo_min(T a, T b) { return (a != a) ? a : ((b != b) ? b : (a < b ? a : b)); }

template <typename T>
FO_HD T fo_clip(T x, T lo, T hi) { return x < lo ? lo : (x > hi ? hi : x); }

template <typename T>
FO_HD T fo_sign(T x) {
    // One select, not nested branches: compilers turn it into vector compares and a
    // blend (the host build of Lion vectorises; random signs made branches mispredict).
    return x != x ? x : T(x > T(0)) - T(x < T(0));
}

FO_HD float fo_sqrt(float x) { return sqrtf(x); }
FO_HD double fo_sqrt(double x) { return sqrt(x); }
FO_HD float fo_abs(float x) { return fabsf(x); }
FO_HD double fo_abs(double x) { return fabs(x); }
FO_HD float fo_pow(float x, float y) { return powf(x, y); }
FO_HD double fo_pow(double x, double y) { return pow(x, y); }

// x - x is 0 for finite x and NaN for inf or NaN.
template <typename T>
FO_HD bool fo_isfinite(T x) { return (x - x) == (x - x); }

// The pipeline's gradient stages for one element (Keras 3 order): unscale, the norm-clip
// `factor` (1 when not clipping by norm), clip by value, coupled decay.
template <typename T>
FO_HD T fo_prepare_gradient(T g, T p, T factor, const Prologue<T>& pro) {
    g = g * pro.unscale;
    g = g * factor;
    if (pro.clipvalue > T(0)) g = fo_clip(g, -pro.clipvalue, pro.clipvalue);
    // torch's Adam(weight_decay): the L2 term joins the clipped gradient, from p before
    // any decoupled decay.
    if (pro.coupled_weight_decay > T(0)) g = g + p * pro.coupled_weight_decay;
    return g;
}

// Decoupled weight decay, before the rule.
template <typename T>
FO_HD void fo_decay(T& p, const Prologue<T>& pro, T lr) {
    if (pro.weight_decay >= T(0)) p = p - p * pro.weight_decay * lr;
}

// The pipeline's first stages for one element, then the rule.
template <typename Rule, typename T>
FO_HD void fused_element(T& p, T g, T& s0, T& s1, T& s2, T factor,
                         const Prologue<T>& pro, const StepScalars<T>& st) {
    g = fo_prepare_gradient(g, p, factor, pro);
    fo_decay(p, pro, st.lr);
    Rule::update(p, g, s0, s1, s2, st.c);
}

// Norm-clip factors from a sum of squares, in double, as Keras computes them.
// Per variable: g*c/max(|g|, c) (|g| = 0 leaves g unchanged; NaN propagates).
FO_HD double clipnorm_factor(double sum_of_squares, double clipnorm) {
    double norm = sum_of_squares > 0.0 ? sqrt(sum_of_squares) : sum_of_squares;
    if (norm != norm) return norm;
    return clipnorm / fo_max(norm, clipnorm);
}

// Global: g*c*min(1/n, 1/c); a norm that is not finite makes every gradient NaN.
FO_HD double global_clipnorm_factor(double sum_of_squares, double clipnorm) {
    double norm = sqrt(sum_of_squares);
    if (!fo_isfinite(norm)) return norm - norm;
    if (norm == 0.0) return clipnorm * (1.0 / clipnorm);  // min(1/0 = inf, 1/c)
    return clipnorm * fo_min(1.0 / norm, 1.0 / clipnorm);
}
