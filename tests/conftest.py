"""Shared test data: one CASES list that every parity test runs over, and tolerances.

A case is (id, optimizer class name, constructor kwargs). RULE_CASES covers every
rule and its variants; OPTION_CASES adds each pipeline option to every optimizer.
"""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent / "host"))  # the emulator's Python side

# Keras' parity tests run on its JAX backend in float64. JAX reads JAX_ENABLE_X64 once,
# when it is first imported, so set both before any test can import it: otherwise a
# subset of test files that imports JAX first (e.g. a checkpoint read by JAX) leaves
# Keras computing float64 variables in float32.
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_ENABLE_X64", "1")

# CI explores the same examples on every run, so a red run is reproducible; developer
# runs draw fresh ones (and keep failures in .hypothesis/).
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Tolerances, stated once (ARCHITECTURE.md, "Testing").
RTOL = {np.float64: 1e-12, np.float32: 1e-5}
ATOL = {np.float64: 1e-14, np.float32: 1e-6}

RULE_CASES = [
    ("sgd", "SGD", {}),
    ("sgd-momentum", "SGD", {"learning_rate": 0.05, "momentum": 0.9}),
    ("sgd-nesterov", "SGD", {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True}),
    ("rmsprop", "RMSprop", {}),
    ("rmsprop-momentum", "RMSprop", {"momentum": 0.9}),
    ("rmsprop-centered", "RMSprop", {"centered": True}),
    ("rmsprop-centered-momentum-eps", "RMSprop",
     {"centered": True, "momentum": 0.5, "rho": 0.8, "epsilon": 0.3}),
    ("adagrad", "Adagrad", {}),
    ("adagrad-init-eps", "Adagrad", {"initial_accumulator_value": 0.5, "epsilon": 0.3}),
    ("adadelta", "Adadelta", {}),
    ("adadelta-paper", "Adadelta", {"learning_rate": 1.0, "rho": 0.9}),
    ("adam", "Adam", {}),
    ("adam-amsgrad", "Adam", {"amsgrad": True, "learning_rate": 0.01}),
    ("adam-eps", "Adam", {"epsilon": 0.3, "beta_1": 0.5, "beta_2": 0.7}),
    ("adamw", "AdamW", {}),
    ("adamw-amsgrad", "AdamW", {"weight_decay": 0.1, "amsgrad": True, "learning_rate": 0.01}),
    ("adamax", "Adamax", {}),
    ("adamax-eps", "Adamax", {"epsilon": 0.3, "beta_1": 0.5}),
    ("nadam", "Nadam", {}),
    ("nadam-betas", "Nadam", {"beta_1": 0.8, "beta_2": 0.9, "epsilon": 0.3}),
    ("ftrl", "Ftrl", {}),
    ("ftrl-all", "Ftrl", {"learning_rate": 0.1, "learning_rate_power": -0.7,
                          "initial_accumulator_value": 0.2, "l1_regularization_strength": 0.01,
                          "l2_regularization_strength": 0.02,
                          "l2_shrinkage_regularization_strength": 0.03, "beta": 0.5}),
    ("ftrl-power0", "Ftrl", {"learning_rate": 0.1, "learning_rate_power": 0.0}),
    ("lion", "Lion", {}),
    ("lion-betas", "Lion", {"beta_1": 0.5, "beta_2": 0.7}),
    ("schedulefreeadamw", "ScheduleFreeAdamW", {}),
    ("schedulefreeadamw-warmup-betas", "ScheduleFreeAdamW",
     {"learning_rate": 0.01, "warmup_steps": 10, "beta_1": 0.5, "beta_2": 0.7, "epsilon": 0.3}),
    ("lamb", "Lamb", {}),
    ("lamb-betas-eps", "Lamb", {"learning_rate": 0.01, "beta_1": 0.5, "beta_2": 0.7,
                                "epsilon": 0.3}),
    ("adafactor", "Adafactor", {}),
    ("adafactor-all", "Adafactor", {"learning_rate": 0.05, "beta_2_decay": -0.5,
                                    "epsilon_1": 1e-3, "epsilon_2": 0.1, "clip_threshold": 0.5,
                                    "relative_step": False}),
    ("muon", "Muon", {}),
    ("muon-plain", "Muon", {"learning_rate": 0.01, "nesterov": False, "rms_rate": None,
                            "momentum": 0.8, "ns_steps": 3, "adam_lr_ratio": 0.5,
                            "adam_beta_1": 0.5, "adam_beta_2": 0.7, "epsilon": 0.3,
                            "weight_decay": None, "adam_weight_decay": 0.1}),
]

