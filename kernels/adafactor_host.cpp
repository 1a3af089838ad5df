// adafactor_host.cpp: Adafactor's step on the CPU (adafactor.cuh), the host executor's
// counterpart of adafactor.cu, on host.cpp's thread pool and the per-segment tiles of its
// plan, in the same phases with a barrier between them:
//   [norm clipping / skip_nonfinite: the gradient phase (whole_host.cpp)]
//   moments  per tile: the sum of p^2 (decayed p); unfactored segments v and the sum of
//            u^2; factored segments G = g^2 + eps_1 into v;
//   r, c     per row and per column of the factored segments (threads split each list);
//   means    per leading index, the mean of its new r;
//   rms      per factored tile: v from r, c and the mean, the sum of u^2;
//   scales   per segment, its tiles' sums in tile order;
//   apply    p decayed again, v rebuilt (factored: stored) or read, p moves;
// then the counters advanced once. plan->segment_values is the segment table of
// adafactor.cuh (Adafactor._kernel_segments). Deterministic whatever the thread count:
// every sum is over a fixed range in a fixed order, threads only decide who takes it.
// Keras' options (whole_host.cpp): the passes read the accumulated mean as their
// gradient, apply restarts the accumulator and the moving average follows each tile.
// Built with FUSEDOPT_T defined and adafactor.cuh included (fusedopt/host.py).
#pragma once
#include "whole_host.cpp"

namespace fo_adafactor {
using namespace fo_whole;

// sum of f(i) over [b, e) in double: FO_LANES partial sums in a fixed order, then the rest.
template <typename F>
static double lane_sum(long long b, long long e, const F& f) {
    double lane[FO_LANES];
    for (int j = 0; j < FO_LANES; ++j) lane[j] = 0.0;
    long long i = b;
    for (; i + FO_LANES <= e; i += FO_LANES)
        for (int j = 0; j < FO_LANES; ++j) lane[j] += f(i + j);
    double rest = 0.0;
    for (; i < e; ++i) rest += f(i);
    for (int width = FO_LANES / 2; width > 0; width /= 2)
        for (int j = 0; j < width; ++j) lane[j] += lane[j + width];
    return lane[0] + rest;
}

template <typename T>
struct Step {
    T* p;
    const T* g;
    T* r;
    T* c;
    T* v;
    const HostPlan* plan;
    const GroupValues<T>* values;
    StepScalars<T> common;  // beta for the statistics (no group's rate needed)
    double* sums;           // 2 per tile: p^2, u^2
    T* factors;             // per segment (clipnorm), else factors[0] for every element
    T* row_means;           // per leading index of the factored segments
    T* scales;              // 2 per segment
    std::atomic<int>* any_nonfinite;
    Options<T> opts;        // use_ema, gradient accumulation

    const double* row(long long s) const {
        return plan->segment_values + s * FO_ADAFACTOR_FIELDS;
    }
    long long total(int field) const { return (long long)row(plan->nsegments)[field]; }

    // A tile's segment, group values and clip factor.
    struct Tile {
        long long b, e, segment;
        const double* row;
        Prologue<T> pro;
        StepScalars<T> st;
        T factor;
    };
    Tile tile(long long k) const {
        const HostPlan& pl = *plan;
        const long long s = pl.sum_segment[k];
        const int group = group_at(pl, pl.sum_start[k]);
        return {pl.sum_start[k], pl.sum_start[k + 1], s, row(s), values->pro[group],
                values->st[group], factors[pl.clip_mode == FO_CLIP_SEGMENT ? s : 0]};
    }

    // The prepared gradient; p decayed in place (a copy of the parameter).
    static T element(const Tile& x, T& pi, T gi) {
        gi = fo_prepare_gradient(gi, pi, x.factor, x.pro);
        fo_decay(pi, x.pro, x.st.lr);
        return gi;
    }

