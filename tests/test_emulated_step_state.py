"""The step's state on the device (issue 10), run on the CPU by the kernel emulator:
a recorded step replays like eager steps, and a skipped step leaves nothing stale
behind for the steps after it."""

import numpy as np
import pytest

import fusedopt
from emulator import emulate


@pytest.fixture
def libraries(emulator_libraries):
    return emulator_libraries


def _sgd_pair(libraries, **kwargs):
    cpu_params = fusedopt.FlatBuffer.from_arrays([np.full(5, -1.0)])
    gpu_params = fusedopt.FlatBuffer.from_arrays([np.full(5, -1.0)])
    cpu, gpu = fusedopt.SGD(0.1, **kwargs), fusedopt.SGD(0.1, **kwargs)
    emulate(gpu, gpu_params, libraries)
    return cpu, cpu_params, gpu, gpu_params


@pytest.mark.xfail(strict=True, reason="issue 10: lr/bias corrections are host-packed kernel args")
def test_recorded_apply_replays_like_eager_steps(libraries):
    """What a user does with CuPy today: capture one apply() into a graph and launch
    it again and again. Every replay must be the next step, not a copy of step t."""
    g = np.linspace(-1.0, 2.0, 5)
    cpu_params = fusedopt.FlatBuffer.from_arrays([np.full(5, -1.0)])
    gpu_params = fusedopt.FlatBuffer.from_arrays([np.full(5, -1.0)])
    cpu, gpu = fusedopt.Adam(0.1), fusedopt.Adam(0.1)
    backend = emulate(gpu, gpu_params, libraries)
    gpu.apply(g, gpu_params)
    with backend.capture() as recorded:
        gpu.apply(g, gpu_params)
    for _ in range(3):
        backend.replay(recorded)
    for _ in range(4):
        cpu.apply(g, cpu_params)
    np.testing.assert_allclose(gpu_params.data, cpu_params.data, rtol=1e-12)


@pytest.mark.xfail(strict=True, reason="issue 10: the device reuses the skipped attempt's row")
def test_learning_rate_changed_after_a_skipped_step_is_used(libraries):
    """SGD(0.1): a good step, a NaN step, learning_rate = 0.5, a good step."""
    cpu, cpu_params, gpu, gpu_params = _sgd_pair(libraries, skip_nonfinite=True)
    for opt, params in ((cpu, cpu_params), (gpu, gpu_params)):
        opt.apply(np.ones(5), params)
        opt.apply(np.full(5, np.nan), params)
        opt.learning_rate = 0.5
        opt.apply(np.ones(5), params)
    assert cpu_params.data[0] == pytest.approx(-1.6)
    np.testing.assert_array_equal(gpu_params.data, cpu_params.data)
