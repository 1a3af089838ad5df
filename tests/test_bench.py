"""The benchmark command on the CPU: record format, performance model, missing peers."""

import builtins
import json

import numpy as np
import pytest

from fusedopt import __main__ as cli
from fusedopt import bench

ROW_KEYS = {"optimizer", "impl", "n", "dtype", "layout", "clip", "median_ms", "bytes", "gbps"}


@pytest.mark.parametrize("name,kwargs,clip,expected", [
    ("sgd", {"momentum": 0.0}, False, 12), ("sgd", {"momentum": 0.9}, False, 20),
    ("adagrad", {}, False, 20),
    ("rmsprop", {}, False, 20), ("adam", {}, False, 28), ("nadam", {}, False, 28),
    ("adamax", {}, False, 28), ("adadelta", {}, False, 28), ("ftrl", {}, False, 28),
    ("lion", {}, False, 20), ("adam", {}, True, 32), ("adam", {"amsgrad": True}, False, 36),
    ("schedulefreeadamw", {}, False, 28),
])
def test_bytes_per_element_follow_the_performance_model(monkeypatch, name, kwargs, clip, expected):
    """ARCHITECTURE.md: SGD 12, SGD+momentum 20, Adagrad/RMSprop 20, Adam/Nadam/Adamax 28,
    AMSGrad 36, Adadelta 28, Ftrl 28; global clipping reads g once more (+4)."""
    monkeypatch.setitem(bench.CONFIGS, name, kwargs)
    assert bench.step_bytes(name, 4, clip=clip) == expected


@pytest.mark.parametrize("name,label,clip,expected", [
    ("adam", "float32", False, 28), ("adam", "bf16+master", False, 28),
    ("adam", "bf16", False, 22), ("adam", "bf16+stochastic", False, 22),
    ("adam", "bf16-state", False, 14), ("adam", "f32-bf16grads", False, 26),
    ("adam", "f32-bf16state", False, 20), ("adam", "bf16+master", True, 30),
    ("sgd", "bf16+master", False, 20), ("sgd", "bf16-state", False, 10),
])
def test_bytes_per_element_of_mixed_precision(name, label, clip, expected):
    """The issue's model: Adam with bfloat16 params and grads, a float32 master and
    float32 state moves 2 (params written) + 8 (master read and written) + 2 (grads)
    + 16 (two float32 slots read and written) = 28 bytes; all bfloat16, 14."""
    assert bench.precision_step_bytes(name, label, clip=clip) == expected


def test_mixed_precision_rows_are_measured_with_their_bytes(tmp_path, capsys):
    code = cli.main(["bench", "--device", "cpu", "--sizes", "12", "--optimizers", "adam",
                     "--repeats", "1", "--warmup", "1", "--rounds", "1", "--quiet",
                     "--out", str(tmp_path)])
    assert code == 0
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    mine = {r["dtype"]: r for r in record["rows"] if r["impl"] == "fusedopt"
            and r["optimizer"] == "adam" and r["layout"] == "flat" and r["clip"] is None}
    assert set(mine) == {"float32", *bench.PRECISIONS}
    for label, r in mine.items():
        assert r["bytes"] == bench.precision_step_bytes("adam", label) * 4096
        assert r["median_ms"] > 0
    torch_bf16 = [r for r in record["rows"] if r["impl"].startswith("torch")
                  and r["dtype"] == "bf16-state"]
    assert {r["impl"] for r in torch_bf16} == {"torch-fused", "torch-foreach"}
    assert all(r["median_ms"] or "missing" in r.get("note", "") for r in torch_bf16)
    out = capsys.readouterr().out
    assert "| adam | fusedopt [bf16+master] | flat |" in out


@pytest.mark.parametrize("option,expected", [
    # EMA reads and writes its average (+8); accumulation's 3 light calls move g and
    # the accumulator (12 each, 24 with EMA), the 4th is a full step with it (36, 44).
    ("ema", 36), ("accumulate4", 3 * 12 + 36), ("accumulate4-ema", 3 * 24 + 44),
    # The LossScaleOptimizer's inf/NaN check reads g once more (+4).
    ("loss-scale", 32),
])
def test_option_rows_follow_the_performance_model(option, expected):
    """The model tests/test_emulated_options.py checks access by access."""
    assert bench.option_bytes("adam", option, 4) == expected


