"""Checkpoint folders: atomic saves, keep-last-K, crash safety, --resume resolution, RNG state."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from learner import checkpoints
from learner.checkpoints import (
    CheckpointError,
    CheckpointManager,
    DiskFullError,
    dump_rng,
    load_rng,
    read_meta,
    resolve_resume,
    rng_state,
    set_rng_state,
)

ROOT = Path(__file__).resolve().parents[1]


def writer(payload: str):
    def write(tmp):
        (tmp / "model").mkdir()
        (tmp / "model" / "weights.bin").write_text(payload)
        (tmp / "counters.json").write_text(json.dumps({"payload": payload}))

    return write


def names(manager: CheckpointManager) -> list[str]:
    return [p.name for p in manager.list()]


def entries(manager: CheckpointManager) -> set[str]:
    return {p.name for p in manager.dir.iterdir()}


def test_save_keeps_last_k_and_points_at_latest(tmp_path):
    manager = CheckpointManager(tmp_path / "run", keep_last=2)
    for it in (1, 2, 3, 4):
        path = manager.save(it, writer(f"w{it}"), meta={"weights_version": it})
    assert path == tmp_path / "run" / "checkpoints" / "iter_000004"
    assert names(manager) == ["iter_000003", "iter_000004"]
    assert entries(manager) == {"iter_000003", "iter_000004", "latest"}
    assert (manager.dir / "latest").read_text() == "iter_000004\n"
    assert manager.latest() == path
    meta = read_meta(path)
    assert meta["iteration"] == 4 and meta["meta"] == {"weights_version": 4}
    assert meta["files"] == {"model/weights.bin": 2, "counters.json": 17}
    assert (path / "model" / "weights.bin").read_text() == "w4"


def test_keep_last_one_never_deletes_the_new_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(1, writer("a"))
    manager.save(2, writer("b"))
    assert names(manager) == ["iter_000002"]


def _raise(*args, **kwargs):
    raise RuntimeError("killed")


def _raise_on_pointer(original):
    def write(path, text):
        if path.name == "latest":
            raise RuntimeError("killed")
        original(path, text)

    return write


CRASHES = {
    "inside write_fn": lambda mp: None,
    "before fsync": lambda mp: mp.setattr(checkpoints, "_fsync_tree", _raise),
    "writing meta.json": lambda mp: mp.setattr(checkpoints, "atomic_write", _raise),
    "before rename": lambda mp: mp.setattr(os, "rename", _raise),
    "before pointer": lambda mp: mp.setattr(
        checkpoints, "atomic_write", _raise_on_pointer(checkpoints.atomic_write)
    ),
    "before pruning": lambda mp: mp.setattr(CheckpointManager, "_prune", _raise),
}


@pytest.mark.parametrize("where", CRASHES)
def test_crash_at_any_step_keeps_previous_checkpoint(tmp_path, monkeypatch, where):
    run = tmp_path / "run"
    CheckpointManager(run, keep_last=1).save(1, writer("old"))
    with monkeypatch.context() as mp:
        CRASHES[where](mp)
        write = _raise if where == "inside write_fn" else writer("new")
        with pytest.raises(RuntimeError, match="killed"):
            CheckpointManager(run, keep_last=1).save(2, write)

    reopened = CheckpointManager(run, keep_last=1)  # opening removes the crash's leftovers
    assert not [name for name in entries(reopened) if name.startswith(".")]
    committed = where in ("before pointer", "before pruning")  # renamed: complete, newest
    latest = reopened.latest()
    assert latest.name == ("iter_000002" if committed else "iter_000001")
    old = run / "checkpoints" / "iter_000001"
    assert (old / "model" / "weights.bin").read_text() == "old"
    assert read_meta(old)["iteration"] == 1
    assert reopened.save(3, writer("next")).name == "iter_000003"
    assert names(reopened) == ["iter_000003"]


def test_leftover_and_incomplete_folders_are_never_checkpoints(tmp_path, caplog):
    run = tmp_path / "run"
    manager = CheckpointManager(run, keep_last=3)
    manager.save(1, writer("a"))
    (manager.dir / ".tmp-iter_000009-123").mkdir()
    (manager.dir / ".tmp-iter_000009-123" / "weights.bin").write_text("half")
    (manager.dir / ".del-iter_000000-123").mkdir()
    (manager.dir / "iter_000008").mkdir()  # e.g. copied by hand without meta.json
    (manager.dir / "latest").write_text("iter_000009\n")  # stale pointer

    assert manager.latest().name == "iter_000001"
    assert "iter_000008: no meta.json (incomplete)" in caplog.text
    assert names(manager) == ["iter_000001"]
    CheckpointManager(run, keep_last=3)
    assert entries(manager) == {"iter_000001", "iter_000008", "latest"}


def test_damaged_checkpoint_is_skipped_and_reported(tmp_path):
    manager = CheckpointManager(tmp_path / "run", keep_last=3)
    manager.save(1, writer("a"))
    second = manager.save(2, writer("b"))
    third = manager.save(3, writer("c"))
    (third / "meta.json").write_text("{not json")
    (second / "model" / "weights.bin").write_text("truncated!")

    assert manager.latest().name == "iter_000001"
    with pytest.raises(
        CheckpointError, match=r"corrupted checkpoint .*iter_000003: meta.json unreadable$"
    ):
        read_meta(third)
    with pytest.raises(CheckpointError, match=r"model/weights.bin has 10 bytes, meta.json says 1$"):
        read_meta(second)


def test_save_refuses_older_iteration_and_replaces_same(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save(5, writer("a"))
    with pytest.raises(ValueError, match="older than the newest checkpoint"):
        manager.save(4, writer("b"))
    manager.save(5, writer("c"))
    assert names(manager) == ["iter_000005"]
    assert (manager.latest() / "model" / "weights.bin").read_text() == "c"


def test_resolve_resume_explicit_run_folder(tmp_path):
    run = tmp_path / "rig-train-20260101-000000"
    CheckpointManager(run, keep_last=2).save(3, writer("a"))
    assert resolve_resume(str(run), tmp_path) == run / "checkpoints" / "iter_000003"

    with pytest.raises(CheckpointError, match=r"^no run folder .*nowhere$"):
        resolve_resume(str(tmp_path / "nowhere"), tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        CheckpointError, match=r"has no complete checkpoint \(checkpoints/ is missing"
    ):
        resolve_resume(str(empty), tmp_path)
    (run / "checkpoints" / "iter_000003" / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=r"\(iter_000003: no meta.json \(incomplete\)\)$"):
        resolve_resume(str(run), tmp_path)


def test_resolve_resume_auto_picks_last_saved_run_of_the_name(tmp_path):
    a = tmp_path / "rig-train-20260101-000000"
    b = tmp_path / "rig-train-20260102-000000"
    other = tmp_path / "other-train-20260103-000000"
    CheckpointManager(b, keep_last=2).save(1, writer("b"))
    time.sleep(0.01)
    CheckpointManager(a, keep_last=2).save(7, writer("a"))  # resumed later: saved last
    time.sleep(0.01)
    CheckpointManager(other, keep_last=2).save(1, writer("o"))
    CheckpointManager(tmp_path / "rig-train-20260104-000000", keep_last=2)  # no checkpoint yet

    assert resolve_resume("auto", tmp_path) == other / "checkpoints" / "iter_000001"
    assert resolve_resume("auto", tmp_path, name="rig") == a / "checkpoints" / "iter_000007"
    with pytest.raises(CheckpointError, match="no run folder of run 'nope' in .* has a complete"):
        resolve_resume("auto", tmp_path, name="nope")
    with pytest.raises(CheckpointError, match="no output folder"):
        resolve_resume("auto", tmp_path / "missing")


def test_rng_state_round_trips_through_torch_save(tmp_path):
    torch = pytest.importorskip("torch")
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn())

    random.seed(2)
    np.random.seed(2)
    torch.manual_seed(2)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn()) == expected


def test_keep_last_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


# -- digests, a full disk, RNG as JSON ---------------------------------------------------------------


def test_bytes_changed_in_place_are_caught_by_the_digests(tmp_path, caplog):
    """Same size, other bytes: the size check passes, the sha256 in meta.json does not. Resume
    falls back to the one before (with a warning); verifying the damaged one names the file."""
    run = tmp_path / "rig-train-20260101-000000"
    manager = CheckpointManager(run, keep_last=3)
    manager.save(1, writer("good"))
    second = manager.save(2, writer("good"))
    assert set(read_meta(second)["sha256"]) == {"model/weights.bin", "counters.json"}
    (second / "model" / "weights.bin").write_text("evil")  # 4 bytes, as before

    assert manager.latest() == second  # listing checks sizes only (cheap)
    assert resolve_resume(str(run), tmp_path).name == "iter_000001"
    assert resolve_resume("auto", tmp_path).name == "iter_000001"
    assert "iter_000002: model/weights.bin has changed since it was saved" in caplog.text
    with pytest.raises(CheckpointError, match=r"model/weights.bin has changed since it was saved"):
        read_meta(second, verify=True)
    (run / "checkpoints" / "iter_000001" / "counters.json").write_text(" " * 18)
    with pytest.raises(CheckpointError, match=r"has no complete checkpoint \(iter_000002: .*sha256"):
        resolve_resume(str(run), tmp_path)


def _enospc(tmp):
    (tmp / "weights.bin").write_bytes(b"x" * 10)
    raise OSError(errno.ENOSPC, "No space left on device")


def _torch_write_failed(tmp):
    raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed "
                       "writing file data/0: file write failed")  # fmt: skip


@pytest.mark.parametrize("write", [_enospc, _torch_write_failed], ids=["ENOSPC", "torch"])
def test_a_full_disk_is_one_line_naming_the_last_good_checkpoint(tmp_path, monkeypatch, write):
    run = tmp_path / "run"
    manager = CheckpointManager(run, keep_last=1)
    manager.save(4, writer("old"))
    full = shutil.disk_usage(tmp_path)._replace(free=0)
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: full)
    with pytest.raises(DiskFullError) as caught:
        manager.save(6, write)
    assert re.fullmatch(r"no space left on /\S* while saving checkpoint iter_000006 in \S+; "
                        r"the last good one is iter_000004", str(caught.value)), caught.value  # fmt: skip
    assert entries(manager) == {"iter_000004", "latest"}  # the half-written one is gone
    assert (manager.latest() / "model" / "weights.bin").read_text() == "old"


def test_an_unrelated_write_error_is_not_called_a_full_disk(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    with pytest.raises(RuntimeError, match="file write failed"):  # plenty of space here
        manager.save(1, _torch_write_failed)
    with pytest.raises(PermissionError):
        manager.save(1, lambda tmp: (_ for _ in ()).throw(PermissionError(errno.EACCES, "no")))


_TMPFS_SCRIPT = """
import sys, torch
from learner.checkpoints import CheckpointManager, DiskFullError
manager = CheckpointManager(sys.argv[1], keep_last=2)
manager.save(1, lambda tmp: torch.save(torch.zeros(1000), tmp / "w.pt"))
try:
    manager.save(2, lambda tmp: torch.save(torch.zeros(1_000_000), tmp / "w.pt"))  # 4 MB
