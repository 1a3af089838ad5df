"""The README states only what is true and every code block in it runs.

- Its python blocks run, in order, in one namespace, with small stand-ins for the
  placeholders a reader fills in (`batches`, `forward_backward`).
- Every command of its bash blocks is checked: `python -m fusedopt ...` commands parse
  and run with tiny settings, pip extras exist, pytest paths exist, docker build
  arguments are the Dockerfile's.
- Its `train --compare` table is what the command it names prints (the real run, about
  10 s), and the other figures of that section are computed, not typed.
- Its CPU benchmark figures are those of the record it links to.
"""

import argparse
import ast
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

import fusedopt
from fusedopt import train as tr
from fusedopt.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def code_blocks(language):
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.M | re.S)


# ------------------------------------------------------------------ python blocks
def forward_backward(batch, params, grads):
    """Stand-in for the reader's model: writes a gradient into every view."""
    rng = np.random.default_rng(batch)
    for g in grads:
        g[...] = rng.normal(size=g.shape)
    return float(sum(np.sum(p * p) for p in params))


GPU_ONLY = "# GPU only"  # the first line of a block that needs CuPy and a GPU


def test_python_blocks_run(tmp_path, monkeypatch):
    blocks = [b for b in code_blocks("python") if not b.startswith(GPU_ONLY)]
    assert len(blocks) >= 2  # Quick start and Checkpoints
    monkeypatch.chdir(tmp_path)  # the checkpoint example writes run.npz
    namespace = {"batches": range(3), "forward_backward": forward_backward}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    # The quick start trained what it built: three steps, state to resume from.
    assert namespace["opt"].iterations == 3


def test_gpu_python_blocks_run_on_a_gpu(tmp_path, monkeypatch):
    """Blocks marked GPU only compile everywhere and run, each on its own, on a GPU."""
    from fusedopt import cuda

    blocks = [b for b in code_blocks("python") if b.startswith(GPU_ONLY)]
    assert blocks  # the CUDA graph example
    for block in blocks:
        compile(block, "README.md", "exec")
    if not cuda.gpu_available():
        pytest.skip("no CUDA GPU")
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        namespace = {"batches": range(3), "forward_backward": forward_backward}
        exec(compile(block, "README.md", "exec"), namespace)
        assert namespace["opt"].iterations == 3


# -------------------------------------------------------------------- bash blocks
def bash_commands():
    """Every command of every bash block (lines split at &&), as argument lists."""
    commands = []
    for block in code_blocks("bash"):
        for line in block.splitlines():
            for command in line.split("&&"):
                argv = shlex.split(command, comments=True)
                if argv:
                    commands.append(argv)
    return commands


def setup_extras():
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return {key.value for key in node.value.keys}
    raise AssertionError("setup.py has no extras_require")


def check_pip(argv):
    for arg in argv[argv.index("install") + 1:]:
        match = re.fullmatch(r"\.\[([\w,]+)\]", arg)
        if match:
            assert set(match.group(1).split(",")) <= setup_extras(), arg
        else:
            assert arg in (".", "-q", "-e"), f"pip argument {arg!r} is not checked"


def check_docker(argv):
    dockerfile = (ROOT / "Dockerfile").read_text()
    for i, arg in enumerate(argv):
        if arg == "--build-arg":
            name = argv[i + 1].split("=")[0]
            assert re.search(rf"^ARG {name}=", dockerfile, re.M), name
    assert argv[1] in ("build", "run")


def check_gpu_job(argv):
    """`bash bench/run_gpu.sh OUT [PART...]`: every part named is one the script runs."""
    script = (ROOT / "bench" / "run_gpu.sh").read_text()
    parts = re.search(r"parts=\(([^)$]*)\)", script).group(1).split()
    assert set(argv[3:]) <= set(parts) | {"all"}, argv


def run_fusedopt(argv, tmp_path, monkeypatch, capsys):
    """Run `python -m fusedopt <argv>` with tiny settings appended (argparse keeps
    the last value of a repeated option)."""
    command = argv[0]
    tiny = {"train": ["--epochs", "1", "--quiet"],
            "bench": ["--sizes", "10", "--repeats", "1", "--warmup", "0", "--no-peers",
                      "--quiet", "--out", str(tmp_path / "bench")]}[command]
    monkeypatch.chdir(tmp_path)
    code = main([*argv, *tiny])
    out = capsys.readouterr().out
    assert code == 0, argv
    return out


