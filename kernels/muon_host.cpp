// muon_host.cpp: Muon's element-wise passes on the CPU (muon.cuh), the host executor's
// counterpart of muon.cu, over the per-segment tiles of host.cpp's plan:
//   fusedopt_host_step        [GradScaler's found_inf or an underflowed loss scale: skip;
//                             the gradient phase], then per tile: AdamW segments the
//                             whole update, Muon segments m and d (into `d`); a skipped
//                             step (skip_nonfinite) sets state->skip and writes nothing;
//   (Newton-Schulz on each Muon segment of d: NumPy matrix products, fusedopt/host.py)
//   fusedopt_host_muon_apply  Muon segments: p decayed, p -= (lr*d)*rms_scale; then the
//                             counters (and a LossScaleOptimizer's scale) advanced once
//                             (or the skip counted).
// plan->segment_values[s]: segment s's rms scale (>= 0) for Muon, -1 for AdamW.
// Keras' options (whole_host.cpp): a call of gradient accumulation that only adds is
// accumulate_phase in fusedopt_host_step, which returns 0 (no Newton-Schulz), and apply
// only counts it; on the call that applies, the first pass reads the accumulated mean
// and restarts the accumulator; the moving average follows the tiles that write p
// (AdamW segments in the first pass, Muon segments in apply).
// Built with FUSEDOPT_T defined and muon.cuh included (fusedopt/host.py).
#pragma once
#include "whole_host.cpp"