except DiskFullError as err:
    print("error:", err)
print("left:", sorted(p.name for p in manager.dir.iterdir()))
"""


def test_a_full_tmpfs_while_saving_is_one_line(tmp_path):
    """The real thing where a tmpfs can be mounted (a private mount namespace, no root needed
    where user namespaces are allowed); skipped elsewhere, the simulated tests above remain."""
    import subprocess
    import sys

    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to mount a private tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    command = (f"mount -t tmpfs -o size=2m tmpfs {mnt} && cd {ROOT} && "
               f"{sys.executable} -c '{_TMPFS_SCRIPT}' {mnt}/run")  # fmt: skip
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs tmpfs {mnt}"],
                           capture_output=True, text=True)  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.strip()}")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == (f"error: no space left on {mnt} while saving checkpoint iter_000002 in "
                        f"{mnt}/run/checkpoints; the last good one is iter_000001"), done.stdout  # fmt: skip
    assert lines[1] == "left: ['iter_000001', 'latest']"


def test_rng_state_round_trips_through_json(tmp_path):
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(5)
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    text = dump_rng({"generator": generator})
    json.loads(text)  # plain JSON: nothing to unpickle
    draw = lambda: (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn(),  # noqa: E731
                    torch.rand(1, generator=generator).item())  # fmt: skip
    expected = draw()

    random.seed(2)
    np.random.seed(2)
    torch.manual_seed(2)
    generator.manual_seed(9)
    load_rng(text, {"generator": generator})
    assert draw() == expected
