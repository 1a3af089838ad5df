// options.cuh: Keras 3's options around every rule, per element, in the math type,
// shared by the CUDA kernel (fused.cu) and the host build (host.cpp); the NumPy twin
// is fusedopt/reference.py (accumulate, ema).
//   gradient accumulation: N-1 calls only add the unscaled gradient to the
//     accumulator; the N-th runs the pipeline on (g*unscale + acc)/N and zeroes acc;
//   use_ema: after the rule, on every call, avg <- mom*avg + (1-mom)*p (mom 0 on the
//     first update), and p <- avg when ema_overwrite_frequency says so.
// Which call does what comes from the step state (step.cuh, fo_phase), so a captured
// step replays every phase.
//
// 16-bit storage (ARCHITECTURE.md, principle 8): `avg` and `acc` are state slots,
// stored in the state dtype, loaded to the math type once and rounded to nearest once
// when stored, as the rule's slots. The p the average reads is what the model holds
// after the step: the float32 master when there is one, else the params as stored
// (rounded to nearest or stochastically: storage.cuh, fo_param_stored). An overwrite
// copies the average as stored into the master (exact) and into the params, rounded
// as every param store. The NumPy twin: fusedopt/reference.py (accumulate,
// ReferencePlan._moving_average).
#pragma once
#include "step.cuh"
#include "storage.cuh"

// The params' rounding of a step (storage.cuh): to nearest, or stochastically from the
// seed and the step's count before it. Every executor's step takes it from here.
FO_HD FoRounding fo_rounding(const Hyper& h, const StepState& s) {
    FoRounding r;
    r.stochastic = h.stochastic_rounding != 0;
    r.seed = h.seed;
    r.step = (fo_u64)s.iterations;
    return r;
}

// One call's options in the math type, rounded once (as NumPy casts its scalars).
template <typename T>
struct OptionScalars {
    T unscale;       // this call's 1/loss scale, for the accumulator
    T steps;         // N
    T ema_momentum;
    T one_minus_ema_momentum;  // 1 - mom, in T as Keras computes it
    int apply;       // the rule runs on this call
    int overwrite;   // the average overwrites the params after this call
};

template <typename T>
FO_HD OptionScalars<T> fo_options(const StepPhase& ph) {
    OptionScalars<T> o;
    o.unscale = (T)ph.unscale;
    o.steps = (T)ph.accumulation;
    o.ema_momentum = (T)ph.ema_momentum;
    o.one_minus_ema_momentum = T(1) - o.ema_momentum;
    o.apply = ph.apply;
    o.overwrite = ph.overwrite;
    return o;
}

// The gradient the pipeline sees on the call that applies: the mean of the N calls'
// unscaled gradients (the prologue's unscale is then 1); the accumulator restarts.
template <typename T>
FO_HD T fo_accumulated_mean(T g, T& acc, const OptionScalars<T>& o) {
    const T mean = (g * o.unscale + acc) / o.steps;
    acc = T(0);
    return mean;
}

// One of the N-1 calls that only accumulate (no clip, no decay, no rule).
template <typename T>
FO_HD void fo_accumulate(T g, T& acc, const OptionScalars<T>& o) {
    acc = acc + g * o.unscale;
}

// Keras' moving average after the rule (on every call, accumulating ones included),
// for an average slot of storage S: `avg` becomes the value the slot will hold (the
// store that follows is then exact), which an overwrite copies into p.
template <typename S, typename T>
FO_HD void fo_moving_average(T& p, T& avg, const OptionScalars<T>& o) {
    avg = fo_stored<S>(o.ema_momentum * avg + o.one_minus_ema_momentum * p);
    if (o.overwrite) p = avg;
}

// What the norm clip sums the square of: on the call that applies with an
// accumulator, the mean the rule will see; else g*unscale.
template <typename T>
FO_HD T fo_norm_value(T g, T acc, bool accumulated, T unscale, T steps) {
    return accumulated ? (g * unscale + acc) / steps : g * unscale;
}
