// step.cuh: the step's state machine (ARCHITECTURE.md, principle 4), shared by every
// executor: the CUDA kernels run it on the device, the host build on the CPU.
//
// A step's learning rate and its rule's scalars are pure functions of two small blocks:
//   Hyper      the hyperparameters; the host writes it only when one changes
//              (assignment, load_state_dict), never per step;
//   StepState  the counters (and Nadam's running product); the executor advances it
//              after each step (fo_advance), on the device for the GPU.
// So nothing a step needs changes on the host from one step to the next: a captured
// CUDA graph replays correctly any number of times, and a skipped step needs no host
// bookkeeping. Everything here is in double, as the NumPy reference computes it; the
// independent implementation these functions are tested against is `_rule_scalars`
// and `_learning_rate_at` in fusedopt (tests/test_host_rules.py).
//
// Layout contract: fusedopt/_kernels.py mirrors Hyper, LearningRate, StepState and
// StepValues as numpy dtypes; every field is 8 bytes, so there is no padding.
#pragma once
#include "common.cuh"

// LearningRate.kind: a number (or a callable the host evaluates each step), or one of
// Keras' six schedules (fusedopt/schedules.py), closed-form functions of the step.
#define FO_LR_CONSTANT 0
#define FO_LR_EXPONENTIAL 1
#define FO_LR_INVERSE_TIME 2
#define FO_LR_PIECEWISE 3
#define FO_LR_POLYNOMIAL 4
#define FO_LR_COSINE 5
#define FO_LR_COSINE_RESTARTS 6
#define FO_MAX_PIECES 32  // PiecewiseConstantDecay values the block holds
#define FO_MAX_HYPER 12   // a rule's hyperparameters (Muon has 11)

// arg[] by kind (the schedules' Keras argument names):
//   EXPONENTIAL, INVERSE_TIME  decay_steps, decay_rate;          flag = staircase
//   POLYNOMIAL                 decay_steps, end_learning_rate, power; flag = cycle
//   COSINE                     decay_steps, alpha, warmup_target, warmup_steps;
//                              flag = a warmup target is set
//   COSINE_RESTARTS            first_decay_steps, t_mul, m_mul, alpha
//   PIECEWISE                  boundaries[pieces - 1], values[pieces]
struct LearningRate {
    long long kind;
    long long flag;
    long long pieces;
    double initial;  // the rate itself (CONSTANT) or initial_learning_rate
    double arg[4];
    double decay;    // Keras 2's inverse-time decay: lr / (1 + decay * iterations)
    double boundaries[FO_MAX_PIECES - 1];
    double values[FO_MAX_PIECES];
};

struct Hyper {
    double unscale;       // 1 / loss_scale_factor (1 when unset)
    double clipvalue;     // > 0: clip g to [-clipvalue, clipvalue]
    double weight_decay;  // >= 0: p <- p - p*weight_decay*lr; < 0: none (Keras' None)
    double coupled_weight_decay;  // > 0: g <- g + coupled_weight_decay*p (L2, torch's Adam)
    double clipnorm;      // clipnorm or global_clipnorm: which one is the executor's layout
    double rule[FO_MAX_HYPER];  // the rule's hyperparameters: its class's _hyperparameters
    LearningRate lr;
    long long stochastic_rounding;  // 1: bfloat16 params are stored stochastically
    unsigned long long seed;        // of the stochastic rounding (kernels/storage.cuh)
    // Keras' options around the rule (fusedopt/optimizer.py; kernels/options.cuh):
    long long accumulation;          // gradient_accumulation_steps N; 1 without
    long long use_ema;               // 1: a moving average of the params after each call
    double ema_momentum;
    long long ema_overwrite_frequency;  // > 0: copy the average into the params that often
    long long dynamic_growth_steps;  // > 0: a LossScaleOptimizer's; the scale is StepState's
};

struct StepState {
    long long iterations;         // calls applied: Keras' `_iterations` (updates * N
                                  // under gradient accumulation)
    long long skipped_steps;      // steps skipped for non-finite gradients
    long long last_step_skipped;  // 1 when the latest step was skipped
    long long skip;               // the finite check's verdict on the step in flight
    unsigned long long blocks_done;  // GPU: blocks of the update in flight that finished
    double product;               // Nadam: u_1*...*u_updates; 1 for the other rules
    // A LossScaleOptimizer's dynamic scale (a float32 value, as Keras keeps it) and its
    // count of finite steps since it last changed (Hyper.dynamic_growth_steps > 0).
    double loss_scale;
    long long scale_counter;
};

