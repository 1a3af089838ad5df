// adafactor.cu: Adafactor's step on the GPU (adafactor.cuh), in six launches of four
// kernels:
//   fusedopt_adafactor_pass (MOMENTS)  per tile (tiles lie inside segments): the gradient
//                               prologue and decay; the sum of p^2 (decayed p); an
//                               unfactored segment's v and the sum of u^2; a factored
//                               segment's G = g^2 + eps_1 into v (a scratch until
//                               the apply rebuilds v there);
//   fusedopt_adafactor_rows     one block per row of a factored segment: r from the
//                               row's sum of G;
//   fusedopt_adafactor_columns  one thread per column: c from the column's sum of G;
//                               one per leading index: the mean of its new r;
//   fusedopt_adafactor_pass (RMS)  per factored tile: v from r, c and the row mean, the
//                               sum of u^2;
//   fusedopt_adafactor_scales   per segment, its tiles' sums in a fixed order ->
//                               max(eps_2, rms(p)) and max(1, rms(u)/clip_threshold);
//   fusedopt_adafactor_pass (APPLY)  p decayed again, v rebuilt (factored: stored) or
//                               read, u recomputed (the same bits), p moves; the last
//                               block advances the step state.
// Every sum is in double, by one thread in element order or by a block in a fixed
// tree: deterministic, no atomics. Only the last launch advances the counters, so all
// six read the same step; each returns at once on a skipped step.
// fp32 bytes per element: factored segments 12 (read p, g; write G) + 4 (rows) + 4
// (columns) + 8 (read p, g) + 16 (read p, g; write p, v) = 44; unfactored 16 + 16 = 32;
// the r and c statistics are a row's or a column's worth of the params.
// Keras' options (whole.cuh; `average`, `accumulator` null without): a call that only
// accumulates is the MOMENTS launch adding g into the accumulator (12 bytes; with
// use_ema 8 more, and p written on an overwrite), the other five return at once; the
// call that applies has MOMENTS read the accumulator beside g and store the mean there
// (+8 bytes), which RMS and APPLY read in place of g, APPLY restarting it (+4); with
// use_ema APPLY moves the average (+8).
#pragma once
#include "whole.cuh"

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)

#define FO_ADAFACTOR_ROW(table, s) ((table) + (s) * FO_ADAFACTOR_FIELDS)

// The prepared gradient (from element i's raw gradient `graw`) and decayed parameter of
// element i (the same bits in every pass).
template <typename T>
__device__ __forceinline__ void adafactor_element(const T* p, T graw, long long i, T factor,
                                                  const Prologue<T>& pro,
                                                  const StepScalars<T>& st, T* pi, T* gi) {
    *pi = fo_load(p + i);
    *gi = fo_prepare_gradient(graw, *pi, factor, pro);
    fo_decay(*pi, pro, st.lr);
}

// The scalars that do not depend on a segment group (beta), and whether the statistics
// stay as they are: a skipped step (skip_nonfinite's verdict, or a LossScaleOptimizer's
// scale that underflowed: fo_phase) or a call of gradient accumulation that only adds.
__device__ __forceinline__ bool adafactor_common(StepScalars<FUSEDOPT_T>* st, const Hyper* hyper,
                                                 const StepState* state) {
    __shared__ int skip;
    if (threadIdx.x == 0) {
        *st = fo_narrow<FUSEDOPT_T>(block_step_values<adafactor>(hyper, state, 1.0));
        const StepPhase phase = fo_phase(*hyper, *state);
        skip = state->skip != 0 || phase.underflow || !phase.apply;
    }
    __syncthreads();
    return skip != 0;
}

// `G` is the v slot as the MOMENTS pass left it (G for factored segments).
extern "C" __global__ void __launch_bounds__(FO_BLOCK) fusedopt_adafactor_rows(
        const FUSEDOPT_T* __restrict__ G, FUSEDOPT_T* __restrict__ r,
        const double* __restrict__ table, long long nsegments, const Hyper* __restrict__ hyper,
        const StepState* __restrict__ state) {
    typedef FUSEDOPT_T T;
    __shared__ StepScalars<T> st;
    __shared__ double sums[FO_BLOCK], unused[FO_BLOCK];
    if (adafactor_common(&st, hyper, state)) return;
    const long long rows = (long long)FO_ADAFACTOR_ROW(table, nsegments)[3];
    for (long long q = blockIdx.x; q < rows; q += gridDim.x) {
        const double* row = FO_ADAFACTOR_ROW(table, adafactor_segment_of(table, nsegments, 3, q));
        const long long cols = (long long)row[2];
        const long long start = (long long)row[0] + (q - (long long)row[3]) * cols;
        double sum = 0.0;
        for (long long j = threadIdx.x; j < cols; j += blockDim.x)
            sum += (double)fo_load(G + start + j);
        whole_block_sum(sums, unused, sum, 0.0);
        if (threadIdx.x == 0) r[q] = adafactor::statistic(r[q], (T)sums[0], cols, st.c);
        __syncthreads();
    }
}

