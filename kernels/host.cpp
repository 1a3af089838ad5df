// host.cpp: the CPU executor (fusedopt/host.py). It runs the CUDA kernels' own code,
// compiled by the host's C++ compiler: the step state machine (step.cuh: the learning
// rate, schedules and the rule's scalars from the hyperparameter block and the
// counters), and the per-element rule and prologue (common.cuh, <rule>.cuh:
// fused_element) over the same tile table as fused.cu, with threads across tiles.
//
// Deterministic whatever the thread count: the tiles depend only on the layout; a
// tile's sum of squares is taken in a fixed order (FO_LANES interleaved partial sums
// combined in a fixed tree), and a segment's tiles are added in tile order. Threads
// only decide who computes a tile, never the order of an addition.
//
// Threads: a small pool of std::threads that sleep between steps (no OpenMP: no
// runtime to ship or to find, no spinning threads competing with the caller's own
// thread pools on a busy machine, and it builds with any C++17 compiler).
//
// Built once per rule and storage combination: fusedopt/host.py prepends
//   #define FUSEDOPT_RULE <rule>   #define FUSEDOPT_T <float|double> (the math type)
//   #define FUSEDOPT_P / FUSEDOPT_G / FUSEDOPT_S (params, grads, state storage types)
//   #include "<rule>.cuh"
// and loads the exported fusedopt_host_step with ctypes. Loads and stores convert
// between storage and math type exactly as fused.cu does (kernels/storage.cuh).
// kernels/whole_host.cpp includes this file for the rules with kernels of their own
// (lamb_host.cpp for every storage key; adafactor_host.cpp, muon_host.cpp for uniform
// float32/float64 ones).
//
// Keras' options (kernels/options.cuh: EMA, gradient accumulation): a call that only
// accumulates runs one light loop over g and the accumulator (and p, or the master,
// and the average with EMA); a call that applies forms the accumulated mean of each
// chunk into a scratch the update reads as its gradient, and updates the moving
// average after the chunk's update, while the chunk is still in cache, from the params
// (or master) just stored: what the model holds. Every loop runs on the math type:
// uniform float32/float64 storage on the buffers themselves, other storage (16-bit
// params, grads or state, the float32 master) on math-type scratch that each chunk is
// converted into and rounded back from where fused.cu rounds ("other storage" below),
// so the conversions and the rule's loop vectorise alike.
#pragma once
#include "options.cuh"
#include "storage.cuh"

#include <string.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

// Partial sums per tile: independent additions for the vector units (two AVX
// registers of doubles), in an order fixed by the code rather than by the compiler;
// few enough that short tiles (small variables) are not dominated by the final tree.
#define FO_LANES 8
// Elements per inner update loop. A slot the configuration lacks is backed by a
// zeroed per-thread scratch of this length, so the loop has no per-element branch
// on absent slots (and vectorises) while absent slots still read 0, as on the GPU.
#define FO_CHUNK 1024
// Below this many elements a step runs on the calling thread: waking the pool
// costs more than it saves.
#define FO_MIN_PARALLEL 65536

enum { FO_CLIP_NONE = 0, FO_CLIP_SEGMENT = 1, FO_CLIP_GLOBAL = 2 };

// ------------------------------------------------------------------ thread pool
namespace fo_pool {

// Runs job(t, n) for t = 0..n-1, t = 0 on the calling thread; returns when all are
// done. Workers sleep on a condition variable between jobs. One job at a time.
class Pool {
  public:
    void run(int n, const std::function<void(int, int)>& job) {
        std::lock_guard<std::mutex> one_job(run_mutex_);
        grow(n - 1);
        {
            std::lock_guard<std::mutex> lock(mutex_);
            job_ = &job;
            threads_ = n;
            pending_ = n - 1;
            ++generation_;
        }
        wake_.notify_all();
        job(0, n);
        std::unique_lock<std::mutex> lock(mutex_);
        done_.wait(lock, [this] { return pending_ == 0; });
        job_ = nullptr;
    }

  private:
    void grow(int workers) {
        while ((int)workers_.size() < workers) {
            const int index = (int)workers_.size() + 1;
            workers_.emplace_back([this, index] { work(index); });
            workers_.back().detach();  // the pool lives as long as the process
        }
    }

    void work(int index) {
        long long seen = 0;
        for (;;) {
            const std::function<void(int, int)>* job;
            int n;
            {
                std::unique_lock<std::mutex> lock(mutex_);
                wake_.wait(lock, [&] { return generation_ != seen; });
                seen = generation_;
                job = job_;
                n = threads_;
            }
            if (index >= n) continue;
            (*job)(index, n);
            std::lock_guard<std::mutex> lock(mutex_);
            if (--pending_ == 0) done_.notify_one();
        }
    }

