// lamb_host.cpp: LAMB's step on the CPU (lamb.cuh), the host executor's counterpart of
// lamb.cu, on host.cpp's thread pool and plan. Over the per-segment reduction tiles of
// the plan (sum_start, sum_segment, segment_tiles), split across threads by elements:
//   [norm clipping / skip_nonfinite: the gradients' tile sums, then per-segment factors]
//   pass 1  prologue, decay, m and v; per tile, the sums of p^2 and r^2 (FO_LANES partial
//           sums in a fixed order, as tile_sum_of_squares);
//   ratios  per segment, its tiles' sums in tile order -> trust ratio;
//   pass 2  p decayed again, r recomputed from the stored m and v (the same bits as pass
//           1), p -= ratio*lr*r;
// with a barrier between phases, then the counters advanced once. Deterministic
// whatever the thread count: threads only decide who computes a tile or a segment.
// Keras' options (whole_host.cpp): pass 1 reads the accumulated mean as its gradient
// and restarts the accumulator; the moving average follows each tile of pass 2.
// Built with FUSEDOPT_T defined and lamb.cuh included (fusedopt/host.py).
#pragma once
#include "whole_host.cpp"

namespace fo_lamb {
using namespace fo_whole;

template <typename T>
struct Step {
    T* p;
    const T* g;
    T* m;
    T* v;
    const HostPlan* plan;
    const GroupValues<T>* values;
    double* sums;     // 2 per tile: p^2, r^2
    T* factors;       // per segment (clipnorm), else factors[0] for every element
    T* ratios;        // per segment
    std::atomic<int>* any_nonfinite;
    Options<T> opts;  // use_ema, gradient accumulation

    // Pass 1 over tile k: m and v, and the tile's sums.
    void moments(long long k) const {
        const HostPlan& pl = *plan;
        const long long b = pl.sum_start[k], e = pl.sum_start[k + 1];
        const int group = group_at(pl, b);
        // Copies, and restrict pointers: stores to m and v cannot change the scalars, so
        // the loop keeps them in registers and vectorises.
        const Prologue<T> pro = values->pro[group];
        const StepScalars<T> st = values->st[group];
        const T factor = factors[pl.clip_mode == FO_CLIP_SEGMENT ? pl.sum_segment[k] : 0];
        const T* __restrict__ p = this->p;
        const T* __restrict__ g = opts.gradient(this->g);
        T* __restrict__ m = this->m;
        T* __restrict__ v = this->v;
        double lane_p[FO_LANES], lane_r[FO_LANES];
        for (int j = 0; j < FO_LANES; ++j) lane_p[j] = 0.0, lane_r[j] = 0.0;
        long long i = b;
        for (; i + FO_LANES <= e; i += FO_LANES) {
            for (int j = 0; j < FO_LANES; ++j) {
                T pi = p[i + j];
                const T gi = fo_prepare_gradient(g[i + j], pi, factor, pro);
                fo_decay(pi, pro, st.lr);
                const T r = lamb::moments(gi, m[i + j], v[i + j], st.c);
                lane_p[j] += (double)pi * (double)pi;
                lane_r[j] += (double)r * (double)r;
            }
        }
        double rest_p = 0.0, rest_r = 0.0;  // the last < FO_LANES elements, in order
        for (; i < e; ++i) {
            T pi = p[i];
            const T gi = fo_prepare_gradient(g[i], pi, factor, pro);
            fo_decay(pi, pro, st.lr);
            const T r = lamb::moments(gi, m[i], v[i], st.c);
            rest_p += (double)pi * (double)pi;
            rest_r += (double)r * (double)r;
        }
        for (int width = FO_LANES / 2; width > 0; width /= 2) {
            for (int j = 0; j < width; ++j) {
                lane_p[j] += lane_p[j + width];
                lane_r[j] += lane_r[j + width];
            }
        }
        sums[2 * k] = lane_p[0] + rest_p;
        sums[2 * k + 1] = lane_r[0] + rest_r;
    }

    // Pass 2 over tile k.
    void apply(long long k) const {
        const HostPlan& pl = *plan;
        const long long b = pl.sum_start[k], e = pl.sum_start[k + 1];
        const int group = group_at(pl, b);
        const Prologue<T> pro = values->pro[group];
        const StepScalars<T> st = values->st[group];
        const T ratio = ratios[pl.sum_segment[k]];
        T* __restrict__ pp = p;
        const T* __restrict__ mm = m;
        const T* __restrict__ vv = v;
        for (long long i = b; i < e; ++i) {
            T pi = pp[i];
            fo_decay(pi, pro, st.lr);
            lamb::apply(pi, lamb::direction(mm[i], vv[i], st.c), ratio, st.c);
            pp[i] = pi;
        }
    }

    // Thread t's share of the step; `barrier` is null on one thread.
    void run(int t, int n, fo_pool::Barrier* barrier) const {
        const HostPlan& pl = *plan;
        auto wait = [&] { if (barrier) barrier->wait(); };
        long long first, last;
        if (!start_phases(pl, g, opts, t, n, factors, any_nonfinite, barrier, &first, &last))
            return;
        for (long long k = first; k < last; ++k) {
            moments(k);
            opts.restart(pl.sum_start[k], pl.sum_start[k + 1]);  // the tile's mean is read
        }
        wait();
        for (long long s = t; s < pl.nsegments; s += n) {
            double sp, sr;
            segment_sums(pl, sums, s, &sp, &sr);
            ratios[s] = (T)lamb_trust_ratio(sp, sr);
        }
        wait();
        for (long long k = first; k < last; ++k) {
            apply(k);
            opts.average(p, pl.sum_start[k], pl.sum_start[k + 1]);  // the tile in cache
        }
    }
};

template <typename T>
static int step(T* p, const T* g, T* m, T* v, T* average, T* accumulator, HostPlan* plan,
                const Hyper* block, StepState* state) {
    return whole_step<lamb, T>(p, g, average, accumulator, plan, block, state, [&](
            const Hyper*, const GroupValues<T>& groups, const StepValues&,
            const Options<T>& opts, std::atomic<int>* any_nonfinite) {
        std::vector<double> sums(2 * plan->nsums + 2);
        std::vector<T> factors(plan->nsegments + 1, T(1)), ratios(plan->nsegments + 1, T(1));
        const Step<T> work = {p, g, m, v, plan, &groups, sums.data(), factors.data(),
                              ratios.data(), any_nonfinite, opts};
        run_threads(threads_for(plan), [&](int t, int n, fo_pool::Barrier* barrier) {
            work.run(t, n, barrier);
        });
    });
}

}  // namespace fo_lamb

#ifdef FUSEDOPT_T
// host.cpp's signature (s2 and the master copy unused: uniform float32/float64 only).
extern "C" int fusedopt_host_step(FUSEDOPT_T* p, const FUSEDOPT_T* g, FUSEDOPT_T* s0,
                                  FUSEDOPT_T* s1, FUSEDOPT_T*, float*, FUSEDOPT_T* average,
                                  FUSEDOPT_T* accumulator, HostPlan* plan, const Hyper* hyper,
                                  StepState* state) {
    return fo_lamb::step<FUSEDOPT_T>(p, g, s0, s1, average, accumulator, plan, hyper, state);
}
#endif