def check_torchrun(argv):
    """torchrun commands need a process group: their arguments are parsed here, and
    tests/test_train_distributed.py runs the job itself; a script must exist."""
    if "-m" in argv:
        args = argv[argv.index("-m") + 1:]
        assert args[:2] == ["fusedopt", "train"] and "--distributed" in args, argv
        parser = argparse.ArgumentParser()
        tr.add_arguments(parser)
        parser.parse_args(args[2:])
    else:
        script = next(a for a in argv[1:] if a.endswith(".py"))
        assert (ROOT / script).exists(), argv


def test_bash_commands_parse_and_run(tmp_path, monkeypatch, capsys):
    seen = set()
    for argv in bash_commands():
        program = Path(argv[0]).name
        if program == "torchrun":
            check_torchrun(argv)
        elif "-m" in argv and argv[argv.index("-m") + 1] == "fusedopt":
            run_fusedopt(argv[argv.index("-m") + 2:], tmp_path, monkeypatch, capsys)
            seen.add("fusedopt")
        elif argv[:3] == ["python3", "-m", "venv"]:
            continue
        elif program == "pip" or argv[1:3] == ["-m", "pip"]:
            check_pip(argv)
        elif "pytest" in argv:
            paths = [a for a in argv[argv.index("pytest") + 1:] if not a.startswith("-")]
            assert all((ROOT / p).exists() for p in paths), argv
        elif program == "docker":
            check_docker(argv)
        elif argv[:2] == ["bash", "bench/run_gpu.sh"]:
            check_gpu_job(argv)
        else:
            raise AssertionError(f"the README shows a command this test does not check: {argv}")
    assert "fusedopt" in seen


# ------------------------------------------------------------- the train figures
TABLE = re.compile(r"<!-- generated by: (?P<command>[^>]*?) -->\n(?P<table>.*?)<!-- end -->",
                   re.S)


def test_readme_train_table_is_what_its_command_prints(tmp_path, monkeypatch, capsys):
    """The real --compare run (not a shortened one: the table shows the real figures).
    A table measured on another machine may differ in the last digits (BLAS); then
    regenerate it with the command and commit it."""
    match = TABLE.search(README)
    assert match, "the train table must sit between its generated-by and end markers"
    command = match["command"]
    assert f"`{command}`" in README  # shown to the reader, not only in the marker
    argv = shlex.split(command)
    assert argv[:4] == ["python", "-m", "fusedopt", "train"] and "--markdown" in argv
    monkeypatch.chdir(tmp_path)
    assert main(argv[3:]) == 0
    assert capsys.readouterr().out == match["table"], f"regenerate with: {command}"
    assert list(tmp_path.iterdir()) == []  # regenerating the README leaves no files


def test_readme_train_figures_are_computed():
    section = README.split("## The main job")[1].split("\n## ")[0]
    sizes = tr.layer_sizes(64, tr.DEFAULT_HIDDEN, 10)
    assert f"MLP ({'-'.join(map(str, sizes))}, {tr.parameter_count(sizes):,} parameters" in section
    assert (f"{tr.DEFAULT_OPTIMIZER.capitalize()}, {tr.DEFAULT_EPOCHS} epochs, "
            f"batch {tr.DEFAULT_BATCH_SIZE}, seed 0") in section
    assert f"{tr.DEFAULT_EPOCHS} epochs each" in section
    assert f"{tr.DEFAULT_TEST_FRACTION:.0%} held-out" in section
    # No typed accuracies outside the generated table.
    prose = TABLE.sub("", section)
    assert not re.search(r"\d+\.\d+%", prose), "figures belong in the generated table"


# ------------------------------------------------------------ the bench figures
SUPERSCRIPTS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹", "0123456789")
# The CPU table's rows: (optimizer, layout, clip) and its columns: the impl measured;
# in the global-clip row torch and optax run their clipping peers.
CPU_ROWS = {"Adam": ("adam", "flat", None), "AdamW": ("adamw", "flat", None),
            "SGD (momentum 0.9)": ("sgd", "flat", None), "Adagrad": ("adagrad", "flat", None),
            "Adam + global clip 1.0": ("adam", "flat", "global"),
            "Adam, 200 tensors": ("adam", "200-tensors", None)}
