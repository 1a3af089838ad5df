// reduce.cu: the gradient reductions a step may need before the update kernel, all on
// the device so a step never waits for the host:
//   fusedopt_sumsq        sum of (g/loss_scale)^2 per tile in double, and whether the
//                         tile holds inf or NaN;
//   fusedopt_clip_factors per-segment (clipnorm) or global (global_clipnorm) factors;
//   fusedopt_skip_check   skip_nonfinite bookkeeping: count the step or the skip.
// Deterministic by construction: the tiles are fixed by the layout, each thread sums a
// fixed set of elements in order and blocks combine them in a fixed tree; there are
// no floating-point atomics. Built once per dtype with FUSEDOPT_T defined.
#pragma once
#include "common.cuh"

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)

// Sum `value` and OR `flag` over the block in a fixed tree; the result is in [0].
__device__ __forceinline__ void block_reduce(double* sums, int* flags, double value, int flag) {
    sums[threadIdx.x] = value;
    flags[threadIdx.x] = flag;
    __syncthreads();
    for (unsigned width = FO_BLOCK / 2; width > 0; width /= 2) {
        if (threadIdx.x < width) {
            sums[threadIdx.x] += sums[threadIdx.x + width];
            flags[threadIdx.x] |= flags[threadIdx.x + width];
        }
        __syncthreads();
    }
}

extern "C" __global__ void __launch_bounds__(FO_BLOCK) fusedopt_sumsq(
        const FUSEDOPT_T* __restrict__ g, const long long* __restrict__ tile_start,
        long long ntiles, FUSEDOPT_T unscale, double* __restrict__ partial,
        int* __restrict__ tile_nonfinite) {
    __shared__ double sums[FO_BLOCK];
    __shared__ int flags[FO_BLOCK];
    for (long long k = blockIdx.x; k < ntiles; k += gridDim.x) {
        double acc = 0.0;
        int nonfinite = 0;
        for (long long i = tile_start[k] + threadIdx.x; i < tile_start[k + 1]; i += blockDim.x) {
            const FUSEDOPT_T x = g[i];
            nonfinite |= !fo_isfinite(x);
            const double scaled = (double)(x * unscale);
            acc += scaled * scaled;
        }
        block_reduce(sums, flags, acc, nonfinite);
        if (threadIdx.x == 0) {
            partial[k] = sums[0];
            if (tile_nonfinite) tile_nonfinite[k] = flags[0];
        }
        __syncthreads();
    }
}

// Segment s owns tiles [segment_tiles[s], segment_tiles[s + 1]); for the global norm
// the host passes one segment spanning every tile and global_norm = 1.
extern "C" __global__ void __launch_bounds__(FO_BLOCK) fusedopt_clip_factors(
        const double* __restrict__ partial, const long long* __restrict__ segment_tiles,
        long long nsegments, double clipnorm, int global_norm, FUSEDOPT_T* __restrict__ factors) {
    __shared__ double sums[FO_BLOCK];
    __shared__ int flags[FO_BLOCK];
    for (long long s = blockIdx.x; s < nsegments; s += gridDim.x) {
        double acc = 0.0;
        for (long long k = segment_tiles[s] + threadIdx.x; k < segment_tiles[s + 1]; k += blockDim.x)
            acc += partial[k];
        block_reduce(sums, flags, acc, 0);
        if (threadIdx.x == 0) {
            const double f = global_norm ? global_clipnorm_factor(sums[0], clipnorm)
                                         : clipnorm_factor(sums[0], clipnorm);
            factors[s] = (FUSEDOPT_T)f;
        }
        __syncthreads();
    }
}

// One block. Records this attempt's scalars as the row of iteration `row_index +
// counters[3]` (the newest iteration the device can be at), then counts the step:
// counters = [iterations, skipped steps, last step skipped, first row's iteration].
extern "C" __global__ void __launch_bounds__(FO_BLOCK) fusedopt_skip_check(
        const int* __restrict__ tile_nonfinite, long long ntiles, long long* counters,
        StepScalars<FUSEDOPT_T> row, long long row_index, StepScalars<FUSEDOPT_T>* table) {
    __shared__ double sums[FO_BLOCK];
    __shared__ int flags[FO_BLOCK];
    int nonfinite = 0;
    for (long long k = threadIdx.x; k < ntiles; k += blockDim.x) nonfinite |= tile_nonfinite[k];
    block_reduce(sums, flags, 0.0, nonfinite);
    if (threadIdx.x == 0) {
        table[row_index] = row;
        if (flags[0]) {
            counters[1] += 1;
            counters[2] = 1;
        } else {
            counters[0] += 1;
            counters[2] = 0;
        }
    }
}

#endif  // __CUDACC__
