// fused.cu: one optimizer step over the whole flat buffer in one launch. Each element's
// param, grad and state slots are read once and param and slots written once.
//
// Built once per rule and storage combination: fusedopt/_kernels.py prepends
//   #define FUSEDOPT_RULE <rule>   #define FUSEDOPT_T <float|double> (the math type)
//   #define FUSEDOPT_P / FUSEDOPT_G / FUSEDOPT_S <float|double|fo_bf16|fo_f16>
//   (params, grads, state; each defaults to FUSEDOPT_T)   #include "<rule>.cuh"
// and the kernel is exported as fusedopt_<rule>. Loads convert each buffer's storage
// type up to the math type once, stores round down once (kernels/storage.cuh); the
// rule and the prologue see only the math type. 16-bit params may have a float32
// master copy (`master`, null without one): the rule then updates the master and the
// params receive it rounded, in the same pass.
//
// The step's scalars come from the device (kernels/step.cuh): thread 0 of each block
// computes them from the hyperparameter block and the step state, and the last block
// to start advances the state, so a launch has no argument that changes from step to
// step and a captured graph replays as the next step every time.
//
// Work is split into tiles (fusedopt/_kernels.py, tile_table): contiguous ranges that
// never cross a segment boundary when clipping per segment, so a block reads its
// clip factor once per tile, and never cross from one segment group to another
// (fusedopt/segments.py: a learning-rate multiplier and weight decay on/off), so a
// block reads its group's scalars once per tile. Each block computes every group's
// scalars at its start, one thread per group. Blocks stride over tiles; threads stride within a tile,
// 16 / sizeof(math type) elements of every buffer at a time (16 bytes of a float32
// buffer, 8 of a bfloat16 one) when all buffers share their element phase.
//
// Keras' options (kernels/options.cuh): with use_ema the moving average `avg`, with
// gradient accumulation the accumulator `acc` (both null without) are slots loaded
// and stored like the rule's. What a call does (apply, or only accumulate; overwrite)
// is decided per launch from the step state, so every call launches the same kernels.
#pragma once
#include "options.cuh"
#include "storage.cuh"

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)

// Elements [i, i + N): N = 1 (the scalar path), or a vector's worth, aligned in every
// buffer (one access per buffer). Absent slots' lanes are zeros, never uninitialised.
template <typename Rule, int N, typename T, typename P, typename G, typename S>
__device__ __forceinline__ void update_run(long long i, P* p, float* master, const G* g,
                                           S* s0, S* s1, S* s2, S* avg, S* acc, T factor,
                                           const Prologue<T>& pro, const StepScalars<T>& st,
                                           const FoRounding& rounding,
                                           const OptionScalars<T>& o) {
    T pv[N], gv[N], av[N] = {}, bv[N] = {}, cv[N] = {}, ev[N] = {}, qv[N] = {};
    bool from_master = false;
    if constexpr (sizeof(P) == 2) {
        if (master) {
            fo_load_run<N>(master + i, pv);
            from_master = true;
        }
    }
    if (!from_master) fo_load_run<N>(p + i, pv);
    fo_load_run<N>(g + i, gv);
    if (s0) fo_load_run<N>(s0 + i, av);
    if (s1) fo_load_run<N>(s1 + i, bv);
    if (s2) fo_load_run<N>(s2 + i, cv);
    if (avg) fo_load_run<N>(avg + i, ev);
    if (acc) {
        fo_load_run<N>(acc + i, qv);
#pragma unroll
        for (int k = 0; k < N; ++k) gv[k] = fo_accumulated_mean(gv[k], qv[k], o);
    }
#pragma unroll
    for (int k = 0; k < N; ++k)
        fused_element<Rule>(pv[k], gv[k], av[k], bv[k], cv[k], factor, pro, st);
    if (avg) {
        // The average reads what the model holds: the master, or the params as stored
        // (their store below then rewrites the same bits).
        if constexpr (sizeof(P) == 2) {
            if (!from_master) fo_param_stored_run<N, P>(pv, rounding, (fo_u64)i);
        }
#pragma unroll
        for (int k = 0; k < N; ++k) fo_moving_average<S>(pv[k], ev[k], o);
        fo_store_run<N>(avg + i, ev);
    }
    if (acc) fo_store_run<N>(acc + i, qv);
    if constexpr (sizeof(P) == 2) {
        if (master) fo_store_run<N>(master + i, pv);
    }
    fo_store_param_run<N>(p + i, pv, rounding, (fo_u64)i);
    if (s0) fo_store_run<N>(s0 + i, av);
    if (s1) fo_store_run<N>(s1 + i, bv);
    if (s2) fo_store_run<N>(s2 + i, cv);
}