def test_sizes_and_optimizer_arguments():
    assert bench.parse_sizes("16-22", "cpu") == [2**16, 2**18, 2**20, 2**22]
    assert bench.parse_sizes("20,24", "gpu") == [2**20, 2**24]
    assert bench.parse_sizes(None, "gpu") == [2**k for k in range(16, 29, 2)]
    with pytest.raises(ValueError, match="--sizes"):
        bench.parse_sizes("big", "cpu")
    with pytest.raises(ValueError, match="nosuch"):
        bench.parse_optimizers("adam,nosuch")


def test_every_fused_optimizer_is_benchmarked():
    """Every optimizer has a fused step now; Adafactor and Muon on matrices."""
    names = bench.parse_optimizers("all")
    assert {"schedulefreeadamw", "lamb", "adafactor", "muon"} <= set(names)
    assert {n: bench.bench_layout(n) for n in ("adam", "lamb", "adafactor", "muon", "adam+ema")} == {
        "adam": "flat", "lamb": "flat", "adafactor": "matrices", "muon": "matrices",
        "adam+ema": "flat"}


def test_step_bytes_model():
    """Bytes per float32 element: Adam one pass (28), LAMB's two passes (40, as the
    emulator counts them: tests/test_emulated_kernels.py), +4 for a norm clip;
    Adafactor 44 on a factored (rank >= 2) segment and 32 on a vector, Muon 32 on a
    matrix and AdamW's 28 on a vector (the emulator counts both too)."""
    assert bench.step_bytes("adam", 4) == 28
    assert bench.step_bytes("lamb", 4) == 40
    assert bench.step_bytes("lamb", 4, clip=True) == 44
    assert bench.step_bytes("adafactor", 4, shape=(3, 5)) == 44
    assert bench.step_bytes("adafactor", 4, shape=(2, 3, 5)) == 44
    assert bench.step_bytes("adafactor", 4, shape=(7,)) == 32
    assert bench.step_bytes("adafactor", 4, clip=True, shape=(3, 5)) == 48
    assert bench.step_bytes("muon", 4, shape=(3, 5)) == 32
    assert bench.step_bytes("muon", 4, shape=(7,)) == bench.step_bytes("muon", 4) == 28
    shapes = [(6, 5), (11,)]
    assert bench.layout_step_bytes("adafactor", "float32", shapes) == 44 * 30 + 32 * 11
    assert bench.layout_step_bytes("adam", "float32", shapes) == 28 * 41


@pytest.mark.parametrize("n", [2**8, 2**12 + 3, 2**16, 2**22, 2**28])
def test_matrix_layout_adds_up(n):
    """Square, wide, tall and very wide matrices and a vector for the rest, n in all."""
    shapes = bench.matrix_shapes(n)
    assert sum(int(np.prod(s)) for s in shapes) == n
    matrices = [s for s in shapes if len(s) == 2]
    assert len(matrices) == 4 and all(min(s) >= 1 for s in shapes)
    wide, tall = matrices[1], matrices[2]
    assert wide[1] > wide[0] and tall[0] > tall[1]
    assert max(int(np.prod(s)) for s in matrices) == int(np.prod(matrices[0]))


def test_adafactor_and_muon_rows_are_measured_on_matrices(tmp_path):
    code = cli.main(["bench", "--device", "cpu", "--sizes", "12", "--optimizers",
                     "adafactor,muon", "--repeats", "1", "--warmup", "1", "--rounds", "1",
                     "--no-peers", "--quiet", "--out", str(tmp_path)])
    assert code == 0
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    shapes = bench.matrix_shapes(4096)
    for name in ("adafactor", "muon"):
        for impl in ("fusedopt", "fusedopt-numpy"):
            (r,) = [r for r in record["rows"] if r["optimizer"] == name and r["impl"] == impl
                    and r["n"] == 4096]
            assert r["layout"] == "matrices" and r["median_ms"] > 0 and "note" not in r
            assert r["bytes"] == bench.layout_step_bytes(name, "float32", shapes)
    table = bench.markdown_table(record)
    assert "| adafactor vs the NumPy reference | 4096 |" in table