    std::mutex run_mutex_, mutex_;
    std::condition_variable wake_, done_;
    std::vector<std::thread> workers_;
    const std::function<void(int, int)>* job_ = nullptr;
    int threads_ = 0, pending_ = 0;
    long long generation_ = 0;
};

// The process's pool. After fork() the child has none of the parent's threads (and
// maybe a locked mutex), so it starts a pool of its own; the old one is abandoned.
inline Pool& pool() {
    static Pool* current = nullptr;
    static pid_t owner = 0;
    static std::mutex guard;
    std::lock_guard<std::mutex> lock(guard);
    if (current == nullptr || owner != getpid()) {
        current = new Pool();
        owner = getpid();
    }
    return *current;
}

// Every thread of a job waits here until all have arrived (phases of one step).
class Barrier {
  public:
    explicit Barrier(int n) : n_(n) {}
    void wait() {
        std::unique_lock<std::mutex> lock(mutex_);
        const long long generation = generation_;
        if (++arrived_ == n_) {
            arrived_ = 0;
            ++generation_;
            all_.notify_all();
        } else {
            all_.wait(lock, [&] { return generation_ != generation; });
        }
    }

  private:
    std::mutex mutex_;
    std::condition_variable all_;
    int n_, arrived_ = 0;
    long long generation_ = 0;
};

}  // namespace fo_pool

// ------------------------------------------------------------------ per tile
// Sum of (g * unscale)^2 over [begin, end) in double, as fusedopt_sumsq does (with
// Acc, of the accumulated mean's squares, options.cuh: fo_norm_value); with Check,
// `nonfinite` says whether a raw gradient is inf or NaN (skip_nonfinite).
template <bool Check, bool Acc, typename G, typename T, typename A>
static double tile_sum_of_squares(const G* __restrict__ g, const A* __restrict__ acc,
                                  long long begin, long long end, T unscale, T steps,
                                  int* nonfinite) {
    double lane[FO_LANES];
    T bad[FO_LANES];  // sums of g - g: 0 while every g is finite, else NaN
    for (int j = 0; j < FO_LANES; ++j) lane[j] = 0.0, bad[j] = T(0);
    long long i = begin;
    for (; i + FO_LANES <= end; i += FO_LANES) {
        for (int j = 0; j < FO_LANES; ++j) {
            const T gi = fo_load(g[i + j]);
            const double x = (double)fo_norm_value(gi, Acc ? (T)fo_load(acc[i + j]) : T(0), Acc,
                                                   unscale, steps);
            lane[j] += x * x;
            if (Check) bad[j] += gi - gi;
        }
    }
    double rest = 0.0;  // the last < FO_LANES elements, in order
    for (; i < end; ++i) {
        const T gi = fo_load(g[i]);
        const double x = (double)fo_norm_value(gi, Acc ? (T)fo_load(acc[i]) : T(0), Acc, unscale,
                                               steps);
        rest += x * x;
        if (Check) bad[0] += gi - gi;
    }
    for (int width = FO_LANES / 2; width > 0; width /= 2) {
        for (int j = 0; j < width; ++j) {
            lane[j] += lane[j + width];
            if (Check) bad[j] += bad[j + width];
        }
    }
    if (Check) *nonfinite = bad[0] != T(0);
    return lane[0] + rest;
}

template <bool Check, typename G, typename T>
static double tile_sum_of_squares(const G* g, long long begin, long long end, T unscale,
                                  int* nonfinite) {
    return tile_sum_of_squares<Check, false>(g, (const T*)nullptr, begin, end, unscale, T(1),
                                             nonfinite);
}

// What the norm clip sums: the gradients times unscale, or on gradient accumulation's
// applying call the mean of them and the accumulator (`acc` null otherwise; stored as
// the state, S).
template <typename T, typename G, typename S>
struct NormInput {
    const G* g;
    const S* acc;
    T unscale;
    T steps;

    template <bool Check>
    double sum(long long begin, long long end, int* nonfinite) const {
        if (acc)
            return tile_sum_of_squares<Check, true>(g, acc, begin, end, unscale, steps, nonfinite);
        return tile_sum_of_squares<Check, false>(g, acc, begin, end, unscale, steps, nonfinite);
    }
};

// The fused update of n contiguous elements of the math type: every element read once,
// written once. `factor` is the norm-clip factor of every element, or, with Factors, of
// each one. Other storage runs this on its chunks' scratch (see "other storage").
template <typename Rule, bool Factors, typename T>
static void update_run(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ s0,
                       T* __restrict__ s1, T* __restrict__ s2, const T* __restrict__ factors,
                       long long n, T factor, const Prologue<T> pro, const StepScalars<T> st) {
    for (long long i = 0; i < n; ++i)
        fused_element<Rule>(p[i], g[i], s0[i], s1[i], s2[i], Factors ? factors[i] : factor, pro,
                            st);
}

