// whole_host.cpp: what the host steps of the whole-variable rules share (lamb_host.cpp,
// adafactor_host.cpp, muon_host.cpp): the per-segment tiles of host.cpp's plan
// (sum_start, sum_segment, segment_tiles) split across threads, a tile's segment group,
// the gradient phase before the update (norm sums, the finite check, per-segment or
// global clip factors), and Keras' options around the rule (kernels/options.cuh, as
// whole.cuh on the GPU; their slots stored as the state, S):
//   a call of gradient accumulation that only adds runs no rule: after the finite check
//     (skip_nonfinite), each thread runs host.cpp's accumulate_only over its tiles;
//   on the call that applies, the norms are those of the accumulated mean; each thread
//     then turns its tiles of the accumulator into that mean in place, which the rule's
//     passes read as their gradient (Options::gradient), and the pass that reads it
//     last restarts it at 0 (Options::restart); with S narrower than T (a 16-bit
//     accumulator, which the mean must not be rounded into) the rule's one pass that
//     reads the gradient forms the mean from g and the accumulator instead
//     (Options::mean_at: lamb_host.cpp);
//   the moving average runs after the pass that writes p, tile by tile while the tile is
//     in cache (Options::average), of the master or of the params as stored.
#pragma once
#include "host.cpp"

namespace fo_whole {

// Tiles [*first, *last) of thread t of n: split where the element count is closest to
// t/n of the buffer, as thread_tiles does for the update tiles.
static void tiles_of(const HostPlan& plan, int t, int n, long long* first, long long* last) {
    const long long total = plan.sum_start[plan.nsums];
    auto split = [&](int u) -> long long {
        if (u == 0) return 0;
        if (u == n) return plan.nsums;
        return first_tile_at(plan.sum_start, plan.nsums, (long long)((double)total * u / n));
    };
    *first = split(t);
    *last = split(t + 1);
}

// The segment group of the elements from x on (the run holding x).
static int group_at(const HostPlan& plan, long long x) {
    return plan.run_group[first_tile_at(plan.run_start, plan.nruns, x + 1) - 1];
}

// Keras' options of one step (options.cuh): the slots (null where absent) and the
// call's scalars.
template <typename T, typename S = T>
struct Options {
    S* avg;  // use_ema's moving average
    S* acc;  // gradient accumulation's accumulator
    OptionScalars<T> o;
    // The accumulator holds the mean on the call that applies (mean_in_place).
    static constexpr bool in_place = sizeof(S) == sizeof(T);

    // A call of gradient accumulation that only adds.
    bool adds_only() const { return acc != nullptr && !o.apply; }

    // What the rule's passes read as the gradient on a call that applies: g, or the
    // accumulated mean the threads left in the accumulator (mean_in_place).
    const T* gradient(const T* g) const { return acc != nullptr ? acc : g; }

    // The accumulator over [b, e) restarts (0, as fo_accumulated_mean leaves it),
    // after the rule's last read of the mean there.
    void restart(long long b, long long e) const {
        if (acc != nullptr) memset(acc + b, 0, sizeof(S) * (size_t)(e - b));  // +0 in S
    }

    // The moving average over [b, e) after the rule wrote p there (host.cpp).
    void average(T* p, long long b, long long e) const {
        if (avg != nullptr) moving_average_run<T>(p + b, avg + b, e - b, o);
    }

    // The same on any storage: of the master when there is one, else of the params as
    // stored; an overwrite writes both, rounded as every param store (host.cpp).
    template <typename P>
    void average(P* p, float* master, const FoRounding& r, long long b, long long e) const {
        if (avg == nullptr) return;
        if constexpr (in_place && sizeof(P) == sizeof(T)) {
            average(p, b, e);
        } else {
            moving_average_converted<T>(p + b, master ? master + b : nullptr, avg + b, e - b, b,
                                        r, o);
        }
    }

    // Without in_place: element i's accumulated mean, (g*unscale + acc)/N (options.cuh;
    // the accumulator restarts with `restart`).
    template <typename G>
    T mean_at(const G* g, long long i) const {
        T q = fo_load(acc[i]);
        return fo_accumulated_mean((T)fo_load(g[i]), q, o);
    }

