// whole.cuh: what the GPU kernels of the whole-variable rules share (lamb.cu,
// adafactor.cu): each segment group's values at a block's start, and a fixed-tree block
// sum (deterministic: the order depends only on the block size).
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
// them (the unscale with a LossScaleOptimizer's scale, step.cuh: fo_phase); returns
// whether the step is skipped (skip_nonfinite's verdict, or a scale that underflowed).
template <typename Rule, typename T>
__device__ __forceinline__ bool whole_group_values(StepScalars<T>* st, Prologue<T>* pro,
                                                   StepValues* values, const double* groups,
                                                   int ngroups, const Hyper* hyper,
                                                   const StepState* state) {
    __shared__ int skip;
    if ((int)threadIdx.x < ngroups) {
        const int k = (int)threadIdx.x;
        const StepValues v = block_step_values<Rule>(hyper, state, groups[2 * k]);
        const StepPhase phase = fo_phase(*hyper, *state);
        st[k] = fo_narrow<T>(v);
        pro[k] = fo_prologue<T>(*hyper, phase, groups[2 * k + 1] != 0.0);
        if (k == 0) {
            *values = v;
            skip = state->skip != 0 || phase.underflow;
        }
    }
    __syncthreads();
    return skip != 0;
}

#endif  // __CUDACC__