def test_model_like_layout_adds_up():
    shapes = bench.model_like_shapes(2**20)
    assert len(shapes) == 200 and sum(s[0] for s in shapes) == 2**20
    assert min(s[0] for s in shapes) >= 1 and len({s for s in shapes}) > 50
    for n in (200, 2**8, 2**10, 2**12):  # the smallest sizes --sizes allows
        shapes = bench.model_like_shapes(n)
        assert sum(s[0] for s in shapes) == n and min(s[0] for s in shapes) >= 1, n


def test_bench_command_writes_the_record(tmp_path, capsys):
    code = cli.main(["bench", "--device", "cpu", "--sizes", "12,14", "--optimizers", "adam,lion",
                     "--repeats", "2", "--warmup", "1", "--rounds", "2", "--no-peers", "--quiet",
                     "--out", str(tmp_path)])
    assert code == 0
    record_path = next(tmp_path.glob("*.json"))
    record = json.loads(record_path.read_text())
    assert set(record) == {"device", "date", "versions", "copy_gbps", "tests", "rows", "machine"}
    assert record["machine"]["threads"] >= 1 and len(record["machine"]["load_average_after"]) == 3
    assert record["copy_gbps"] > 0 and record["versions"]["fusedopt"]
    for r in record["rows"]:
        assert ROW_KEYS <= set(r)
        assert r["impl"] in bench.IMPLS
        assert r["layout"] in ("flat", "matrices", "200-tensors", "small-model",
                               "torch-model", *bench.SEGMENT_LAYOUTS)
        assert r["clip"] in (None, "global", "segment")
        assert r["median_ms"] > 0 and r["gbps"] == pytest.approx(r["bytes"] / (r["median_ms"] * 1e6))
        if r["layout"] != "small-model":  # timed in each of the two rounds
            assert len(r["round_ms"]) == 2 and r["median_ms"] == pytest.approx(
                sum(r["round_ms"]) / 2)
    impls = {(r["impl"], r["optimizer"], r["n"], r["layout"], r["clip"]) for r in record["rows"]}
    assert ("fusedopt", "lion", 2**14, "flat", None) in impls
    assert ("fusedopt-numpy", "lion", 2**14, "flat", None) in impls  # the reference executor
    assert ("fusedopt", "adam", 2**12, "flat", "global") in impls
    assert ("copy", None, 2**14, "flat", None) in impls          # every core
    assert ("inplace", None, 2**14, "flat", None) in impls
    assert ("copy-1thread", None, 2**14, "flat", None) in impls
    for layout, (count, n) in bench.SEGMENT_LAYOUTS.items():
        for clip in (None, "segment"):
            assert ("fusedopt", "adam", n, layout, clip) in impls
    for option in bench.OPTION_ROWS:
        assert ("fusedopt", f"adam+{option}", 2**14, "flat", None) in impls
    assert record_path.with_suffix(".md").read_text().startswith("## ")
    png = record_path.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    out = capsys.readouterr().out
    assert "| adam | fusedopt |" in out
    assert "| lion vs the NumPy reference | 16384 |" in out and "### Targets" in out


def test_missing_peers_are_reported_not_faked(monkeypatch):
    real_import = builtins.__import__

    def no_peers(name, *args, **kwargs):
        if name.split(".")[0] in ("torch", "jax", "optax"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_peers)
    ctx = bench.CpuContext()
    rows = (bench.measure_torch(ctx, "adam", 1024, "flat", warmup=1, repeats=1)
            + bench.measure_optax(ctx, 1024, warmup=1, repeats=1))
    assert {r["impl"] for r in rows} == {"torch-fused", "torch-foreach", "optax", "optax-clip"}
    for r in rows:
        assert r["median_ms"] is None and r["gbps"] is None and r["note"].startswith("missing")


def test_bench_refuses_a_gpu_it_does_not_have(monkeypatch, capsys):
    monkeypatch.setattr(bench.cuda, "gpu_problem", lambda: "no GPU in this test")
    assert cli.main(["bench", "--device", "gpu"]) == 2
    assert "no usable GPU here: no GPU in this test" in capsys.readouterr().err


