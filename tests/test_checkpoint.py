"""Checkpoints: exact resume, atomic writes, refusal of bad files with nothing changed,
in both containers (safetensors, the default, and .npz; see test_checkpoint_formats.py
for what is particular to each)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import fusedopt
from conftest import CASES, case_ids

LAYOUT = [(40, 3), (17,), (), (0,), (1,)]
CONTAINERS = pytest.mark.parametrize("ext", ["safetensors", "npz"])


def make_params(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return fusedopt.FlatBuffer.from_arrays([rng.normal(size=s).astype(dtype) for s in LAYOUT])


def grads_for(step, size, dtype=np.float64):
    """The gradient of step `step`, reproducible from the step number alone."""
    return np.random.default_rng(1000 + step).normal(size=size).astype(dtype)


def run(opt, params, start, stop, dtype=np.float64):
    for step in range(start, stop):
        opt.apply(grads_for(step, params.size, dtype), params)


def snapshot(opt, params):
    return [params.data.copy()] + [s.copy() for s in opt.slots().values()] + [opt.iterations]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y)
        else:
            assert x == y


@CONTAINERS
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_resume_from_disk_is_bitwise_identical(tmp_path, case, dtype, ext):
    _, cls_name, kwargs = case
    straight_opt, straight = getattr(fusedopt, cls_name)(**kwargs), make_params(dtype)
    run(straight_opt, straight, 0, 12, dtype)
    opt, params = getattr(fusedopt, cls_name)(**kwargs), make_params(dtype)
    run(opt, params, 0, 5, dtype)
    fusedopt.save(tmp_path / f"ckpt.{ext}", opt, params)
    del opt, params
    opt, params = fusedopt.load(tmp_path / f"ckpt.{ext}")
    updates = 5 // (kwargs.get("gradient_accumulation_steps") or 1)
    assert type(opt).__name__ == cls_name and opt.iterations == updates
    run(opt, params, 5, 12, dtype)
    assert_same(snapshot(opt, params), snapshot(straight_opt, straight))


def test_config_schedule_and_counters_survive(tmp_path):
    schedule = fusedopt.schedules.PiecewiseConstantDecay([3, 6], [0.1, 0.01, 0.001])
    opt = fusedopt.Nadam(learning_rate=schedule, global_clipnorm=1.0, skip_nonfinite=True,
                         weight_decay=0.01)
    params = make_params()
    run(opt, params, 0, 4)
    opt.apply(np.full(params.size, np.nan), params)
    fusedopt.save(tmp_path / "c.npz", opt, params)
    loaded, _ = fusedopt.load(tmp_path / "c.npz")
    assert loaded.get_config() == opt.get_config()
    assert (loaded.iterations, loaded.skipped_steps, loaded.last_step_skipped) == (4, 1, True)


def test_load_into_existing_objects(tmp_path):
    opt, params = fusedopt.Adam(), make_params()
    run(opt, params, 0, 3)
    fusedopt.save(tmp_path / "c.npz", opt, params)
    target_opt, target_params = fusedopt.Adam(), make_params(seed=9)
    out_opt, out_params = fusedopt.load(tmp_path / "c.npz", optimizer=target_opt,
                                        params=target_params)
    assert out_opt is target_opt and out_params is target_params
    assert_same(snapshot(target_opt, target_params), snapshot(opt, params))


@CONTAINERS
def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, ext):
    opt, params = fusedopt.Adam(), make_params()
    run(opt, params, 0, 2)
    path = tmp_path / f"c.{ext}"
    fusedopt.save(path, opt, params)
    before = path.read_bytes()
    run(opt, params, 2, 4)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(fusedopt.checkpoint.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        fusedopt.save(path, opt, params)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [f"c.{ext}"]  # no temporary file left behind
    assert fusedopt.load(path)[0].iterations == 2


KILL_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, fusedopt
    path, steps = sys.argv[1], int(sys.argv[2])
    params = fusedopt.FlatBuffer.from_arrays([np.linspace(-1, 1, 400_000), np.ones(7)])
    opt = fusedopt.Adam(learning_rate=0.01, clipnorm=1.0)
    print("ready", flush=True)
    for step in range(steps):
        opt.apply(np.random.default_rng(1000 + step).normal(size=params.size), params)
        fusedopt.save(path, opt, params)
""")


@pytest.mark.parametrize("delay", [0.3, 0.7, 1.1])
def test_kill_during_training_then_resume_exactly(tmp_path, delay):
    """SIGKILL a process that saves after every step, at an arbitrary moment (often
    mid-save): the checkpoint on disk is whole and resuming from it reproduces the
    uninterrupted run bit for bit."""
    steps = 400
    script, path = tmp_path / "train.py", tmp_path / "ckpt.safetensors"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(path), str(steps)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 60
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    opt, params = fusedopt.load(path)
    done = opt.iterations
    assert 0 < done < steps, "the process should have been killed mid-run"
    for step in range(done, done + 3):
        opt.apply(np.random.default_rng(1000 + step).normal(size=params.size), params)
    ref_params = fusedopt.FlatBuffer.from_arrays([np.linspace(-1, 1, 400_000), np.ones(7)])
    ref = fusedopt.Adam(learning_rate=0.01, clipnorm=1.0)
    for step in range(done + 3):
        ref.apply(np.random.default_rng(1000 + step).normal(size=params.size), ref_params)
    assert_same(snapshot(opt, params), snapshot(ref, ref_params))


