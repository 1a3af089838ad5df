// emulator_muon.h: entry points for Muon's kernels (kernels/muon.cu), with exactly the
// arguments fusedopt.cuda.StepPlan passes (tests/host/emulator.py checks them).
#pragma once

extern "C" void emu_fusedopt_muon_moments(
        unsigned grid, unsigned block, FUSEDOPT_T* p, const FUSEDOPT_T* g, FUSEDOPT_T* m,
        FUSEDOPT_T* v, FUSEDOPT_T* d, FUSEDOPT_T* average, FUSEDOPT_T* accumulator,
        const long long* tile_start, const int* tile_segment, const int* tile_group,
        long long ntiles, const FUSEDOPT_T* factors, int nfactors, const double* segment_values,
        const double* groups, int ngroups, const Hyper* hyper, const StepState* state) {
    emu::launch(grid, block, [&] {
        fusedopt_muon_moments(p, g, m, v, d, average, accumulator, tile_start, tile_segment,
                              tile_group, ntiles, factors, nfactors, segment_values, groups,
                              ngroups, hyper, state);
    });
}

extern "C" void emu_fusedopt_muon_apply(
        unsigned grid, unsigned block, FUSEDOPT_T* p, const FUSEDOPT_T* d, FUSEDOPT_T* average,
        const long long* tile_start, const int* tile_segment, const int* tile_group,
        long long ntiles, const double* segment_values, const double* groups, int ngroups,
        const Hyper* hyper, StepState* state) {
    emu::launch(grid, block, [&] {
        fusedopt_muon_apply(p, d, average, tile_start, tile_segment, tile_group, ntiles,
                            segment_values, groups, ngroups, hyper, state);
    });
}
