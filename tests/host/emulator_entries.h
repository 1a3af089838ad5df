// emulator_entries.h: C entry points that launch the emulated kernels with exactly the
// arguments fusedopt.cuda.StepPlan passes, structs by value where the kernel takes them
// by value (tests/host/emulator.py checks every argument against the kernel's signature).
#pragma once

#define EMU_RULE(rule)                                                                       \
    extern "C" void emu_fusedopt_##rule(                                                      \
        unsigned grid, unsigned block, FUSEDOPT_P* p, const FUSEDOPT_G* g, FUSEDOPT_S* s0,    \
        FUSEDOPT_S* s1, FUSEDOPT_S* s2, float* master, FUSEDOPT_S* average,                   \
        FUSEDOPT_S* accumulator, const long long* tile_start, const int* tile_segment,        \
        const int* tile_group, long long ntiles, const FUSEDOPT_T* factors, int nfactors,     \
        const double* groups, int ngroups, const Hyper* hyper, StepState* state) {            \
        emu::launch(grid, block, [&] {                                                        \
            fused_step<rule, FUSEDOPT_T>(p, g, s0, s1, s2, master, average, accumulator,      \
                                         tile_start, tile_segment, tile_group, ntiles,        \
                                         factors, nfactors, groups, ngroups, hyper, state);   \
        });                                                                                   \
    }

extern "C" void emu_fusedopt_sumsq(unsigned grid, unsigned block, const FUSEDOPT_G* g,
                                   const FUSEDOPT_S* accumulator, const long long* tile_start,
                                   long long ntiles, const Hyper* hyper, const StepState* state,
                                   double* partial, int* tile_nonfinite) {
    emu::launch(grid, block, [&] {
        fusedopt_sumsq(g, accumulator, tile_start, ntiles, hyper, state, partial, tile_nonfinite);
    });
}

extern "C" void emu_fusedopt_clip_factors(unsigned grid, unsigned block, const double* partial,
                                          const long long* segment_tiles, long long nsegments,
                                          int global_norm, const Hyper* hyper,
                                          FUSEDOPT_T* factors) {
    emu::launch(grid, block, [&] {
        fusedopt_clip_factors(partial, segment_tiles, nsegments, global_norm, hyper, factors);
    });
}

extern "C" void emu_fusedopt_skip_check(unsigned grid, unsigned block, const int* tile_nonfinite,
                                        long long ntiles, StepState* state) {
    emu::launch(grid, block, [&] { fusedopt_skip_check(tile_nonfinite, ntiles, state); });
}

extern "C" void emu_fusedopt_amp_inputs(unsigned grid, unsigned block, const float* grad_scale,
                                        const float* found_inf, double unscale, Hyper* hyper,
                                        StepState* state) {
    emu::launch(grid, block,
                [&] { fusedopt_amp_inputs(grad_scale, found_inf, unscale, hyper, state); });
}

extern "C" void emu_fusedopt_write_hyper(unsigned grid, unsigned block, Hyper* hyper, Hyper value) {
    emu::launch(grid, block, [&] { fusedopt_write_hyper(hyper, value); });
}

extern "C" void emu_fusedopt_write_state(unsigned grid, unsigned block, StepState* state,
                                         StepState value) {
    emu::launch(grid, block, [&] { fusedopt_write_state(state, value); });
}

// Accesses since the last call ([is_store][log2 bytes], then misaligned), and zeroes them.
extern "C" void emu_take_access_counts(long long* out) {
    for (int s = 0; s < 2; ++s)
        for (int w = 0; w < 5; ++w) out[s * 5 + w] = emu::accesses[s][w], emu::accesses[s][w] = 0;
    out[10] = emu::misaligned;
    emu::misaligned = 0;
}

// A broken CUDA rule (e.g. a barrier not reached by every thread), or null; clears it.
extern "C" const char* emu_take_error() {
    const char* e = emu::error;
    emu::error = nullptr;
    return e;
}