// Gradient accumulation's applying call: mean[i] = the chunk's accumulated mean, which
// the update then reads as its gradient; the accumulator restarts.
template <typename T>
static void accumulated_mean_run(T* __restrict__ mean, const T* __restrict__ g,
                                 T* __restrict__ acc, long long n, const OptionScalars<T> o) {
    for (long long i = 0; i < n; ++i) mean[i] = fo_accumulated_mean(g[i], acc[i], o);
}

// One of gradient accumulation's calls that only add.
template <typename T>
static void accumulate_run(const T* __restrict__ g, T* __restrict__ acc, long long n,
                           const OptionScalars<T> o) {
    for (long long i = 0; i < n; ++i) fo_accumulate(g[i], acc[i], o);
}

// The moving average after the update of a chunk (Overwrite: the params take it).
template <bool Overwrite, typename T>
static void moving_average_run(T* __restrict__ p, T* __restrict__ avg, long long n,
                               OptionScalars<T> o) {
    o.overwrite = Overwrite;
    for (long long i = 0; i < n; ++i) fo_moving_average<T>(p[i], avg[i], o);
}

template <typename T>
static void moving_average_run(T* p, T* avg, long long n, const OptionScalars<T>& o) {
    if (o.overwrite) moving_average_run<true>(p, avg, n, o);
    else moving_average_run<false>(p, avg, n, o);
}

// Gradient accumulation's light calls (fused.cu, accumulate_run), with EMA the moving
// average after each chunk's accumulation.
template <typename T>
static void accumulate_only(T* p, const T* g, T* avg, T* acc, long long n,
                            const OptionScalars<T>& o) {
    for (long long a = 0; a < n; a += FO_CHUNK) {
        const long long count = n - a < FO_CHUNK ? n - a : FO_CHUNK;
        accumulate_run(g + a, acc + a, count, o);
        if (avg) moving_average_run(p + a, avg + a, count, o);
    }
}

// ------------------------------------------------------------------ other storage
// 16-bit params, grads or state (and the float32 master copy) take the same loops as
// uniform storage: each chunk of a 16-bit buffer is converted into math-type scratch
// (loads are exact), the uniform loops run on the scratch, and the chunk is stored
// back, rounded once where fused.cu rounds (storage.cuh: to nearest, or the params
// stochastically from the same (seed, step, element index)). The same values in the
// same operations: the same bits as element by element, but the conversions are
// branch-free loops of their own that vectorise, and so do the rule's.

// out[i] = in[i] in the math type (exact).
template <typename S, typename T>
static void load_run(T* __restrict__ out, const S* __restrict__ in, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = (T)fo_load(in[i]);
}

// out[i] <- in[i], rounded to nearest.
template <typename S, typename T>
static void store_run(S* __restrict__ out, const T* __restrict__ in, long long n) {
    for (long long i = 0; i < n; ++i) fo_store(out[i], in[i]);
}

// The params' store of [0, n) (element `first` + i): rounded as fo_store_param rounds.
template <typename P, typename T>
static void store_param_run(P* out, const T* in, long long n, const FoRounding&, long long) {
    store_run(out, in, n);
}

// bfloat16 params, stochastically: one random word per aligned group of four elements
// (fo_random_word, as fo_dither), then the rounding itself, a vector loop.
static void store_param_run(fo_bf16* __restrict__ out, const float* __restrict__ in,
                            long long n, const FoRounding& r, long long first) {
    if (!r.stochastic) {
        store_run(out, in, n);
        return;
    }
    const fo_u64 g0 = (fo_u64)first >> 2;
    const long long groups = (long long)(((fo_u64)(first + n - 1) >> 2) - g0) + 1;
    fo_u64 word[FO_CHUNK / 4 + 2];
    for (long long k = 0; k < groups; ++k) word[k] = fo_random_word(r.seed, r.step, g0 + k);
    for (long long i = 0; i < n; ++i) {
        const fo_u64 index = (fo_u64)(first + i);
        out[i].bits = fo_float_to_bf16_sr(in[i], fo_dither_of(word[(index >> 2) - g0], index));
    }
}

// Math-type views of one chunk of a buffer of storage S: the buffer itself when S is
// the math type, else `scratch`, loaded from it (load) and stored back (store).
template <typename T, typename S>
static T* chunk_view(S* x, T* scratch, long long n) {
    if constexpr (sizeof(S) == sizeof(T)) {
        (void)scratch, (void)n;
        return reinterpret_cast<T*>(x);
    } else {
        load_run(scratch, x, n);
        return scratch;
    }
}

