// reduce.cu: the small kernels around the update, all on the device so a step never
// waits for the host:
//   fusedopt_sumsq        sum of (g/loss_scale)^2 per tile in double (of the
//                         accumulated mean's squares on gradient accumulation's
//                         applying call), and whether the tile holds inf or NaN;
//   fusedopt_clip_factors per-segment (clipnorm) or global (global_clipnorm) factors;
//   fusedopt_skip_check   skip_nonfinite: the verdict on this step, for the update;
//   fusedopt_amp_inputs   torch.amp.GradScaler's scale and inf flag, device tensors
//                         read on the device: the step's unscale and skip;
//   fusedopt_write_hyper, fusedopt_write_state
//                         the host's writes of the step state (kernels/step.cuh), made
//                         when a hyperparameter or the counters are set, never per step:
//                         by value, so they are stream-ordered and need no staging.
// Deterministic by construction: the tiles are fixed by the layout, each thread sums a
// fixed set of elements in a fixed order and blocks combine them in a fixed tree; there
// are no floating-point atomics. Built once per gradient and state dtype with FUSEDOPT_G
// (the grads' storage type), FUSEDOPT_S (the state's: gradient accumulation's slot)
// and FUSEDOPT_T (the math type) defined.
#pragma once
#include "options.cuh"
#include "storage.cuh"

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

// The elements of one chunk of V = 16 / sizeof(math type) elements, loaded as one
// vector when `vector` (g is aligned to the chunk) and one by one otherwise: the same
// values either way, in the math type.
template <typename G>
struct Chunk {
    typedef typename fo_math<G>::type T;
    static constexpr int V = 16 / sizeof(T);
    T x[V];

    __device__ __forceinline__ void load(const G* g, long long c, bool vector) {
        if (vector) {
            fo_load_run<V>(g + c * V, x);
        } else {
#pragma unroll
            for (int k = 0; k < V; ++k) fo_load_run<1>(g + c * V + k, x + k);
        }
    }
};

// The square of the value the norm clip sees (options.cuh, fo_norm_value: g*unscale,
// or on the call that applies with an accumulator the mean the rule will see); the
// finite check is on the raw gradient.
template <typename T>
__device__ __forceinline__ double square(T x, T a, bool accumulated, T unscale, T steps,
                                         int& nonfinite) {
    nonfinite |= !fo_isfinite(x);
    const double value = (double)fo_norm_value(x, a, accumulated, unscale, steps);
    return value * value;
}

