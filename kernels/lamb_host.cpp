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
// Storage as lamb.cu's: params P (16-bit ones with the float32 master copy when there
// is one, else stored rounded to nearest or stochastically from the flat index), grads
// G, state S (m and v stored rounded to nearest; pass 1's r from the values stored,
// which pass 2 reads back). Keras' options as whole_host.cpp runs them on any storage:
// pass 1 reads the accumulated mean (from the accumulator in place, or formed from g
// and a 16-bit accumulator), the average is of the master or of the params as stored.
// Built with FUSEDOPT_T and FUSEDOPT_P/G/S defined and lamb.cuh included
// (fusedopt/host.py).
#pragma once
#include "whole_host.cpp"

namespace fo_lamb {
using namespace fo_whole;

template <typename T, typename P, typename G, typename S>
struct Step {
    P* p;
    const G* g;
    S* m;
    S* v;
    float* master;    // 16-bit params' float32 master copy, or null
    const HostPlan* plan;
    const GroupValues<T>* values;
    double* sums;     // 2 per tile: p^2, r^2
    T* factors;       // per segment (clipnorm), else factors[0] for every element
    T* ratios;        // per segment
    std::atomic<int>* any_nonfinite;
    Options<T, S> opts;  // use_ema, gradient accumulation
    FoRounding rounding;

    // p as the rule reads it: the master's when there is one, else the params'.
    T load_param(const P* __restrict__ pp, long long i) const {
        if constexpr (sizeof(P) == 2) {
            if (master) return (T)master[i];
        }
        return (T)fo_load(pp[i]);
    }

    // Pass 1 over tile k: m and v, and the tile's sums; `grad(i)` the gradient it reads
    // (the grads', or the accumulated mean).
    template <typename Grad>
    void moments(const Grad& grad, long long k) const {
        const HostPlan& pl = *plan;
        const long long b = pl.sum_start[k], e = pl.sum_start[k + 1];
        const int group = group_at(pl, b);
        // Copies, and restrict pointers: stores to m and v cannot change the scalars, so
        // the loop keeps them in registers and vectorises.
        const Prologue<T> pro = values->pro[group];
        const StepScalars<T> st = values->st[group];
        const T factor = factors[pl.clip_mode == FO_CLIP_SEGMENT ? pl.sum_segment[k] : 0];
        const P* __restrict__ p = this->p;
        S* __restrict__ m = this->m;
        S* __restrict__ v = this->v;
        double lane_p[FO_LANES], lane_r[FO_LANES];
        for (int j = 0; j < FO_LANES; ++j) lane_p[j] = 0.0, lane_r[j] = 0.0;
        // Element i: its decayed p and its r, from m and v as stored.
        auto element = [&](long long i, double& sum_p, double& sum_r) {
            T pi = load_param(p, i);
            const T gi = fo_prepare_gradient(grad(i), pi, factor, pro);
            fo_decay(pi, pro, st.lr);
            T mi = fo_load(m[i]), vi = fo_load(v[i]);
            lamb::moments(gi, mi, vi, st.c);
            fo_store(m[i], mi);
            fo_store(v[i], vi);
            const T r = lamb::direction((T)fo_load(m[i]), (T)fo_load(v[i]), st.c);
            sum_p += (double)pi * (double)pi;
            sum_r += (double)r * (double)r;
        };
        long long i = b;
        for (; i + FO_LANES <= e; i += FO_LANES)
            for (int j = 0; j < FO_LANES; ++j) element(i + j, lane_p[j], lane_r[j]);
        double rest_p = 0.0, rest_r = 0.0;  // the last < FO_LANES elements, in order
        for (; i < e; ++i) element(i, rest_p, rest_r);
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
        P* __restrict__ pp = p;
        const S* __restrict__ mm = m;
        const S* __restrict__ vv = v;
        for (long long i = b; i < e; ++i) {
            T pi = load_param(pp, i);
            fo_decay(pi, pro, st.lr);
            lamb::apply(pi, lamb::direction((T)fo_load(mm[i]), (T)fo_load(vv[i]), st.c), ratio,
                        st.c);
            if constexpr (sizeof(P) == 2) {
                if (master) master[i] = (float)pi;
                fo_store_param(pp[i], pi, rounding, (fo_u64)i);
            } else {
                fo_store(pp[i], pi);
            }
        }
    }

    // Thread t's share of the step; `barrier` is null on one thread.
    void run(int t, int n, fo_pool::Barrier* barrier) const {
        const HostPlan& pl = *plan;
        auto wait = [&] { if (barrier) barrier->wait(); };
        long long first, last;
        if (!start_phases(pl, g, opts, t, n, factors, any_nonfinite, barrier, &first, &last))
            return;
        const G* __restrict__ gg = g;
        const S* __restrict__ acc = opts.acc;
        for (long long k = first; k < last; ++k) {
            if (acc == nullptr) {
                moments([&](long long i) { return (T)fo_load(gg[i]); }, k);
            } else if constexpr (Options<T, S>::in_place) {  // the mean is in acc
                moments([&](long long i) { return (T)fo_load(acc[i]); }, k);
            } else {
                moments([&](long long i) { return opts.mean_at(gg, i); }, k);
            }
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
            opts.average(p, master, rounding, pl.sum_start[k], pl.sum_start[k + 1]);  // in cache
        }
    }
};

template <typename T, typename P, typename G, typename S>
static int step(P* p, const G* g, S* m, S* v, float* master, S* average, S* accumulator,
                HostPlan* plan, const Hyper* block, StepState* state) {
    return whole_step<lamb, T>(p, g, average, accumulator, plan, block, state, [&](
            const Hyper* h, const GroupValues<T>& groups, const StepValues&,
            const Options<T, S>& opts, std::atomic<int>* any_nonfinite) {
        std::vector<double> sums(2 * plan->nsums + 2);
        std::vector<T> factors(plan->nsegments + 1, T(1)), ratios(plan->nsegments + 1, T(1));
        const FoRounding rounding = fo_rounding(*h, *state);  // options.cuh
        const Step<T, P, G, S> work = {p, g, m, v, master, plan, &groups, sums.data(),
                                       factors.data(), ratios.data(), any_nonfinite, opts,
                                       rounding};
        run_threads(threads_for(plan), [&](int t, int n, fo_pool::Barrier* barrier) {
            work.run(t, n, barrier);
        });
    }, master);
}

}  // namespace fo_lamb

#ifdef FUSEDOPT_T
// host.cpp's signature (s2 unused).
extern "C" int fusedopt_host_step(FUSEDOPT_P* p, const FUSEDOPT_G* g, FUSEDOPT_S* s0,
                                  FUSEDOPT_S* s1, FUSEDOPT_S*, float* master,
                                  FUSEDOPT_S* average, FUSEDOPT_S* accumulator, HostPlan* plan,
                                  const Hyper* hyper, StepState* state) {
    return fo_lamb::step<FUSEDOPT_T>(p, g, s0, s1, master, average, accumulator, plan, hyper,
                                     state);
}
#endif
