// fused.cu: one optimizer step over the whole flat buffer in one launch. Each element's
// param, grad and state slots are read once and param and slots written once.
//
// Built once per rule and dtype: fusedopt/_kernels.py prepends
//   #define FUSEDOPT_RULE <rule>   #define FUSEDOPT_T <float|double>   #include "<rule>.cuh"
// and the kernel is exported as fusedopt_<rule>.
//
// Work is split into tiles (fusedopt/_kernels.py, tile_table): contiguous ranges that
// never cross a segment boundary when clipping per segment, so a block reads its
// clip factor once per tile. Blocks stride over tiles; threads stride within a tile,
// four floats (two doubles) at a time when every buffer is 16-byte aligned.
#pragma once
#include "common.cuh"

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)

template <typename T> struct Vec16;
template <> struct Vec16<float> { typedef float4 type; };
template <> struct Vec16<double> { typedef double2 type; };

template <typename Rule, typename T>
__device__ __forceinline__ void update_scalar(long long i, T* p, const T* g, T* s0, T* s1, T* s2,
                                              T factor, const Prologue<T>& pro,
                                              const StepScalars<T>& st) {
    T pi = p[i], a = s0 ? s0[i] : T(0), b = s1 ? s1[i] : T(0), c = s2 ? s2[i] : T(0);
    fused_element<Rule>(pi, g[i], a, b, c, factor, pro, st);
    p[i] = pi;
    if (s0) s0[i] = a;
    if (s1) s1[i] = b;
    if (s2) s2[i] = c;
}

// Elements [V*j, V*j + V) with one 16-byte load and store per buffer.
template <typename Rule, typename T>
__device__ __forceinline__ void update_vector(long long j, T* p, const T* g, T* s0, T* s1, T* s2,
                                              T factor, const Prologue<T>& pro,
                                              const StepScalars<T>& st) {
    typedef typename Vec16<T>::type V16;
    constexpr int V = sizeof(V16) / sizeof(T);
    union Lanes { V16 v; T x[V]; };
    Lanes pv, gv, av, bv, cv;
    pv.v = reinterpret_cast<const V16*>(p)[j];
    gv.v = reinterpret_cast<const V16*>(g)[j];
    if (s0) av.v = reinterpret_cast<const V16*>(s0)[j];
    if (s1) bv.v = reinterpret_cast<const V16*>(s1)[j];
    if (s2) cv.v = reinterpret_cast<const V16*>(s2)[j];
#pragma unroll
    for (int k = 0; k < V; ++k)
        fused_element<Rule>(pv.x[k], gv.x[k], av.x[k], bv.x[k], cv.x[k], factor, pro, st);
    reinterpret_cast<V16*>(p)[j] = pv.v;
    if (s0) reinterpret_cast<V16*>(s0)[j] = av.v;
    if (s1) reinterpret_cast<V16*>(s1)[j] = bv.v;
    if (s2) reinterpret_cast<V16*>(s2)[j] = cv.v;
}

template <typename Rule, typename T>
__device__ __forceinline__ void fused_step(
        T* __restrict__ p, const T* __restrict__ g,
        T* __restrict__ s0, T* __restrict__ s1, T* __restrict__ s2,
        const long long* __restrict__ tile_start, const int* __restrict__ tile_segment,
        long long ntiles, Prologue<T> pro, StepScalars<T> st,
        const T* __restrict__ factors, int nfactors,
        const StepScalars<T>* __restrict__ table, const long long* __restrict__ counters) {
    if (counters != nullptr) {
        // skip_nonfinite: the check kernel has already counted this step. A skipped
        // step writes nothing; otherwise use the scalars of the device's iteration.
        if (counters[2] != 0) return;
        st = table[counters[0] - 1 - counters[3]];
    }
    typedef typename Vec16<T>::type V16;
    constexpr long long V = sizeof(V16) / sizeof(T);
    const unsigned long long addresses = (unsigned long long)p | (unsigned long long)g |
        (unsigned long long)s0 | (unsigned long long)s1 | (unsigned long long)s2;
    const bool aligned = (addresses % sizeof(V16)) == 0;
    for (long long k = blockIdx.x; k < ntiles; k += gridDim.x) {
        const long long begin = tile_start[k], end = tile_start[k + 1];
        const T factor = factors == nullptr ? T(1) : factors[nfactors == 1 ? 0 : tile_segment[k]];
        // [begin, head) scalar, [head, body_end) vectorised, [body_end, end) scalar.
        long long head = end, body_end = end;
        if (aligned) {
            head = begin + (V - begin % V) % V;
            if (head > end) head = end;
            body_end = head + (end - head) / V * V;
        }
        for (long long i = begin + threadIdx.x; i < head; i += blockDim.x)
            update_scalar<Rule>(i, p, g, s0, s1, s2, factor, pro, st);
        for (long long j = head / V + threadIdx.x; j < body_end / V; j += blockDim.x)
            update_vector<Rule>(j, p, g, s0, s1, s2, factor, pro, st);
        for (long long i = body_end + threadIdx.x; i < end; i += blockDim.x)
            update_scalar<Rule>(i, p, g, s0, s1, s2, factor, pro, st);
    }
}

#define FO_CAT2(a, b) a##b
#define FO_CAT(a, b) FO_CAT2(a, b)

#ifdef FUSEDOPT_RULE
// The kernel. Pointers that a configuration does not use are null: absent slots,
// `factors` without norm clipping, `table` and `counters` without skip_nonfinite.
extern "C" __global__ void __launch_bounds__(FO_BLOCK) FO_CAT(fusedopt_, FUSEDOPT_RULE)(
        FUSEDOPT_T* p, const FUSEDOPT_T* g, FUSEDOPT_T* s0, FUSEDOPT_T* s1, FUSEDOPT_T* s2,
        const long long* tile_start, const int* tile_segment, long long ntiles,
        Prologue<FUSEDOPT_T> pro, StepScalars<FUSEDOPT_T> st,
        const FUSEDOPT_T* factors, int nfactors,
        const StepScalars<FUSEDOPT_T>* table, const long long* counters) {
    fused_step<FUSEDOPT_RULE, FUSEDOPT_T>(p, g, s0, s1, s2, tile_start, tile_segment, ntiles,
                                          pro, st, factors, nfactors, table, counters);
}
#endif

#endif  // __CUDACC__