template <typename T, typename S>
static const T* chunk_view(const S* x, T* scratch, long long n) {
    if constexpr (sizeof(S) == sizeof(T)) {
        (void)scratch, (void)n;
        return reinterpret_cast<const T*>(x);
    } else {
        load_run(scratch, x, n);
        return scratch;
    }
}

template <typename T, typename S>
static void chunk_store(S* x, const T* view, long long n) {
    if constexpr (sizeof(S) != sizeof(T)) store_run(x, view, n);
}

// The moving average of a chunk on other storage (n elements at flat position `first`)
// after its update: of the master, or of the params as stored (read back: the rounded
// value); an overwrite copies the stored average into the master and the params,
// rounded as every param store.
template <bool Overwrite, typename S, typename T>
static void moving_average_stored_run(T* __restrict__ p, T* __restrict__ avg, long long n,
                                      OptionScalars<T> o) {
    o.overwrite = Overwrite;
    for (long long i = 0; i < n; ++i) fo_moving_average<S>(p[i], avg[i], o);
}

template <typename T, typename P, typename S>
static void moving_average_chunk(P* p, float* master, S* avg, long long n, long long first,
                                 const FoRounding& rounding, const OptionScalars<T>& o,
                                 T* p_scratch, T* avg_scratch) {
    T* pv = master ? reinterpret_cast<T*>(master) : chunk_view<T>(p, p_scratch, n);
    T* av = chunk_view<T>(avg, avg_scratch, n);
    if (o.overwrite) moving_average_stored_run<true, S>(pv, av, n, o);
    else moving_average_stored_run<false, S>(pv, av, n, o);
    chunk_store(avg, av, n);  // exact: av holds the values as stored
    if constexpr (sizeof(P) != sizeof(T)) {
        if (o.overwrite) store_param_run(p, pv, n, rounding, first);
    }
}

// The same over [0, n) (flat position `first` on), chunk by chunk, for a caller with
// no chunks of its own (kernels/whole_host.cpp's Lamb on other storage).
template <typename T, typename P, typename S>
static void moving_average_converted(P* p, float* master, S* avg, long long n, long long first,
                                     const FoRounding& rounding, const OptionScalars<T>& o) {
    T p_scratch[FO_CHUNK], avg_scratch[FO_CHUNK];
    for (long long a = 0, count; a < n; a += count) {
        count = n - a < FO_CHUNK ? n - a : FO_CHUNK;
        moving_average_chunk<T>(p + a, master ? master + a : nullptr, avg + a, count, first + a,
                                rounding, o, p_scratch, avg_scratch);
    }
}

// A call that only accumulates, on other storage: acc <- acc + g*unscale over [0, n),
// on math-type views of each chunk, the accumulator rounded once.
template <typename T, typename G, typename S>
static void accumulate_converted(const G* g, S* acc, long long n, const OptionScalars<T>& o) {
    T g_scratch[FO_CHUNK], acc_scratch[FO_CHUNK];
    for (long long a = 0, count; a < n; a += count) {
        count = n - a < FO_CHUNK ? n - a : FO_CHUNK;
        T* q = chunk_view<T>(acc + a, acc_scratch, count);
        accumulate_run<T>(chunk_view<T>(g + a, g_scratch, count), q, count, o);
        chunk_store(acc + a, q, count);
    }
}

// ------------------------------------------------------------------ the step
// What a step needs besides the buffers, the hyperparameters and the counters; built
// once per layout and clip mode by fusedopt/host.py (HostPlan), which mirrors it as a
// ctypes Structure.
//
// Two tile tables, both fusedopt/_kernels.py TileTables: the update runs over the flat
// one (fused.cu's without clipnorm), whose long tiles keep the vector loops long
// whatever the segment sizes; the reductions run over the per-segment one when
// clipping per segment (reduce.cu's: every tile inside one segment, so segment sums are
// sums of whole tiles), else over the flat one too.
struct HostPlan {
    const long long* tile_start;     // update tile k covers [tile_start[k], tile_start[k + 1])
    long long ntiles;
    const long long* sum_start;      // reduction tile k covers [sum_start[k], sum_start[k + 1])
    const int* sum_segment;          // and lies in segment sum_segment[k] (per-segment tables)
    long long nsums;
    const long long* segment_tiles;  // segment s owns reduction tiles [segment_tiles[s], ...[s + 1])
    const long long* offsets;        // segment s covers [offsets[s], offsets[s + 1])
    long long nsegments;
    int clip_mode;                   // FO_CLIP_*: per segment or global, Hyper.clipnorm
    int skip_nonfinite;              // check the gradients first; skip the step if any is not finite
    double clipnorm;                 // Hyper.clipnorm, copied here for the threads
    double* partial;                 // scratch: per reduction tile, the sum of squares
    int* nonfinite;                  // scratch: per reduction tile, a non-finite flag
    int num_threads;                 // > 0
    int threads_used;                // out: threads the last step ran on
    const long long* run_start;      // run r covers [run_start[r], run_start[r + 1]) and its
    const int* run_group;            // segments are all in group run_group[r]
    long long nruns;                 // (fusedopt/segments.py, group_runs)
    const double* groups;            // [multiplier, decay (1 or 0)] per segment group
    long long ngroups;               // 1 to FO_MAX_GROUPS
    const float* grad_scale;         // or null: divide the gradients by *grad_scale too
    const float* found_inf;          // or null: skip the step if *found_inf != 0
    const double* segment_values;    // per segment, a whole-variable rule's own (muon_host.cpp)
};