OPTIONS = {
    "clipnorm": {"clipnorm": 1.0},
    "global_clipnorm": {"global_clipnorm": 2.0},
    "clipvalue": {"clipvalue": 0.5},
    "weight_decay": {"weight_decay": 0.1},
    "loss_scale": {"loss_scale_factor": 4.0},
    "ema": {"use_ema": True, "ema_momentum": 0.9, "ema_overwrite_frequency": 4},
    "accumulate": {"gradient_accumulation_steps": 3},
}

OPTIMIZER_NAMES = sorted({cls for _, cls, _ in RULE_CASES})

OPTION_CASES = [
    (f"{cls.lower()}+{opt}", cls, dict(kwargs))
    for cls in OPTIMIZER_NAMES
    for opt, kwargs in OPTIONS.items()
]

# The loss scale divides the gradient before any clipping: these catch the two in the
# wrong order (a single option cannot).
COMBINED_CASES = [
    ("adam+loss_scale+clipvalue", "Adam", {"loss_scale_factor": 4.0, "clipvalue": 0.1}),
    ("adamw+loss_scale+clipnorm", "AdamW", {"loss_scale_factor": 4.0, "clipnorm": 1.0}),
    ("sgd-momentum+loss_scale+clipnorm", "SGD",
     {"momentum": 0.9, "loss_scale_factor": 0.25, "clipnorm": 1.0}),
    ("lion+loss_scale+clipvalue", "Lion", {"loss_scale_factor": 8.0, "clipvalue": 0.05}),
    ("adagrad+loss_scale+clipnorm", "Adagrad", {"loss_scale_factor": 3.0, "clipnorm": 0.5}),
    # Accumulation: clipping sees the mean; the scale divides each call's gradient.
    ("adam+accumulate+clipnorm+ema", "Adam",
     {"gradient_accumulation_steps": 2, "clipnorm": 0.5, "use_ema": True,
      "ema_overwrite_frequency": 3}),
    ("nadam+accumulate+global_clipnorm+loss_scale", "Nadam",
     {"gradient_accumulation_steps": 3, "global_clipnorm": 1.0, "loss_scale_factor": 4.0,
      "weight_decay": 0.05}),
    # The same options in the rules with kernels of their own (kernels/whole.cuh): the
    # norms of the mean per variable or over all, the average after the rule.
    ("lamb+accumulate+clipnorm+ema", "Lamb",
     {"gradient_accumulation_steps": 2, "clipnorm": 0.5, "use_ema": True,
      "ema_overwrite_frequency": 2, "weight_decay": 0.05}),
    ("adafactor+accumulate+global_clipnorm+ema", "Adafactor",
     {"gradient_accumulation_steps": 2, "global_clipnorm": 1.0, "use_ema": True,
      "ema_momentum": 0.9, "ema_overwrite_frequency": 3, "loss_scale_factor": 4.0}),
    ("muon+accumulate+clipnorm+ema", "Muon",
     {"gradient_accumulation_steps": 3, "clipnorm": 0.5, "use_ema": True,
      "ema_overwrite_frequency": 2}),
]

# fusedopt's own options, which Keras does not have: every executor runs them, the
# Keras parity test does not (KERAS_CASES).
FUSEDOPT_ONLY_CASES = [
    ("adam-torch-epsilon", "Adam",
     {"epsilon_after_bias_correction": True, "epsilon": 0.3, "beta_2": 0.7}),
    ("adamw-amsgrad-torch-epsilon", "AdamW",
     {"epsilon_after_bias_correction": True, "amsgrad": True, "epsilon": 0.01}),
    ("adam-coupled-decay-clipnorm", "Adam", {"coupled_weight_decay": 0.1, "clipnorm": 1.0}),
    ("sgd-momentum-both-decays", "SGD",
     {"momentum": 0.9, "coupled_weight_decay": 0.05, "weight_decay": 0.01}),
    ("ftrl-coupled-decay", "Ftrl", {"coupled_weight_decay": 0.02}),
    ("sgd-gradient-units-dampening-decay", "SGD",
     {"momentum": 0.9, "momentum_in_gradient_units": True, "dampening": 0.3,
      "coupled_weight_decay": 0.05}),
    ("sgd-gradient-units-nesterov", "SGD",
     {"learning_rate": 0.05, "momentum": 0.8, "nesterov": True,
      "momentum_in_gradient_units": True}),
    ("adam-maximize-loss-scale-clipnorm", "Adam",
     {"maximize": True, "loss_scale_factor": 4.0, "clipnorm": 1.0}),
    ("sgd-gradient-units-maximize-clipvalue", "SGD",
     {"momentum": 0.5, "momentum_in_gradient_units": True, "maximize": True,
      "clipvalue": 0.3}),
]

KERAS_CASES = RULE_CASES + OPTION_CASES + COMBINED_CASES