    void moments(long long k) const {
        const Tile x = tile(k);
        const T* __restrict__ pp = p;
        const T* __restrict__ gg = opts.gradient(g);
        T* __restrict__ vv = v;
        if (x.row[1] >= 0.0) {  // factored: G into v
            sums[2 * k] = lane_sum(x.b, x.e, [&](long long i) {
                T pi = pp[i];
                vv[i] = adafactor::regulated(element(x, pi, gg[i]), x.st.c);
                return (double)(pi * pi);
            });
            return;
        }
        sums[2 * k] = lane_sum(x.b, x.e, [&](long long i) {
            T pi = pp[i];
            element(x, pi, gg[i]);
            return (double)(pi * pi);
        });
        sums[2 * k + 1] = lane_sum(x.b, x.e, [&](long long i) {
            T pi = pp[i];
            const T gi = element(x, pi, gg[i]);
            adafactor::moment(gi, vv[i], x.st.c);
            const T u = gi / fo_sqrt(vv[i]);
            return (double)(u * u);
        });
    }

    void row_statistic(long long q) const {
        const double* x = row(adafactor_segment_of(plan->segment_values, plan->nsegments, 3, q));
        const long long cols = (long long)x[2];
        const T* G = v + (long long)x[0] + (q - (long long)x[3]) * cols;
        const double sum = lane_sum(0, cols, [&](long long j) { return (double)G[j]; });
        r[q] = adafactor::statistic(r[q], (T)sum, cols, common.c);
    }

    // Columns [q0, q1) of the c slot: each column's sum over its rows in row order (as
    // the GPU's thread per column), taken a row of columns at a time.
    void column_statistics(long long q0, long long q1) const {
        std::vector<double> sums_of;
        for (long long q = q0; q < q1;) {
            const double* x = row(adafactor_segment_of(plan->segment_values, plan->nsegments, 4, q));
            const long long rows = (long long)x[1], cols = (long long)x[2];
            const long long local = q - (long long)x[4], l = local / cols, j0 = local - l * cols;
            const long long width = cols - j0 < q1 - q ? cols - j0 : q1 - q;
            sums_of.assign((size_t)width, 0.0);
            const T* G = v + (long long)x[0] + l * rows * cols + j0;
            for (long long i = 0; i < rows; ++i)
                for (long long j = 0; j < width; ++j) sums_of[j] += (double)G[i * cols + j];
            for (long long j = 0; j < width; ++j)
                c[q + j] = adafactor::statistic(c[q + j], (T)sums_of[j], rows, common.c);
            q += width;
        }
    }

    void row_mean(long long q) const {
        const double* x = row(adafactor_segment_of(plan->segment_values, plan->nsegments, 5, q));
        const long long rows = (long long)x[1];
        const T* rr = r + (long long)x[3] + (q - (long long)x[5]) * rows;
        double sum = 0.0;
        for (long long i = 0; i < rows; ++i) sum += (double)rr[i];
        row_means[q] = (T)sum / (T)rows;
    }

    // f(i, n, r, row mean, c): the elements [i, i + n) of tile x, a factored segment's,
    // that lie in one row, with that row's statistics and the c entries from the first
    // one's column on: the loops over a row's elements vectorise.
    template <typename F>
    void row_runs(const Tile& x, const F& f) const {
        AdafactorWalk at(x.row, x.b, 1);
        for (long long i = x.b, n; i < x.e; i += n) {
            n = x.e - i < at.cols - at.col ? x.e - i : at.cols - at.col;
            f(i, n, r[at.r_at(x.row)], row_means[at.l_at(x.row)], c + at.c_at(x.row));
            at.col = 0;
            if (++at.row == at.rows) at.row = 0, ++at.lead;
        }
    }

    void rms(long long k) const {
        const Tile x = tile(k);
        if (x.row[1] < 0.0) return;
        const T* __restrict__ pp = p;
        const T* __restrict__ gg = opts.gradient(g);
        double sum = 0.0;
        row_runs(x, [&](long long i0, long long n, T rr, T rm, const T* __restrict__ cc) {
            sum += lane_sum(i0, i0 + n, [&](long long i) {
                T pi = pp[i];
                const T gi = element(x, pi, gg[i]);
                const T u = gi / fo_sqrt(adafactor::factored(rr, rm, cc[i - i0]));
                return (double)(u * u);
            });
        });
        sums[2 * k + 1] = sum;
    }