namespace fo_muon {
using namespace fo_whole;

template <typename T>
struct Groups {
    GroupValues<T> muon, adamw;  // the two prologues (weight decays); the same scalars
};

template <typename T>
static StepValues group_values(const HostPlan* plan, const Hyper* h, const StepState* state,
                               Groups<T>* out) {
    const StepPhase phase = fo_phase(*h, *state);  // a LossScaleOptimizer's unscale
    for (long long k = 0; k < plan->ngroups; ++k) {
        const bool decay = plan->groups[2 * k + 1] != 0.0;
        out->muon.st[k] = fo_narrow<T>(fo_step_values<muon>(*h, *state, plan->groups[2 * k]));
        out->adamw.st[k] = out->muon.st[k];
        out->muon.pro[k] = fo_prologue<T>(*h, phase, decay);
        out->adamw.pro[k] = muon_adamw_prologue<T>(*h, phase, decay);
    }
    return fo_step_values<muon>(*h, *state, plan->groups[0]);
}

template <typename T>
static void moments_tile(const HostPlan& pl, long long k, T* p, const T* g, T* m, T* v, T* d,
                         const Groups<T>& groups, const T* factors, const Options<T>& opts) {
    const long long b = pl.sum_start[k], e = pl.sum_start[k + 1];
    const long long segment = pl.sum_segment[k];
    const int group = group_at(pl, b);
    const StepScalars<T> st = groups.muon.st[group];
    const T factor = factors[pl.clip_mode == FO_CLIP_SEGMENT ? segment : 0];
    if (pl.segment_values[segment] < 0.0) {
        const Prologue<T> pro = groups.adamw.pro[group];
        for (long long i = b; i < e; ++i) {
            const T gi = fo_prepare_gradient(g[i], p[i], factor, pro);
            fo_decay(p[i], pro, st.lr);
            muon::adamw(p[i], gi, m[i], v[i], st.c);
        }
        opts.average(p, b, e);
    } else {
        const Prologue<T> pro = groups.muon.pro[group];
        for (long long i = b; i < e; ++i)
            d[i] = muon::momentum(fo_prepare_gradient(g[i], p[i], factor, pro), m[i], st.c);
    }
}

// Returns 1 when the rule runs on this call (Newton-Schulz follows), 0 when it does not
// (a skipped step, or a call of gradient accumulation that only adds).
template <typename T>
static int moments(T* p, const T* g, T* m, T* v, T* d, T* average, T* accumulator,
                   HostPlan* plan, const Hyper* block, StepState* state) {
    Hyper amp_block;
    const Hyper* h = fo_amp_hyper(plan, block, &amp_block);  // GradScaler's inputs
    // Skipped (found_inf, or a LossScaleOptimizer's scale that underflowed): apply counts
    // it and writes nothing.
    if (fo_amp_found_inf(plan) || fo_phase(*h, *state).underflow) {
        state->skip = 1;
        return 0;
    }
    Groups<T> groups;
    group_values(plan, h, state, &groups);
    plan->clipnorm = h->clipnorm;
    const Options<T> opts = {average, accumulator, fo_options<T>(fo_phase(*h, *state))};
    std::vector<T> factors(plan->nsegments + 1, T(1));
    std::atomic<int> any_nonfinite(0);
    run_threads(threads_for(plan), [&](int t, int n, fo_pool::Barrier* barrier) {
        if (opts.adds_only()) {
            accumulate_phase(*plan, p, (float*)nullptr, g, opts, FoRounding{}, t, n,
                             &any_nonfinite, barrier);
            return;
        }
        long long first, last;
        if (!start_phases(*plan, g, opts, t, n, factors.data(), &any_nonfinite, barrier, &first,
                          &last))
            return;
        for (long long k = first; k < last; ++k) {
            moments_tile(*plan, k, p, opts.gradient(g), m, v, d, groups, factors.data(), opts);
            opts.restart(plan->sum_start[k], plan->sum_start[k + 1]);  // the mean is read
        }
    });
    state->skip = any_nonfinite.load() != 0;
    return state->skip || opts.adds_only() ? 0 : 1;
}

template <typename T>
static void apply(T* p, const T* d, T* average, HostPlan* plan, const Hyper* block,
                  StepState* state) {
    Hyper amp_block;
    const Hyper* h = fo_amp_hyper(plan, block, &amp_block);
    Groups<T> groups;
    const StepValues values = group_values(plan, h, state, &groups);
    const Options<T> opts = {average, nullptr, fo_options<T>(fo_phase(*h, *state))};
    if (!state->skip && opts.o.apply) {  // not skipped, nor a call that only accumulates
        run_threads(threads_for(plan), [&](int t, int n, fo_pool::Barrier*) {
            const HostPlan& pl = *plan;
            long long first, last;
            tiles_of(pl, t, n, &first, &last);
            for (long long k = first; k < last; ++k) {
                const double scale = pl.segment_values[pl.sum_segment[k]];
                if (scale < 0.0) continue;
                const int group = group_at(pl, pl.sum_start[k]);
                const Prologue<T> pro = groups.muon.pro[group];
                const StepScalars<T> st = groups.muon.st[group];
                for (long long i = pl.sum_start[k]; i < pl.sum_start[k + 1]; ++i) {
                    T pi = p[i];
                    fo_decay(pi, pro, st.lr);
                    muon::apply(pi, d[i], (T)scale, st.c);
                    p[i] = pi;
                }
                opts.average(p, pl.sum_start[k], pl.sum_start[k + 1]);
            }
        });
    }
    fo_advance(*state, *h, values, state->skip != 0);  // the scale too
}

}  // namespace fo_muon

#ifdef FUSEDOPT_T
// host.cpp's signature; s2 is the scratch d (params-sized), not a slot, and the master
// copy is unused (uniform float32/float64 only).
extern "C" int fusedopt_host_step(FUSEDOPT_T* p, const FUSEDOPT_T* g, FUSEDOPT_T* s0,
                                  FUSEDOPT_T* s1, FUSEDOPT_T* s2, float*, FUSEDOPT_T* average,
                                  FUSEDOPT_T* accumulator, HostPlan* plan, const Hyper* hyper,
                                  StepState* state) {
    return fo_muon::moments<FUSEDOPT_T>(p, g, s0, s1, s2, average, accumulator, plan, hyper,
                                        state);
}

extern "C" void fusedopt_host_muon_apply(FUSEDOPT_T* p, const FUSEDOPT_T* d,
                                         FUSEDOPT_T* average, HostPlan* plan,
                                         const Hyper* hyper, StepState* state) {
    fo_muon::apply<FUSEDOPT_T>(p, d, average, plan, hyper, state);
}
#endif
