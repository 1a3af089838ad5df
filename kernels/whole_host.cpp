// whole_host.cpp: what the host steps of the whole-variable rules share (lamb_host.cpp,
// muon_host.cpp): the per-segment tiles of host.cpp's plan (sum_start, sum_segment,
// segment_tiles) split across threads, a tile's segment group, and the gradient phase
// before the update (norm sums, the finite check, per-segment or global clip factors).
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

// The gradient phase of thread t of n (tiles [first, last)): the tiles' sums of
// squares and the finite check, a barrier, then the clip factors: factors[s] per
// segment (clipnorm) or factors[0] (global_clipnorm), and a barrier. Returns false when
// a gradient is not finite under skip_nonfinite (every thread returns the same).
template <typename T>
static bool gradient_phase(const HostPlan& pl, const T* g, T unscale, int t, int n,
                           long long first, long long last, T* factors,
                           std::atomic<int>* any_nonfinite, fo_pool::Barrier* barrier) {
    auto wait = [&] { if (barrier) barrier->wait(); };
    if (pl.clip_mode == FO_CLIP_NONE && !pl.skip_nonfinite) return true;
    int bad = 0;
    for (long long k = first; k < last; ++k) {
        const long long b = pl.sum_start[k], e = pl.sum_start[k + 1];
        if (pl.skip_nonfinite) {
            pl.partial[k] = tile_sum_of_squares<true>(g, b, e, unscale, &pl.nonfinite[k]);
            bad |= pl.nonfinite[k];
        } else {
            pl.partial[k] = tile_sum_of_squares<false>(g, b, e, unscale, nullptr);
        }
    }
    if (bad) any_nonfinite->fetch_or(1);
    wait();
    if (any_nonfinite->load()) return false;
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

// A whole-variable rule's host step around `run(h, groups, values, any_nonfinite)`,
// which runs the rule's phases on the threads: GradScaler's inputs (a found_inf skips
// the step, counted, as does a LossScaleOptimizer's scale that underflowed), each
// segment group's scalars and prologue (the unscale with that scale: fo_phase), the
// clip norm for the threads; then the counters (and the scale) advanced once, as
// host.cpp's host_step does. Returns 1 if the step was applied, 0 if it was skipped
// (then no buffer was written).
template <typename Rule, typename T, typename Run>
static int whole_step(HostPlan* plan, const Hyper* block, StepState* state, const Run& run) {
    StepStart<T> start;
    if (!start_step<Rule>(plan, block, state, &start)) return 0;  // host.cpp
    const Hyper* h = start.h;
    const StepValues& values = start.values;
    const GroupValues<T>& groups = start.groups;
    plan->clipnorm = h->clipnorm;
    std::atomic<int> any_nonfinite(0);
    run(h, groups, values, &any_nonfinite);
    const bool skipped = any_nonfinite.load() != 0;
    fo_advance(*state, *h, values, skipped);
    return skipped ? 0 : 1;
}

// Thread t of n's tiles [*first, *last) (tiles_of), after the gradient phase over them
// (gradient_phase); false when the step is skipped (every thread returns the same).
template <typename T>
static bool start_phases(const HostPlan& pl, const T* g, const GroupValues<T>& values, int t,
                         int n, T* factors, std::atomic<int>* any_nonfinite,
                         fo_pool::Barrier* barrier, long long* first, long long* last) {
    tiles_of(pl, t, n, first, last);
    return gradient_phase(pl, g, values.pro[0].unscale, t, n, *first, *last, factors,
                          any_nonfinite, barrier);
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

}  // namespace fo_whole
