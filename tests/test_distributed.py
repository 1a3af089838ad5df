"""fusedopt.distributed on gloo: every optimizer and option of CASES (and the cases
below: schedules, skip_nonfinite with an inf on one rank only, EMA, gradient
accumulation, LossScaleOptimizer, per-segment attributes, whole-variable rules) on 1, 2
and 3 ranks (3: uneven shards, segments that straddle shard boundaries, whole-variable
shards as uneven as the segments) against a single process fed the mean gradient, 10 steps;
checkpoints saved on 2 ranks, resumed on 3, saved again and loaded into one process;
bad input refused on every rank.

One launch of tests/distributed_worker.py on three ranks (127.0.0.1 only), torch
imported once per rank: a phase per world size, each in a process group of ranks
0..w-1 (`group=`), every collective bounded by that group's 30 s timeout, the launch
killed after the phases' bound (phase_seconds()); every case of a world size runs in
that group, one after the other, and reports on its own
(test_case_matches_a_single_process is one test per world size and case).

Bitwise, wherever the order of every sum is fixed: each rank's gradients are
multiples of 1/64 (times powers of two), so their sum over ranks is exact in any order
and the mean is one rounding, as in the single process. That covers every rule and
option, EMA, accumulation, the loss scale, skip_nonfinite, and clipnorm where no
segment straddles a shard boundary (whole-variable rules clip whole segments in the
shard's optimizer). Not bitwise (`exact()` says which): global_clipnorm on more than
one rank, and clipnorm on more than one rank when a segment straddles a boundary,
where the float64 sum of squares is taken per shard (per piece of a cut segment) and
the partial sums added in rank order, not in the single process's order. Those are
held to CLIP_RTOL relative (and absolute) on the float32 params after 10 steps.
"""

import json
import os
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
from conftest import CASES  # noqa: E402
from dist_common import (STEPS, LAYOUTS, make_optimizer, make_params,  # noqa: E402
                         single_process)

HERE = os.path.dirname(os.path.abspath(__file__))
CLIP_RTOL = 2e-6  # relative and absolute, float32 params after 10 steps (see exact())

SCHEDULE = {"class_name": "ExponentialDecay",
            "config": {"initial_learning_rate": 0.05, "decay_steps": 3, "decay_rate": 0.5}}
EMA = {"use_ema": True, "ema_momentum": 0.8, "ema_overwrite_frequency": 2}
MATRIX_NAMES = ["w0", "b0", "embedding/w1", "w2", "b2"]

