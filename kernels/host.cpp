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
// Built once per rule and dtype: fusedopt/host.py prepends
//   #define FUSEDOPT_RULE <rule>   #define FUSEDOPT_T <float|double>   #include "<rule>.cuh"
// and loads the exported fusedopt_host_step with ctypes.
#include "step.cuh"

#include <string.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

// Partial sums per tile: enough independent additions for the compiler to keep the
// vector units busy, in an order fixed by the code rather than by the compiler.
#define FO_LANES 16
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
// Sum of (g * unscale)^2 over [begin, end) in double, as fusedopt_sumsq does; with
// Check, `nonfinite` says whether a raw gradient is inf or NaN (skip_nonfinite).
template <bool Check, typename T>
static double tile_sum_of_squares(const T* __restrict__ g, long long begin, long long end,
                                  T unscale, int* nonfinite) {
    double lane[FO_LANES] = {0};
    double bad[FO_LANES] = {0};  // sums of g - g: 0 while every g is finite, else NaN
    long long i = begin;
    for (; i + FO_LANES <= end; i += FO_LANES) {
        for (int j = 0; j < FO_LANES; ++j) {
            const double x = (double)(g[i + j] * unscale);
            lane[j] += x * x;
            if (Check) bad[j] += (double)(g[i + j] - g[i + j]);
        }
    }
    for (int j = 0; i < end; ++i, ++j) {
        const double x = (double)(g[i] * unscale);
        lane[j] += x * x;
        if (Check) bad[j] += (double)(g[i] - g[i]);
    }
    for (int width = FO_LANES / 2; width > 0; width /= 2) {
        for (int j = 0; j < width; ++j) {
            lane[j] += lane[j + width];
            if (Check) bad[j] += bad[j + width];
        }
    }
    if (Check) *nonfinite = bad[0] != 0.0;
    return lane[0];
}

// The fused update of n contiguous elements: every element read once, written once.
template <typename Rule, typename T>
static void update_run(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ s0,
                       T* __restrict__ s1, T* __restrict__ s2, long long n, T factor,
                       const Prologue<T> pro, const StepScalars<T> st) {
    for (long long i = 0; i < n; ++i)
        fused_element<Rule>(p[i], g[i], s0[i], s1[i], s2[i], factor, pro, st);
}

template <typename Rule, typename T>
static void update_tile(T* p, const T* g, T* const s[3], long long begin, long long end,
                        T factor, const Prologue<T>& pro, const StepScalars<T>& st,
                        T* scratch) {
    for (long long a = begin; a < end; a += FO_CHUNK) {
        const long long n = end - a < FO_CHUNK ? end - a : FO_CHUNK;
        T* slot[3];
        for (int k = 0; k < 3; ++k) {
            if (s[k]) {
                slot[k] = s[k] + a;
            } else {
                slot[k] = scratch + k * FO_CHUNK;
                memset(slot[k], 0, sizeof(T) * n);
            }
        }
        update_run<Rule, T>(p + a, g + a, slot[0], slot[1], slot[2], n, factor, pro, st);
    }
}

// ------------------------------------------------------------------ the step
// What a step needs besides the buffers, the hyperparameters and the counters; built
// once per layout and clip mode by fusedopt/host.py (HostPlan), which mirrors it as a
// ctypes Structure.
struct HostPlan {
    const long long* tile_start;     // tile k covers [tile_start[k], tile_start[k + 1])
    const int* tile_segment;         // tile k lies in segment tile_segment[k] (clipnorm)
    long long ntiles;
    const long long* segment_tiles;  // segment s owns tiles [segment_tiles[s], ...[s + 1])
    int clip_mode;                   // FO_CLIP_*: per segment or global, Hyper.clipnorm
    int skip_nonfinite;              // check the gradients first; skip the step if any is not finite
    double clipnorm;                 // Hyper.clipnorm, copied here for the threads
    double* partial;                 // scratch: per-tile sums of squares (ntiles)
    int* nonfinite;                  // scratch: per-tile non-finite flags (ntiles)
    int num_threads;                 // > 0
    int threads_used;                // out: threads the last step ran on
};

// Thread t's tiles: contiguous, split where the element count is closest to t/n of
// the buffer (tiles of per-segment tables vary in length).
static void thread_tiles(const HostPlan& plan, int t, int n, long long* first, long long* last) {
    const long long total = plan.tile_start[plan.ntiles];
    auto split = [&](int u) -> long long {
        if (u == 0) return 0;
        if (u == n) return plan.ntiles;
        const long long target = (long long)((double)total * u / n);
        long long lo = 0, hi = plan.ntiles;  // first tile starting at or after target
        while (lo < hi) {
            const long long mid = (lo + hi) / 2;
            if (plan.tile_start[mid] < target) lo = mid + 1; else hi = mid;
        }
        return lo;
    };
    *first = split(t);
    *last = split(t + 1);
}

// The clip factor of segment s from its tiles' sums, added in tile order.
template <typename T>
static T segment_factor(const HostPlan& plan, long long s) {
    double sum = 0.0;
    for (long long k = plan.segment_tiles[s]; k < plan.segment_tiles[s + 1]; ++k)
        sum += plan.partial[k];
    return (T)clipnorm_factor(sum, plan.clipnorm);
}

