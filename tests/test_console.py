"""The console of `rig train` shows what a user needs; library warnings, log lines and C++ stderr
go to the run's train.log (rig/console.py).

Component tier: a subprocess with a real file descriptor 2 for the routing, and one in-process
`rig train` iteration as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "debug.yaml")
ROUTED = """
import logging, os, sys, warnings
from pathlib import Path
from rig.console import to_log_file

with to_log_file(Path(sys.argv[1])) as terminal:
    warnings.warn("`past_key_values` is deprecated", FutureWarning)
    logging.getLogger("ray").warning("Token authentication is enabled for this Ray cluster")
    os.write(2, b"[E core_worker.cc:2465] Actor has constructor arguments in the object store\\n")
    print("a library's print to stderr", file=sys.stderr)
    logging.getLogger("rig.tracking").warning("metric loss/total is nan at step 3")
    terminal.write("training 1/1\\n")
print("error: shown after the run", file=sys.stderr)
"""


def _run(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)  # fmt: skip


def test_library_output_goes_to_the_log_file_ours_to_the_terminal(tmp_path):
    log = tmp_path / "run" / "train.log"
    proc = _run(ROUTED, str(log), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        "warning: metric loss/total is nan at step 3",
        "training 1/1",
        "error: shown after the run",
    ]
    text = log.read_text()
    for line in ("FutureWarning: `past_key_values` is deprecated", "WARNING ray: Token authentication",
                 "core_worker.cc:2465", "a library's print to stderr",
                 "WARNING rig.tracking: metric loss/total is nan"):  # fmt: skip
        assert line in text, line


@pytest.mark.slow
def test_rig_train_console_has_no_library_warnings(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("deepspeed")
    fast = ["rollout.num_env_runners=0", "imagination.num_actors=0", "env.num_envs=1",
            "rollout.fragment_length=2", "imagination.num_starts=2", "imagination.horizon=1",
            "policy.max_reasoning_tokens=2", "env.kwargs.length=4", "train.iterations=1",
            "tracking.system_metrics=false", "train.export_at_end=false"]  # fmt: skip
    code = "import sys; from rig.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = _run(code, "train", "--config", DEBUG, *fast, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for noise in ("Warning", "deprecated", "WARNING", "core_worker"):
        assert noise not in proc.stderr, proc.stderr
    assert "iter 1:" in proc.stderr  # the live line, as a plain line where stderr is no terminal
    (run,) = (tmp_path / "runs").glob("*-train-*")
    assert (run / "train.log").is_file()
