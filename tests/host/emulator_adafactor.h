// emulator_adafactor.h: entry points for Adafactor's kernels (kernels/adafactor.cu), with
// exactly the arguments fusedopt.cuda.StepPlan passes (tests/host/emulator.py checks them).
#pragma once

extern "C" void emu_fusedopt_adafactor_pass(
        unsigned grid, unsigned block, int phase, FUSEDOPT_T* p, const FUSEDOPT_T* g,
        FUSEDOPT_T* v, const FUSEDOPT_T* r, const FUSEDOPT_T* c, const FUSEDOPT_T* row_means,
        FUSEDOPT_T* average, FUSEDOPT_T* accumulator, const long long* tile_start,
        const int* tile_segment, const int* tile_group, long long ntiles,
        const FUSEDOPT_T* factors, int nfactors, const FUSEDOPT_T* scales, const double* table,
        const double* groups, int ngroups, const Hyper* hyper, StepState* state,
        double* partial) {
    emu::launch(grid, block, [&] {
        fusedopt_adafactor_pass(phase, p, g, v, r, c, row_means, average, accumulator,
                                tile_start, tile_segment, tile_group, ntiles, factors, nfactors,
                                scales, table, groups, ngroups, hyper, state, partial);
    });
}

extern "C" void emu_fusedopt_adafactor_rows(unsigned grid, unsigned block, const FUSEDOPT_T* G,
                                            FUSEDOPT_T* r, const double* table,
                                            long long nsegments, const Hyper* hyper,
                                            const StepState* state) {
    emu::launch(grid, block,
                [&] { fusedopt_adafactor_rows(G, r, table, nsegments, hyper, state); });
}

extern "C" void emu_fusedopt_adafactor_columns(unsigned grid, unsigned block,
                                               const FUSEDOPT_T* G, const FUSEDOPT_T* r,
                                               FUSEDOPT_T* c, FUSEDOPT_T* row_means,
                                               const double* table, long long nsegments,
                                               const Hyper* hyper, const StepState* state) {
    emu::launch(grid, block, [&] {
        fusedopt_adafactor_columns(G, r, c, row_means, table, nsegments, hyper, state);
    });
}

extern "C" void emu_fusedopt_adafactor_scales(unsigned grid, unsigned block,
                                              const double* partial,
                                              const long long* segment_tiles, long long nsegments,
                                              const double* table, const Hyper* hyper,
                                              const StepState* state, FUSEDOPT_T* scales) {
    emu::launch(grid, block, [&] {
        fusedopt_adafactor_scales(partial, segment_tiles, nsegments, table, hyper, state, scales);
    });
}
