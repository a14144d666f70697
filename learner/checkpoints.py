"""A run's checkpoints: written atomically, kept to the last K, found again for ``--resume``.

Layout::

    <run_dir>/checkpoints/
        iter_000010/              a complete checkpoint: whatever the caller wrote + meta.json
        iter_000012/
        latest                    "iter_000012", for people and tools (cat checkpoints/latest)
        .tmp-iter_000014-<pid>/   being written (or left by a crash): never a checkpoint
        .del-iter_000008-<pid>/   being deleted (or left by a crash): never a checkpoint

:meth:`CheckpointManager.save` commits in this order, so a crash (an exception, a kill, a power
loss) at any point leaves every earlier checkpoint intact and the new one either complete or
invisible:

1. the caller's ``write_fn`` fills ``.tmp-iter_N-<pid>/``;
2. every file and folder in it is fsynced: a rename is only atomic for what has reached the
   disk, and without it a power loss can leave a renamed checkpoint of empty files;
3. ``meta.json`` is written last, with the iteration, the time, the caller's metadata and the
   size of every file, and fsynced: it is the completeness marker, and the sizes also catch a
   checkpoint truncated or half-copied later (rsync to another disk);
4. the folder is renamed to ``iter_N`` (atomic on one filesystem) and the parent fsynced;
5. ``latest`` is rewritten (temporary file + ``os.replace``);
6. checkpoints beyond ``keep_last`` are moved to ``.del-*`` and then deleted, oldest first.

A crash between 4 and 5 leaves ``latest`` one checkpoint behind, so :meth:`~CheckpointManager.latest`
does not trust it: it returns the newest ``iter_*`` folder whose meta.json checks out, and
skips (with a warning) one that does not, falling back to the one before. Leftover ``.tmp-*`` and
``.del-*`` folders are removed when a manager is opened and before each save. One process writes
a run's checkpoints (the driver, or DeepSpeed rank 0 for the manager's own files).

RNG state: :func:`rng_state` returns Python's, NumPy's global and torch's (CPU and every CUDA
device) generator states as plain types, so ``torch.save(rng_state(), tmp_dir / "rng.pt")`` in a
``write_fn`` and ``set_rng_state(torch.load(path, weights_only=True))`` on resume round-trip
without unpickling arbitrary objects. Each process saves its own (``rng_rank{r}.pt``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rig.errors import UserError
from rig.runs import ensure_writable_dir

_log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
META = "meta.json"
POINTER = "latest"
TMP_PREFIX = ".tmp-"
DEL_PREFIX = ".del-"
_NAME = re.compile(r"^iter_(\d{6,})$")
_RUN_NAME = r"-[A-Za-z0-9_]+-\d{8}-\d{6}(-\d+)?$"  # <name>-<command>-<timestamp>[-k], rig/runs.py


class CheckpointError(UserError):
    """A run folder or checkpoint given to resume from is missing, empty or damaged."""


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:06d}"


class CheckpointManager:
    """Writes ``<run_dir>/checkpoints/iter_NNNNNN/`` folders atomically and keeps the last K."""

    def __init__(self, run_dir: str | Path, keep_last: int) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.dir = Path(run_dir) / CHECKPOINTS
        self.keep_last = keep_last
        ensure_writable_dir(self.dir, "checkpoints")
        _remove_leftovers(self.dir)

    def save(
        self,
        iteration: int,
        write_fn: Callable[[Path], None],
        meta: Mapping[str, Any] | None = None,
    ) -> Path:
        """Commit one checkpoint (module docstring) and return its folder.

        ``write_fn(tmp_dir)`` writes the contents into an existing empty folder; ``meta`` (JSON
        types: the weights version, counters) is stored in meta.json under ``"meta"``. Saving an
        iteration older than the newest checkpoint is refused (a counter not restored on resume
        would otherwise prune the newer ones); saving the same iteration again replaces it (a crash
        between moving the old copy aside and the rename leaves the checkpoint before it)."""
        newest = self.latest()
        if newest is not None and iteration < _iteration(newest):
            raise ValueError(
                f"iteration {iteration} is older than the newest checkpoint {newest}; "
                "restore the counters from it or use a new run folder"
            )
        _remove_leftovers(self.dir)
        name = checkpoint_name(iteration)
        tmp = self.dir / f"{TMP_PREFIX}{name}-{os.getpid()}"
        tmp.mkdir()
        write_fn(tmp)
        files = _fsync_tree(tmp)
        record = {
            "iteration": iteration,
            "time": time.time(),
            "files": files,
            "meta": dict(meta or {}),
        }
        atomic_write(tmp / META, json.dumps(record, indent=1))
        _fsync_dir(tmp)

        final = self.dir / name
        if final.exists():  # same iteration saved again: move the old one aside, then replace
            os.rename(final, self.dir / f"{DEL_PREFIX}{name}-{os.getpid()}")
        os.rename(tmp, final)
        _fsync_dir(self.dir)
        atomic_write(self.dir / POINTER, name + "\n")
        self._prune(final)
        return final

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None; damaged ones are skipped with a warning."""
        for path in reversed(_named(self.dir)):
            problem = _problem(path)
            if problem is None:
                return path
            _log.warning("skipping checkpoint %s: %s", path, problem)
        return None

    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return [path for path in _named(self.dir) if _problem(path) is None]

    def _prune(self, just_written: Path) -> None:
        """Delete all but the newest ``keep_last`` complete checkpoints up to ``just_written``.

        ``iter_*`` folders newer than it (damaged ones that resuming skipped) belong to an
        abandoned attempt and go too, as do damaged older ones."""
        older = [p for p in self.list() if _iteration(p) < _iteration(just_written)]
        keep = {just_written, *older[max(0, len(older) - self.keep_last + 1) :]}
        for path in _named(self.dir):  # oldest first
            if path not in keep:
                trash = self.dir / f"{DEL_PREFIX}{path.name}-{os.getpid()}"
                os.rename(path, trash)  # atomic: never a half-deleted iter_* folder
                shutil.rmtree(trash)
        _remove_leftovers(self.dir)


