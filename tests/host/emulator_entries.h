// emulator_entries.h: C entry points that launch the emulated kernels with the same
// arguments fusedopt.cuda.StepPlan passes, structs by pointer instead of by value.
#pragma once

#define EMU_RULE(rule)                                                                       \
    extern "C" void emu_fusedopt_##rule(                                                      \
        unsigned grid, unsigned block, FUSEDOPT_T* p, const FUSEDOPT_T* g, FUSEDOPT_T* s0,    \
        FUSEDOPT_T* s1, FUSEDOPT_T* s2, const long long* tile_start, const int* tile_segment, \
        long long ntiles, const Prologue<FUSEDOPT_T>* pro, const StepScalars<FUSEDOPT_T>* st, \
        const FUSEDOPT_T* factors, int nfactors, const StepScalars<FUSEDOPT_T>* table,       \
        const long long* counters) {                                                         \
        emu::launch_serial(grid, block, [&] {                                                 \
            fused_step<rule, FUSEDOPT_T>(p, g, s0, s1, s2, tile_start, tile_segment, ntiles,  \
                                         *pro, *st, factors, nfactors, table, counters);      \
        });                                                                                   \
    }

extern "C" void emu_fusedopt_sumsq(unsigned grid, unsigned block, const FUSEDOPT_T* g,
                                   const long long* tile_start, long long ntiles,
                                   FUSEDOPT_T unscale, double* partial, int* tile_nonfinite) {
    emu::launch_threaded(grid, block, [&] {
        fusedopt_sumsq(g, tile_start, ntiles, unscale, partial, tile_nonfinite);
    });
}

extern "C" void emu_fusedopt_clip_factors(unsigned grid, unsigned block, const double* partial,
                                          const long long* segment_tiles, long long nsegments,
                                          double clipnorm, int global_norm, FUSEDOPT_T* factors) {
    emu::launch_threaded(grid, block, [&] {
        fusedopt_clip_factors(partial, segment_tiles, nsegments, clipnorm, global_norm, factors);
    });
}

extern "C" void emu_fusedopt_skip_check(unsigned grid, unsigned block, const int* tile_nonfinite,
                                        long long ntiles, long long* counters,
                                        const StepScalars<FUSEDOPT_T>* row, long long row_index,
                                        StepScalars<FUSEDOPT_T>* table) {
    emu::launch_threaded(grid, block, [&] {
        fusedopt_skip_check(tile_nonfinite, ntiles, counters, *row, row_index, table);
    });
}
