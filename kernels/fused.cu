// fused.cu: one optimizer step over the whole flat buffer in one launch. Each element's
// param, grad and state slots are read once and param and slots written once.
//
// Built once per rule and dtype: fusedopt/_kernels.py prepends
//   #define FUSEDOPT_RULE <rule>   #define FUSEDOPT_T <float|double>   #include "<rule>.cuh"
// and the kernel is exported as fusedopt_<rule>.
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
// 16 bytes of every buffer at a time when all buffers share their alignment mod 16.
#pragma once
#include "step.cuh"

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)

template <typename Rule, typename T>
__device__ __forceinline__ void update_scalar(long long i, T* p, const T* g, T* s0, T* s1, T* s2,
                                              T factor, const Prologue<T>& pro,
                                              const StepScalars<T>& st) {
    T pi = fo_load(p + i), a = s0 ? fo_load(s0 + i) : T(0), b = s1 ? fo_load(s1 + i) : T(0);
    T c = s2 ? fo_load(s2 + i) : T(0);
    fused_element<Rule>(pi, fo_load(g + i), a, b, c, factor, pro, st);
    fo_store(p + i, pi);
    if (s0) fo_store(s0 + i, a);
    if (s1) fo_store(s1 + i, b);
    if (s2) fo_store(s2 + i, c);
}

// Elements [i, i + V), 16-byte aligned in every buffer: one load and store per buffer.
template <typename Rule, typename T>
__device__ __forceinline__ void update_vector(long long i, T* p, const T* g, T* s0, T* s1, T* s2,
                                              T factor, const Prologue<T>& pro,
                                              const StepScalars<T>& st) {
    typedef typename Vec16<T>::type V16;
    constexpr int V = sizeof(V16) / sizeof(T);
    union Lanes { V16 v; T x[V]; };
    // Absent slots' lanes are zeros, as update_scalar passes, never uninitialised.
    Lanes pv, gv, av = {}, bv = {}, cv = {};
    pv.v = fo_load(reinterpret_cast<const V16*>(p + i));
    gv.v = fo_load(reinterpret_cast<const V16*>(g + i));
    if (s0) av.v = fo_load(reinterpret_cast<const V16*>(s0 + i));
    if (s1) bv.v = fo_load(reinterpret_cast<const V16*>(s1 + i));
    if (s2) cv.v = fo_load(reinterpret_cast<const V16*>(s2 + i));
#pragma unroll
    for (int k = 0; k < V; ++k)
        fused_element<Rule>(pv.x[k], gv.x[k], av.x[k], bv.x[k], cv.x[k], factor, pro, st);
    fo_store(reinterpret_cast<V16*>(p + i), pv.v);
    if (s0) fo_store(reinterpret_cast<V16*>(s0 + i), av.v);
    if (s1) fo_store(reinterpret_cast<V16*>(s1 + i), bv.v);
    if (s2) fo_store(reinterpret_cast<V16*>(s2 + i), cv.v);
}

