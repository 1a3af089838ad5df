// cuda_emulator.h: just enough of CUDA to run the real kernels of fused.cu and reduce.cu
// on the host, so that their indexing, tiling, alignment paths, block reductions and
// step-state bookkeeping are tested without a GPU. Blocks run one after another; the
// threads of a block run as fibers on one OS thread, each until it reaches
// __syncthreads or returns, then the next, so a block's barriers are real and every
// run is deterministic. It also counts the kernels' element accesses by width
// (fo_load/fo_store) and flags misaligned ones, which a GPU would fault on. What it
// cannot show: races, memory-model effects and speed; those need a real GPU.
#pragma once
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <ucontext.h>

#include <functional>
#include <vector>

#define __CUDACC__ 1
#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(x)
#define __shared__ static

struct dim3 {
    unsigned x = 0, y = 1, z = 1;
};
inline dim3 threadIdx, blockIdx, blockDim, gridDim;
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
struct alignas(8) uint2 { unsigned x, y; };

namespace emu {
// accesses[is_store][log2(bytes)]; misaligned: accesses not aligned to their width.
inline long long accesses[2][5];
inline long long misaligned;
// Set when a kernel breaks a rule of CUDA's execution model (reported to Python).
inline const char* error;

inline void access(bool is_store, const void* pointer, unsigned bytes) {
    int width = 0;
    while ((1u << width) < bytes) ++width;
    accesses[is_store][width] += 1;
    if ((uintptr_t)pointer % bytes != 0) misaligned += 1;
}

constexpr size_t STACK = 1 << 16;
inline ucontext_t scheduler;
inline std::vector<ucontext_t> fibers;
inline std::vector<char*> stacks;
inline std::vector<char> finished;
inline unsigned current;
inline const std::function<void()>* body;

inline void fiber_main() {
    (*body)();
    finished[current] = 1;  // returning resumes the scheduler (uc_link)
}

inline void yield() { swapcontext(&fibers[current], &scheduler); }

inline void launch(unsigned grid, unsigned block, const std::function<void()>& kernel) {
    gridDim.x = grid;
    blockDim.x = block;
    body = &kernel;
    fibers.resize(block);
    finished.resize(block);
    while (stacks.size() < block) stacks.push_back(static_cast<char*>(malloc(STACK)));
    for (unsigned b = 0; b < grid && error == nullptr; ++b) {
        blockIdx.x = b;
        for (unsigned t = 0; t < block; ++t) {
            getcontext(&fibers[t]);
            fibers[t].uc_stack.ss_sp = stacks[t];
            fibers[t].uc_stack.ss_size = STACK;
            fibers[t].uc_link = &scheduler;
            makecontext(&fibers[t], fiber_main, 0);
            finished[t] = 0;
        }
        // Rounds: every thread runs until its next barrier (or its end). A round in
        // which some threads ended while others wait at a barrier is a deadlock on a GPU.
        for (;;) {
            unsigned done = 0;
            for (unsigned t = 0; t < block; ++t) {
                if (finished[t]) continue;
                current = t;
                threadIdx.x = t;
                swapcontext(&scheduler, &fibers[t]);
            }
            for (unsigned t = 0; t < block; ++t) done += finished[t];
            if (done == block) break;
            if (done != 0) {
                error = "__syncthreads() not reached by every thread of a block";
                break;
            }
        }
    }
}
}  // namespace emu

inline void __syncthreads() { emu::yield(); }
inline void __threadfence() {}
// One OS thread runs every emulated thread, so a plain add is atomic.
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
    const unsigned long long old = *address;
    *address = old + value;
    return old;
}

#define FO_ACCESS(is_store, pointer, bytes) emu::access(is_store, pointer, bytes)