extern "C" __global__ void __launch_bounds__(FO_BLOCK) fusedopt_adafactor_columns(
        const FUSEDOPT_T* __restrict__ G, const FUSEDOPT_T* __restrict__ r,
        FUSEDOPT_T* __restrict__ c, FUSEDOPT_T* __restrict__ row_means,
        const double* __restrict__ table, long long nsegments, const Hyper* __restrict__ hyper,
        const StepState* __restrict__ state) {
    typedef FUSEDOPT_T T;
    __shared__ StepScalars<T> st;
    if (adafactor_common(&st, hyper, state)) return;
    const double* totals = FO_ADAFACTOR_ROW(table, nsegments);
    const long long columns = (long long)totals[4], items = columns + (long long)totals[5];
    for (long long q = blockIdx.x * (long long)blockDim.x + threadIdx.x; q < items;
         q += (long long)gridDim.x * blockDim.x) {
        const int field = q < columns ? 4 : 5;
        const long long x = q < columns ? q : q - columns;
        const double* row = FO_ADAFACTOR_ROW(table, adafactor_segment_of(table, nsegments, field, x));
        const long long rows = (long long)row[1], cols = (long long)row[2];
        double sum = 0.0;
        if (field == 4) {  // column j of leading index l: G[l, :, j]
            const long long local = x - (long long)row[4], l = local / cols;
            const long long first = (long long)row[0] + l * rows * cols + (local - l * cols);
            for (long long i = 0; i < rows; ++i) sum += (double)fo_load(G + first + i * cols);
            c[x] = adafactor::statistic(c[x], (T)sum, rows, st.c);
        } else {  // the mean of the new r[l, :]
            const long long first = (long long)row[3] + (x - (long long)row[5]) * rows;
            for (long long i = 0; i < rows; ++i) sum += (double)r[first + i];
            row_means[x] = (T)sum / (T)rows;
        }
    }
}

// Segment s owns tiles [segment_tiles[s], segment_tiles[s + 1]); scales[2s], [2s + 1]:
// its max(eps_2, rms(p)) and max(1, rms(u)/clip_threshold).
extern "C" __global__ void __launch_bounds__(FO_BLOCK) fusedopt_adafactor_scales(
        const double* __restrict__ partial, const long long* __restrict__ segment_tiles,
        long long nsegments, const double* __restrict__ table, const Hyper* __restrict__ hyper,
        const StepState* __restrict__ state, FUSEDOPT_T* __restrict__ scales) {
    __shared__ double sums_p[FO_BLOCK], sums_u[FO_BLOCK];
    const StepPhase phase = fo_phase(*hyper, *state);
    if (state->skip || phase.underflow || !phase.apply) return;
    for (long long s = blockIdx.x; s < nsegments; s += gridDim.x) {
        whole_segment_sums(partial, segment_tiles, s, sums_p, sums_u);
        const long long n = (long long)(FO_ADAFACTOR_ROW(table, s + 1)[0] -
                                        FO_ADAFACTOR_ROW(table, s)[0]);
        if (threadIdx.x == 0 && n > 0) adafactor_scales(sums_p[0], sums_u[0], n, *hyper, scales + 2 * s);
        __syncthreads();
    }
}

// The passes over the elements (`phase`), tile by tile.
#define FO_ADAFACTOR_MOMENTS 0
#define FO_ADAFACTOR_RMS 1
#define FO_ADAFACTOR_APPLY 2