// One step's values, in double: the learning rate (weight decay uses it), the rule's
// scalars in reference.<rule>'s order, and the running product after this step.
struct StepValues {
    double lr;
    double c[FO_MAX_SCALARS];
    double product;
};

#define FO_PI 3.141592653589793  // math.pi

FO_HD double fo_cosine_decay(double step, double decay_steps, double alpha, double from) {
    const double cosine = 0.5 * (1.0 + cos(FO_PI * (step / decay_steps)));
    return from * ((1 - alpha) * cosine + alpha);
}

FO_HD double fo_periods(double t_mul, double i) { return (1.0 - pow(t_mul, i)) / (1.0 - t_mul); }

// The schedule at `step` (iterations before the step). Operation for operation the
// formulas of fusedopt/schedules.py, so the host build rounds exactly as Python does.
FO_HD double fo_schedule(const LearningRate& r, double step) {
    switch (r.kind) {
    case FO_LR_EXPONENTIAL:
    case FO_LR_INVERSE_TIME: {
        double p = step / r.arg[0];
        if (r.flag) p = floor(p);
        return r.kind == FO_LR_EXPONENTIAL ? r.initial * pow(r.arg[1], p)
                                           : r.initial / (1.0 + r.arg[1] * p);
    }
    case FO_LR_PIECEWISE:
        for (long long i = 0; i + 1 < r.pieces; ++i)
            if (step <= r.boundaries[i]) return r.values[i];
        return r.values[r.pieces - 1];
    case FO_LR_POLYNOMIAL: {
        double decay_steps = r.arg[0];
        if (r.flag) {
            decay_steps = decay_steps * (step == 0 ? 1.0 : ceil(step / r.arg[0]));
        } else if (decay_steps < step) {
            step = decay_steps;
        }
        const double p = step / decay_steps;
        return (r.initial - r.arg[1]) * pow(1 - p, r.arg[2]) + r.arg[1];
    }
    case FO_LR_COSINE: {
        const double decay_steps = r.arg[0], alpha = r.arg[1];
        if (!r.flag) return fo_cosine_decay(step < decay_steps ? step : decay_steps,
                                            decay_steps, alpha, r.initial);
        const double target = r.arg[2], warmup = r.arg[3];
        if (decay_steps + warmup < step) step = decay_steps + warmup;
        if (step < warmup) return (target - r.initial) * (step / warmup) + r.initial;
        return fo_cosine_decay(step - warmup, decay_steps, alpha, target);
    }
    case FO_LR_COSINE_RESTARTS: {
        const double t_mul = r.arg[1], m_mul = r.arg[2], alpha = r.arg[3];
        double fraction = step / r.arg[0], i;
        if (t_mul == 1.0) {
            i = floor(fraction);
            fraction -= i;
        } else {
            i = floor(log(1.0 - fraction * (1.0 - t_mul)) / log(t_mul));
            // The ratio of logs can land a hair under an integer at a restart.
            if (fo_periods(t_mul, i + 1) <= fraction) i += 1;
            else if (fo_periods(t_mul, i) > fraction) i -= 1;
            fraction = (fraction - fo_periods(t_mul, i)) / pow(t_mul, i);
        }
        const double cosine = 0.5 * pow(m_mul, i) * (1.0 + cos(FO_PI * fraction));
        return r.initial * ((1 - alpha) * cosine + alpha);
    }
    default:
        return r.initial;
    }
}

// The learning rate of the step after `iterations` completed ones.
FO_HD double fo_learning_rate(const LearningRate& r, long long iterations) {
    double lr = fo_schedule(r, (double)iterations);
    if (r.decay != 0.0) lr = lr / (1.0 + r.decay * (double)iterations);
    return lr;
}

// Gradient accumulation (Keras 3): `iterations` counts calls; the rule runs on every
// N-th (is_update_step = (calls + 1) % N == 0) and its step t counts updates.
FO_HD long long fo_accumulation(const Hyper& h) { return h.accumulation > 1 ? h.accumulation : 1; }
FO_HD long long fo_updates(const Hyper& h, const StepState& s) {
    return s.iterations / fo_accumulation(h);
}
FO_HD bool fo_applies(const Hyper& h, const StepState& s) {
    return (s.iterations + 1) % fo_accumulation(h) == 0;
}

// What a call does around the rule (kernels/options.cuh), from the same two blocks.
struct StepPhase {
    double unscale;       // Hyper's unscale, divided by a LossScaleOptimizer's scale
    double ema_momentum;  // 0 on the first update: the average starts as the params
    double accumulation;  // N
    int apply;            // 0: one of gradient accumulation's N-1 calls that only add
    int ema;              // update the moving average after the rule
    int overwrite;        // then copy it into the params (ema_overwrite_frequency)
    int underflow;        // the dynamic scale is 0: skip, as for non-finite gradients
};