def corrupt_variants(data):
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    return {
        "truncated-half": data[: len(data) // 2],
        "truncated-tail": data[:-10],
        "empty": b"",
        "flipped-byte": bytes(flipped),
        "not-a-zip": b"hello, I am not a checkpoint" * 10,
        "first-byte": bytes([data[0] ^ 0x01]) + data[1:],  # the header length or zip magic
        # safetensors only: a zip reader rightly ignores its local headers' extra fields
        # (byte 40 of an .npz) and data after the archive; the checksums guard the content.
        "byte-40": data[:40] + bytes([data[40] ^ 0x20]) + data[41:],  # in the JSON header
        "appended": data + b"\0" * 8,
    }


CORRUPTIONS = [(ext, variant) for ext in ("safetensors", "npz")
               for variant in corrupt_variants(b"x" * 100)
               if ext == "safetensors" or variant not in ("byte-40", "appended")]


@pytest.mark.parametrize("ext, variant", CORRUPTIONS)
def test_corrupt_files_are_refused_and_nothing_changes(tmp_path, variant, ext):
    opt, params = fusedopt.Adam(), make_params()
    run(opt, params, 0, 2)
    path = tmp_path / f"c.{ext}"
    fusedopt.save(path, opt, params)
    path.write_bytes(corrupt_variants(path.read_bytes())[variant])
    target_opt, target_params = fusedopt.Adam(), make_params(seed=5)
    run(target_opt, target_params, 0, 1)
    before = snapshot(target_opt, target_params)
    with pytest.raises(ValueError, match="checkpoint|corrupt|truncated"):
        fusedopt.load(path, optimizer=target_opt, params=target_params)
    assert_same(snapshot(target_opt, target_params), before)


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, params=np.ones(3))
    with pytest.raises(ValueError, match="not a fusedopt checkpoint"):
        fusedopt.load(path)
    path = tmp_path / "other.safetensors"
    with open(path, "wb") as f:
        fusedopt._safetensors.write(f, {"params": np.ones(3)}, {"format": "pt"})
    with pytest.raises(ValueError, match="not a fusedopt checkpoint"):
        fusedopt.load(path)


@CONTAINERS
@pytest.mark.parametrize("mismatch", ["optimizer", "layout", "dtype", "slots"])
def test_mismatched_checkpoint_is_refused_and_nothing_changes(tmp_path, mismatch, ext):
    opt, params = fusedopt.Adam(), make_params()
    run(opt, params, 0, 2)
    path = tmp_path / f"c.{ext}"
    fusedopt.save(path, opt, params)
    target_opt = {"optimizer": fusedopt.SGD(momentum=0.5),
                  "slots": fusedopt.Adam(amsgrad=True)}.get(mismatch, fusedopt.Adam())
    if mismatch == "layout":
        target_params = fusedopt.FlatBuffer.from_arrays([np.zeros(3), np.zeros(4)])
    elif mismatch == "dtype":
        target_params = make_params(np.float32)
    else:
        target_params = make_params(seed=3)
    target_opt.apply(target_params.full_like(0.1), target_params)
    before = snapshot(target_opt, target_params)
    with pytest.raises(ValueError):
        fusedopt.load(path, optimizer=target_opt, params=target_params)
    assert_same(snapshot(target_opt, target_params), before)


def test_callable_learning_rate_cannot_be_saved(tmp_path):
    opt, params = fusedopt.SGD(learning_rate=lambda: 0.1), make_params()
    with pytest.raises(ValueError, match="learning_rate"):
        fusedopt.save(tmp_path / "c.safetensors", opt, params)
    assert not os.listdir(tmp_path)


def test_saving_into_a_missing_folder_names_the_users_path(tmp_path):
    opt, params = fusedopt.Adam(), make_params()
    path = tmp_path / "nodir" / "x.npz"
    with pytest.raises(FileNotFoundError) as info:
        fusedopt.save(path, opt, params)
    assert info.value.filename == str(path) and "nodir" in str(info.value)
    assert ".tmp" not in str(info.value) and ".fusedopt-" not in str(info.value)
    assert not opt.built  # refused before anything was built


def test_a_failed_write_names_the_users_path_and_leaves_no_temporary(tmp_path, monkeypatch):
    import errno

    def disk_full(file, **arrays):
        raise OSError(errno.ENOSPC, "No space left on device", file.name)

    monkeypatch.setattr(fusedopt.checkpoint.np, "savez", disk_full)
    path = tmp_path / "c.npz"
    with pytest.raises(OSError) as info:
        fusedopt.save(path, fusedopt.Adam(), make_params())
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert "No space left" in str(info.value) and ".fusedopt-" not in str(info.value)
    assert os.listdir(tmp_path) == []

