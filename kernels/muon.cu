// muon.cu: Muon's element-wise kernels on the GPU (muon.cuh); a step is
//   fusedopt_muon_moments  the prologue; AdamW segments: decay and the whole Adam
//                          update; Muon segments: m, and d into the scratch `d`;
//   Newton-Schulz          per Muon segment, d <- NS(d): matrix products by CuPy
//                          (cuBLAS) on the same stream (fusedopt/cuda.py);
//   fusedopt_muon_apply    Muon segments: p decayed (the same operation on the same p
//                          as pass 1 would make) and p -= (lr*d)*rms_scale; the last
//                          block advances the step state, so every launch of the step
//                          reads the same step.
// `segment_values[s]` is segment s's rms scale (>= 0) for a Muon segment, -1 for an
// AdamW one (Muon._segment_arguments). Tiles lie inside segments. fp32 bytes per
// element: AdamW segments 28 (Adam's); Muon segments 20 (read p, g, m; write m, d)
// + 12 (read p, d; write p) = 32, plus the matrix products.
// Keras' options (whole.cuh; `average`, `accumulator` null without): a call that only
// accumulates is fusedopt_muon_moments adding g into the accumulator (12 bytes; with
// use_ema 8 more, and p written on an overwrite), fusedopt_muon_apply returns at once
// and the host queues no matrix products when it knows the call (fusedopt/cuda.py); the
// call that applies reads the accumulator beside g and restarts it (+8 bytes), and
// with use_ema the pass that writes p moves the average (+8: fusedopt_muon_moments on
// AdamW segments, fusedopt_muon_apply on Muon ones).
#pragma once
// whole.cuh for the options' helpers, and fused.cu's block_step_values and take_ticket.
#include "whole.cuh"

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)

// Each segment group's scalars and its two prologues (Muon, AdamW segments), in shared
// memory (the unscale with a LossScaleOptimizer's scale, step.cuh: fo_phase), and the
// call's options; returns whether the step is skipped (skip_nonfinite's verdict, or a
// scale that underflowed).
template <typename T>
__device__ __forceinline__ bool muon_group_values(StepScalars<T>* st, Prologue<T>* pro,
                                                  Prologue<T>* pro_adamw, StepValues* values,
                                                  OptionScalars<T>* options,
                                                  const double* groups, int ngroups,
                                                  const Hyper* hyper, const StepState* state) {
    __shared__ int skip;
    if ((int)threadIdx.x < ngroups) {
        const int k = (int)threadIdx.x;
        const StepValues v = block_step_values<muon>(hyper, state, groups[2 * k]);
        const StepPhase phase = fo_phase(*hyper, *state);
        st[k] = fo_narrow<T>(v);
        pro[k] = fo_prologue<T>(*hyper, phase, groups[2 * k + 1] != 0.0);
        pro_adamw[k] = muon_adamw_prologue<T>(*hyper, phase, groups[2 * k + 1] != 0.0);
        if (k == 0) {
            *values = v;
            *options = fo_options<T>(phase);
            skip = state->skip != 0 || phase.underflow;
        }
    }
    __syncthreads();
    return skip != 0;
}

