// lamb.cu: LAMB's step on the GPU (lamb.cuh), two passes over the elements:
//   fusedopt_lamb_moments  the gradient prologue, decay, m and v updated; per tile, the
//                          sums of p^2 (decayed p) and r^2 in double (partial[2k], [2k+1]);
//   fusedopt_lamb_ratios   per segment, its tiles' sums in a fixed order -> trust ratio;
//   fusedopt_lamb_apply    p decayed again (the same operation on the same p), r
//                          recomputed from the stored m and v (the same bits as pass 1),
//                          p -= ratio*lr*r; the last block advances the step state.
// Recomputing r costs a read of m and v in pass 2 (fp32: 24 + 16 = 40 bytes per
// element in all) where a scratch r would cost a write and a read of r (also 40) plus
// a params-sized buffer, so the step keeps no scratch but the per-tile sums.
// Keras' options (whole.cuh; `average`, `accumulator` null without): a call that only
// accumulates is fusedopt_lamb_moments adding g into the accumulator (8 bytes read, 4
// written per fp32 element; with use_ema also p and the average read, the average
// written, p only on an overwrite), the other two return at once; the call that
// applies reads the accumulator beside g in pass 1 and restarts it (+8 bytes), and
// with use_ema pass 2 moves the average (+8 bytes).
// Storage (ARCHITECTURE.md, principle 8; fused.cu's): params FUSEDOPT_P, grads
// FUSEDOPT_G, state FUSEDOPT_S, math FUSEDOPT_T. 16-bit params may have a float32
// master copy (`master`, null without), which the passes read and write as p, the
// params receiving it rounded; else they are stored rounded to nearest or
// stochastically (FoRounding, seeded by the step's count and the flat index, as
// fused.cu). m and v are stored rounded to nearest, and pass 1's r is computed from
// the values stored (fo_stored), which pass 2 reads back: both passes see one r, and
// it is Keras' (its update reads m and v back after assigning them).
// The tiles lie inside segments (fusedopt/_kernels.py, TileTable(per_segment=True)).
// Each thread takes a fixed set of a tile's elements in a fixed order and blocks add
// in a fixed tree, so the sums depend only on the layout: deterministic, no atomics.
// Only the last kernel advances the counters, so all three read the same step.
#pragma once
#include "whole.cuh"

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)

extern "C" __global__ void __launch_bounds__(FO_BLOCK) fusedopt_lamb_moments(
        FUSEDOPT_P* __restrict__ p, const FUSEDOPT_G* __restrict__ g,
        FUSEDOPT_S* __restrict__ m, FUSEDOPT_S* __restrict__ v, float* __restrict__ master,
        FUSEDOPT_S* __restrict__ average, FUSEDOPT_S* __restrict__ accumulator,
        const long long* __restrict__ tile_start, const int* __restrict__ tile_segment,
        const int* __restrict__ tile_group, long long ntiles,
        const FUSEDOPT_T* __restrict__ factors, int nfactors, const double* __restrict__ groups,
        int ngroups, const Hyper* __restrict__ hyper, const StepState* __restrict__ state,
        double* __restrict__ partial) {
    typedef FUSEDOPT_T T;
    typedef FUSEDOPT_S S;
    __shared__ StepScalars<T> shared_st[FO_MAX_GROUPS];
    __shared__ Prologue<T> shared_pro[FO_MAX_GROUPS];
    __shared__ StepValues shared_values;
    __shared__ OptionScalars<T> shared_options;
    __shared__ FoRounding shared_rounding;
    __shared__ double sums_p[FO_BLOCK], sums_r[FO_BLOCK];
    if (whole_group_values<lamb, T>(shared_st, shared_pro, &shared_values, &shared_options,
                                    groups, ngroups, hyper, state, &shared_rounding))
        return;  // a skipped step writes nothing
    const OptionScalars<T> options = shared_options;
    if (accumulator && !options.apply) {  // gradient accumulation: this call only adds
        whole_accumulate(p, master, g, average, accumulator, tile_start, ntiles,
                         shared_rounding, options);
        return;
    }
    for (long long k = blockIdx.x; k < ntiles; k += gridDim.x) {
        const long long begin = tile_start[k], end = tile_start[k + 1];
        const T factor = factors == nullptr ? T(1) : factors[nfactors == 1 ? 0 : tile_segment[k]];
        const StepScalars<T> st = shared_st[tile_group[k]];
        const Prologue<T> pro = shared_pro[tile_group[k]];
        double sp = 0.0, sr = 0.0;
        for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) {
            T pi = whole_load_param<T>(p, master, i);
            T mi = whole_load<T>(m, i), vi = whole_load<T>(v, i);
            const T gi = fo_prepare_gradient(whole_gradient(g, accumulator, i, options, false),
                                             pi, factor, pro);
            fo_decay(pi, pro, st.lr);
            lamb::moments(gi, mi, vi, st.c);
            mi = fo_stored<S>(mi);  // what pass 2 reads back
            vi = fo_stored<S>(vi);
            const T r = lamb::direction(mi, vi, st.c);
            whole_store(m, i, mi);
            whole_store(v, i, vi);
            sp += (double)pi * (double)pi;
            sr += (double)r * (double)r;
        }
        whole_block_sum(sums_p, sums_r, sp, sr);
        if (threadIdx.x == 0) {
            partial[2 * k] = sums_p[0];
            partial[2 * k + 1] = sums_r[0];
        }
        __syncthreads();
    }
}

