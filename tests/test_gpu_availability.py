"""Without a usable GPU, every entry point says what is missing (CuPy, the NVIDIA
driver, a device) instead of leaking CuPy's error or advising to install what is
installed. Runs on any machine: the CUDA runtime is a stand-in and the detection
function is monkeypatched."""

import types

import numpy as np
import pytest

import fusedopt
from fusedopt import cuda
from fusedopt.__main__ import main

NO_DRIVER = 35   # cudaErrorInsufficientDriver
NO_DEVICE = 100  # cudaErrorNoDevice


class FakeCudaRuntimeError(Exception):
    """Like cupy_backends' CUDARuntimeError: a message and a `status`."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def fake_runtime(driver, devices, runtime=12080):
    def get_device_count():
        if isinstance(devices, Exception):
            raise devices
        return devices

    return types.SimpleNamespace(driverGetVersion=lambda: driver,
                                 runtimeGetVersion=lambda: runtime,
                                 getDeviceCount=get_device_count)


def test_no_driver():
    problem = cuda._runtime_problem(fake_runtime(0, FakeCudaRuntimeError(
        NO_DRIVER, "cudaErrorInsufficientDriver: CUDA driver version is insufficient")))
    assert "no NVIDIA driver" in problem and "12.8" in problem
    assert "pip install" not in problem  # CuPy and its extras are there already


def test_driver_too_old_for_the_runtime():
    problem = cuda._runtime_problem(fake_runtime(11040, FakeCudaRuntimeError(
        NO_DRIVER, "cudaErrorInsufficientDriver")))
    assert "supports CUDA up to 11.4" in problem and "12.8" in problem
    assert "update the driver" in problem


@pytest.mark.parametrize("devices", [0, FakeCudaRuntimeError(NO_DEVICE, "cudaErrorNoDevice")],
                         ids=["count-0", "no-device-error"])
def test_driver_but_no_device(devices):
    problem = cuda._runtime_problem(fake_runtime(12080, devices))
    assert "driver (CUDA 12.8) is installed but sees no CUDA device" in problem


def test_a_usable_device_is_no_problem():
    assert cuda._runtime_problem(fake_runtime(12080, 2)) is None


def test_another_cuda_error_is_passed_on():
    problem = cuda._runtime_problem(fake_runtime(12080, FakeCudaRuntimeError(
        999, "cudaErrorUnknown: unknown error")))
    assert "cudaErrorUnknown" in problem


def test_no_cupy(monkeypatch):
    def no_cupy():
        raise RuntimeError("the GPU path needs CuPy")

    monkeypatch.setattr(cuda, "_cupy", no_cupy)
    problem = cuda.gpu_problem()
    assert problem.startswith("CuPy is not installed") and "fusedopt[cuda12]" in problem
    assert cuda.gpu_available() is False


DRIVER_MISSING = "CuPy (CUDA runtime 12.8) is installed, but no NVIDIA driver was found"


@pytest.fixture
def no_driver(monkeypatch):
    monkeypatch.setattr(cuda, "gpu_problem", lambda: DRIVER_MISSING)


def test_gpu_available_follows_the_diagnosis(no_driver):
    assert cuda.gpu_available() is False


def test_load_onto_a_gpu_says_what_is_missing(tmp_path, no_driver):
    params = fusedopt.FlatBuffer.from_arrays([np.ones(3)])
    fusedopt.save(tmp_path / "run.npz", fusedopt.Adam(), params)
    with pytest.raises(RuntimeError, match="device 'gpu': no usable GPU here: CuPy .* no NVIDIA driver"):
        fusedopt.load(tmp_path / "run.npz", device="gpu")
    assert fusedopt.load(tmp_path / "run.npz", device="cpu")[1].device == "cpu"


def test_buffers_on_a_gpu_say_what_is_missing(no_driver):
    with pytest.raises(RuntimeError, match="no NVIDIA driver"):
        fusedopt.FlatBuffer.zeros([(3,)], device="gpu")
    with pytest.raises(RuntimeError, match="no NVIDIA driver"):
        fusedopt.FlatBuffer.from_arrays([np.ones(3)]).to("cuda:0")


def test_train_cli_says_what_is_missing(no_driver, capsys):
    assert main(["train", "--device", "gpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no NVIDIA driver" in err and "--device cpu" in err and "pip install" not in err


def test_bench_cli_says_what_is_missing(no_driver, capsys):
    assert main(["bench", "--device", "gpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no NVIDIA driver" in err and "pip install" not in err


def test_a_malformed_device_is_still_a_value_error(no_driver):
    with pytest.raises(ValueError, match="device"):
        fusedopt.FlatBuffer.from_arrays([np.ones(3)]).to("gpu:x")
