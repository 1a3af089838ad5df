// whole.cuh: what the GPU kernels of the whole-variable rules share (lamb.cu,
// adafactor.cu, muon.cu): each segment group's values at a block's start, a fixed-tree
// block sum (deterministic: the order depends only on the block size), and Keras'
// options around the rule (kernels/options.cuh), on any storage types (P, G, S: the
// params', grads' and state's; the options' slots are state; lamb.cu takes them all):
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

// Element i of a buffer of storage S in the math type T (exact), and a math value stored
// into it (rounded to nearest once when S is narrower): every access through
// common.cuh's fo_load/fo_store, which the emulator counts.
template <typename T, typename S>
__device__ __forceinline__ T whole_load(const S* x, long long i) {
    return (T)fo_load(fo_load(x + i));
}

template <typename S, typename T>
__device__ __forceinline__ void whole_store(S* x, long long i, T value) {
    S s;
    fo_store(s, value);
    fo_store(x + i, s);
}

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
// With `rounding`, also the params' rounding of this step (fused_step's).
template <typename Rule, typename T>
__device__ __forceinline__ bool whole_group_values(StepScalars<T>* st, Prologue<T>* pro,
                                                   StepValues* values, OptionScalars<T>* options,
                                                   const double* groups, int ngroups,
                                                   const Hyper* hyper, const StepState* state,
                                                   FoRounding* rounding = nullptr) {
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
            if (rounding) *rounding = fo_rounding(*hyper, *state);
        }
    }
    __syncthreads();
    return skip != 0;
}

// Gradient accumulation's calls that only add (no clip, no rule): fused.cu's
// accumulate_tiles, 16 bytes at a time where the buffers allow, with
// use_ema the moving average too (of the master when there is one, else of the params
// as stored; p and the master written only when the average overwrites them).
template <typename T, typename P, typename G, typename S>
__device__ __forceinline__ void whole_accumulate(P* p, float* master, const G* g, S* avg,
                                                 S* acc, const long long* tile_start,
                                                 long long ntiles, const FoRounding& rounding,
                                                 const OptionScalars<T>& o) {
    constexpr int V = 16 / sizeof(T);
    const long long first = common_boundary<V>(p, master, g, (const S*)nullptr,
                                               (const S*)nullptr, (const S*)nullptr, avg, acc);
    accumulate_tiles<V>(p, master, g, avg, acc, tile_start, ntiles, first, rounding, o);
}

// The gradient element i the rule's first pass reads: g's, or on gradient
// accumulation's applying call (`acc` not null) the accumulated mean, which is stored
// back into the accumulator when later passes read it there (`keep`), else the
// accumulator restarts at 0 (options.cuh, fo_accumulated_mean).
template <typename T, typename G, typename S>
__device__ __forceinline__ T whole_gradient(const G* g, S* acc, long long i,
                                            const OptionScalars<T>& o, bool keep) {
    T x = whole_load<T>(g, i);
    if (acc == nullptr) return x;
    T q = whole_load<T>(acc, i);
    x = fo_accumulated_mean(x, q, o);
    whole_store(acc, i, keep ? x : q);
    return x;
}

// use_ema after the rule, on element i's new p (before it is stored): the average moves,
// and overwrites p when ema_overwrite_frequency says so. Nothing without an average.
// `p` is what the model holds: the master's value, or the params' as stored
// (whole_param_stored).
template <typename T, typename S>
__device__ __forceinline__ void whole_average(T& p, S* avg, long long i,
                                              const OptionScalars<T>& o) {
    if (avg == nullptr) return;
    T e = whole_load<T>(avg, i);
    fo_moving_average<S>(p, e, o);
    whole_store(avg, i, e);
}

// Element i's new p as the model will hold it, for use_ema's average: itself with a
// master copy or params of the math type, else the params' value once stored (rounded
// as whole_store_param will round it).
template <typename P, typename T>
__device__ __forceinline__ T whole_param_stored(T p, bool master, const FoRounding& r,
                                                long long i) {
    if constexpr (sizeof(P) == 2) {
        if (!master) return fo_param_stored<P>(p, r, (fo_u64)i);
    }
    return p;
}

// Element i's new p stored: into the master when there is one, and into the params
// rounded as every param store (fused.cu: update_run).
template <typename P, typename T>
__device__ __forceinline__ void whole_store_param(P* p, float* master, T x, const FoRounding& r,
                                                  long long i) {
    if constexpr (sizeof(P) == 2) {
        if (master) fo_store(master + i, (float)x);
    }
    P s;
    fo_store_param(s, x, r, (fo_u64)i);
    fo_store(p + i, s);
}

// Element i's p as the rule reads it: the master's when there is one, else the params'.
template <typename T, typename P>
__device__ __forceinline__ T whole_load_param(const P* p, const float* master, long long i) {
    if constexpr (sizeof(P) == 2) {
        if (master) return (T)fo_load(master + i);
    }
    return whole_load<T>(p, i);
}

#endif  // __CUDACC__