EXTRA_CASES = [
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
    # EMA and gradient accumulation, carried by the shard's optimizer.
    {"id": "adam-ema-swap", "cls": "Adam", "kwargs": dict(EMA), "ema_swap": True},
    {"id": "lamb-ema-swap-odd", "cls": "Lamb", "kwargs": dict(EMA, learning_rate=0.01),
     "layout": "odd", "ema_swap": True},
    {"id": "adam-ema-accumulate-skip-inf-rank1", "cls": "Adam",
     "kwargs": dict(EMA, gradient_accumulation_steps=3, skip_nonfinite=True,
                    loss_scale_factor=4.0, weight_decay=0.1), "inf": [4, 1]},
    {"id": "sgd-accumulate-schedule-reduced", "cls": "SGD",
     "kwargs": {"learning_rate": SCHEDULE, "momentum": 0.9, "gradient_accumulation_steps": 2},
     "reduced": True},
    {"id": "adafactor-accumulate-clipnorm-odd", "cls": "Adafactor",
     "kwargs": {"gradient_accumulation_steps": 2, "clipnorm": 0.5}, "layout": "odd"},
    # LossScaleOptimizer: the found-inf decision shared by every rank.
    {"id": "lso-adam-inf-rank1", "cls": "Adam", "kwargs": {},
     "loss_scale": {"initial_scale": 8.0, "dynamic_growth_steps": 2}, "inf": [3, 1]},
    {"id": "lso-sgd-global-clipnorm-inf-rank0", "cls": "SGD",
     "kwargs": {"momentum": 0.9, "global_clipnorm": 0.5},
     "loss_scale": {"initial_scale": 0.5, "dynamic_growth_steps": 3}, "inf": [5, 0]},
    # On the host executor: a single process keeps the scale in its step state
    # (kernels/step.cuh), the sharded step beside a plain shard optimizer; they agree.
    {"id": "lso-adam-ema-accumulate-host-inf-rank1", "cls": "Adam",
     "kwargs": dict(EMA, gradient_accumulation_steps=2, weight_decay=0.1),
     "loss_scale": {"initial_scale": 4.0, "dynamic_growth_steps": 2}, "inf": [3, 1],
     "executor": "host"},
    # A scale that underflows to 0 (the smallest float32 subnormal, halved) skips every
    # later step, in one process and sharded alike.
    {"id": "lso-sgd-underflow-host", "cls": "SGD", "kwargs": {"momentum": 0.5},
     "loss_scale": {"initial_scale": 1e-45, "dynamic_growth_steps": 100}, "inf": [0, 0],
     "executor": "host"},
    {"id": "lso-lamb-accumulate-ema-odd", "cls": "Lamb",
     "kwargs": dict(EMA, gradient_accumulation_steps=2, learning_rate=0.01),
     "loss_scale": {"initial_scale": 2.0, "dynamic_growth_steps": 1}, "inf": [2, 2],
     "layout": "odd"},
    # Whole-variable rules: shards at segment boundaries, per-segment names and
    # attributes mapped to them.
    {"id": "adafactor-skip-inf-odd", "cls": "Adafactor", "kwargs": {"skip_nonfinite": True},
     "inf": [3, 1], "layout": "odd"},
    {"id": "muon-global-clipnorm-matrices", "cls": "Muon",
     "kwargs": {"learning_rate": 0.01, "global_clipnorm": 1.0}, "layout": "matrices"},
    {"id": "muon-buffer-names-matrices", "cls": "Muon",
     "kwargs": {"learning_rate": 0.01, "exclude_layers": ["w2"], "exclude_embeddings": False},
     "layout": "matrices", "names": MATRIX_NAMES},
    {"id": "muon-segment-names-matrices", "cls": "Muon",
     "kwargs": {"learning_rate": 0.01, "segment_names": MATRIX_NAMES},
     "layout": "matrices"},
    {"id": "lamb-segment-attributes-matrices", "cls": "Lamb",
     "kwargs": {"learning_rate": 0.01, "weight_decay": 0.1, "segment_attributes": {
         "lr_multipliers": [1.0, 0.5, 2.0, 0.0, 1.0], "decay": [True, False, True, True, False]}},
     "layout": "matrices"},
    {"id": "adamw-segment-attributes-names", "cls": "AdamW",
     "kwargs": {"segment_attributes": {"lr_multipliers": [2.0, 1.0, 0.5, 1.0, 1.0],
                                       "exclude_from_weight_decay": {"var_names": ["^b"]}}},
     "layout": "matrices", "names": MATRIX_NAMES},
]


def carried(cls, kwargs):
    """Whether ShardedOptimizer takes the case (it refuses, by name and before any
    collective, gradient accumulation with a norm clip across ranks)."""
    try:
        distributed._check_carried(getattr(fusedopt, cls)(**kwargs))
    except ValueError:
        return False
    return True


def cases(world):
    """Every CASES entry the sharded step carries on the mixed layout, and
    EXTRA_CASES; the same on every world size."""
    out = [{"id": cid, "cls": cls, "kwargs": kwargs} for cid, cls, kwargs in CASES
           if carried(cls, kwargs)]
    return out + [dict(c) for c in EXTRA_CASES]


def case_by_id(case_id):
    return next(c for c in cases(1) if c["id"] == case_id)


def _options(case):
    return dict(case.get("kwargs", {}))