// The first element at a 16-byte boundary of every buffer, or -1 when the buffers do
// not share their alignment mod 16 (then the whole step takes the scalar path).
template <typename T>
__device__ __forceinline__ long long common_boundary(const T* p, const T* g, const T* s0,
                                                     const T* s1, const T* s2) {
    const unsigned long long a = (unsigned long long)p;
    const unsigned long long differ = (a ^ (unsigned long long)g) |
        (s0 ? a ^ (unsigned long long)s0 : 0) | (s1 ? a ^ (unsigned long long)s1 : 0) |
        (s2 ? a ^ (unsigned long long)s2 : 0);
    if (differ % 16 != 0 || a % sizeof(T) != 0) return -1;
    return (long long)((16 - a % 16) % 16 / sizeof(T));
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
__device__ __forceinline__ void take_ticket(StepState* state, const StepValues& values,
                                            bool skip) {
    __threadfence();
    if (atomicAdd(&state->blocks_done, 1ULL) == gridDim.x - 1) {
        StepState s = *state;
        fo_advance(s, values, skip);
        s.blocks_done = 0;
        *state = s;
    }
}

// `groups` holds [multiplier, decay (1 or 0)] per segment group, `tile_group` each
// tile's group (fusedopt/segments.py); ngroups <= FO_MAX_GROUPS <= FO_BLOCK.
template <typename Rule, typename T>
__device__ __forceinline__ void fused_step(
        T* __restrict__ p, const T* __restrict__ g,
        T* __restrict__ s0, T* __restrict__ s1, T* __restrict__ s2,
        const long long* __restrict__ tile_start, const int* __restrict__ tile_segment,
        const int* __restrict__ tile_group, long long ntiles, const T* __restrict__ factors,
        int nfactors, const double* __restrict__ groups, int ngroups,
        const Hyper* __restrict__ hyper, StepState* state) {
    __shared__ StepScalars<T> shared_st[FO_MAX_GROUPS];
    __shared__ Prologue<T> shared_pro[FO_MAX_GROUPS];
    __shared__ StepValues shared_values;  // group 0's: the running product to advance
    __shared__ int shared_skip;
    if ((int)threadIdx.x < ngroups) {
        const int k = (int)threadIdx.x;
        const StepValues values = block_step_values<Rule>(hyper, state, groups[2 * k]);
        shared_st[k] = fo_narrow<T>(values);
        shared_pro[k] = fo_prologue<T>(*hyper, groups[2 * k + 1] != 0.0);
        if (k == 0) {
            shared_values = values;
            shared_skip = state->skip != 0;  // skip_nonfinite: the gradients are not finite
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) take_ticket(state, shared_values, shared_skip != 0);
    if (shared_skip) return;  // a skipped step writes nothing
    typedef typename Vec16<T>::type V16;
    constexpr long long V = sizeof(V16) / sizeof(T);
    const long long first = common_boundary(p, g, s0, s1, s2);
    for (long long k = blockIdx.x; k < ntiles; k += gridDim.x) {
        const long long begin = tile_start[k], end = tile_start[k + 1];
        const T factor = factors == nullptr ? T(1) : factors[nfactors == 1 ? 0 : tile_segment[k]];
        const StepScalars<T> st = shared_st[tile_group[k]];
        const Prologue<T> pro = shared_pro[tile_group[k]];
        // [begin, head) scalar, [head, body_end) vectorised, [body_end, end) scalar.
        long long head = end, body_end = end;
        if (first >= 0) {
            head = begin + ((first - begin) % V + V) % V;
            if (head > end) head = end;
            body_end = head + (end - head) / V * V;
        }
        for (long long i = begin + threadIdx.x; i < head; i += blockDim.x)
            update_scalar<Rule>(i, p, g, s0, s1, s2, factor, pro, st);
        for (long long i = head + V * threadIdx.x; i < body_end; i += V * blockDim.x)
            update_vector<Rule>(i, p, g, s0, s1, s2, factor, pro, st);
        for (long long i = body_end + threadIdx.x; i < end; i += blockDim.x)
            update_scalar<Rule>(i, p, g, s0, s1, s2, factor, pro, st);
    }
}

#define FO_CAT2(a, b) a##b
#define FO_CAT(a, b) FO_CAT2(a, b)

#ifdef FUSEDOPT_RULE
// The kernel. Pointers that a configuration does not use are null: absent slots, and
// `factors` without norm clipping.
extern "C" __global__ void __launch_bounds__(FO_BLOCK) FO_CAT(fusedopt_, FUSEDOPT_RULE)(
        FUSEDOPT_T* p, const FUSEDOPT_T* g, FUSEDOPT_T* s0, FUSEDOPT_T* s1, FUSEDOPT_T* s2,
        const long long* tile_start, const int* tile_segment, const int* tile_group,
        long long ntiles, const FUSEDOPT_T* factors, int nfactors, const double* groups,
        int ngroups, const Hyper* hyper, StepState* state) {
    fused_step<FUSEDOPT_RULE, FUSEDOPT_T>(p, g, s0, s1, s2, tile_start, tile_segment,
                                          tile_group, ntiles, factors, nfactors, groups,
                                          ngroups, hyper, state);
}
#endif

#endif  // __CUDACC__