FO_HD StepPhase fo_phase(const Hyper& h, const StepState& s) {
    StepPhase ph;
    const long long updates = fo_updates(h, s);
    const bool dynamic = h.dynamic_growth_steps > 0;
    ph.unscale = dynamic ? h.unscale / s.loss_scale : h.unscale;
    ph.underflow = dynamic && s.loss_scale == 0.0;
    ph.accumulation = (double)fo_accumulation(h);
    ph.apply = fo_applies(h, s);
    ph.ema = h.use_ema != 0;
    ph.ema_momentum = updates != 0 ? h.ema_momentum : 0.0;
    ph.overwrite = ph.ema && h.ema_overwrite_frequency > 0 &&
                   (updates + 1) % h.ema_overwrite_frequency == 0;
    return ph;
}

// This step's values for a segment group with learning-rate `multiplier`: the rate
// (multiplied first, so every scalar derived from it is the one an optimizer with
// rate multiplier*lr computes), then the rule's scalars for t = iterations + 1.
// Each rule provides
//   static void scalars(const double* h, long long t, double lr, double product,
//                       StepValues& v)
// filling v.c (and v.product, if it keeps a running product; it never depends on lr).
template <typename Rule>
FO_HD StepValues fo_step_values(const Hyper& h, const StepState& s, double multiplier = 1.0) {
    StepValues v = {};
    v.lr = fo_learning_rate(h.lr, s.iterations) * multiplier;  // schedules see every call
    v.product = s.product;
    Rule::scalars(h.rule, fo_updates(h, s) + 1, v.lr, s.product, v);
    return v;
}

// After a step: count it (taking the rule's new running product if the rule ran) or
// count the skip.
FO_HD void fo_advance(StepState& s, const StepValues& v, bool skipped, bool applied = true) {
    if (skipped) {
        s.skipped_steps += 1;
        s.last_step_skipped = 1;
    } else {
        s.iterations += 1;
        s.last_step_skipped = 0;
        if (applied) s.product = v.product;
    }
    s.skip = 0;
}

// The same for a step with Keras' options (every executor's step: fused.cu, host.cpp,
// and the own kernels of lamb, adafactor, muon): the product only on
// calls that apply the rule; then a LossScaleOptimizer's scale, in float32 as Keras
// keeps it: halved by a skip, doubled after dynamic_growth_steps finite calls in a row
// (reference.loss_scale_update).
FO_HD void fo_advance(StepState& s, const Hyper& h, const StepValues& v, bool skipped) {
    fo_advance(s, v, skipped, fo_applies(h, s));
    if (h.dynamic_growth_steps > 0) {
        float scale = (float)s.loss_scale;
        if (skipped) {
            scale = scale * 0.5f;
            s.scale_counter = 0;
        } else if (s.scale_counter == h.dynamic_growth_steps - 1) {
            scale = scale * 2.0f;
            s.scale_counter = 0;
        } else {
            s.scale_counter += 1;
        }
        s.loss_scale = (double)scale;
    }
}

// The math type's copies the per-element code reads (rounded once, as the NumPy path
// casts its Python floats to the buffer's dtype).
template <typename T>
FO_HD StepScalars<T> fo_narrow(const StepValues& v) {
    StepScalars<T> st;
    st.lr = (T)v.lr;
    for (int k = 0; k < FO_MAX_SCALARS; ++k) st.c[k] = (T)v.c[k];
    return st;
}

// `decay`: the segment group's weight decay switch (off: no decay, as Keras' None).
template <typename T>
FO_HD Prologue<T> fo_prologue(const Hyper& h, bool decay = true) {
    Prologue<T> pro;
    pro.unscale = (T)h.unscale;
    pro.clipvalue = (T)h.clipvalue;
    pro.weight_decay = decay ? (T)h.weight_decay : T(-1);
    pro.coupled_weight_decay = decay ? (T)h.coupled_weight_decay : T(0);
    return pro;
}

// The prologue of a call in `phase`: its unscale (with a LossScaleOptimizer's scale),
// or 1 under gradient accumulation, whose mean is already unscaled (options.cuh).
template <typename T>
FO_HD Prologue<T> fo_prologue(const Hyper& h, const StepPhase& phase, bool decay) {
    Prologue<T> pro = fo_prologue<T>(h, decay);
    pro.unscale = fo_accumulation(h) > 1 ? T(1) : (T)phase.unscale;
    return pro;
}