extern "C" __global__ void __launch_bounds__(FO_BLOCK) fusedopt_muon_moments(
        FUSEDOPT_T* __restrict__ p, const FUSEDOPT_T* __restrict__ g,
        FUSEDOPT_T* __restrict__ m, FUSEDOPT_T* __restrict__ v, FUSEDOPT_T* __restrict__ d,
        FUSEDOPT_T* __restrict__ average, FUSEDOPT_T* __restrict__ accumulator,
        const long long* __restrict__ tile_start, const int* __restrict__ tile_segment,
        const int* __restrict__ tile_group, long long ntiles,
        const FUSEDOPT_T* __restrict__ factors, int nfactors,
        const double* __restrict__ segment_values, const double* __restrict__ groups,
        int ngroups, const Hyper* __restrict__ hyper, const StepState* __restrict__ state) {
    typedef FUSEDOPT_T T;
    __shared__ StepScalars<T> shared_st[FO_MAX_GROUPS];
    __shared__ Prologue<T> shared_pro[FO_MAX_GROUPS], shared_adamw[FO_MAX_GROUPS];
    __shared__ StepValues shared_values;
    __shared__ OptionScalars<T> shared_options;
    if (muon_group_values<T>(shared_st, shared_pro, shared_adamw, &shared_values,
                             &shared_options, groups, ngroups, hyper, state))
        return;  // a skipped step writes nothing
    const OptionScalars<T> options = shared_options;
    if (accumulator && !options.apply) {  // gradient accumulation: this call only adds
        whole_accumulate(p, (float*)nullptr, g, average, accumulator, tile_start, ntiles,
                             FoRounding{}, options);
        return;
    }
    for (long long k = blockIdx.x; k < ntiles; k += gridDim.x) {
        const long long begin = tile_start[k], end = tile_start[k + 1];
        const int segment = tile_segment[k];
        const T factor = factors == nullptr ? T(1) : factors[nfactors == 1 ? 0 : segment];
        const StepScalars<T> st = shared_st[tile_group[k]];
        if (segment_values[segment] < 0.0) {  // AdamW: the whole update here
            const Prologue<T> pro = shared_adamw[tile_group[k]];
            for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) {
                T pi = fo_load(p + i), mi = fo_load(m + i), vi = fo_load(v + i);
                const T gi = fo_prepare_gradient(
                    whole_gradient(g, accumulator, i, options, false), pi, factor, pro);
                fo_decay(pi, pro, st.lr);
                muon::adamw(pi, gi, mi, vi, st.c);
                whole_average(pi, average, i, options);
                fo_store(p + i, pi);
                fo_store(m + i, mi);
                fo_store(v + i, vi);
            }
        } else {  // Muon: m and d; p moves in fusedopt_muon_apply
            const Prologue<T> pro = shared_pro[tile_group[k]];
            for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) {
                T mi = fo_load(m + i);
                const T graw = whole_gradient(g, accumulator, i, options, false);
                const T gi = fo_prepare_gradient(graw, fo_load(p + i), factor, pro);
                fo_store(d + i, muon::momentum(gi, mi, st.c));
                fo_store(m + i, mi);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(FO_BLOCK) fusedopt_muon_apply(
        FUSEDOPT_T* __restrict__ p, const FUSEDOPT_T* __restrict__ d,
        FUSEDOPT_T* __restrict__ average, const long long* __restrict__ tile_start,
        const int* __restrict__ tile_segment, const int* __restrict__ tile_group, long long ntiles,
        const double* __restrict__ segment_values, const double* __restrict__ groups,
        int ngroups, const Hyper* __restrict__ hyper, StepState* state) {
    typedef FUSEDOPT_T T;
    __shared__ StepScalars<T> shared_st[FO_MAX_GROUPS];
    __shared__ Prologue<T> shared_pro[FO_MAX_GROUPS], shared_adamw[FO_MAX_GROUPS];
    __shared__ StepValues shared_values;
    __shared__ OptionScalars<T> shared_options;
    const bool skip = muon_group_values<T>(shared_st, shared_pro, shared_adamw, &shared_values,
                                           &shared_options, groups, ngroups, hyper, state);
    if (threadIdx.x == 0) take_ticket(state, shared_values, skip, hyper);
    const OptionScalars<T> options = shared_options;
    if (skip || !options.apply) return;  // skipped, or a call that only accumulates
    for (long long k = blockIdx.x; k < ntiles; k += gridDim.x) {
        const double scale = segment_values[tile_segment[k]];
        if (scale < 0.0) continue;  // AdamW segments are done
        const long long begin = tile_start[k], end = tile_start[k + 1];
        const StepScalars<T> st = shared_st[tile_group[k]];
        const Prologue<T> pro = shared_pro[tile_group[k]];
        for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) {
            T pi = fo_load(p + i);
            fo_decay(pi, pro, st.lr);
            muon::apply(pi, fo_load(d + i), (T)scale, st.c);
            whole_average(pi, average, i, options);
            fo_store(p + i, pi);
        }
    }
}

#endif  // __CUDACC__