// Each segment group's prologue and scalars for one step (fusedopt/segments.py).
template <typename T>
struct GroupValues {
    Prologue<T> pro[FO_MAX_GROUPS];
    StepScalars<T> st[FO_MAX_GROUPS];
};

// Per-segment clip factors, element by element, for the update (clipnorm). A thread
// meets its segments in order. A segment inside the thread's elements ("whole") is
// summed when first met, just before its update reads the same gradients again, from
// cache for all but huge segments; the sums of segments shared with other threads were
// taken before the step's barrier. Either way a segment's sum is the sum of its tiles'
// sums in tile order, so the result does not depend on who computed what.
template <typename T, typename G, typename S>
struct SegmentFactors {
    const HostPlan* plan;
    NormInput<T, G, S> input;
    long long begin, end;            // this thread's elements
    long long segment = -1;          // the segment of the next element, once known
    T factor = T(1);

    // factors[0, n) for the elements from `start`, which must not decrease between calls.
    void fill(long long start, long long n, T* factors) {
        const long long* offsets = plan->offsets;
        if (segment < 0) {  // the last segment starting at or before `start`
            long long lo = 0, hi = plan->nsegments;
            while (hi - lo > 1) {
                const long long mid = (lo + hi) / 2;
                if (offsets[mid] <= start) lo = mid; else hi = mid;
            }
            factor = of(segment = lo);
        }
        for (long long i = 0; i < n;) {
            while (offsets[segment + 1] <= start + i) factor = of(++segment);  // empty ones too
            const long long stop = offsets[segment + 1] - start < n ? offsets[segment + 1] - start : n;
            for (; i < stop; ++i) factors[i] = factor;
        }
    }

    T of(long long s) const {
        const HostPlan& p = *plan;
        const bool whole = begin <= p.offsets[s] && p.offsets[s + 1] <= end;
        double sum = 0.0;
        for (long long k = p.segment_tiles[s]; k < p.segment_tiles[s + 1]; ++k) {
            if (whole && !p.skip_nonfinite)
                p.partial[k] = input.template sum<false>(p.sum_start[k], p.sum_start[k + 1],
                                                         nullptr);
            sum += p.partial[k];
        }
        return (T)clipnorm_factor(sum, p.clipnorm);
    }
};

// The first of a table's tiles starting at or after element x.
static long long first_tile_at(const long long* start, long long ntiles, long long x) {
    long long lo = 0, hi = ntiles;
    while (lo < hi) {
        const long long mid = (lo + hi) / 2;
        if (start[mid] < x) lo = mid + 1; else hi = mid;
    }
    return lo;
}

// Thread t's update tiles [*first, *last): contiguous, split where the element count is
// closest to t/n of the buffer.
static void thread_tiles(const HostPlan& plan, int t, int n, long long* first, long long* last) {
    const long long total = plan.tile_start[plan.ntiles];
    auto split = [&](int u) -> long long {
        if (u == 0) return 0;
        if (u == n) return plan.ntiles;
        return first_tile_at(plan.tile_start, plan.ntiles, (long long)((double)total * u / n));
    };
    *first = split(t);
    *last = split(t + 1);
}

template <typename T>
static T global_factor(const HostPlan& plan) {
    double sum = 0.0;
    for (long long k = 0; k < plan.nsums; ++k) sum += plan.partial[k];
    return (T)global_clipnorm_factor(sum, plan.clipnorm);
}

// Thread t's update range: its update tiles' elements [*begin, *end).
static void thread_elements(const HostPlan& plan, int t, int n, long long* begin, long long* end) {
    long long first, last;
    thread_tiles(plan, t, n, &first, &last);
    *begin = plan.tile_start[first];
    *end = plan.tile_start[last];
}

