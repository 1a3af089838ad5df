"""Who runs a step: the three executors and the one small interface they share
(ARCHITECTURE.md, principle 6).

    plan = Plan(optimizer, params)   # built once per layout (FusedOptimizer.build)
    plan.step(grads, params_data, slots, host_learning_rate[, amp=(grad_scale, found_inf)])
                                     # one step; counts it or its skip. host_learning_rate
                                     # is None unless only the host can evaluate the rate;
                                     # amp: 1-element float32 arrays (or None) on the
                                     # buffers' device, read where the step runs: divide
                                     # the gradients by grad_scale, skip if found_inf != 0
    plan.hyperparameters_changed(name)   # after an assignment: refresh the plan's copy
    plan.read_state()                # (iterations, skipped_steps, last_step_skipped)
    plan.write_state(iterations, skipped_steps, last_step_skipped)   # load_state_dict
    plan.next_iteration              # the iteration the next step will be
    plan.join_current_stream()       # before the host reads or writes the state slots
    plan.name                        # "cuda", "host" or "numpy"

- "cuda":  fusedopt.cuda.StepPlan, the kernels of kernels/ through NVRTC and CuPy;
- "host":  fusedopt.host.HostPlan, the same kernel sources compiled for the CPU
           (the update and the step state functions of kernels/step.cuh);
- "numpy": fusedopt.reference.ReferencePlan, the rules and the per-step scalars in
           plain Python and NumPy: the independent oracle the others are tested against.

Where the buffers are decides: CuPy buffers take "cuda"; NumPy buffers take "host"
when the host library builds on this machine, else "numpy" (with one warning).
`executor=` on an optimizer asks for one by name instead.

The plan owns the step counters, as the step's state lives where the buffers live
(principle 4); the optimizer keeps them only while nothing is built.
"""

import numpy as np

from . import cuda, host, reference

EXECUTORS = ("auto", "host", "numpy", "cuda")


def check_executor(value):
    if not isinstance(value, str):
        raise TypeError(f"`executor` must be one of {', '.join(map(repr, EXECUTORS))}, "
                        f"got {type(value).__name__}: {value!r}")
    if value not in EXECUTORS:
        raise ValueError(f"`executor` must be one of {', '.join(map(repr, EXECUTORS))}, "
                         f"got {value!r}")
    return value


def host_key(optimizer, param_dtype, grad_dtype=None):
    """(param, grad, state) dtype names of the kernels that run `optimizer` on params of
    `param_dtype` and grads of `grad_dtype` (default: the params')."""
    p = optimizer._precision_for(np.dtype(param_dtype).name,
                                 None if grad_dtype is None else np.dtype(grad_dtype).name)
    return p.param, p.grad, p.state


def plan_for(optimizer, params):
    """A new plan for `optimizer` on `params` (a FlatBuffer). Raises, before anything
    is changed, when the requested executor cannot run these buffers here."""
    requested = optimizer.executor
    reason = optimizer._reference_only(params.dtype)
    if reason:
        # What only the NumPy reference implements is refused by the others, never
        # quietly run elsewhere (README, "Executors").
        if params.device != "cpu" or requested in ("host", "cuda"):
            where = "CuPy buffers" if params.device != "cpu" else f"executor={requested!r}"
            raise ValueError(f"{type(optimizer).__name__} with {reason} runs only on the NumPy "
                             f"executor so far, which {where} cannot use; use NumPy buffers "
                             "with executor='auto' or 'numpy'")
        return reference.ReferencePlan(optimizer, params)
    if params.device != "cpu":
        if requested not in ("auto", "cuda"):
            raise ValueError(f"`executor={requested!r}` runs on CPU buffers, but `params` "
                             f"live on {params.device}; use executor='auto' or 'cuda'")
        return cuda.StepPlan(optimizer, params)
    if requested == "cuda":
        raise ValueError("`executor='cuda'` needs CuPy buffers, but `params` are NumPy arrays")
    if requested == "numpy":
        return reference.ReferencePlan(optimizer, params)
    key = host_key(optimizer, params.dtype)
    if requested == "host":
        try:
            fn = host.library(optimizer.rule, *key)
        except host.HostBuildError as e:
            raise RuntimeError(f"`executor='host'` cannot run here: {e}") from e
        return host.HostPlan(optimizer, params, fn)
    fn = host.library_or_warn(optimizer.rule, *key)
    if fn is None:
        return reference.ReferencePlan(optimizer, params)
    return host.HostPlan(optimizer, params, fn)
