// emulator_lamb.h: entry points for LAMB's kernels (kernels/lamb.cu), with exactly the
// arguments fusedopt.cuda.StepPlan passes (tests/host/emulator.py checks them), for
// every storage key (FUSEDOPT_P/G/S).
#pragma once

extern "C" void emu_fusedopt_lamb_moments(
        unsigned grid, unsigned block, FUSEDOPT_P* p, const FUSEDOPT_G* g, FUSEDOPT_S* m,
        FUSEDOPT_S* v, float* master, FUSEDOPT_S* average, FUSEDOPT_S* accumulator,
        const long long* tile_start, const int* tile_segment, const int* tile_group,
        long long ntiles, const FUSEDOPT_T* factors, int nfactors, const double* groups,
        int ngroups, const Hyper* hyper, const StepState* state, double* partial) {
    emu::launch(grid, block, [&] {
        fusedopt_lamb_moments(p, g, m, v, master, average, accumulator, tile_start,
                              tile_segment, tile_group, ntiles, factors, nfactors, groups,
                              ngroups, hyper, state, partial);
    });
}

extern "C" void emu_fusedopt_lamb_ratios(unsigned grid, unsigned block, const double* partial,
                                         const long long* segment_tiles, long long nsegments,
                                         FUSEDOPT_T* ratios) {
    emu::launch(grid, block,
                [&] { fusedopt_lamb_ratios(partial, segment_tiles, nsegments, ratios); });
}

extern "C" void emu_fusedopt_lamb_apply(
        unsigned grid, unsigned block, FUSEDOPT_P* p, const FUSEDOPT_S* m, const FUSEDOPT_S* v,
        float* master, FUSEDOPT_S* average, const long long* tile_start, const int* tile_segment,
        const int* tile_group, long long ntiles, const FUSEDOPT_T* ratios, const double* groups,
        int ngroups, const Hyper* hyper, StepState* state) {
    emu::launch(grid, block, [&] {
        fusedopt_lamb_apply(p, m, v, master, average, tile_start, tile_segment, tile_group,
                            ntiles, ratios, groups, ngroups, hyper, state);
    });
}
