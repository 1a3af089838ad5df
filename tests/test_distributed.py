"""fusedopt.distributed on gloo: 1, 2 and 3 ranks (3: uneven shards, segments that
straddle shard boundaries) against a single process, checkpoints resharded 2 -> 3 and
2 -> 1 process, and bad input refused on every rank.

Each world size is one launch of tests/distributed_worker.py per rank (127.0.0.1 only,
a 30 s collective timeout, the launch killed after LAUNCH_TIMEOUT); all scenarios of a
world size run in that one launch, so torch is imported once per rank.

Bitwise where the order of every sum is fixed: each rank's gradients are multiples of
1/64 (times powers of two), so their sum over ranks is exact in any order and the
mean is one rounding, as in the single process. Not bitwise: global_clipnorm and
clipnorm on more than one rank, where the sum of squares is taken per shard (and per
piece of a segment cut by a shard boundary) and the partial sums added in rank order,
not in the single process's order: those are held to CLIP_RTOL.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

import fusedopt  # noqa: E402
from fusedopt import distributed  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import CASES, COMBINED_CASES  # noqa: E402
from dist_common import STEPS, make_optimizer, make_params, single_process  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LAUNCH_TIMEOUT = 90
CLIP_RTOL = 2e-6  # relative, float32 params after 10 steps (observed: see README)

SCHEDULE = {"class_name": "ExponentialDecay",
            "config": {"initial_learning_rate": 0.05, "decay_steps": 3, "decay_rate": 0.5}}


def shardable(case):
    """What ShardedOptimizer carries (whole-variable rules, EMA and gradient
    accumulation are refused: test_what_the_sharded_step_does_not_carry_is_refused)."""
    _, cls_name, kwargs = case
    opt = getattr(fusedopt, cls_name)(**kwargs)
    return not (opt.whole_variable or opt.use_ema or opt.gradient_accumulation_steps)


def cases(world=2):
    """Every CASES entry on the mixed layout (on 3 ranks, where 3 processes share this
    machine's cores and each collective is slow, the per-option cases of three
    optimizers only, to bound the runtime), plus schedules, skip_nonfinite with an inf
    on one rank only, float64, another layout and already-reduced gradients."""
    chosen = CASES if world < 3 else [
        c for c in CASES if "+" not in c[0] or c[1] in ("Adam", "SGD", "Adagrad")
        or c in COMBINED_CASES]
    chosen = [c for c in chosen if shardable(c)]
    out = [{"id": cid, "cls": cls, "kwargs": kwargs} for cid, cls, kwargs in chosen]
    out += [
        {"id": "adam-schedule", "cls": "Adam", "kwargs": {"learning_rate": SCHEDULE}},
        {"id": "sgd-schedule-clipnorm", "cls": "SGD",
         "kwargs": {"learning_rate": SCHEDULE, "momentum": 0.9, "clipnorm": 0.5}},
        {"id": "adam-skip-inf-rank1", "cls": "Adam", "kwargs": {"skip_nonfinite": True},
         "inf": [3, 1]},
        {"id": "adam-skip-global-inf-rank1", "cls": "Adam",
         "kwargs": {"skip_nonfinite": True, "global_clipnorm": 1.0, "loss_scale_factor": 2.0},
         "inf": [4, 1]},
        {"id": "adam-inf-no-skip", "cls": "Adam", "kwargs": {}, "inf": [2, 1]},
        {"id": "nadam-float64-odd", "cls": "Nadam", "kwargs": {}, "dtype": "float64",
         "layout": "odd"},
        {"id": "adamw-global-odd", "cls": "AdamW", "kwargs": {"global_clipnorm": 1.0},
         "layout": "odd"},
        {"id": "adam-reduced", "cls": "Adam", "kwargs": {"clipnorm": 0.5}, "reduced": True},
    ]
    return out


def clipped(case, world):
    kw = case["kwargs"]
    return world > 1 and bool(kw.get("clipnorm") or kw.get("global_clipnorm"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world, job, out):
    """Run the worker on `world` ranks; (arrays, report) per rank. Kills every rank
    and fails if any runs past LAUNCH_TIMEOUT or exits non-zero."""
    os.makedirs(out, exist_ok=True)
    job_path = os.path.join(out, "job.json")
    with open(job_path, "w") as f:
        json.dump(job, f)
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "distributed_worker.py"),
                               str(r), str(world), str(port), job_path, out],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
             for r in range(world)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=LAUNCH_TIMEOUT)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} of {world} failed:\n{outputs[r][-4000:]}"
    results = []
    for r in range(world):
        with np.load(os.path.join(out, f"rank-{r}.npz")) as z:
            arrays = {k: z[k] for k in z.files}
        with open(os.path.join(out, f"rank-{r}.json")) as f:
            results.append((arrays, json.load(f)))
    return results


def check_against_single_process(case, world, results):
    opt, params = single_process(case, world)
    for r, (arrays, report) in enumerate(results):
        got = arrays[case["id"]]
        np.testing.assert_array_equal(got, results[0][0][case["id"]],
                                      err_msg=f"{case['id']}: rank {r} differs from rank 0")
        assert report[case["id"]]["iterations"] == opt.iterations, case["id"]
        assert report[case["id"]]["skipped_steps"] == opt.skipped_steps, case["id"]
        if clipped(case, world):
            np.testing.assert_allclose(got, params.data, rtol=CLIP_RTOL, atol=CLIP_RTOL,
                                       err_msg=f"{case['id']} on {world} ranks")
        else:
            np.testing.assert_array_equal(got, params.data,
                                          err_msg=f"{case['id']} on {world} ranks")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every world size's launch, in order: 1, 2 (which saves checkpoints) and 3
    (which resumes them and meets the broken ones)."""
    base = tmp_path_factory.mktemp("dist")
    ckpt = {name: str(base / name) for name in ("a", "b", "missing", "mixed")}
    for path in ckpt.values():
        os.makedirs(path)
    adam = {"cls": "Adam", "kwargs": {"learning_rate": 0.01}}
    out = {}
    out[1] = launch(1, cases(1), str(base / "w1"))
    job2 = cases(2) + [
        dict(adam, id="save-a", steps=5, save=ckpt["a"]),
        dict(adam, id="save-b", steps=5, save=ckpt["b"], seed=1),
    ]
    out[2] = launch(2, job2, str(base / "w2"))
    # A shard gone, and a shard from another run beside a's manifest.
    for name in os.listdir(ckpt["a"]):
        shutil.copy(os.path.join(ckpt["a"], name), ckpt["missing"])
        shutil.copy(os.path.join(ckpt["a"], name), ckpt["mixed"])
    shard1 = "shard-00001-of-00002.safetensors"
    os.unlink(os.path.join(ckpt["missing"], shard1))
    shutil.copy(os.path.join(ckpt["b"], shard1), ckpt["mixed"])
    job3 = cases(3) + [
        dict(adam, id="resume-a", start=5, steps=5, load=ckpt["a"]),
        dict(adam, id="bad-missing", bad=True, load=ckpt["missing"]),
        dict(adam, id="bad-mixed", bad=True, load=ckpt["mixed"]),
        dict(adam, id="bad-layout", bad=True, layout_per_rank=True),
        dict(adam, id="bad-dtype", bad=True, dtype_per_rank=True),
    ]
    out[3] = launch(3, job3, str(base / "w3"))
    return out, ckpt, adam


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_case_matches_a_single_process(runs, world):
    results = runs[0][world]
    for case in cases(world):
        check_against_single_process(case, world, results)