    // On the call that applies, the accumulator over [b, e) becomes the mean the rule
    // reads: (g*unscale + acc)/N (options.cuh).
    template <typename G>
    void mean_in_place(const G* g, long long b, long long e) const {
        if constexpr (in_place) {
            if (acc == nullptr || !o.apply) return;
            for (long long i = b; i < e; ++i) {
                T q = acc[i];
                acc[i] = fo_accumulated_mean((T)fo_load(g[i]), q, o);
            }
        }
    }
};

// The gradient phase of thread t of n (tiles [first, last)): the tiles' sums of
// squares (of the accumulated mean on gradient accumulation's applying call) and the
// finite check, a barrier, then the clip factors: factors[s] per segment (clipnorm) or
// factors[0] (global_clipnorm), and a barrier. A call that only accumulates needs no
// norms, only the finite check. Returns false when a gradient is not finite under
// skip_nonfinite (every thread returns the same).
template <typename T, typename G, typename S>
static bool gradient_phase(const HostPlan& pl, const G* g, const Options<T, S>& opts, int t,
                           int n, long long first, long long last, T* factors,
                           std::atomic<int>* any_nonfinite, fo_pool::Barrier* barrier) {
    auto wait = [&] { if (barrier) barrier->wait(); };
    const bool norms = pl.clip_mode != FO_CLIP_NONE && !opts.adds_only();
    if (!norms && !pl.skip_nonfinite) return true;
    const NormInput<T, G, S> input = {g, opts.adds_only() ? nullptr : opts.acc, opts.o.unscale,
                                   opts.o.steps};
    int bad = 0;
    for (long long k = first; k < last; ++k) {
        const long long b = pl.sum_start[k], e = pl.sum_start[k + 1];
        if (pl.skip_nonfinite) {
            pl.partial[k] = input.template sum<true>(b, e, &pl.nonfinite[k]);
            bad |= pl.nonfinite[k];
        } else {
            pl.partial[k] = input.template sum<false>(b, e, nullptr);
        }
    }
    if (bad) any_nonfinite->fetch_or(1);
    wait();
    if (any_nonfinite->load()) return false;
    if (!norms) return true;
    if (pl.clip_mode == FO_CLIP_SEGMENT) {
        for (long long s = t; s < pl.nsegments; s += n) {
            double sum = 0.0;
            for (long long k = pl.segment_tiles[s]; k < pl.segment_tiles[s + 1]; ++k)
                sum += pl.partial[k];
            factors[s] = (T)clipnorm_factor(sum, pl.clipnorm);
        }
        wait();
    } else if (pl.clip_mode == FO_CLIP_GLOBAL) {
        if (t == 0) factors[0] = global_factor<T>(pl);
        wait();
    }
    return true;
}

// Segment s's sums of its tiles' two partial sums (sums[2k], sums[2k + 1]), in tile order.
static void segment_sums(const HostPlan& pl, const double* sums, long long s, double* a,
                         double* b) {
    *a = 0.0, *b = 0.0;
    for (long long k = pl.segment_tiles[s]; k < pl.segment_tiles[s + 1]; ++k)
        *a += sums[2 * k], *b += sums[2 * k + 1];
}

// Thread t of n's tiles [*first, *last) (tiles_of), after the gradient phase over them
// (gradient_phase) and, on gradient accumulation's applying call, with the thread's
// tiles of the accumulator holding the mean; false when the step is skipped (every
// thread returns the same).
template <typename T, typename G, typename S>
static bool start_phases(const HostPlan& pl, const G* g, const Options<T, S>& opts, int t, int n,
                         T* factors, std::atomic<int>* any_nonfinite, fo_pool::Barrier* barrier,
                         long long* first, long long* last) {
    tiles_of(pl, t, n, first, last);
    if (!gradient_phase(pl, g, opts, t, n, *first, *last, factors, any_nonfinite, barrier))
        return false;
    opts.mean_in_place(g, pl.sum_start[*first], pl.sum_start[*last]);
    return true;
}

// Thread t of n's share of a call of gradient accumulation that only adds: the finite
// check (skip_nonfinite), then host.cpp's accumulate_only over the thread's tiles (on
// other storage its converting loops: the average of the master or of the params as
// stored, both written on an overwrite).
template <typename T, typename P, typename G, typename S>
static void accumulate_phase(const HostPlan& pl, P* p, float* master, const G* g,
                             const Options<T, S>& opts, const FoRounding& rounding, int t,
                             int n, std::atomic<int>* any_nonfinite, fo_pool::Barrier* barrier) {
    long long first, last;
    tiles_of(pl, t, n, &first, &last);
    if (!gradient_phase(pl, g, opts, t, n, first, last, (T*)nullptr, any_nonfinite, barrier))
        return;
    const long long b = pl.sum_start[first], e = pl.sum_start[last];
    if constexpr (sizeof(P) == sizeof(T) && sizeof(G) == sizeof(T) && sizeof(S) == sizeof(T)) {
        accumulate_only<T>(p + b, g + b, opts.avg ? opts.avg + b : nullptr, opts.acc + b,
                           e - b, opts.o);
    } else {
        accumulate_converted<T>(g + b, opts.acc + b, e - b, opts.o);
        opts.average(p, master, rounding, b, e);
    }
}

// The threads a step over `plan`'s per-segment tiles runs on (host_step's rule).
static int threads_for(HostPlan* plan) {
    long long n = plan->num_threads;
    if (n > plan->nsums) n = plan->nsums;
    if (plan->sum_start[plan->nsums] < FO_MIN_PARALLEL || n < 1) n = 1;
    plan->threads_used = (int)n;
    return (int)n;
}

// Runs job(t, n, barrier) on `n` threads (the calling one alone: no barrier).
template <typename Job>
static void run_threads(int n, const Job& job) {
    if (n == 1) {
        job(0, 1, nullptr);
    } else {
        fo_pool::Barrier barrier(n);
        fo_pool::pool().run(n, [&](int t, int threads) { job(t, threads, &barrier); });
    }
}

// A whole-variable rule's host step around `run(h, groups, values, opts, any_nonfinite)`,
// which runs the rule's phases on the threads: GradScaler's inputs (a found_inf skips
// the step, counted, as does a LossScaleOptimizer's scale that underflowed), each
// segment group's scalars and prologue (the unscale with that scale: fo_phase), the
// clip norm for the threads; a call of gradient accumulation that only adds runs
// accumulate_phase instead of the rule; then the counters (and the scale) advanced
// once, as host.cpp's host_step does. Returns 1 if the rule was applied, 0 if the step
// was skipped (then no buffer was written) or only accumulated.
// P, G, S: the params', grads' and state's storage (the options' slots are state);
// `master`: 16-bit params' float32 master copy, or null; `rounding` the step's param
// rounding (options.cuh, fo_rounding), for the average's overwrite on a call that only adds.
template <typename Rule, typename T, typename P, typename G, typename S, typename Run>
static int whole_step(P* p, const G* g, S* average, S* accumulator, HostPlan* plan,
                      const Hyper* block, StepState* state, const Run& run,
                      float* master = nullptr) {
    StepStart<T> start;
    if (!start_step<Rule>(plan, block, state, &start)) return 0;  // host.cpp
    const Hyper* h = start.h;
    const StepValues& values = start.values;
    const GroupValues<T>& groups = start.groups;
    const Options<T, S> opts = {average, accumulator, fo_options<T>(start.phase)};
    const FoRounding rounding = fo_rounding(*h, *state);  // options.cuh
    plan->clipnorm = h->clipnorm;
    std::atomic<int> any_nonfinite(0);
    if (opts.adds_only()) {
        run_threads(threads_for(plan), [&](int t, int n, fo_pool::Barrier* barrier) {
            accumulate_phase(*plan, p, master, g, opts, rounding, t, n, &any_nonfinite,
                             barrier);
        });
    } else {
        run(h, groups, values, opts, &any_nonfinite);
    }
    const bool skipped = any_nonfinite.load() != 0;
    fo_advance(*state, *h, values, skipped);
    return skipped || opts.adds_only() ? 0 : 1;
}

}  // namespace fo_whole