    void apply(long long k) const {
        const Tile x = tile(k);
        const T scale = scales[2 * x.segment], divisor = scales[2 * x.segment + 1];
        T* __restrict__ pp = p;
        const T* __restrict__ gg = opts.gradient(g);
        T* __restrict__ vv = v;
        if (x.row[1] < 0.0) {
            for (long long i = x.b; i < x.e; ++i) {
                T pi = pp[i];
                const T gi = element(x, pi, gg[i]);
                adafactor::apply(pi, gi, vv[i], scale, divisor, x.st.c);
                pp[i] = pi;
            }
            return;
        }
        row_runs(x, [&](long long i0, long long n, T rr, T rm, const T* __restrict__ cc) {
            for (long long i = i0; i < i0 + n; ++i) {
                T pi = pp[i];
                const T gi = element(x, pi, gg[i]);
                vv[i] = adafactor::factored(rr, rm, cc[i - i0]);
                adafactor::apply(pi, gi, vv[i], scale, divisor, x.st.c);
                pp[i] = pi;
            }
        });
    }

    // Thread t's share of the step; `barrier` is null on one thread.
    void run(int t, int n, fo_pool::Barrier* barrier) const {
        const HostPlan& pl = *plan;
        auto wait = [&] { if (barrier) barrier->wait(); };
        // Items [t*count/n, (t+1)*count/n) of a list of `count`.
        auto share = [&](long long count, const auto& job) {
            for (long long q = count * t / n; q < count * (t + 1) / n; ++q) job(q);
        };
        long long first, last;
        if (!start_phases(pl, g, opts, t, n, factors, any_nonfinite, barrier, &first, &last))
            return;
        for (long long k = first; k < last; ++k) moments(k);
        wait();
        share(total(3), [&](long long q) { row_statistic(q); });
        column_statistics(total(4) * t / n, total(4) * (t + 1) / n);
        wait();
        share(total(5), [&](long long q) { row_mean(q); });
        wait();
        for (long long k = first; k < last; ++k) rms(k);
        wait();
        for (long long s = t; s < pl.nsegments; s += n) {
            double sp, su;
            segment_sums(pl, sums, s, &sp, &su);
            const long long size = (long long)(row(s + 1)[0] - row(s)[0]);
            if (size > 0) adafactor_scales(sp, su, size, *hyper, scales + 2 * s);
        }
        wait();
        for (long long k = first; k < last; ++k) {
            apply(k);
            const long long b = pl.sum_start[k], e = pl.sum_start[k + 1];
            opts.restart(b, e);     // the mean's last read
            opts.average(p, b, e);  // the tile in cache
        }
    }

    const Hyper* hyper;
};

template <typename T>
static int step(T* p, const T* g, T* r, T* c, T* v, T* average, T* accumulator, HostPlan* plan,
                const Hyper* block, StepState* state) {
    return whole_step<adafactor, T>(p, g, average, accumulator, plan, block, state, [&](
            const Hyper* h, const GroupValues<T>& groups, const StepValues& values,
            const Options<T>& opts, std::atomic<int>* any_nonfinite) {
        const double* totals = plan->segment_values + plan->nsegments * FO_ADAFACTOR_FIELDS;
        std::vector<double> sums(2 * plan->nsums + 2);
        std::vector<T> factors(plan->nsegments + 1, T(1)), scales(2 * plan->nsegments + 2, T(1));
        std::vector<T> row_means((size_t)totals[5] + 1);
        const Step<T> work = {p, g, r, c, v, plan, &groups, fo_narrow<T>(values), sums.data(),
                              factors.data(), row_means.data(), scales.data(), any_nonfinite,
                              opts, h};
        run_threads(threads_for(plan), [&](int t, int n, fo_pool::Barrier* barrier) {
            work.run(t, n, barrier);
        });
    });
}

}  // namespace fo_adafactor

#ifdef FUSEDOPT_T
// host.cpp's signature: the slots r, c, v (the master copy unused: uniform
// float32/float64 only).
extern "C" int fusedopt_host_step(FUSEDOPT_T* p, const FUSEDOPT_T* g, FUSEDOPT_T* s0,
                                  FUSEDOPT_T* s1, FUSEDOPT_T* s2, float*, FUSEDOPT_T* average,
                                  FUSEDOPT_T* accumulator, HostPlan* plan, const Hyper* hyper,
                                  StepState* state) {
    return fo_adafactor::step<FUSEDOPT_T>(p, g, s0, s1, s2, average, accumulator, plan, hyper,
                                          state);
}
#endif
