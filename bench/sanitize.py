"""Drive every fusedopt kernel on a GPU for compute-sanitizer (bench/run_sanitizer.sh).

Every rule, float32 and float64, with the option sets that launch each kernel
(plain; per-segment clipnorm; global clipnorm; skip_nonfinite with a NaN step), on a
layout with empty, one-element and odd segments, on aligned and unaligned buffers.
Results are checked against the NumPy path so a run that is clean but wrong fails too.
"""

import sys

import numpy as np

import fusedopt

LAYOUT = [(1000,), (0,), (1,), (3, 7), (4099,), ()]
OPTIONS = [{}, {"clipnorm": 0.5}, {"global_clipnorm": 1.0},
           {"skip_nonfinite": True, "clipnorm": 0.5, "loss_scale_factor": 8.0}]


def main():
    import cupy as cp

    size = sum(int(np.prod(s)) for s in LAYOUT)
    rng = np.random.default_rng(0)
    failures = 0
    for name in fusedopt.available():
        for dtype in (np.float32, np.float64):
            for options in OPTIONS:
                for offset in (0, 1):  # 1: unaligned, the scalar path
                    init = rng.normal(size=size).astype(dtype)
                    backing = cp.zeros(size + offset, dtype=dtype)
                    backing[offset:] = cp.asarray(init)
                    gpu = fusedopt.FlatBuffer(backing[offset:], LAYOUT)
                    cpu = fusedopt.FlatBuffer(init.copy(), LAYOUT)
                    gpu_opt = type(fusedopt.get(name))(**options)
                    cpu_opt = type(fusedopt.get(name))(**options)
                    for step in range(3):
                        g = rng.normal(size=size).astype(dtype)
                        if step == 1 and options.get("skip_nonfinite"):
                            g[7] = np.nan
                        gpu_opt.apply(cp.asarray(g), gpu)
                        cpu_opt.apply(g, cpu)
                    cp.cuda.runtime.deviceSynchronize()
                    tol = 1e-12 if dtype == np.float64 else 1e-5
                    if not np.allclose(cp.asnumpy(gpu.data), cpu.data, rtol=tol, atol=tol):
                        failures += 1
                        print(f"MISMATCH {name} {np.dtype(dtype).name} {options} offset={offset}")
    print(f"sanitize driver: {failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