def read_meta(checkpoint: str | Path) -> dict[str, Any]:
    """The checkpoint's meta.json (iteration, time, files, the caller's ``meta``), validated."""
    path = Path(checkpoint)
    problem = _problem(path)
    if problem is not None:
        raise CheckpointError(f"corrupted checkpoint {path}: {problem}")
    return json.loads((path / META).read_text())


def resolve_resume(arg: str, output_dir: str | Path, name: str | None = None) -> Path:
    """The checkpoint folder ``--resume`` names: the newest complete one of a run folder.

    ``arg`` is a run folder, or ``auto``: among the run folders in ``output_dir`` (only those of
    run ``name`` when given), the one whose newest complete checkpoint was saved last. The run
    folder is ``result.parent.parent``. Read-only: leftovers are cleaned by the manager."""
    if arg != "auto":
        run = Path(arg)
        if not run.is_dir():
            raise CheckpointError(f"no run folder {arg}")
        found = _latest_or_reasons(run)
        if isinstance(found, str):
            raise CheckpointError(f"run {arg} has no complete checkpoint ({found})")
        return found

    out = Path(output_dir)
    if not out.is_dir():
        raise CheckpointError(f"--resume auto: no output folder {out} (run.output_dir)")
    runs = [p for p in out.iterdir() if p.is_dir() and (p / CHECKPOINTS).is_dir()]
    if name is not None:
        runs = [p for p in runs if re.match(re.escape(name) + _RUN_NAME, p.name)]
    candidates = [c for c in map(_latest_or_reasons, runs) if not isinstance(c, str)]
    if not candidates:
        which = f"of run {name!r} " if name is not None else ""
        raise CheckpointError(
            f"--resume auto: no run folder {which}in {out} has a complete checkpoint"
        )
    return max(candidates, key=lambda c: json.loads((c / META).read_text())["time"])


# -- RNG state --------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python, NumPy (global) and torch (CPU, every CUDA device) generator states, as plain
    types and tensors so that ``torch.load(..., weights_only=True)`` reads them back."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": keys.tolist(),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA only where saved and available)."""
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- helpers ----------------------------------------------------------------------------------------


def _iteration(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def _named(ckpt_dir: Path) -> list[Path]:
    """``iter_*`` folders, oldest first, complete or not."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if _NAME.match(p.name) and p.is_dir()]
    return sorted(found, key=_iteration)


def _problem(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None if it is."""
    try:
        record = json.loads((path / META).read_text())
        iteration, files = record["iteration"], record["files"]
    except FileNotFoundError:
        return f"no {META} (incomplete)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{META} unreadable"
    if _NAME.match(path.name) and iteration != _iteration(path):
        return f"{META} says iteration {iteration}"
    for rel, size in files.items():
        file = path / rel
        if not file.is_file():
            return f"{rel} missing"
        if file.stat().st_size != size:
            return f"{rel} has {file.stat().st_size} bytes, {META} says {size}"
    return None


def _latest_or_reasons(run: Path) -> Path | str:
    """The run's newest complete checkpoint, or why there is none (for the error line)."""
    named = _named(run / CHECKPOINTS)
    if not named:
        return "checkpoints/ is missing or empty"
    reasons = []
    for path in reversed(named):
        problem = _problem(path)
        if problem is None:
            return path
        reasons.append(f"{path.name}: {problem}")
    return "; ".join(reasons)


def _remove_leftovers(ckpt_dir: Path) -> None:
    for path in ckpt_dir.iterdir():
        if path.name.startswith((TMP_PREFIX, DEL_PREFIX)):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _fsync_tree(root: Path) -> dict[str, int]:
    """fsync every file and folder under ``root``; return {relative path: size} of the files."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            files[path.relative_to(root).as_posix()] = path.stat().st_size
        _fsync_dir(Path(folder))
    return files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str, tmp: Path | None = None) -> None:
    """Write ``data`` to ``path`` atomically and durably: a sibling temporary file (``tmp``, by
    default ``path``'s name with this module's prefix and the process id), fsync, ``os.replace``,
    fsync of the folder. A crash leaves the old file or the new one, never a mix (the dataset
    writer of ``supervised/`` uses it too)."""
    path = Path(path)
    tmp = tmp or path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