# Keras' options in the rules with kernels of their own (kernels/whole.cuh,
# whole_host.cpp), each with a norm clip and skip_nonfinite, over enough calls for EMA
# overwrites inside accumulation cycles: (class name, options), for the emulated, host
# and GPU tests of those kernels (test_emulated_options.py, test_gpu.py).
OWN_KERNEL_OPTIONS = [
    ("Lamb", {"gradient_accumulation_steps": 3, "use_ema": True, "ema_overwrite_frequency": 2,
              "clipnorm": 0.5, "weight_decay": 0.1, "skip_nonfinite": True}),
    ("Adafactor", {"gradient_accumulation_steps": 2, "use_ema": True, "ema_momentum": 0.9,
                   "ema_overwrite_frequency": 3, "global_clipnorm": 1.0, "skip_nonfinite": True,
                   "loss_scale_factor": 4.0}),
    ("Muon", {"gradient_accumulation_steps": 3, "use_ema": True, "ema_overwrite_frequency": 2,
              "clipnorm": 0.5, "skip_nonfinite": True, "exclude_layers": ["^skip"]}),
]
CASES = KERAS_CASES + FUSEDOPT_ONLY_CASES


def _runs_on_kernels(case):
    import fusedopt

    _, cls_name, kwargs = case
    return not getattr(fusedopt, cls_name)(**kwargs)._reference_only()


# The cases the kernels implement (the host and CUDA executors, the emulator); the
# others run only on the NumPy executor, which the other executors refuse
# (tests/test_keras_family_classes.py).
KERNEL_CASES = [c for c in CASES if _runs_on_kernels(c)]
KERNEL_RULE_CASES = [c for c in RULE_CASES if _runs_on_kernels(c)]
# The kernel cases a CUDA graph can capture: Muon's matrix products allocate CuPy
# temporaries, so capturing its step is refused (fusedopt/cuda.py, _enqueue_muon).
GRAPH_CASES = [c for c in KERNEL_CASES if c[1] != "Muon"]

# Mixed precision (fusedopt.precision): (id, param dtype, grad dtype, optimizer options).
# Master weights and stochastic rounding are run-time switches of the (param, grad,
# state) kernels, so four kernel builds cover these six cases, and between them every
# storage type in every position: bfloat16, float16 and float32 params; bfloat16,
# float32 and float16 grads; float32 and bfloat16 state.
PRECISIONS = [
    ("bf16", "bfloat16", "bfloat16", {}),
    ("bf16-master", "bfloat16", "bfloat16", {"master_weights": True}),
    ("bf16-stochastic", "bfloat16", "bfloat16", {"stochastic_rounding": True, "seed": 5}),
    ("bf16-all", "bfloat16", "bfloat16", {"state_dtype": "bfloat16"}),
    ("f16-master-f32grads-bf16state", "float16", "float32",
     {"master_weights": True, "state_dtype": "bfloat16"}),
    ("f32-f16grads-bf16state", "float32", "float16", {"state_dtype": "bfloat16"}),
]
# Every precision runs these rules (the cross product: the emulated GPU path for all,
# the host build for Adam); every kernel rule runs the first precision ("bf16":
# bfloat16 params and grads, float32 state) on both.
PRECISION_RULES = ["adam", "sgd-momentum", "lion", "schedulefreeadamw"]


def dtype_of(name):
    """The NumPy dtype of a storage dtype name (bfloat16: ml_dtypes')."""
    from fusedopt import precision

    return precision.numpy_dtype(name)


# Layouts used across tests: segment shapes, including (), (0,), (1,) and odd sizes.
LAYOUTS = {
    "mixed": [(3, 4), (5,), (), (0,), (1,), (2, 1, 3)],
    "single": [(37,)],
    "odd": [(7,), (1,), (13, 3), (0,), (129,)],
}


def case_ids(cases):
    return [c[0] for c in cases]


def random_params(layout, dtype, seed):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(dtype) for s in layout]


def random_grads(layout, dtype, seed, steps, scale=1.0):
    """Per-step gradient lists; segment norms vary so clipping bites on some only."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        out.append([(rng.normal(size=s) * scale * rng.uniform(0.1, 2.0)).astype(dtype)
                    for s in layout])
    return out


def running_in_ci():
    return bool(os.environ.get("CI"))


def require_in_ci(reason):
    """Skip here, but fail in CI: some checks must run there (ARCHITECTURE.md)."""
    if running_in_ci():
        pytest.fail(f"required in CI but unavailable: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def emulator_libraries():
    """The real kernels compiled for the host (tests/host/emulator.py), per dtype."""
    import emulator

    libs = emulator.build()
    if libs is None:
        require_in_ci("a C++20 compiler (g++) for the kernel emulator")
    return libs