CPU_COLUMNS = ["fusedopt", "fusedopt-numpy", "torch-fused", "torch-foreach", "optax"]
CLIP_PEERS = {"torch-fused": "torch-clip+fused", "optax": "optax-clip"}


def table_rows(text, labels):
    """(label, sizes, the other cells) of each row of the README tables in `text` whose
    first cell is one of `labels`; the sizes from a "2²² / 2²⁴" cell."""
    for line in text.splitlines():
        cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        if cells and cells[0] in labels:
            sizes = [2 ** int(x.strip()[1:].translate(SUPERSCRIPTS)) for x in cells[1].split("/")]
            yield cells[0], sizes, cells[2:]


def test_readme_cpu_benchmark_figures_are_the_records():
    """Every figure of the README's CPU table is the median the record it links holds."""
    section = README.split("**CPU results**")[1].split("\n## ")[0]
    record_path = re.search(r"\]\((bench/results/[^)]+)\.md\)", section).group(1)
    record = json.loads((ROOT / f"{record_path}.json").read_text())
    medians = {(r["optimizer"], r["impl"], r["layout"], r["clip"], r["n"]): r["median_ms"]
               for r in record["rows"]}
    checked = 0
    for label, sizes, cells in table_rows(section, CPU_ROWS):
        optimizer, layout, clip = CPU_ROWS[label]
        for impl, cell in zip(CPU_COLUMNS, cells):
            figure = cell.split("(")[0].strip().strip("*").strip()
            if not figure:
                continue
            impl = CLIP_PEERS.get(impl, impl) if clip else impl
            for n, value in zip(sizes, figure.split("/")):
                expected = medians[(optimizer, impl, layout, clip, n)]
                assert value.strip() == f"{expected:.1f}", (label, impl, n)
                checked += 1
    assert checked >= 30, checked


TORCH_BENCH_ROWS = {"200 tensors": ("adamw", "torch-model"),
                    "host overhead: 1M parameters, 100 tensors, Adam": ("adam", "small-model")}


def test_readme_torch_benchmark_figures_are_the_record():
    """The torch-model table of "Use from PyTorch" holds its record's medians."""
    section = README.split("## Use from PyTorch")[1].split("\n## ")[0]
    record_path = re.search(r"\]\((bench/results/[^)]+)\.md\)", section).group(1)
    record = json.loads((ROOT / f"{record_path}.json").read_text())
    medians = {(r["optimizer"], r["impl"], r["layout"], r["n"]): r["median_ms"]
               for r in record["rows"]}
    checked = 0
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] not in TORCH_BENCH_ROWS:
            continue
        optimizer, layout = TORCH_BENCH_ROWS[cells[0]]
        n = 2 ** int(cells[1][1:].translate(SUPERSCRIPTS))
        impls = ("fusedopt-torch", "torch-fused")
        for impl, figure in zip(impls, cells[2:]):
            decimals = len(figure.split(".")[1]) if "." in figure else 0
            expected = medians[(optimizer, impl, layout, n)]
            assert figure == f"{expected:.{decimals}f}", (cells[0], impl, n)
            assert abs(float(figure) - expected) <= 0.05 * expected  # 3 significant figures
            checked += 1
    assert checked == 8, checked
    apply_ms = medians[("adam", "fusedopt", "small-model", 2 ** 20)]
    assert f"took {apply_ms:.2f} ms per" in section