// Gradient accumulation's light calls: g and the accumulator, plus with use_ema the
// moving average of what the model holds (the master when there is one, else the
// params as stored), which are written only when the average overwrites them.
template <int N, typename T, typename P, typename G, typename S>
__device__ __forceinline__ void accumulate_run(long long i, P* p, float* master, const G* g,
                                               S* avg, S* acc, const FoRounding& rounding,
                                               const OptionScalars<T>& o) {
    T gv[N], qv[N], pv[N] = {}, ev[N] = {};
    bool from_master = false;
    fo_load_run<N>(g + i, gv);
    fo_load_run<N>(acc + i, qv);
    if (avg) {
        if constexpr (sizeof(P) == 2) {
            if (master) {
                fo_load_run<N>(master + i, pv);
                from_master = true;
            }
        }
        if (!from_master) fo_load_run<N>(p + i, pv);
        fo_load_run<N>(avg + i, ev);
    }
#pragma unroll
    for (int k = 0; k < N; ++k) fo_accumulate(gv[k], qv[k], o);
    fo_store_run<N>(acc + i, qv);
    if (!avg) return;
#pragma unroll
    for (int k = 0; k < N; ++k) fo_moving_average<S>(pv[k], ev[k], o);
    fo_store_run<N>(avg + i, ev);
    if (!o.overwrite) return;
    if constexpr (sizeof(P) == 2) {
        if (from_master) fo_store_run<N>(master + i, pv);
    }
    fo_store_param_run<N>(p + i, pv, rounding, (fo_u64)i);
}

// Where element 0 of buffer x sits in a run of V elements of its own type: x / sizeof
// mod V, or -1 when x is not aligned to its element (no vector path then).
template <int V, typename X>
__device__ __forceinline__ long long run_phase(const X* x) {
    const unsigned long long a = (unsigned long long)x;
    return a % sizeof(X) != 0 ? -1 : (long long)(a / sizeof(X) % V);
}

// The first element at which every buffer starts an aligned vector of V elements, or
// -1 when the buffers' phases differ (then the whole step takes the scalar path).
// Buffers of one type share it exactly when their addresses agree mod 16 bytes.
template <int V, typename P, typename G, typename S>
__device__ __forceinline__ long long common_boundary(const P* p, const float* master,
                                                     const G* g, const S* s0, const S* s1,
                                                     const S* s2, const S* avg,
                                                     const S* acc) {
    const long long phase = run_phase<V>(p);
    bool same = phase >= 0 && run_phase<V>(g) == phase;
    if (master) same = same && run_phase<V>(master) == phase;
    if (s0) same = same && run_phase<V>(s0) == phase;
    if (s1) same = same && run_phase<V>(s1) == phase;
    if (s2) same = same && run_phase<V>(s2) == phase;
    if (avg) same = same && run_phase<V>(avg) == phase;
    if (acc) same = same && run_phase<V>(acc) == phase;
    return same ? (V - phase) % V : -1;
}

// A group's step values, once per block. Not inlined: the double-precision schedule and
// power functions (CUDA's libdevice uses fused multiply-adds inside them by design)
// stay in their own PTX function, apart from the element math, which must have none.
template <typename Rule>
__device__ __noinline__ StepValues block_step_values(const Hyper* hyper, const StepState* state,
                                                     double multiplier) {
    return fo_step_values<Rule>(*hyper, *state, multiplier);
}

