"""The console keeps what a user needs; everything else a run prints goes to its log file.

A `rig train` user needs the live line, the results and one-line errors. The libraries under it
print more on every run: transformers' FutureWarnings and deprecation notices, Ray's and RLlib's
warnings, and C++ log lines that Ray's core worker (and gloo, DeepSpeed's ops) write straight to
file descriptor 2. Inside ``with to_log_file(run_dir / LOG_FILE) as terminal``:

- file descriptor 2 and ``sys.stderr`` are the log file, so whatever C, C++ or Python code
  writes to stderr lands there, whenever its handler was made;
- Python warnings and log records of every logger (INFO and up) are written to the log file,
  one timestamped line each;
- warnings our own packages log (``rig``, ``learner``, ``actors``, ``rl``, ``envs``,
  ``supervised``: a non-finite metric, a skipped checkpoint, a failed env) also reach the
  terminal as ``warning: ...``;
- ``terminal`` is the stream the console had; the live line and progress are drawn on it.

On exit file descriptor 2, ``sys.stderr``, warnings and logging are as they were, so the error
line of a failed run (printed by ``rig.cli.main`` afterwards) is on the terminal.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

LOG_FILE = "train.log"
OUR_PACKAGES = ("rig", "learner", "actors", "rl", "envs", "supervised")


class _Ours(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.split(".")[0] in OUR_PACKAGES


@contextlib.contextmanager
def to_log_file(path: Path) -> Iterator[TextIO]:
    """Route stderr, warnings and logging to ``path`` (appended); yields the terminal stream."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
    old_stderr = sys.stderr
    try:
        on_fd2 = old_stderr.fileno() == 2
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        on_fd2 = False  # a test's captured stream: it stays the terminal as it is
    saved_fd2 = os.dup(2)
    terminal = (
        os.fdopen(os.dup(2), "w", buffering=1, encoding=getattr(old_stderr, "encoding", None))
        if on_fd2
        else old_stderr
    )
    root = logging.getLogger()
    to_file = logging.StreamHandler(log)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_terminal = logging.StreamHandler(terminal)
    to_terminal.setLevel(logging.WARNING)
    to_terminal.addFilter(_Ours())
    to_terminal.setFormatter(_Plain())
    old_level = root.level
    os.dup2(log.fileno(), 2)
    sys.stderr = log
    root.addHandler(to_file)
    root.addHandler(to_terminal)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    try:
        yield terminal
    finally:
        logging.captureWarnings(False)
        root.removeHandler(to_terminal)
        root.removeHandler(to_file)
        root.setLevel(old_level)
        with contextlib.suppress(Exception):
            terminal.flush()
        log.flush()
        sys.stderr = old_stderr
        os.dup2(saved_fd2, 2)
        os.close(saved_fd2)
        if terminal is not old_stderr:
            terminal.close()
        log.close()


class _Plain(logging.Formatter):
    """``warning: <message>``, as the CLI writes ``error: <message>``."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"