def test_readme_lamb_host_figures_are_the_record():
    """The Lamb paragraph of the CPU results holds the medians of the record it links
    (2026-11-23-amd-epyc-2-cores-3: Lamb against Adam on the host executor)."""
    section = README.split("**CPU results**")[1].split("\n## ")[0]
    paragraph = section[section.index("Lamb on the host executor"):].split("\n\n")[0]
    text = " ".join(paragraph.split())
    record_path = re.search(r"\]\((bench/results/[^)]+)\.md\)", text).group(1)
    record = json.loads((ROOT / f"{record_path}.json").read_text())
    medians = {(r["optimizer"], r["impl"], r["layout"], r["clip"], r["n"]): r["median_ms"]
               for r in record["rows"]}
    figures = re.search(r"\)\): ([\d.]+) / ([\d.]+) ms at 2²² / 2²⁴, against Adam's ([\d.]+) / "
                        r"([\d.]+) ms and the NumPy reference's Lamb at ([\d.]+) / ([\d.]+) ms",
                        text)
    assert figures, text
    expected = [(o, impl, n) for o, impl in (("lamb", "fusedopt"), ("adam", "fusedopt"),
                                             ("lamb", "fusedopt-numpy"))
                for n in (2 ** 22, 2 ** 24)]
    for value, (optimizer, impl, n) in zip(figures.groups(), expected):
        assert value == f"{medians[(optimizer, impl, 'flat', None, n)]:.1f}", (optimizer, impl, n)


MATRIX_ROWS = {"Adafactor": "adafactor", "Muon": "muon"}


def test_readme_adafactor_and_muon_figures_are_the_record():
    """The Adafactor and Muon table of the CPU results (the "matrices" layout) holds the
    medians of the record it links, host executor and NumPy reference."""
    section = README.split("**CPU results**")[1].split("\n## ")[0]
    part = section[section.index("Adafactor and Muon on the host executor"):]
    part = part[:part.index("\n\n", part.index("| step (matrices layout)"))]
    record_path = re.search(r"\]\((bench/results/[^)]+)\.md\)", part).group(1)
    record = json.loads((ROOT / f"{record_path}.json").read_text())
    medians = {(r["optimizer"], r["impl"], r["layout"], r["n"]): r["median_ms"]
               for r in record["rows"]}
    checked = 0
    for label, sizes, cells in table_rows(part, MATRIX_ROWS):
        for impl, cell in zip(("fusedopt", "fusedopt-numpy"), cells):
            for n, value in zip(sizes, cell.split("/")):
                expected = medians[(MATRIX_ROWS[label], impl, "matrices", n)]
                assert value.strip() == f"{expected:.1f}", (label, impl, n)
                checked += 1
    assert checked == 8, checked


def test_readme_mixed_precision_cpu_figures_are_the_record():
    """The CPU figures of the mixed-precision paragraph ("Bytes per element") are the
    medians of the record it links: Adam in float32, the range over the 16-bit
    configurations (bench.PRECISIONS) and torch's fused bfloat16 Adam, at 2²⁰ / 2²²."""
    from fusedopt import bench

    section = README.split("**Bytes per element**")[1].split("\n## ")[0]
    text = " ".join(section.split())
    record_path = re.search(r"\]\((bench/results/[^)]+)\.md\)", text).group(1)
    record = json.loads((ROOT / f"{record_path}.json").read_text())
    medians = {(r["optimizer"], r["impl"], r["dtype"], r["n"]): r["median_ms"]
               for r in record["rows"] if r["layout"] == "flat" and r["clip"] is None}
    figures = re.search(r"Adam on 2²⁰ / 2²² elements took ([\d.]+) / ([\d.]+) ms in float32 "
                        r"and ([\d.]+) to ([\d.]+) / ([\d.]+) to ([\d.]+) ms in the 16-bit "
                        r"configurations, against ([\d.]+) / ([\d.]+) ms for torch's fused "
                        r"bfloat16 Adam", text)
    assert figures, text
    f32, f32_big, low, high, low_big, high_big, peer, peer_big = figures.groups()
    for n, (a, lo, hi, t) in ((2 ** 20, (f32, low, high, peer)),
                              (2 ** 22, (f32_big, low_big, high_big, peer_big))):
        sixteen = [medians[("adam", "fusedopt", label, n)] for label in bench.PRECISIONS]
        assert a == f"{medians[('adam', 'fusedopt', 'float32', n)]:.1f}", n
        assert (lo, hi) == (f"{min(sixteen):.1f}", f"{max(sixteen):.1f}"), n
        assert t == f"{medians[('adam', 'torch-fused', 'bf16-state', n)]:.1f}", n
    state = re.search(r"bfloat16 state with float32 params \(([\d.]+) / ([\d.]+) ms\)", text)
    assert state, text
    for n, value in zip((2 ** 20, 2 ** 22), state.groups()):
        assert value == f"{medians[('adam', 'fusedopt', 'f32-bf16state', n)]:.1f}", n
