// cuda_emulator.h: just enough of CUDA to run the real kernels of fused.cu and reduce.cu
// on the host, so that their indexing, tiling, alignment paths, block reductions and
// skip bookkeeping are tested without a GPU. Blocks run one after another. The threads
// of a block run one after another for kernels without __syncthreads (the update),
// or as real threads meeting at a barrier (the reductions). What it cannot show:
// races between blocks, memory-model effects and speed; those need a real GPU.
#pragma once
#include <math.h>

#include <barrier>
#include <functional>
#include <thread>
#include <vector>

#define __CUDACC__ 1
#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static

struct dim3 {
    unsigned x = 0, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };

namespace emu {
inline std::barrier<>* block_barrier = nullptr;

inline void launch_serial(unsigned grid, unsigned block, const std::function<void()>& kernel) {
    gridDim.x = grid;
    blockDim.x = block;
    for (unsigned b = 0; b < grid; ++b)
        for (unsigned t = 0; t < block; ++t) {
            blockIdx.x = b;
            threadIdx.x = t;
            kernel();
        }
}

inline void launch_threaded(unsigned grid, unsigned block, const std::function<void()>& kernel) {
    gridDim.x = grid;
    blockDim.x = block;
    for (unsigned b = 0; b < grid; ++b) {
        std::barrier<> barrier(block);
        block_barrier = &barrier;
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < block; ++t)
            threads.emplace_back([&, b, t] {
                blockIdx.x = b;
                threadIdx.x = t;
                kernel();
            });
        for (auto& th : threads) th.join();
        block_barrier = nullptr;
    }
}
}  // namespace emu

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