// The last block to start a step advances the step state: every other block has read
// it by then (its threads read it before a barrier, thread 0 takes the ticket after),
// and the next kernel in the stream sees the new state. An integer ticket, no floating-point atomics.
// It advances with Keras' options (step.cuh, fo_advance): the calls counted and a
// LossScaleOptimizer's scale grown or halved, for every rule (lamb.cu, adafactor.cu and
// muon.cu take the ticket too).
__device__ __forceinline__ void take_ticket(StepState* state, const StepValues& values,
                                            bool skip, const Hyper* hyper) {
    __threadfence();
    if (atomicAdd(&state->blocks_done, 1ULL) == gridDim.x - 1) {
        StepState s = *state;
        fo_advance(s, *hyper, values, skip);
        s.blocks_done = 0;
        *state = s;
    }
}

// Tile [begin, end) as runs: [begin, *head) one element at a time, [*head, *body_end)
// V at a time (aligned in every buffer from `first` on, see common_boundary; -1: no
// element is), [*body_end, end) one at a time.
template <int V>
__device__ __forceinline__ void tile_split(long long begin, long long end, long long first,
                                           long long* head, long long* body_end) {
    *head = *body_end = end;
    if (first >= 0) {
        *head = begin + ((first - begin) % V + V) % V;
        if (*head > end) *head = end;
        *body_end = *head + (end - *head) / V * V;
    }
}

// Gradient accumulation's calls that only add, over every tile: accumulate_run V
// elements at a time from `first` (common_boundary) on, one at a time around that.
// Also the first kernel of Lamb's, Adafactor's and Muon's (whole.cuh, whole_accumulate).
template <int V, typename T, typename P, typename G, typename S>
__device__ __forceinline__ void accumulate_tiles(P* p, float* master, const G* g, S* avg,
                                                 S* acc, const long long* tile_start,
                                                 long long ntiles, long long first,
                                                 const FoRounding& rounding,
                                                 const OptionScalars<T>& o) {
    for (long long k = blockIdx.x; k < ntiles; k += gridDim.x) {
        const long long begin = tile_start[k], end = tile_start[k + 1];
        long long head, body_end;
        tile_split<V>(begin, end, first, &head, &body_end);
        for (long long i = begin + threadIdx.x; i < head; i += blockDim.x)
            accumulate_run<1>(i, p, master, g, avg, acc, rounding, o);
        for (long long i = head + V * threadIdx.x; i < body_end; i += V * blockDim.x)
            accumulate_run<V>(i, p, master, g, avg, acc, rounding, o);
        for (long long i = body_end + threadIdx.x; i < end; i += blockDim.x)
            accumulate_run<1>(i, p, master, g, avg, acc, rounding, o);
    }
}