// The sums that must be ready before any thread updates: every reduction tile for the
// global norm or the finite check; for per-segment norms, only the tiles of segments
// that straddle two threads' elements (SegmentFactors sums the others on the way).
// Thread t takes the tiles starting among its elements.
template <typename T, typename G, typename S>
static void thread_sums(int t, int n, const NormInput<T, G, S>& input, const HostPlan& plan,
                        std::atomic<int>* any_nonfinite) {
    long long begin, end;
    thread_elements(plan, t, n, &begin, &end);
    // The reduction tiles starting in [begin, end).
    const long long first = first_tile_at(plan.sum_start, plan.nsums, begin);
    const long long last = first_tile_at(plan.sum_start, plan.nsums, end);
    const bool shared_only = plan.clip_mode == FO_CLIP_SEGMENT && !plan.skip_nonfinite;
    int bad = 0;
    for (long long k = first; k < last; ++k) {
        const long long b = plan.sum_start[k], e = plan.sum_start[k + 1];
        if (shared_only) {
            const long long s = plan.sum_segment[k];
            if (begin <= plan.offsets[s] && plan.offsets[s + 1] <= end) continue;  // whole
        }
        if (plan.skip_nonfinite) {
            plan.partial[k] = input.template sum<true>(b, e, &plan.nonfinite[k]);
            bad |= plan.nonfinite[k];
        } else {
            plan.partial[k] = input.template sum<false>(b, e, nullptr);
        }
    }
    if (bad) any_nonfinite->fetch_or(1);
}

// Keras' options of one step (options.cuh): the slots (null where absent) and the
// call's scalars.
template <typename T, typename S>
struct StepOptions {
    S* avg;  // use_ema's moving average
    S* acc;  // gradient accumulation's accumulator
    OptionScalars<T> o;
};

// Thread t's update of its tiles, in chunks of at most FO_CHUNK elements that never
// cross from one run of a segment group to the next. Other storage than the math type
// runs the same loops on math-type views of each chunk (chunk_view: the buffer itself
// when it is of the math type).
template <typename Rule, typename T, typename P, typename G, typename S>
static void thread_update(int t, int n, P* p, float* master, const G* g, S* const s[3],
                          const HostPlan& plan, const GroupValues<T>& values,
                          const FoRounding& rounding, const StepOptions<T, S>& options,
                          const NormInput<T, G, S>& norm) {
    long long begin, end;
    thread_elements(plan, t, n, &begin, &end);
    if (begin >= end) return;
    constexpr bool uniform = sizeof(P) == sizeof(T) && sizeof(G) == sizeof(T) &&
                             sizeof(S) == sizeof(T);
    constexpr long long CONVERT = uniform ? 1 : FO_CHUNK;  // the scratch other storage needs
    T p_scratch[CONVERT], g_scratch[CONVERT], avg_scratch[CONVERT], acc_scratch[CONVERT];
    if (options.acc && !options.o.apply) {
        if constexpr (uniform) {  // P, G and S are T: the options' loops (see the top)
            accumulate_only<T>(reinterpret_cast<T*>(p) + begin,
                               reinterpret_cast<const T*>(g) + begin,
                               options.avg ? reinterpret_cast<T*>(options.avg) + begin : nullptr,
                               reinterpret_cast<T*>(options.acc) + begin, end - begin, options.o);
        } else {
            for (long long a = begin, count; a < end; a += count) {
                count = end - a < FO_CHUNK ? end - a : FO_CHUNK;
                T* q = chunk_view<T>(options.acc + a, acc_scratch, count);
                accumulate_run<T>(chunk_view<T>(g + a, g_scratch, count), q, count, options.o);
                chunk_store(options.acc + a, q, count);
                if (options.avg)
                    moving_average_chunk<T>(p + a, master ? master + a : nullptr,
                                            options.avg + a, count, a, rounding, options.o,
                                            p_scratch, avg_scratch);
            }
        }
        return;
    }
    T scratch[3][FO_CHUNK];  // the slots' views: absent slots (zeros) or converted chunks
    T factors[FO_CHUNK];
    T mean[FO_CHUNK];  // the accumulated mean of a chunk, on the call that applies
    const T factor = plan.clip_mode == FO_CLIP_GLOBAL ? global_factor<T>(plan) : T(1);
    SegmentFactors<T, G, S> segments = {&plan, norm, begin, end};
    const bool per_segment = plan.clip_mode == FO_CLIP_SEGMENT;
    long long run = first_tile_at(plan.run_start, plan.nruns, begin + 1) - 1;  // holds begin
    for (long long a = begin, count; a < end; a += count) {
        while (plan.run_start[run + 1] <= a) ++run;
        const long long stop = plan.run_start[run + 1] < end ? plan.run_start[run + 1] : end;
        count = stop - a < FO_CHUNK ? stop - a : FO_CHUNK;
        const Prologue<T>& pro = values.pro[plan.run_group[run]];
        const StepScalars<T>& st = values.st[plan.run_group[run]];
        T* slot[3];
        for (int k = 0; k < 3; ++k) {
            if (s[k]) {
                slot[k] = chunk_view<T>(s[k] + a, scratch[k], count);
            } else {
                slot[k] = scratch[k];
                memset(slot[k], 0, sizeof(T) * count);  // +0
            }
        }
        // The master copy is the params' math-type view (float32: 16-bit params only).
        T* pv = master ? reinterpret_cast<T*>(master + a) : chunk_view<T>(p + a, p_scratch, count);
        // The segments' norms first: they read the accumulator the mean restarts.
        if (per_segment) segments.fill(a, count, factors);
        // The gradients the update reads: g's, or the accumulated mean.
        const T* gv = chunk_view<T>(g + a, g_scratch, count);
        if (options.acc) {
            T* q = chunk_view<T>(options.acc + a, acc_scratch, count);
            accumulated_mean_run<T>(mean, gv, q, count, options.o);
            chunk_store(options.acc + a, q, count);
            gv = mean;
        }
        if (per_segment) {
            update_run<Rule, true>(pv, gv, slot[0], slot[1], slot[2], factors, count, factor,
                                   pro, st);
        } else {
            update_run<Rule, false>(pv, gv, slot[0], slot[1], slot[2], (const T*)nullptr,
                                    count, factor, pro, st);
        }
        if constexpr (sizeof(P) != sizeof(T)) {  // round the params once
            if (master) store_run(p + a, pv, count);  // to nearest from the master
            else store_param_run(p + a, pv, count, rounding, a);
        }
        for (int k = 0; k < 3; ++k)
            if (s[k]) chunk_store(s[k] + a, slot[k], count);
        if (options.avg)
            moving_average_chunk<T>(p + a, master ? master + a : nullptr, options.avg + a, count,
                                    a, rounding, options.o, p_scratch, avg_scratch);
    }
}