def exact(case, world):
    """Whether the sharded run must equal the single process bit for bit (see the
    module docstring); else it is held to CLIP_RTOL."""
    kw = _options(case)
    if world == 1 or not (kw.get("clipnorm") or kw.get("global_clipnorm")):
        return True
    if kw.get("global_clipnorm"):
        return False
    if getattr(fusedopt, case["cls"]).whole_variable:
        return True  # whole segments: the shard's optimizer clips them itself
    params = make_params(case)
    for lo, hi in distributed.shard_bounds(params.size, world):
        for a, b in zip(params.offsets[:-1], params.offsets[1:]):
            if a < b and (a < lo < b or a < hi < b):
                return False  # a segment cut by a shard boundary
    return True


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def phase_seconds(world, cases):
    """A bound on one phase: about 0.4 s a case on 3 ranks sharing 2 cores, with room
    for a loaded machine; a hang is cut off by the 30 s collective timeout first."""
    return 30 + 1.5 * world * len(cases)


def launch(phases, out):
    """Run the worker on as many ranks as the largest phase needs, once for every
    phase; {world: [(arrays, report) per rank]}. Kills every rank and fails if any
    runs past the phases' time or exits non-zero."""
    os.makedirs(out, exist_ok=True)
    world = max(p.get("world", 1) for p in phases)
    budget = sum(phase_seconds(p["world"], p["cases"]) for p in phases if "world" in p)
    job_path = os.path.join(out, "job.json")
    with open(job_path, "w") as f:
        json.dump({"phases": phases, "wait": budget}, f)
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "distributed_worker.py"),
                               str(r), str(world), str(port), job_path, out],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
             for r in range(world)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=60 + budget)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} of {world} failed:\n{outputs[r][-4000:]}"
    results = {}
    for w in sorted({p["world"] for p in phases if "world" in p}):
        results[w] = []
        for r in range(w):
            with np.load(os.path.join(out, f"w{w}-rank-{r}.npz")) as z:
                arrays = {k: z[k] for k in z.files}
            with open(os.path.join(out, f"w{w}-rank-{r}.json")) as f:
                results[w].append((arrays, json.load(f)))
    return results


def reported(results, case_id):
    """Each rank's (arrays, report) of one case, failing with its error if it raised."""
    for r, (_, report) in enumerate(results):
        got = report[case_id]
        assert "failed" not in got, f"{case_id} on rank {r}: {got['failed']}\n" \
            f"{got.get('traceback', '')}"
    return [(arrays, report[case_id]) for arrays, report in results]


def assert_params(got, want, case, world, what=""):
    msg = f"{case['id']}{what} on {world} ranks"
    if exact(case, world):
        np.testing.assert_array_equal(got, want, err_msg=msg)
    else:
        np.testing.assert_allclose(got, want, rtol=CLIP_RTOL, atol=CLIP_RTOL, err_msg=msg)