// Segment s owns tiles [segment_tiles[s], segment_tiles[s + 1]).
extern "C" __global__ void __launch_bounds__(FO_BLOCK) fusedopt_lamb_ratios(
        const double* __restrict__ partial, const long long* __restrict__ segment_tiles,
        long long nsegments, FUSEDOPT_T* __restrict__ ratios) {
    __shared__ double sums_p[FO_BLOCK], sums_r[FO_BLOCK];
    for (long long s = blockIdx.x; s < nsegments; s += gridDim.x) {
        whole_segment_sums(partial, segment_tiles, s, sums_p, sums_r);
        if (threadIdx.x == 0) ratios[s] = (FUSEDOPT_T)lamb_trust_ratio(sums_p[0], sums_r[0]);
        __syncthreads();
    }
}

extern "C" __global__ void __launch_bounds__(FO_BLOCK) fusedopt_lamb_apply(
        FUSEDOPT_P* __restrict__ p, const FUSEDOPT_S* __restrict__ m,
        const FUSEDOPT_S* __restrict__ v, float* __restrict__ master,
        FUSEDOPT_S* __restrict__ average, const long long* __restrict__ tile_start,
        const int* __restrict__ tile_segment, const int* __restrict__ tile_group,
        long long ntiles, const FUSEDOPT_T* __restrict__ ratios,
        const double* __restrict__ groups, int ngroups, const Hyper* __restrict__ hyper,
        StepState* state) {
    typedef FUSEDOPT_T T;
    typedef FUSEDOPT_P P;
    __shared__ StepScalars<T> shared_st[FO_MAX_GROUPS];
    __shared__ Prologue<T> shared_pro[FO_MAX_GROUPS];
    __shared__ StepValues shared_values;
    __shared__ OptionScalars<T> shared_options;
    __shared__ FoRounding shared_rounding;
    const bool skip = whole_group_values<lamb, T>(shared_st, shared_pro, &shared_values,
                                                  &shared_options, groups, ngroups, hyper, state,
                                                  &shared_rounding);
    if (threadIdx.x == 0) take_ticket(state, shared_values, skip, hyper);
    const OptionScalars<T> options = shared_options;
    if (skip || !options.apply) return;  // skipped, or a call that only accumulates
    const FoRounding rounding = shared_rounding;
    for (long long k = blockIdx.x; k < ntiles; k += gridDim.x) {
        const long long begin = tile_start[k], end = tile_start[k + 1];
        const T ratio = ratios[tile_segment[k]];
        const StepScalars<T> st = shared_st[tile_group[k]];
        const Prologue<T> pro = shared_pro[tile_group[k]];
        for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) {
            T pi = whole_load_param<T>(p, master, i);
            fo_decay(pi, pro, st.lr);
            lamb::apply(pi, lamb::direction(whole_load<T>(m, i), whole_load<T>(v, i), st.c),
                        ratio, st.c);
            if (average) {
                pi = whole_param_stored<P>(pi, master != nullptr, rounding, i);
                whole_average(pi, average, i, options);
            }
            whole_store_param(p, master, pi, rounding, i);
        }
    }
}

#endif  // __CUDACC__