// `groups` holds [multiplier, decay (1 or 0)] per segment group, `tile_group` each
// tile's group (fusedopt/segments.py); ngroups <= FO_MAX_GROUPS <= FO_BLOCK.
template <typename Rule, typename T, typename P, typename G, typename S>
__device__ __forceinline__ void fused_step(
        P* __restrict__ p, const G* __restrict__ g,
        S* __restrict__ s0, S* __restrict__ s1, S* __restrict__ s2, float* __restrict__ master,
        S* __restrict__ avg, S* __restrict__ acc, const long long* __restrict__ tile_start, const int* __restrict__ tile_segment,
        const int* __restrict__ tile_group, long long ntiles, const T* __restrict__ factors,
        int nfactors, const double* __restrict__ groups, int ngroups,
        const Hyper* __restrict__ hyper, StepState* state) {
    __shared__ StepScalars<T> shared_st[FO_MAX_GROUPS];
    __shared__ Prologue<T> shared_pro[FO_MAX_GROUPS];
    __shared__ StepValues shared_values;  // group 0's: the running product to advance
    __shared__ int shared_skip;
    __shared__ FoRounding shared_rounding;
    __shared__ OptionScalars<T> shared_options;
    if ((int)threadIdx.x < ngroups) {
        const int k = (int)threadIdx.x;
        const StepValues values = block_step_values<Rule>(hyper, state, groups[2 * k]);
        const StepPhase phase = fo_phase(*hyper, *state);
        shared_st[k] = fo_narrow<T>(values);
        shared_pro[k] = fo_prologue<T>(*hyper, phase, groups[2 * k + 1] != 0.0);
        if (k == 0) {
            shared_values = values;
            shared_options = fo_options<T>(phase);
            // skip_nonfinite: the gradients are not finite (or the loss scale is 0)
            shared_skip = state->skip != 0 || phase.underflow;
            shared_rounding = fo_rounding(*hyper, *state);
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) take_ticket(state, shared_values, shared_skip != 0, hyper);
    if (shared_skip) return;  // a skipped step writes nothing
    constexpr int V = 16 / sizeof(T);  // lanes of the vector path: 16 bytes of math type
    const FoRounding rounding = shared_rounding;
    const OptionScalars<T> options = shared_options;
    const long long first = common_boundary<V>(p, master, g, s0, s1, s2, avg, acc);
    if (acc && !options.apply) {  // gradient accumulation: this call only adds
        accumulate_tiles<V>(p, master, g, avg, acc, tile_start, ntiles, first, rounding,
                            options);
        return;
    }
    for (long long k = blockIdx.x; k < ntiles; k += gridDim.x) {
        const long long begin = tile_start[k], end = tile_start[k + 1];
        const T factor = factors == nullptr ? T(1) : factors[nfactors == 1 ? 0 : tile_segment[k]];
        const StepScalars<T> st = shared_st[tile_group[k]];
        const Prologue<T> pro = shared_pro[tile_group[k]];
        long long head, body_end;
        tile_split<V>(begin, end, first, &head, &body_end);
        for (long long i = begin + threadIdx.x; i < head; i += blockDim.x)
            update_run<Rule, 1>(i, p, master, g, s0, s1, s2, avg, acc, factor, pro, st,
                                rounding, options);
        for (long long i = head + V * threadIdx.x; i < body_end; i += V * blockDim.x)
            update_run<Rule, V>(i, p, master, g, s0, s1, s2, avg, acc, factor, pro, st,
                                rounding, options);
        for (long long i = body_end + threadIdx.x; i < end; i += blockDim.x)
            update_run<Rule, 1>(i, p, master, g, s0, s1, s2, avg, acc, factor, pro, st,
                                rounding, options);
    }
}

#define FO_CAT2(a, b) a##b
#define FO_CAT(a, b) FO_CAT2(a, b)

#ifdef FUSEDOPT_RULE
// The kernel. Pointers that a configuration does not use are null: absent slots, the
// master copy (always, unless the params are 16-bit and master_weights is set), the
// moving average without use_ema, the accumulator without gradient accumulation, and
// `factors` without norm clipping.
extern "C" __global__ void __launch_bounds__(FO_BLOCK) FO_CAT(fusedopt_, FUSEDOPT_RULE)(
        FUSEDOPT_P* p, const FUSEDOPT_G* g, FUSEDOPT_S* s0, FUSEDOPT_S* s1, FUSEDOPT_S* s2,
        float* master, FUSEDOPT_S* average, FUSEDOPT_S* accumulator,
        const long long* tile_start, const int* tile_segment, const int* tile_group,
        long long ntiles, const FUSEDOPT_T* factors, int nfactors, const double* groups,
        int ngroups, const Hyper* hyper, StepState* state) {
    fused_step<FUSEDOPT_RULE, FUSEDOPT_T>(p, g, s0, s1, s2, master, average, accumulator,
                                          tile_start, tile_segment, tile_group, ntiles,
                                          factors, nfactors, groups, ngroups, hyper, state);
}
#endif

#endif  // __CUDACC__
