"""Run folders (rig/runs.py): claimed atomically, so two runs started at once never share one."""

from __future__ import annotations

import multiprocessing
import time

from rig import runs
from rig.runs import claim_run_dir


def test_claims_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt: "20260101-000000")
    first = claim_run_dir(tmp_path, "debug", "train")
    second = claim_run_dir(tmp_path, "debug", "train")
    assert first.name == "debug-train-20260101-000000"
    assert second.name == "debug-train-20260101-000000-2"
    assert first.is_dir() and second.is_dir()  # claimed: created, not just named


def _claim(output_dir: str, start_at: float, queue) -> None:
    while time.time() < start_at:
        time.sleep(0.001)
    queue.put(str(runs.claim_run_dir(output_dir, "debug", "train")))


def test_processes_claiming_at_once_never_share_a_folder(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    start_at = int(time.time()) + 1.2  # well inside one second: same timestamp for all
    procs = [ctx.Process(target=_claim, args=(str(tmp_path), start_at, queue)) for _ in range(4)]
    for proc in procs:
        proc.start()
    claimed = [queue.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    assert len(set(claimed)) == 4, claimed