def run_bench(argv, capsys):
    try:
        code = cli.main(["bench", *argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, message", [
    (["--sizes", "40"], "--sizes are log2 element counts, at most 36"),
    (["--sizes", "4-12"], "--sizes are log2 element counts, at least 8"),
    (["--sizes", "24-20"], "--sizes: the range '24-20' runs backwards"),
    (["--sizes", "x"], "--sizes takes log2 sizes"),
    (["--repeats", "-3"], "--repeats: expected an integer >= 1, got '-3'"),
    (["--repeats", "0"], "--repeats: expected an integer >= 1"),
    (["--warmup", "-1"], "--warmup: expected an integer >= 0"),
    (["--optimizers", "adam,nosuch"], "--optimizers: unknown optimizer(s) ['nosuch']"),
    (["--tests", "/no/such/tests.json"], "--tests: cannot read /no/such/tests.json"),
    (["--out", __file__], "--out: "),
])
def test_bad_arguments_are_refused_before_anything_runs(argv, message, monkeypatch, capsys):
    def must_not_run(*args, **kwargs):
        raise AssertionError("measuring started")

    monkeypatch.setattr(bench, "build_plan", must_not_run)
    code, out, err = run_bench(["--device", "cpu", "--quiet", *argv], capsys)
    assert code == 2 and message in err and "Traceback" not in err and out == ""


def test_a_run_larger_than_memory_is_refused_before_allocating(monkeypatch, capsys):
    monkeypatch.setattr(bench, "cpu_available_bytes", lambda: 1 << 30)  # 1 GiB free

    def must_not_run(*args, **kwargs):
        raise AssertionError("measuring started")

    monkeypatch.setattr(bench, "build_plan", must_not_run)
    code, _, err = run_bench(["--device", "cpu", "--sizes", "28", "--quiet"], capsys)
    assert code == 2
    # 4 bytes x (params, grads, 3 state words, 3 temporaries) x 2^28: Adafactor's three
    # slots are counted at full size (r and c are smaller; Muon's scratch d is not).
    assert ("--sizes: the largest point (2^28 float32 elements) needs about 8.0 GiB, but only "
            "1.0 GiB of CPU memory is available" in err)


def test_memory_estimate_covers_buffers_slots_and_temporaries():
    ctx = bench.CpuContext()
    n = 1 << 26  # large enough that one buffer set exceeds twice the L2 size
    # params + grads + Adam's two slots + temporaries, float32
    assert bench.estimate_peak_bytes(ctx, [n], ["adam"], peers=False) == 4 * n * (4 + 3)
    assert bench.estimate_peak_bytes(ctx, [n], ["sgd"], peers=False) == 4 * n * (3 + 3)
    assert bench.estimate_peak_bytes(ctx, [n], ["sgd"], peers=True) == 4 * n * (4 + 3)
    # Small sizes rotate through several buffer sets (at most 64) to defeat the cache.
    small = bench.estimate_peak_bytes(ctx, [1 << 10], ["adam"], peers=False)
    assert small == 64 * 4 * (1 << 10) * (4 + 3)


def record_with(rows):
    return {"device": "Test CPU (2 cores)", "date": "2026-01-02", "versions": {},
            "copy_gbps": 10.0, "tests": None, "rows": rows}


def test_missing_peers_are_listed_once_below_the_results():
    measured = bench.row("adam", "fusedopt", 1024, "flat", None, 0.5, 28 * 1024)
    rows = [measured]
    for n in (1024, 4096, 16384):
        for layout in ("flat", "200-tensors"):
            for impl in ("torch-fused", "torch-foreach"):
                rows += bench.missing("adam", impl, n, layout, None, "torch is not installed")
        rows += bench.missing("adam", "optax", n, "flat", None, "jax/optax not installed")
    table = bench.markdown_table(record_with(rows))
    assert table.count("torch is not installed") == 1
    assert table.count("jax/optax not installed") == 1
    assert "- torch-fused, torch-foreach: torch is not installed" in table
    assert "- optax: jax/optax not installed" in table
    table_rows = [line for line in table.splitlines() if line.startswith("| adam")]
    assert table_rows == ["| adam | fusedopt | flat |  | 1024 | 0.5000 | 0.1 | 1% |"]


