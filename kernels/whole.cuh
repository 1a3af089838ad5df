// whole.cuh: what the GPU kernels of the whole-variable rules share (lamb.cu,
// adafactor.cu, muon.cu): each segment group's values at a block's start, a fixed-tree
// block sum (deterministic: the order depends only on the block size), and Keras'
// options around the rule (kernels/options.cuh; float32/float64 buffers only):
//   a call of gradient accumulation that only adds is the rule's first kernel running
//     fused.cu's accumulate_run over the tiles (g and the accumulator; p and the
//     average with use_ema); the rule's other kernels return at once (the last after
//     taking the ticket), so every call launches the same kernels;
//   the call that applies reads the accumulated mean where the rule's first pass reads
//     g (whole_gradient), and the accumulator restarts there or in the last pass that
//     reads it;
//   the moving average runs in the pass that writes p, on p in registers
//     (whole_average).
#pragma once
// fused.cu for block_step_values and take_ticket (FUSEDOPT_RULE is not defined here, so
// it defines no kernel).
#include "fused.cu"

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)

// Sum two values over the block in a fixed tree; the results are in a[0] and b[0].
__device__ __forceinline__ void whole_block_sum(double* a, double* b, double x, double y) {
    a[threadIdx.x] = x;
    b[threadIdx.x] = y;
    __syncthreads();
    for (unsigned width = FO_BLOCK / 2; width > 0; width /= 2) {
        if (threadIdx.x < width) {
            a[threadIdx.x] += a[threadIdx.x + width];
            b[threadIdx.x] += b[threadIdx.x + width];
        }
        __syncthreads();
    }
}

// Segment s's sums of its tiles' two partial sums (partial[2k], partial[2k + 1]; segment
// s owns tiles [segment_tiles[s], segment_tiles[s + 1])), in a fixed order: a[0], b[0].
__device__ __forceinline__ void whole_segment_sums(const double* partial,
                                                   const long long* segment_tiles, long long s,
                                                   double* a, double* b) {
    double x = 0.0, y = 0.0;
    for (long long k = segment_tiles[s] + threadIdx.x; k < segment_tiles[s + 1]; k += blockDim.x) {
        x += partial[2 * k];
        y += partial[2 * k + 1];
    }
    whole_block_sum(a, b, x, y);
}

// Each segment group's scalars and prologue, in shared memory, as fused_step computes
// them (the unscale with a LossScaleOptimizer's scale, step.cuh: fo_phase), and the
// call's options; returns whether the step is skipped (skip_nonfinite's verdict, or a
// scale that underflowed).
template <typename Rule, typename T>
__device__ __forceinline__ bool whole_group_values(StepScalars<T>* st, Prologue<T>* pro,
                                                   StepValues* values, OptionScalars<T>* options,
                                                   const double* groups, int ngroups,
                                                   const Hyper* hyper, const StepState* state) {
    __shared__ int skip;
    if ((int)threadIdx.x < ngroups) {
        const int k = (int)threadIdx.x;
        const StepValues v = block_step_values<Rule>(hyper, state, groups[2 * k]);
        const StepPhase phase = fo_phase(*hyper, *state);
        st[k] = fo_narrow<T>(v);
        pro[k] = fo_prologue<T>(*hyper, phase, groups[2 * k + 1] != 0.0);
        if (k == 0) {
            *values = v;
            *options = fo_options<T>(phase);
            skip = state->skip != 0 || phase.underflow;
        }
    }
    __syncthreads();
    return skip != 0;
}

// Gradient accumulation's calls that only add (no clip, no rule): fused.cu's
// accumulate_run over every tile, 16 bytes at a time where the buffers allow, with
// use_ema the moving average too (p written only when the average overwrites it).
template <typename T>
__device__ __forceinline__ void whole_accumulate(T* p, const T* g, T* avg, T* acc,
                                                 const long long* tile_start, long long ntiles,
                                                 const OptionScalars<T>& o) {
    constexpr int V = 16 / sizeof(T);
    const FoRounding rounding = {};  // float32/float64 params: stored as they are
    const long long first = common_boundary<V>(p, (const float*)nullptr, g, (const T*)nullptr,
                                               (const T*)nullptr, (const T*)nullptr, avg, acc);
    for (long long k = blockIdx.x; k < ntiles; k += gridDim.x) {
        const long long begin = tile_start[k], end = tile_start[k + 1];
        long long head, body_end;
        tile_split<V>(begin, end, first, &head, &body_end);
        for (long long i = begin + threadIdx.x; i < head; i += blockDim.x)
            accumulate_run<1>(i, p, (float*)nullptr, g, avg, acc, rounding, o);
        for (long long i = head + V * threadIdx.x; i < body_end; i += V * blockDim.x)
            accumulate_run<V>(i, p, (float*)nullptr, g, avg, acc, rounding, o);
        for (long long i = body_end + threadIdx.x; i < end; i += blockDim.x)
            accumulate_run<1>(i, p, (float*)nullptr, g, avg, acc, rounding, o);
    }
}

// The gradient element i the rule's first pass reads: g's, or on gradient
// accumulation's applying call (`acc` not null) the accumulated mean, which is stored
// back into the accumulator when later passes read it there (`keep`), else the
// accumulator restarts at 0 (options.cuh, fo_accumulated_mean).
template <typename T>
__device__ __forceinline__ T whole_gradient(const T* g, T* acc, long long i,
                                            const OptionScalars<T>& o, bool keep) {
    T x = fo_load(g + i);
    if (acc == nullptr) return x;
    T q = fo_load(acc + i);
    x = fo_accumulated_mean(x, q, o);
    fo_store(acc + i, keep ? x : q);
    return x;
}

// use_ema after the rule, on element i's new p (before it is stored): the average moves,
// and overwrites p when ema_overwrite_frequency says so. Nothing without an average.
template <typename T>
__device__ __forceinline__ void whole_average(T& p, T* avg, long long i,
                                              const OptionScalars<T>& o) {
    if (avg == nullptr) return;
    T e = fo_load(avg + i);
    fo_moving_average<T>(p, e, o);
    fo_store(avg + i, e);
}

#endif  // __CUDACC__
