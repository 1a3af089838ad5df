"""The one progress display shared by `train` and `bench`: redrawn in place on a
terminal, silent elsewhere (only whole log lines reach a pipe or a log file)."""

import io
import re
from pathlib import Path

from fusedopt import _progress, bench
from fusedopt import train as tr
from fusedopt.__main__ import main
from fusedopt._progress import ProgressBar


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_on_a_terminal_the_bar_redraws_in_place_and_log_lines_stand_alone(monkeypatch):
    stream = FakeTerminal()
    bar = ProgressBar(stream=stream)
    bar.update("epoch 1/2", 5, 10, "loss 0.5000")
    assert stream.getvalue() == "\repoch 1/2 [############------------] 5/10 loss 0.5000"
    bar.update("epoch 1/2", 6, 10, "loss 0.4000")  # within REDRAW_SECONDS: not drawn
    assert stream.getvalue().count("\r") == 1
    monkeypatch.setattr(ProgressBar, "REDRAW_SECONDS", 0.0)
    bar.update("e", 10, 10)  # shorter: padded to cover the previous line
    last = stream.getvalue().split("\r")[-1]
    assert last.startswith("e [########################] 10/10") and len(last) == len(
        "epoch 1/2 [############------------] 5/10 loss 0.5000")
    bar.log("epoch 1/2 loss 0.2500 test acc 90.00%")
    assert stream.getvalue().endswith("\r" + " " * len(last.rstrip()) + "\r"
                                      "epoch 1/2 loss 0.2500 test acc 90.00%\n")


def test_elsewhere_only_log_lines_are_written():
    stream = io.StringIO()  # a pipe or a file: isatty() is False
    bar = ProgressBar(stream=stream)
    assert not bar.wants_update()
    bar.update("epoch 1/2", 5, 10, "loss 0.5")
    bar.clear()
    bar.log("a result")
    assert stream.getvalue() == "a result\n"


def test_disabled_writes_nothing():
    stream = FakeTerminal()
    bar = ProgressBar(stream=stream, enabled=False)
    bar.update("x", 1, 2)
    bar.log("x")
    assert stream.getvalue() == ""


def test_a_line_never_wraps(monkeypatch):
    monkeypatch.setattr(_progress, "_terminal_width", lambda: 30)
    stream = FakeTerminal()
    ProgressBar(stream=stream).update("a long label", 1, 2, "and a long detail")
    assert len(stream.getvalue()) == 1 + 29


def test_train_and_bench_share_the_one_progress_display():
    assert tr.ProgressBar is bench.ProgressBar is ProgressBar
    package = Path(_progress.__file__).parent
    owners = [p.name for p in package.glob("*.py")
              if re.search(r"^class \w*Progress", p.read_text(), re.M)]
    assert owners == ["_progress.py"]


def test_bench_draws_no_progress_into_a_pipe(tmp_path, capsys):
    assert main(["bench", "--device", "cpu", "--sizes", "10", "--optimizers", "sgd",
                 "--repeats", "1", "--warmup", "0", "--no-peers", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().err == ""