def test_same_day_records_are_kept_not_overwritten(tmp_path):
    record = record_with([bench.row(None, "copy", 1024, "flat", None, 0.01, 8192)])
    first = bench.write_record(record, tmp_path)
    before = {p: p.read_bytes() for p in first}
    second = bench.write_record(record, tmp_path)
    third = bench.write_record(record, tmp_path)
    assert [p.name for p in first[:2]] == ["2026-01-02-test-cpu-2-cores.json",
                                            "2026-01-02-test-cpu-2-cores.md"]
    assert [p.name for p in second[:2]] == ["2026-01-02-test-cpu-2-cores-2.json",
                                             "2026-01-02-test-cpu-2-cores-2.md"]
    assert third[0].name == "2026-01-02-test-cpu-2-cores-3.json"
    assert all(p.read_bytes() == data for p, data in before.items())


def test_target_table_compares_the_points_it_names():
    def point(optimizer, impl, ms, layout="flat", clip=None, n=1024):
        return bench.row(optimizer, impl, n, layout, clip, ms, 28 * n)

    record = {"rows": [
        point("adam", "fusedopt", 2.0), point("adam", "torch-fused", 3.0),
        point("adam", "fusedopt", 2.0, clip="global"),
        point("adam", "torch-clip+fused", 2.4, clip="global"),
        point("adam", "fusedopt", 4.0, layout="10k-segments", clip="segment", n=7),
        point("adam", "fusedopt", 2.0, layout="10k-segments", n=7),
        point(None, "copy", 1.0), point("sgd", "fusedopt-numpy", 1.0),
        point("sgd", "fusedopt", 0.5)]}
    lines = bench.target_table(record)
    table = {line.split(" | ")[0].lstrip("| "): line for line in lines[4:]}
    assert "| 1.50x | 1.00x | yes | 50% |" in table["adam vs torch fused"]
    assert "| 1.20x | 1.25x | NO |" in table["adam + global clip vs torch clip_grad_norm_ + fused"]
    assert "| 0.50x | 0.77x | NO |" in table["10k-segments clipnorm vs unclipped (within 1.3x)"]
    assert "| 2.00x | 3.00x | NO |" in table["sgd vs the NumPy reference"]
    assert "adam vs optax" not in table  # not measured: no row


def test_torch_model_row_times_fusedopt_torch_against_torch_fused_adamw(capsys):
    """The row the torch issue asks for: the same ~200-tensor parameters stepped by
    fusedopt.torch.AdamW (the whole step()) and by torch.optim.AdamW(fused=True)."""
    pytest.importorskip("torch")
    ctx = bench.CpuContext()
    rows = bench.measure_torch_model(ctx, 2**14, warmup=1, repeats=2)
    assert [(r["impl"], r["optimizer"], r["layout"]) for r in rows] == [
        ("fusedopt-torch", "adamw", "torch-model"), ("torch-fused", "adamw", "torch-model")]
    for r in rows:
        assert r["median_ms"] > 0 and r["bytes"] == 28 * 2**14 and "step()" in r["note"]
    overhead = bench.measure_host_overhead(ctx, peers=True, warmup=1, repeats=1, steps=3)
    assert {r["impl"] for r in overhead} == {"fusedopt", "torch-fused", "fusedopt-torch"}
    table = bench.target_table(record_with(rows))
    assert any(line.startswith("| torch model: fusedopt.torch AdamW vs torch AdamW fused | "
                               "16384 |") for line in table)


def test_torch_model_row_is_reported_missing_without_torch(monkeypatch):
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name.split(".")[0] == "torch":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    rows = bench.measure_torch_model(bench.CpuContext(), 1024, warmup=1, repeats=1)
    assert {r["impl"] for r in rows} == {"fusedopt-torch", "torch-fused"}
    assert all(r["median_ms"] is None and r["note"].startswith("missing") for r in rows)