def test_skip_nonfinite_on_one_rank_skips_on_every_rank(runs):
    for world in (2, 3):
        for arrays, report in runs[0][world]:
            assert report["adam-skip-inf-rank1"]["skipped_steps"] == 1
            assert report["adam-skip-inf-rank1"]["iterations"] == STEPS - 1


def test_state_is_sharded(runs):
    for world in (1, 2, 3):
        sizes = [report["adam"]["state_nbytes"] for _, report in runs[0][world]]
        total = 2 * 25 * 4  # Adam: m and v over the mixed layout's 25 float32 elements
        assert sum(sizes) == total
        assert max(sizes) - min(sizes) <= 2 * 4  # shards differ by at most one element


def test_checkpoint_saved_on_2_ranks_resumes_on_3_bitwise(runs):
    results, ckpt, adam = runs
    case = dict(adam, id="resume-a")
    # Steps 0-4 on 2 ranks' gradients, then 5-9 on 3 ranks': the same in one process.
    opt, params = single_process(case, 2, steps=5)
    opt, params = single_process(case, 3, steps=5, opt=opt, params=params, start=5)
    for arrays, report in results[3]:
        np.testing.assert_array_equal(arrays["resume-a"], params.data)
        assert report["resume-a"]["iterations"] == 10


def test_checkpoint_saved_on_2_ranks_loads_into_one_process_bitwise(runs):
    results, ckpt, adam = runs
    opt, params = single_process(dict(adam, id="save-a"), 2, steps=5)
    loaded, loaded_params = distributed.load_unsharded(ckpt["a"])
    np.testing.assert_array_equal(loaded_params.data, params.data)
    assert loaded.iterations == 5
    for name, slot in opt.slots().items():
        np.testing.assert_array_equal(loaded.slots()[name], slot)
    np.testing.assert_array_equal(results[2][0][0]["save-a"], params.data)


