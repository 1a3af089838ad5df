"""The one progress display of the command line (`train` and `bench`).

A single line on stderr, redrawn in place at most every REDRAW_SECONDS:

    epoch  3/20 [#########---------------] 17/43 loss 0.1234

It is drawn only on a terminal. In a pipe, a log file or CI the bar draws nothing,
so a log holds only the lines written with `log()`, whole lines without control
characters.
"""

import math
import shutil
import sys
import time


class ProgressBar:
    """A redrawn progress line plus permanent log lines, on one stream.

    Args:
        stream: where to write (default sys.stderr).
        enabled: False makes everything silent (--quiet).
    """

    WIDTH = 24
    REDRAW_SECONDS = 0.1

    def __init__(self, stream=None, enabled=True):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.interactive = enabled and _is_terminal(self.stream)
        self._last_draw = -math.inf
        self._shown = 0  # length of the bar line now on screen; 0 when there is none

    def wants_update(self):
        """Whether update() now would draw. Lets a caller skip preparing the detail
        (reading a loss from a GPU waits for it) when nothing would be shown."""
        return self.interactive and time.perf_counter() - self._last_draw >= self.REDRAW_SECONDS

    def update(self, label, done, total, detail=""):
        """Show `done` of `total` (drawn only if wants_update())."""
        if not self.wants_update():
            return
        self._last_draw = time.perf_counter()
        line = render(label, done, total, detail)[:_terminal_width() - 1]  # no wrapping
        padding = " " * max(0, self._shown - len(line))  # cover a longer previous line
        self._write("\r" + line + padding)
        self._shown = len(line)

    def log(self, text):
        """A permanent line (a result, a header), written on any stream unless
        disabled; the bar is cleared first so the line stands alone."""
        if self.enabled:
            self.clear()
            self._write(text + "\n")

    def clear(self):
        """Remove the bar from the screen (call when done)."""
        if self._shown:
            self._write("\r" + " " * self._shown + "\r")
            self._shown = 0

    def _write(self, text):
        self.stream.write(text)
        self.stream.flush()


def render(label, done, total, detail=""):
    """'label [#####-----] done/total detail'."""
    fraction = min(1.0, done / total) if total else 1.0
    filled = int(round(fraction * ProgressBar.WIDTH))
    bar = "#" * filled + "-" * (ProgressBar.WIDTH - filled)
    return f"{label} [{bar}] {done}/{total}" + (f" {detail}" if detail else "")


def _is_terminal(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _terminal_width():
    return shutil.get_terminal_size(fallback=(100, 24)).columns