extern "C" __global__ void __launch_bounds__(FO_BLOCK) fusedopt_adafactor_pass(
        int phase, FUSEDOPT_T* __restrict__ p, const FUSEDOPT_T* __restrict__ g,
        FUSEDOPT_T* __restrict__ v, const FUSEDOPT_T* __restrict__ r,
        const FUSEDOPT_T* __restrict__ c, const FUSEDOPT_T* __restrict__ row_means,
        FUSEDOPT_T* __restrict__ average, FUSEDOPT_T* __restrict__ accumulator,
        const long long* __restrict__ tile_start, const int* __restrict__ tile_segment,
        const int* __restrict__ tile_group, long long ntiles,
        const FUSEDOPT_T* __restrict__ factors, int nfactors, const FUSEDOPT_T* __restrict__ scales,
        const double* __restrict__ table, const double* __restrict__ groups, int ngroups,
        const Hyper* __restrict__ hyper, StepState* state, double* __restrict__ partial) {
    typedef FUSEDOPT_T T;
    __shared__ StepScalars<T> shared_st[FO_MAX_GROUPS];
    __shared__ Prologue<T> shared_pro[FO_MAX_GROUPS];
    __shared__ StepValues shared_values;
    __shared__ OptionScalars<T> shared_options;
    __shared__ double sums_p[FO_BLOCK], sums_u[FO_BLOCK];
    const bool skip = whole_group_values<adafactor, T>(shared_st, shared_pro, &shared_values,
                                                       &shared_options, groups, ngroups, hyper,
                                                       state);
    if (phase == FO_ADAFACTOR_APPLY && threadIdx.x == 0)
        take_ticket(state, shared_values, skip, hyper);
    if (skip) return;  // a skipped step writes nothing
    const OptionScalars<T> options = shared_options;
    if (accumulator && !options.apply) {  // gradient accumulation: this call only adds
        if (phase == FO_ADAFACTOR_MOMENTS)
            whole_accumulate(p, (float*)nullptr, g, average, accumulator, tile_start, ntiles,
                             FoRounding{}, options);
        return;
    }
    // On the call that applies, MOMENTS leaves the accumulated mean in the accumulator;
    // RMS and APPLY read it there.
    const T* grad = accumulator ? accumulator : g;
    for (long long k = blockIdx.x; k < ntiles; k += gridDim.x) {
        const long long begin = tile_start[k], end = tile_start[k + 1];
        const int segment = tile_segment[k];
        const T factor = factors == nullptr ? T(1) : factors[nfactors == 1 ? 0 : segment];
        const StepScalars<T> st = shared_st[tile_group[k]];
        const Prologue<T> pro = shared_pro[tile_group[k]];
        const double* row = FO_ADAFACTOR_ROW(table, segment);
        const bool factored = row[1] >= 0.0;
        if (phase == FO_ADAFACTOR_RMS && !factored) continue;  // summed by MOMENTS
        double sp = 0.0, su = 0.0;
        AdafactorWalk walk;
        if (factored) walk = AdafactorWalk(row, begin + threadIdx.x, blockDim.x);
        for (long long i = begin + threadIdx.x; i < end; i += blockDim.x, walk.advance()) {
            T pi, gi, vi;
            const T graw = phase == FO_ADAFACTOR_MOMENTS
                               ? whole_gradient(g, accumulator, i, options, true)
                               : fo_load(grad + i);
            if (phase == FO_ADAFACTOR_APPLY && accumulator) fo_store(accumulator + i, T(0));
            adafactor_element(p, graw, i, factor, pro, st, &pi, &gi);
            if (phase == FO_ADAFACTOR_MOMENTS) {
                sp += (double)(pi * pi);
                if (factored) {
                    fo_store(v + i, adafactor::regulated(gi, st.c));
                    continue;
                }
                vi = fo_load(v + i);
                adafactor::moment(gi, vi, st.c);
                fo_store(v + i, vi);
            } else if (factored) {
                vi = walk.v(row, r, c, row_means);
                if (phase == FO_ADAFACTOR_APPLY) fo_store(v + i, vi);
            } else {
                vi = fo_load(v + i);
            }
            if (phase == FO_ADAFACTOR_APPLY) {
                adafactor::apply(pi, gi, vi, scales[2 * segment], scales[2 * segment + 1], st.c);
                whole_average(pi, average, i, options);
                fo_store(p + i, pi);
            } else {
                const T u = gi / fo_sqrt(vi);
                su += (double)(u * u);
            }
        }
        if (phase == FO_ADAFACTOR_APPLY) continue;
        whole_block_sum(sums_p, sums_u, sp, su);
        if (threadIdx.x == 0) {
            if (phase == FO_ADAFACTOR_MOMENTS) partial[2 * k] = sums_p[0];
            if (phase == FO_ADAFACTOR_RMS || !factored) partial[2 * k + 1] = sums_u[0];
        }
        __syncthreads();
    }
}

#endif  // __CUDACC__
