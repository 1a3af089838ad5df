"""`python -m fusedopt train`: the MLP learns, its gradients are right, runs repeat
exactly, the CLI reports JSON, --compare writes a plot and a table, and bad
arguments end with a message and exit code 2 instead of a traceback.

Runs are kept short (a few epochs) except one, which runs the real default
configuration and holds it to the documented target (>= 95% test accuracy).
"""

import json
import math
import struct

import numpy as np
import pytest

import fusedopt
from fusedopt import train as tr
from fusedopt.__main__ import main


@pytest.fixture(scope="module")
def digits():
    return tr.load_digits_dataset(seed=0)


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of `python -m fusedopt train ...`; argparse's own
    errors raise SystemExit, the command's return an exit code: both are codes here."""
    try:
        code = main(["train", *argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------- the data
def test_digits_split_is_stratified_scaled_and_seeded(digits):
    assert digits.x_train.shape == (1347, 64) and digits.x_test.shape == (450, 64)
    assert digits.x_train.dtype == np.float32
    assert 0.0 <= digits.x_train.min() and digits.x_train.max() <= 1.0
    # Stratified: each class is about 10% of the test split.
    counts = np.bincount(digits.y_test, minlength=10)
    assert counts.min() >= 43 and counts.max() <= 47
    again = tr.load_digits_dataset(seed=0)
    np.testing.assert_array_equal(again.x_test, digits.x_test)
    other = tr.load_digits_dataset(seed=1)
    assert not np.array_equal(other.y_test, digits.y_test)


# ---------------------------------------------------------------- the gradients
@pytest.mark.parametrize("sizes", [[5, 4, 3, 3], [5, 3]], ids=["two-hidden", "no-hidden"])
def test_gradients_match_central_differences(sizes):
    """The backward pass writes d(loss)/d(params) into the grads FlatBuffer; every
    element is compared with a central difference of the loss, in float64."""
    rng = np.random.default_rng(3)
    params = tr.init_params(sizes, seed=3, dtype=np.float64)
    params.data[...] = rng.normal(size=params.size)  # non-zero biases too
    x = rng.uniform(0, 1, size=(6, sizes[0]))
    labels = rng.integers(0, sizes[-1], size=6)
    # Keep away from ReLU's kink, where a finite difference is not a derivative: no
    # hidden pre-activation may lie within a step h of zero.
    views = params.views()
    a = x
    for w, b in list(zip(views[0::2], views[1::2]))[:-1]:
        z = a @ w + b
        assert np.abs(z).min() > 1e-4
        a = np.maximum(z, 0)

    grads = params.zeros_like()
    grads.data[...] = 123.0  # the backward pass must overwrite, not accumulate
    loss = tr.loss_and_gradients(params, grads, x, labels)
    assert float(loss) == pytest.approx(float(tr.loss_value(params, x, labels)), rel=1e-12)

    h = 1e-6
    numeric = np.empty(params.size)
    for i in range(params.size):
        saved = params.data[i]
        params.data[i] = saved + h
        up = float(tr.loss_value(params, x, labels))
        params.data[i] = saved - h
        down = float(tr.loss_value(params, x, labels))
        params.data[i] = saved
        numeric[i] = (up - down) / (2 * h)
    np.testing.assert_allclose(grads.data, numeric, rtol=1e-6, atol=1e-9)
    # The views the backward pass wrote into alias the flat buffer.
    assert all(np.shares_memory(view, grads.data) for view in grads.views())


# ------------------------------------------------------------------- training
def test_default_optimizer_learns_in_a_short_run(digits):
    result = tr.train(epochs=5, data=digits)
    # Chance is 10%; five epochs of Adam reach 94-96% for seeds 0-9.
    assert result.test_accuracy >= 0.90
    assert result.loss_history[-1] < 0.5 * result.loss_history[0]
    assert result.steps == 5 * math.ceil(1347 / tr.DEFAULT_BATCH_SIZE)
    assert result.optimizer == "adam" and result.device == "cpu"
    assert result.steps_per_second > 0 and result.seconds >= result.apply_seconds > 0


def test_default_command_reaches_95_percent(capsys):
    """The real default configuration (Adam, 20 epochs, hidden 128,64, float32)."""
    code, out, _ = run_cli(["--json", "--quiet"], capsys)
    assert code == 0
    result = json.loads(out)
    assert result["optimizer"] == "adam"
    assert result["epochs"] == tr.DEFAULT_EPOCHS
    assert result["test_accuracy"] >= 0.95
    assert result["seconds"] < 60


def test_bfloat16_command_reaches_95_percent(capsys):
    """The default configuration with bfloat16 params and grads (no master copy)."""
    code, out, _ = run_cli(["--json", "--quiet", "--dtype", "bfloat16"], capsys)
    assert code == 0
    result = json.loads(out)
    assert result["dtype"] == "bfloat16" and result["test_accuracy"] >= 0.95


# Per epoch, the mean training loss of a bfloat16 run with a float32 master copy, with
# stochastic rounding, or with a master and bfloat16 state stays within 5% (+0.005) of
# the float32 run's; plain bfloat16 (whose small updates round away) within 2.5 times
# it, and behind the master copy at the end. Measured: within 2.3% and 1.8 times for
# seeds 0 and 1 over 10 epochs.
BF16_RUNS = [("master", {"master_weights": True}, 0.05, 0.005),
             ("stochastic", {"stochastic_rounding": True}, 0.05, 0.005),
             ("master-bf16-state", {"master_weights": True, "state_dtype": "bfloat16"},
              0.05, 0.005)]


def test_bfloat16_training_follows_float32_within_a_band(digits):
    runs = {}
    for name, kwargs, dtype in [("float32", {}, "float32"), ("plain", {}, "bfloat16")] + [
            (name, kwargs, "bfloat16") for name, kwargs, _, _ in BF16_RUNS]:
        runs[name] = tr.train(tr.make_optimizer("adam", **kwargs), epochs=10, data=digits,
                              dtype=dtype)
        assert runs[name].dtype == dtype
    reference = np.array(runs["float32"].loss_history)
    for name, _, rtol, atol in BF16_RUNS:
        losses = np.array(runs[name].loss_history)
        assert np.all(np.abs(losses - reference) <= rtol * reference + atol), (name, losses)
        assert runs[name].test_accuracy >= 0.95, name
    plain = np.array(runs["plain"].loss_history)
    assert np.all(plain <= 2.5 * reference) and np.all(plain >= 0.9 * reference), plain
    assert plain[-1] > runs["master"].loss_history[-1]


def test_same_seed_gives_identical_history(digits):
    first = tr.train("adam", epochs=3, seed=5, data=tr.load_digits_dataset(5))
    second = tr.train("adam", epochs=3, seed=5, data=tr.load_digits_dataset(5))
    assert first.loss_history == second.loss_history
    assert first.accuracy_history == second.accuracy_history
    other = tr.train("adam", epochs=3, seed=6, data=tr.load_digits_dataset(6))
    assert other.loss_history != first.loss_history


@pytest.mark.parametrize("name", fusedopt.available())
def test_every_optimizer_learns_at_its_task_setting(name, digits):
    result = tr.train(name, epochs=3, data=digits)
    assert result.loss_history[-1] < 0.7 * result.loss_history[0], result.loss_history
    # Chance is 10%. The best of three epochs, since Adagrad's accuracy swings from
    # epoch to epoch early on (63%, 78%, 60%); every rule tops 78% in three.
    assert max(result.accuracy_history) >= 0.7, (name, result.accuracy_history)


def test_float64_and_no_hidden_layer(digits):
    result = tr.train("sgd", epochs=3, dtype="float64", hidden=(),
                      data=tr.load_digits_dataset(0, np.float64))
    assert result.dtype == "float64"
    assert result.test_accuracy >= 0.85  # softmax regression on digits


def test_options_reach_the_optimizer():
    opt = tr.make_optimizer("sgd", learning_rate=0.3, clipnorm=None, weight_decay=0.01)
    assert (opt.learning_rate, opt.momentum, opt.weight_decay) == (0.3, 0.9, 0.01)
    assert tr.describe_optimizer(opt) == "sgd(learning_rate=0.3, weight_decay=0.01, momentum=0.9)"
    assert tr.optimizer_name(fusedopt.AdamW()) == "adamw"


# ------------------------------------------------------------------------ CLI
def test_json_output_is_one_object_with_the_fields(capsys):
    code, out, err = run_cli(["--epochs", "2", "--json", "--device", "cpu"], capsys)
    assert code == 0
    result = json.loads(out)  # the whole of stdout is one JSON object
    for key, kind in [("optimizer", str), ("device", str), ("epochs", int),
                      ("train_loss", float), ("test_accuracy", float), ("steps", int),
                      ("steps_per_second", float), ("seconds", float)]:
        assert isinstance(result[key], kind), key
    assert result["epochs"] == 2 and len(result["loss_history"]) == 2
    assert result["steps"] == 2 * math.ceil(1347 / 32)
    # Progress still goes to stderr: one line per epoch when it is not a terminal.
    assert err.count("epoch ") == 2 and "\r" not in err


def test_text_output_reports_accuracy_and_steps_per_second(capsys):
    code, out, err = run_cli(["--epochs", "1", "--quiet", "--optimizer", "nadam"], capsys)
    assert code == 0 and err == ""
    assert "test accuracy" in out and "steps/s" in out and "wall time" in out


def test_compare_writes_plot_and_table(tmp_path, capsys):
    plot, table = tmp_path / "curves.png", tmp_path / "table.md"
    code, out, _ = run_cli(["--compare", "--epochs", "2", "--quiet",
                            "--plot", str(plot), "--table", str(table)], capsys)
    assert code == 0
    png = plot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 800 and height >= 400 and len(png) > 20_000
    rows = [line for line in table.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| optimizer")]
    assert [row.split("|")[1].strip() for row in rows] == fusedopt.available()
    assert all(row in out for row in rows)  # the table is printed too


def test_compare_json_reports_every_optimizer(tmp_path, capsys):
    code, out, _ = run_cli(["--compare", "--epochs", "1", "--json", "--quiet",
                            "--plot", str(tmp_path / "p.png"),
                            "--table", str(tmp_path / "t.md")], capsys)
    assert code == 0
    results = json.loads(out)["results"]
    assert [r["optimizer"] for r in results] == fusedopt.available()


def test_plot_and_table_without_compare_write_the_single_run(tmp_path, monkeypatch, capsys):
    """--plot used to be ignored without --compare; it now plots the run it made."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["--epochs", "2", "--optimizer", "sgd", "--plot", "one.png",
                              "--table", "one.md"], capsys)
    assert code == 0 and "test accuracy" in out
    png = (tmp_path / "one.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    rows = [line for line in (tmp_path / "one.md").read_text().splitlines()
            if line.startswith("| sgd |")]
    assert len(rows) == 1
    assert "wrote one.png and one.md" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.md", "one.png"]


def test_a_single_run_writes_no_files_unless_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_cli(["--epochs", "1", "--quiet"], capsys)[0] == 0
    assert list(tmp_path.iterdir()) == []


def test_compare_writes_its_default_files(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_cli(["--compare", "--epochs", "1", "--quiet"], capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [tr.DEFAULT_TABLE, tr.DEFAULT_PLOT]


def test_markdown_prints_the_reproducible_table_only(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--compare", "--markdown", "--epochs", "1", "--quiet", "--plot", "p.png"]
    code, first, err = run_cli(argv, capsys)
    assert code == 0 and err == ""
    lines = first.splitlines()
    assert lines[0] == "| optimizer | settings | final train loss | test accuracy |"
    assert [line.split("|")[1].strip() for line in lines[2:]] == fusedopt.available()
    assert "steps/s" not in first
    assert run_cli(argv, capsys)[1] == first  # no timings: the same on every run
    code, single, _ = run_cli(["--markdown", "--epochs", "1", "--quiet"], capsys)
    assert code == 0 and single.splitlines()[2].startswith("| adam | `adam(learning_rate=0.001)` |")


@pytest.mark.parametrize("argv, message", [
    (["--optimizer", "nope"], "--optimizer: unknown optimizer 'nope'"),
    (["--learning-rate", "-1"], "--learning-rate must be"),
    (["--learning-rate", "nan"], "--learning-rate must be finite"),
    (["--optimizer", "ftrl", "--learning-rate", "0"], "--learning-rate must be > 0"),
    (["--weight-decay", "-0.5"], "--weight-decay must be in [0.0, inf)"),
    (["--clipnorm", "1", "--clipvalue", "1"],
     "Only one of --clipnorm, --clipvalue and --global-clipnorm can be set; "
     "got --clipnorm, --clipvalue"),
    (["--global-clipnorm", "-1"], "--global-clipnorm must be"),
    (["--json", "--markdown"], "cannot be combined"),
    (["--plot", "/no/such/folder/p.png"], "--plot: cannot write"),
    (["--compare", "--table", "/no/such/folder/t.md"], "--table: cannot write"),
    (["--dtype", "int8"], "--dtype"),
    (["--dtype", "float32", "--master-weights"], "--master-weights keeps a float32 copy"),
    (["--dtype", "float16", "--stochastic-rounding"], "bfloat16 params only"),
    (["--dtype", "float16", "--stochastic-rounding", "--framework", "torch"],
     "bfloat16 params only"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "x"], "--batch-size"),
    (["--hidden", "64,zero"], "--hidden"),
    (["--seed", "-1"], "--seed"),
    (["--device", "tpu"], "--device"),
    (["--compare", "--optimizer", "sgd"], "cannot be combined"),
    (["--compare", "--plot", "/no/such/folder/p.png"], "does not exist"),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    code, out, err = run_cli([*argv, "--quiet"], capsys)
    assert code == 2
    assert "error" in err and message in err
    assert "Traceback" not in err and out == ""
    # The command line's spelling, never the API's (`learning_rate`).
    assert not any(f"`{name}`" in err for name in tr.OPTIMIZER_OPTIONS), err


def test_gpu_without_a_gpu_is_a_clear_error(monkeypatch, capsys):
    # Pretend there is no GPU, so the test means the same on every machine.
    monkeypatch.setattr(fusedopt.cuda, "gpu_problem", lambda: "no GPU in this test")
    code, _, err = run_cli(["--device", "gpu", "--epochs", "1"], capsys)
    assert code == 2
    assert "no usable GPU" in err and "--device cpu" in err
    code, out, _ = run_cli(["--device", "auto", "--epochs", "1", "--json", "--quiet"], capsys)
    assert code == 0 and json.loads(out)["device"] == "cpu"


def test_json_has_no_nan():
    result = tr.TrainResult("sgd", "sgd()", "cpu", "float32", 1, 1, [math.nan], [0.1], 0.0, 1.0)
    text = json.dumps(result.to_dict(), allow_nan=False)
    assert json.loads(text)["train_loss"] is None