@pytest.mark.parametrize("scenario, words", [
    ("bad-missing", "missing"),
    ("bad-mixed", "another run"),
    ("bad-layout", "differ from rank 0"),
    ("bad-dtype", "differ from rank 0"),
])
def test_bad_input_is_refused_on_every_rank(runs, scenario, words):
    for r, (_, report) in enumerate(runs[0][3]):
        got = report[scenario]
        assert got["error"] == "ValueError", (scenario, r, got)
        assert words in got["message"], (scenario, r, got["message"])
        assert got["unchanged"], (scenario, r)


def test_no_process_group_is_refused():
    assert not dist.is_initialized()
    params = make_params({"cls": "Adam"})
    before = params.data.copy()
    with pytest.raises(ValueError, match="`group`.*not initialised"):
        distributed.ShardedOptimizer(make_optimizer({"cls": "Adam"}), params)
    np.testing.assert_array_equal(params.data, before)


def test_bad_arguments_are_refused_before_any_collective():
    params = make_params({"cls": "Adam"})
    with pytest.raises(TypeError, match="`opt`"):
        distributed.ShardedOptimizer("adam", params)
    with pytest.raises(TypeError, match="`params`"):
        distributed.ShardedOptimizer(fusedopt.Adam(), params.data)
    used = fusedopt.Adam()
    used.apply(params.zeros_like(), params)
    with pytest.raises(ValueError, match="already has state"):
        distributed.ShardedOptimizer(used, params)


@pytest.mark.parametrize("opt, words", [
    (lambda: fusedopt.Lamb(), "whole variables"), (lambda: fusedopt.Muon(), "whole variables"),
    (lambda: fusedopt.LossScaleOptimizer(fusedopt.Adam()), "cannot be sharded"),
    (lambda: fusedopt.Adam(use_ema=True), "use_ema"),
    (lambda: fusedopt.SGD(gradient_accumulation_steps=2), "gradient_accumulation_steps"),
], ids=["lamb", "muon", "loss-scale", "ema", "accumulation"])
def test_what_the_sharded_step_does_not_carry_is_refused(opt, words):
    params = make_params({"cls": "Adam"})
    with pytest.raises(ValueError, match=words):
        distributed.ShardedOptimizer(opt(), params)


@pytest.mark.parametrize("kwargs, words", [
    ({"master_weights": True}, "`master_weights` .mixed precision"),
    ({"state_dtype": "bfloat16"}, "`state_dtype` .mixed precision"),
    ({"stochastic_rounding": True}, "`stochastic_rounding` .mixed precision"),
    ({}, "bfloat16 buffers .mixed precision"),
], ids=["master", "state-dtype", "stochastic", "bf16-params"])
def test_mixed_precision_is_refused_before_any_collective(kwargs, words):
    params = make_params({"cls": "Adam"})
    if not kwargs:
        params = fusedopt.FlatBuffer.from_arrays(params.views(), dtype="bfloat16")
    with pytest.raises(ValueError, match=words):
        distributed.ShardedOptimizer(fusedopt.Adam(**kwargs), params)


def test_shards_are_contiguous_and_uneven_by_at_most_one():
    for size in (3, 25, 176):
        for world in (1, 2, 3):
            bounds = distributed.shard_bounds(size, world)
            assert bounds[0][0] == 0 and bounds[-1][1] == size
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1


def test_clip_factors_are_the_references():
    from fusedopt import reference

    sums = np.array([0.0, 1e-300, 0.25, 1.0, 4.0, 1e300, np.inf, np.nan])
    for clip in (0.5, 1.0, 2.0):
        got = distributed.clipnorm_factors(np, sums, clip)
        want = [reference.clipnorm_factor(s, clip) for s in sums]
        np.testing.assert_array_equal(got, want)
        got = distributed.global_clipnorm_factors(np, sums, clip)
        want = [reference.global_clipnorm_factor(s, clip) for s in sums]
        np.testing.assert_array_equal(got, want)


def test_import_fusedopt_distributed_does_not_import_torch():
    code = ("import sys, fusedopt, fusedopt.distributed; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