template <typename T>
static T global_factor(const HostPlan& plan) {
    double sum = 0.0;
    for (long long k = 0; k < plan.ntiles; ++k) sum += plan.partial[k];
    return (T)global_clipnorm_factor(sum, plan.clipnorm);
}

// One thread's share of a step: sums of its tiles, wait for everyone's, then the
// update of its tiles, unless a gradient is not finite and skip_nonfinite is set.
template <typename Rule, typename T>
static void thread_step(int t, int n, T* p, const T* g, T* const slots[3], const HostPlan& plan,
                        const Prologue<T>& pro, const StepScalars<T>& st,
                        fo_pool::Barrier* barrier, std::atomic<int>* any_nonfinite) {
    long long first, last;
    thread_tiles(plan, t, n, &first, &last);
    const bool sums = plan.clip_mode != FO_CLIP_NONE || plan.skip_nonfinite;
    if (sums) {
        int bad = 0;
        for (long long k = first; k < last; ++k) {
            const long long b = plan.tile_start[k], e = plan.tile_start[k + 1];
            plan.partial[k] = plan.skip_nonfinite
                ? tile_sum_of_squares<true>(g, b, e, pro.unscale, &plan.nonfinite[k])
                : tile_sum_of_squares<false>(g, b, e, pro.unscale, nullptr);
            if (plan.skip_nonfinite) bad |= plan.nonfinite[k];
        }
        if (bad) any_nonfinite->fetch_or(1);
        if (barrier) barrier->wait();
        if (any_nonfinite->load()) return;
    }
    // Each thread derives the factors it needs itself, from every tile's sum in the
    // same order, so no thread waits for another's factors.
    T factor = T(1);
    if (plan.clip_mode == FO_CLIP_GLOBAL) factor = global_factor<T>(plan);
    long long segment = -1;
    T scratch[3 * FO_CHUNK];
    for (long long k = first; k < last; ++k) {
        if (plan.clip_mode == FO_CLIP_SEGMENT && plan.tile_segment[k] != segment) {
            segment = plan.tile_segment[k];
            factor = segment_factor<T>(plan, segment);
        }
        update_tile<Rule, T>(p, g, slots, plan.tile_start[k], plan.tile_start[k + 1], factor,
                             pro, st, scratch);
    }
}

// One optimizer step: its values from the hyperparameters and the counters (the
// functions the GPU runs), the update, then the counters advanced (fo_advance), as the
// GPU does on the device. Returns 1 if the step was applied, 0 if skip_nonfinite
// skipped it (then no buffer was written).
template <typename Rule, typename T>
static int host_step(T* p, const T* g, T* s0, T* s1, T* s2, HostPlan* plan, const Hyper* h,
                     StepState* state) {
    const StepValues values = fo_step_values<Rule>(*h, *state);
    const StepScalars<T> st = fo_narrow<T>(values);
    const Prologue<T> pro = fo_prologue<T>(*h);
    plan->clipnorm = h->clipnorm;
    T* const slots[3] = {s0, s1, s2};
    std::atomic<int> any_nonfinite(0);
    const long long size = plan->tile_start[plan->ntiles];
    long long n = plan->num_threads;
    if (n > plan->ntiles) n = plan->ntiles;
    if (size < FO_MIN_PARALLEL || n < 1) n = 1;
    plan->threads_used = (int)n;
    if (n == 1) {
        thread_step<Rule, T>(0, 1, p, g, slots, *plan, pro, st, nullptr, &any_nonfinite);
    } else {
        fo_pool::Barrier barrier((int)n);
        fo_pool::pool().run((int)n, [&](int t, int threads) {
            thread_step<Rule, T>(t, threads, p, g, slots, *plan, pro, st, &barrier,
                                 &any_nonfinite);
        });
    }
    const bool skipped = any_nonfinite.load() != 0;
    fo_advance(*state, values, skipped);
    return skipped ? 0 : 1;
}

// The benchmark's copy ceiling (fusedopt/bench.py): dst <- src with the same pool and
// the same split of the buffer across threads as a step.
extern "C" void fusedopt_host_copy(void* dst, const void* src, long long bytes, int num_threads) {
    const long long align = 4096;  // each thread starts on its own page
    long long n = num_threads < 1 ? 1 : num_threads;
    if (bytes < (long long)FO_MIN_PARALLEL * 4) n = 1;
    auto part = [&](int t, int threads) {
        long long a = bytes / threads * t / align * align;
        long long b = t + 1 == threads ? bytes : bytes / threads * (t + 1) / align * align;
        memcpy((char*)dst + a, (const char*)src + a, (size_t)(b - a));
    };
    if (n == 1) part(0, 1);
    else fo_pool::pool().run((int)n, part);
}

#ifdef FUSEDOPT_RULE
extern "C" int fusedopt_host_step(FUSEDOPT_T* p, const FUSEDOPT_T* g, FUSEDOPT_T* s0,
                                  FUSEDOPT_T* s1, FUSEDOPT_T* s2, HostPlan* plan,
                                  const Hyper* hyper, StepState* state) {
    return host_step<FUSEDOPT_RULE, FUSEDOPT_T>(p, g, s0, s1, s2, plan, hyper, state);
}
#endif