// One thread's share of a step: its sums, wait for everyone's, then its update, unless
// a gradient is not finite and skip_nonfinite is set. Gradient accumulation's calls
// that only add need no norms, only the finite check.
template <typename Rule, typename T, typename P, typename G, typename S>
static void thread_step(int t, int n, P* p, float* master, const G* g, S* const slots[3],
                        const HostPlan& plan, const GroupValues<T>& values,
                        const FoRounding& rounding, const StepOptions<T, S>& options,
                        const NormInput<T, G, S>& norm, fo_pool::Barrier* barrier,
                        std::atomic<int>* any_nonfinite) {
    const bool norms = plan.clip_mode != FO_CLIP_NONE && (options.o.apply || !options.acc);
    if (norms || plan.skip_nonfinite) {
        thread_sums<T>(t, n, norm, plan, any_nonfinite);
        if (barrier) barrier->wait();
        if (any_nonfinite->load()) return;
    }
    thread_update<Rule, T>(t, n, p, master, g, slots, plan, values, rounding, options, norm);
}

// torch.amp.GradScaler's inputs, read here as the GPU reads them (reduce.cu,
// fusedopt_amp_inputs): the block a step reads (`block`, or a copy in `*scratch` whose
// unscale is divided by *grad_scale), and whether *found_inf skips the step (counted
// like skip_nonfinite's skip). Every host step reads them (lamb_host.cpp, muon_host.cpp).
static const Hyper* fo_amp_hyper(const HostPlan* plan, const Hyper* block, Hyper* scratch) {
    if (!plan->grad_scale) return block;
    *scratch = *block;
    scratch->unscale = block->unscale / (double)*plan->grad_scale;
    return scratch;
}

static bool fo_amp_found_inf(const HostPlan* plan) {
    return plan->found_inf && *plan->found_inf != 0.0f;
}

// The start of every host step (host_step; whole_host.cpp's whole_step for the rules
// with kernels of their own): the block with GradScaler's inputs, group 0's values (they
// advance the state: the running product never depends on lr), the phase (Keras'
// options, a LossScaleOptimizer's unscale), each segment group's scalars and prologue.
// Not copyable: `h` may point at its own `amp_block`.
template <typename T>
struct StepStart {
    Hyper amp_block;
    const Hyper* h;
    StepValues values;
    StepPhase phase;
    GroupValues<T> groups;
    StepStart() = default;
    StepStart(const StepStart&) = delete;
};

// Fills `start`; false when the step is skipped before any buffer is read (found_inf,
// or a LossScaleOptimizer's scale that underflowed): then it is already counted.
template <typename Rule, typename T>
static bool start_step(HostPlan* plan, const Hyper* block, StepState* state,
                       StepStart<T>* start) {
    start->h = fo_amp_hyper(plan, block, &start->amp_block);
    const Hyper& h = *start->h;
    start->values = fo_step_values<Rule>(h, *state, plan->groups[0]);
    start->phase = fo_phase(h, *state);
    if (fo_amp_found_inf(plan) || start->phase.underflow) {
        fo_advance(*state, h, start->values, true);
        return false;
    }
    for (long long k = 0; k < plan->ngroups; ++k) {
        start->groups.st[k] = fo_narrow<T>(fo_step_values<Rule>(h, *state, plan->groups[2 * k]));
        start->groups.pro[k] = fo_prologue<T>(h, start->phase, plan->groups[2 * k + 1] != 0.0);
    }
    return true;
}