// This thread's share of the sum of squares of tile [begin, end). The chunks are the
// buffer's groups of V elements (chunk c = elements [cV, cV + V)): thread t takes
// chunks C0 + t, C0 + t + B, ..., UNROLL of them per round into UNROLL accumulators,
// plus element begin + t of the head before the first whole chunk and element
// C1*V + t of the tail after the last. Which element goes into which sum in which
// order depends only on the layout, never on the buffer's address: the same bits on
// the vector and the scalar path. `acc` (null unless this call applies accumulated
// gradients; in the state's storage type A) is read alongside g.
template <typename G, typename T, typename A>
__device__ __forceinline__ double tile_sumsq(const G* __restrict__ g, const A* __restrict__ acc,
                                             long long begin, long long end, T unscale,
                                             T steps, bool vector, int& nonfinite) {
    constexpr int V = Chunk<G>::V, UNROLL = 4;
    const long long t = threadIdx.x, B = blockDim.x;
    const long long c0 = (begin + V - 1) / V, c1 = end / V;
    const long long head_end = c0 * V < end ? c0 * V : end;
    const long long tail_begin = c1 * V > head_end ? c1 * V : head_end;
    const bool accumulated = acc != nullptr;
    double head = 0.0, tail = 0.0, sums[UNROLL] = {};
    T x, a = T(0);
    if (begin + t < head_end) {
        fo_load_run<1>(g + begin + t, &x);
        if (accumulated) fo_load_run<1>(acc + begin + t, &a);
        head = square(x, a, accumulated, unscale, steps, nonfinite);
    }
    for (long long c = c0 + t; c < c1; c += UNROLL * B) {
        Chunk<G> chunks[UNROLL];
        Chunk<A> accs[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {  // all loads first: UNROLL in flight per thread
            if (c + u * B < c1) {
                chunks[u].load(g, c + u * B, vector);
                if (accumulated) accs[u].load(acc, c + u * B, vector);
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            if (c + u * B >= c1) continue;
            double s = 0.0;
#pragma unroll
            for (int k = 0; k < V; ++k)
                s += square(chunks[u].x[k], accumulated ? accs[u].x[k] : T(0), accumulated,
                            unscale, steps, nonfinite);
            sums[u] += s;
        }
    }
    if (tail_begin + t < end) {
        fo_load_run<1>(g + tail_begin + t, &x);
        if (accumulated) fo_load_run<1>(acc + tail_begin + t, &a);
        tail = square(x, a, accumulated, unscale, steps, nonfinite);
    }
    double total = head;
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) total += sums[u];
    return total + tail;
}

// `accumulator`: gradient accumulation's slot (null without); read on the call that
// applies, whose norm is that of the mean (on the other calls the sums are not used,
// only the finite check). The unscale is the call's (step.cuh, fo_phase: with a
// LossScaleOptimizer's scale from the step state).
extern "C" __global__ void __launch_bounds__(FO_BLOCK) fusedopt_sumsq(
        const FUSEDOPT_G* __restrict__ g, const FUSEDOPT_S* __restrict__ accumulator,
        const long long* __restrict__ tile_start, long long ntiles,
        const Hyper* __restrict__ hyper, const StepState* __restrict__ state,
        double* __restrict__ partial, int* __restrict__ tile_nonfinite) {
    __shared__ double sums[FO_BLOCK];
    __shared__ int flags[FO_BLOCK];
    const StepPhase phase = fo_phase(*hyper, *state);
    const FUSEDOPT_T unscale = (FUSEDOPT_T)phase.unscale;
    const FUSEDOPT_T steps = (FUSEDOPT_T)phase.accumulation;
    const FUSEDOPT_S* acc = phase.apply ? accumulator : nullptr;
    const bool vector =
        (unsigned long long)g % (16 / sizeof(FUSEDOPT_T) * sizeof(FUSEDOPT_G)) == 0 &&
        (unsigned long long)acc % (16 / sizeof(FUSEDOPT_T) * sizeof(FUSEDOPT_S)) == 0;
    for (long long k = blockIdx.x; k < ntiles; k += gridDim.x) {
        int nonfinite = 0;
        const double total = tile_sumsq(g, acc, tile_start[k], tile_start[k + 1], unscale,
                                        steps, vector, nonfinite);
        block_reduce(sums, flags, total, nonfinite);
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
        long long nsegments, int global_norm, const Hyper* __restrict__ hyper,
        FUSEDOPT_T* __restrict__ factors) {
    __shared__ double sums[FO_BLOCK];
    __shared__ int flags[FO_BLOCK];
    const double clipnorm = hyper->clipnorm;
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

// One block: does any tile hold inf or NaN? The update reads the verdict from the step
// state, skips the step if so, and counts it either way (fused.cu, take_ticket).
extern "C" __global__ void __launch_bounds__(FO_BLOCK) fusedopt_skip_check(
        const int* __restrict__ tile_nonfinite, long long ntiles, StepState* state) {
    __shared__ double sums[FO_BLOCK];
    __shared__ int flags[FO_BLOCK];
    int nonfinite = 0;
    for (long long k = threadIdx.x; k < ntiles; k += blockDim.x) nonfinite |= tile_nonfinite[k];
    block_reduce(sums, flags, 0.0, nonfinite);
    // OR, not assign: fusedopt_amp_inputs may have set it (fo_advance clears it).
    if (threadIdx.x == 0 && flags[0] != 0) state->skip = 1;
}

// Before the other kernels of a step (FusedOptimizer.apply's grad_scale, found_inf;
// either may be null): the unscale the step's kernels read is the block's own
// (`unscale`, 1/loss_scale_factor as the host wrote it) divided by *grad_scale, and a
// nonzero *found_inf skips the step (the update counts the skip). The host rewrites the
// block's unscale when a later step comes without a scale.
extern "C" __global__ void __launch_bounds__(FO_BLOCK) fusedopt_amp_inputs(
        const float* grad_scale, const float* found_inf, double unscale, Hyper* hyper,
        StepState* state) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    hyper->unscale = grad_scale ? unscale / (double)*grad_scale : unscale;
    if (found_inf && *found_inf != 0.0f) state->skip = 1;
}

extern "C" __global__ void __launch_bounds__(FO_BLOCK) fusedopt_write_hyper(Hyper* hyper,
                                                                           Hyper value) {
    if (blockIdx.x == 0 && threadIdx.x == 0) *hyper = value;
}

extern "C" __global__ void __launch_bounds__(FO_BLOCK) fusedopt_write_state(StepState* state,
                                                                           StepState value) {
    if (blockIdx.x == 0 && threadIdx.x == 0) *state = value;
}

#endif  // __CUDACC__