# Checkpoint chains: saved on 2 ranks after 5 steps, resumed on 3 for 3 more and saved
# again, then loaded into one process; each against the single process, bitwise.
CHAINS = {
    "adam": {"cls": "Adam", "kwargs": {"learning_rate": 0.01}},
    "ema-accumulate": {"cls": "Adam", "kwargs": dict(EMA, gradient_accumulation_steps=3,
                                                     skip_nonfinite=True),
                       "inf": [1, 1]},
    "adafactor-odd": {"cls": "Adafactor", "kwargs": {"learning_rate": 0.05},
                      "layout": "odd"},
    "muon-names": {"cls": "Muon", "kwargs": {"learning_rate": 0.01}, "layout": "matrices",
                   "names": MATRIX_NAMES},
    "lamb-clipnorm": {"cls": "Lamb", "kwargs": {"clipnorm": 0.5, "learning_rate": 0.01}},
    "loss-scale": {"cls": "Adam", "kwargs": {"learning_rate": 0.01},
                   "loss_scale": {"initial_scale": 8.0, "dynamic_growth_steps": 2},
                   "inf": [2, 0]},
}
SAVED_STEPS, RESUMED_STEPS = 5, 3
MANIFEST, SHARD1 = distributed.MANIFEST, "shard-00001-of-00002.safetensors"
BAD = {
    "bad-missing": "missing", "bad-mixed": "another run", "bad-layout": "differ from rank 0",
    "bad-dtype": "differ from rank 0", "bad-slots": "slots", "bad-optimizer": "optimizer",
    "bad-rule-kind": "optimizer", "bad-too-few-segments": "fewer than the 3 ranks",
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One launch of three ranks: every case on rank 0 alone, then on ranks 0-1 (which
    also save checkpoints), then on all three (which resume and save them again, and
    meet the broken ones), each phase in its own process group."""
    base = tmp_path_factory.mktemp("dist")
    names = list(CHAINS) + [f"{n}-3" for n in CHAINS] + ["adam-b", "missing", "mixed"]
    ckpt = {name: str(base / name) for name in names}
    for path in ckpt.values():
        os.makedirs(path)
    job2 = cases(2) + [dict(c, id=f"save-{n}", steps=SAVED_STEPS, save=ckpt[n])
                       for n, c in CHAINS.items()]
    job2.append(dict(CHAINS["adam"], id="save-adam-b", steps=SAVED_STEPS,
                     save=ckpt["adam-b"], seed=1))
    # A shard gone, and a shard from another run beside adam's manifest.
    files = [MANIFEST, "shard-00000-of-00002.safetensors", SHARD1]
    damage = {
        "copy": [(os.path.join(ckpt["adam"], f), os.path.join(ckpt[d], f))
                 for f in files for d in ("missing", "mixed")]
        + [(os.path.join(ckpt["adam-b"], SHARD1), os.path.join(ckpt["mixed"], SHARD1))],
        "remove": [os.path.join(ckpt["missing"], SHARD1)],
    }
    adam = CHAINS["adam"]
    job3 = cases(3) + [
        dict(c, id=f"resume-{n}", start=SAVED_STEPS, steps=RESUMED_STEPS, load=ckpt[n],
             save=ckpt[f"{n}-3"]) for n, c in CHAINS.items()]
    job3 += [
        dict(adam, id="bad-missing", bad=True, load=ckpt["missing"]),
        dict(adam, id="bad-mixed", bad=True, load=ckpt["mixed"]),
        dict(adam, id="bad-layout", bad=True, layout_per_rank=True),
        dict(adam, id="bad-dtype", bad=True, dtype_per_rank=True),
        # EMA and accumulator slots into an Adam that keeps neither.
        dict(adam, id="bad-slots", bad=True, load=ckpt["ema-accumulate"]),
        # A LossScaleOptimizer's checkpoint into a plain Adam.
        dict(adam, id="bad-optimizer", bad=True, load=ckpt["loss-scale"]),
        # Whole segments (Lamb) into an elementwise rule's shards of the same layout.
        dict(adam, id="bad-rule-kind", bad=True, load=ckpt["lamb-clipnorm"]),
        # A whole-variable rule with one variable for three ranks.
        {"id": "bad-too-few-segments", "cls": "Lamb", "kwargs": {}, "layout": "single",
         "bad": True},
    ]
    phases = [{"world": 1, "cases": cases(1)}, {"world": 2, "cases": job2}, damage,
              {"world": 3, "cases": job3}]
    return launch(phases, str(base / "out")), ckpt


WORLD_CASES = [(w, c["id"]) for w in (1, 2, 3) for c in cases(w)]


@pytest.mark.parametrize("world, case_id", WORLD_CASES,
                         ids=[f"{w}-{c}" for w, c in WORLD_CASES])
def test_case_matches_a_single_process(runs, world, case_id):
    case = case_by_id(case_id)
    trace = []
    opt, params = single_process(case, world, trace=trace)
    got = reported(runs[0][world], case_id)
    for r, (arrays, report) in enumerate(got):
        # After every step, not only the last: what each rank's next forward pass sees
        # (an all-gather left out after a call that changed params shows only here).
        np.testing.assert_array_equal(arrays[case_id + "@trace"],
                                      got[0][0][case_id + "@trace"],
                                      err_msg=f"{case_id}: rank {r} differs from rank 0")
        np.testing.assert_array_equal(arrays[case_id], got[0][0][case_id])
        assert report["iterations"] == opt.iterations, (case_id, r)
        assert report["skipped_steps"] == opt.skipped_steps, (case_id, r)
        if "loss_scale" in case:
            assert report["dynamic_scale"] == opt.dynamic_scale, (case_id, r)
            assert report["step_counter"] == opt.step_counter, (case_id, r)
    assert_params(got[0][0][case_id + "@trace"], np.stack(trace), case, world, "@trace")
    assert_params(got[0][0][case_id], params.data, case, world)
    if case.get("ema_swap"):
        opt.swap_ema_weights(params)
        assert_params(got[0][0][case_id + "@swapped"], params.data, case, world, "@swapped")
        assert "swap them back" in got[0][1]["refused_while_swapped"]
        opt.swap_ema_weights(params)
        assert_params(got[0][0][case_id + "@back"], params.data, case, world, "@back")
        opt.finalize_variable_values(params)
        assert_params(got[0][0][case_id + "@final"], params.data, case, world, "@final")


def test_every_case_of_conftest_runs_on_every_world_size():
    """...but those that accumulate under a norm clip (refused, see below)."""
    refused = {c[0] for c in CASES if not carried(c[1], c[2])}
    assert refused and all(c[2].get("gradient_accumulation_steps") and
                           (c[2].get("clipnorm") or c[2].get("global_clipnorm"))
                           for c in CASES if c[0] in refused)
    ids = {c[0] for c in CASES} - refused
    for world in (1, 2, 3):
        assert ids <= {c["id"] for c in cases(world)}


def test_skip_nonfinite_on_one_rank_skips_on_every_rank(runs):
    for world in (2, 3):
        for _, report in reported(runs[0][world], "adam-skip-inf-rank1"):
            assert report["skipped_steps"] == 1
            assert report["iterations"] == STEPS - 1


def test_loss_scale_halves_on_every_rank_when_one_rank_overflows(runs):
    # Initial scale 8, doubled after 2 finite steps in a row, an inf on rank 1 only at
    # step 3: 16 after step 1, 8 after step 3 (skipped), then 16, 32, 64.
    for world in (2, 3):
        for _, report in reported(runs[0][world], "lso-adam-inf-rank1"):
            assert report["skipped_steps"] == 1
            assert report["dynamic_scale"] == 64.0


def test_state_is_sharded(runs):
    for world in (1, 2, 3):
        sizes = [report["state_nbytes"] for _, report in reported(runs[0][world], "adam")]
        total = 2 * 25 * 4  # Adam: m and v over the mixed layout's 25 float32 elements
        assert sum(sizes) == total
        assert max(sizes) - min(sizes) <= 2 * 4  # shards differ by at most one element


def test_whole_variable_rules_shard_at_segment_boundaries(runs):
    offsets = make_params({"layout": "odd"}).offsets
    for world in (1, 2, 3):
        got = reported(runs[0][world], "adafactor-skip-inf-odd")
        bounds = [tuple(b) for b in got[0][1]["bounds"]]
        assert all(a in offsets and b in offsets for a, b in bounds)
        assert bounds[0][0] == 0 and bounds[-1][1] == offsets[-1]
        whole = single_process(case_by_id("adafactor-skip-inf-odd"), world)[0]
        assert sum(r["state_nbytes"] for _, r in got) == sum(
            int(v.nbytes) for v in whole.slots().values())
    # 3 ranks on segments of [7, 1, 39, 0, 129] elements.
    assert [tuple(b) for b in reported(runs[0][3], "adafactor-skip-inf-odd")[0][1]["bounds"]] \
        == [(0, 8), (8, 47), (47, 176)]


@pytest.mark.parametrize("chain", list(CHAINS))
def test_checkpoint_saved_on_2_ranks_resumes_on_3_and_loads_into_one_process(runs, chain):
    results, ckpt = runs
    case = dict(CHAINS[chain], id=chain)
    # Steps 0-4 on 2 ranks' gradients: the checkpoint, loaded into one process.
    opt, params = single_process(case, 2, steps=SAVED_STEPS)
    for _, report in reported(results[2], f"save-{chain}"):
        assert report["iterations"] == opt.iterations
    assert_state_equal(*distributed.load_unsharded(ckpt[chain]), opt, params)
    # Then steps 5-7 on 3 ranks' gradients, saved on 3 ranks.
    opt, params = single_process(case, 3, steps=RESUMED_STEPS, opt=opt, params=params,
                                 start=SAVED_STEPS)
    for arrays, report in reported(results[3], f"resume-{chain}"):
        np.testing.assert_array_equal(arrays[f"resume-{chain}"], params.data)
        assert report["iterations"] == opt.iterations
    assert_state_equal(*distributed.load_unsharded(ckpt[f"{chain}-3"]), opt, params)


def assert_state_equal(loaded, loaded_params, opt, params):
    np.testing.assert_array_equal(loaded_params.data, params.data)
    assert loaded_params.names == params.names
    want, got = opt.state_dict(), loaded.state_dict()
    for key in ("optimizer", "iterations", "layout"):
        assert got[key] == want[key], key
    assert loaded.skipped_steps == opt.skipped_steps
    assert set(got["slots"]) == set(want["slots"])
    for name, slot in want["slots"].items():
        np.testing.assert_array_equal(got["slots"][name], slot, err_msg=name)


@pytest.mark.parametrize("scenario", list(BAD))
def test_bad_input_is_refused_on_every_rank(runs, scenario):
    for r, (_, report) in enumerate(reported(runs[0][3], scenario)):
        assert report["error"] == "ValueError", (scenario, r, report)
        assert BAD[scenario] in report["message"], (scenario, r, report["message"])
        assert report["unchanged"], (scenario, r)


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
    (lambda: fusedopt.Adam(gradient_accumulation_steps=2, global_clipnorm=1.0),
     "global_clipnorm"),
    (lambda: fusedopt.SGD(gradient_accumulation_steps=2, clipnorm=1.0), "clipnorm"),
    (lambda: fusedopt.LossScaleOptimizer(fusedopt.Lamb(gradient_accumulation_steps=3,
                                                       global_clipnorm=1.0)),
     "global_clipnorm"),
], ids=["global-clipnorm", "clipnorm", "loss-scale-lamb-global-clipnorm"])
def test_accumulation_with_a_norm_across_ranks_is_refused(opt, words):
    """Keras clips the mean of the accumulated gradients; its norm would need a sum
    across ranks inside the shard's optimizer (see fusedopt.distributed)."""
    params = make_params({"cls": "Adam"})
    with pytest.raises(ValueError, match=f"gradient_accumulation_steps with `{words}`"):
        distributed.ShardedOptimizer(opt(), params)


def test_segment_cuts_are_the_nearest_boundaries():
    offsets = make_params({"layout": "odd"}).offsets  # 0 7 8 47 47 176
    assert distributed.segment_cuts(offsets, 1) == [0, 5]
    assert distributed.segment_cuts(offsets, 2) == [0, 3, 5]
    # Nearest to 117.3 would leave the last rank nothing: 47 instead of 176.
    assert distributed.segment_cuts(offsets, 3) == [0, 2, 3, 5]
    offsets = make_params({"layout": "mixed"}).offsets  # 0 12 17 18 18 19 25
    assert distributed.segment_cuts(offsets, 3) == [0, 1, 2, 6]
    for layout in LAYOUTS:
        offsets = make_params({"layout": layout}).offsets
        full = sum(b > a for a, b in zip(offsets[:-1], offsets[1:]))
        for world in (1, 2, 3, 4, 5, 7):
            if world > full:
                with pytest.raises(ValueError, match=f"fewer than the {world} ranks"):
                    distributed.segment_cuts(offsets, world)
                continue
            cuts = distributed.segment_cuts(offsets, world)
            assert cuts[0] == 0 and cuts[-1] == len(offsets) - 1
            for a, b in zip(cuts, cuts[1:]):  # every rank owns elements
                assert offsets[b] > offsets[a]
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
    # Wrapped in a LossScaleOptimizer: the options are the inner optimizer's.
    with pytest.raises(ValueError, match=words):
        distributed.ShardedOptimizer(fusedopt.LossScaleOptimizer(fusedopt.Adam(**kwargs)),
                                     params)


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