// One optimizer step: its values from the hyperparameters and the counters (the
// functions the GPU runs), the update, then the counters advanced (fo_advance), as the
// GPU does on the device. Returns 1 if the step was applied, 0 if it was skipped
// (skip_nonfinite, found_inf, a loss scale of 0: then no buffer was written).
template <typename Rule, typename T, typename P, typename G, typename S>
static int host_step(P* p, const G* g, S* s0, S* s1, S* s2, float* master, S* average,
                     S* accumulator, HostPlan* plan, const Hyper* block, StepState* state) {
    StepStart<T> start;
    if (!start_step<Rule>(plan, block, state, &start)) return 0;
    const Hyper* h = start.h;
    const StepValues& values = start.values;
    const StepPhase& phase = start.phase;
    const GroupValues<T>& groups = start.groups;
    const StepOptions<T, S> options = {average, accumulator, fo_options<T>(phase)};
    const NormInput<T, G, S> norm = {g, phase.apply ? accumulator : nullptr, options.o.unscale,
                                     options.o.steps};
    plan->clipnorm = h->clipnorm;
    S* const slots[3] = {s0, s1, s2};
    const FoRounding rounding = fo_rounding(*h, *state);
    std::atomic<int> any_nonfinite(0);
    const long long size = plan->tile_start[plan->ntiles];
    long long n = plan->num_threads;
    if (n > plan->ntiles) n = plan->ntiles;
    if (size < FO_MIN_PARALLEL || n < 1) n = 1;
    plan->threads_used = (int)n;
    if (n == 1) {
        thread_step<Rule, T>(0, 1, p, master, g, slots, *plan, groups, rounding, options, norm,
                             nullptr, &any_nonfinite);
    } else {
        fo_pool::Barrier barrier((int)n);
        fo_pool::pool().run((int)n, [&](int t, int threads) {
            thread_step<Rule, T>(t, threads, p, master, g, slots, *plan, groups, rounding,
                                 options, norm, &barrier, &any_nonfinite);
        });
    }
    const bool skipped = any_nonfinite.load() != 0;
    fo_advance(*state, *h, values, skipped);
    return skipped ? 0 : 1;
}

// The benchmark's ceilings (fusedopt/bench.py), with the same pool and the same split
// of the buffer across threads as a step. A copy writes lines it never read (the CPU
// reads them first, or streams them past the cache); an optimizer step writes back
// what it has just read, as the in-place scale does: that is the step's ceiling.
static void split_run(long long n, int num_threads, const std::function<void(long long, long long)>& part) {
    const long long align = 1024;  // elements: each thread starts on its own cache lines
    long long threads = num_threads < 1 ? 1 : num_threads;
    if (n < FO_MIN_PARALLEL) threads = 1;
    auto run = [&](int t, int count) {
        const long long a = n / count * t / align * align;
        part(a, t + 1 == count ? n : n / count * (t + 1) / align * align);
    };
    if (threads == 1) run(0, 1);
    else fo_pool::pool().run((int)threads, run);
}

extern "C" void fusedopt_host_copy(float* dst, const float* src, long long n, int num_threads) {
    split_run(n, num_threads, [&](long long a, long long b) {
        memcpy(dst + a, src + a, sizeof(float) * (size_t)(b - a));
    });
}

extern "C" void fusedopt_host_scale(float* x, long long n, float s, int num_threads) {
    split_run(n, num_threads, [&](long long a, long long b) {
        float* __restrict__ y = x + a;
        for (long long i = 0; i < b - a; ++i) y[i] = y[i] * s;
    });
}

#ifdef FUSEDOPT_RULE
// `master`: the float32 master copy of 16-bit params, or null; `average` and
// `accumulator`: use_ema's and gradient accumulation's slots, or null.
extern "C" int fusedopt_host_step(FUSEDOPT_P* p, const FUSEDOPT_G* g, FUSEDOPT_S* s0,
                                  FUSEDOPT_S* s1, FUSEDOPT_S* s2, float* master,
                                  FUSEDOPT_S* average, FUSEDOPT_S* accumulator,
                                  HostPlan* plan, const Hyper* hyper, StepState* state) {
    return host_step<FUSEDOPT_RULE, FUSEDOPT_T>(p, g, s0, s1, s2, master, average, accumulator,
                                                plan, hyper, state);
}
#endif
