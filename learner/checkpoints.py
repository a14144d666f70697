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
   size and sha256 digest of every file, and fsynced: it is the completeness marker; the sizes
   catch a checkpoint truncated or half-copied later (rsync to another disk) at every listing,
   the digests catch bytes changed in place (same size) when a checkpoint is resumed or
   exported (:func:`resolve_resume` reads every byte once; listing does not);
4. the folder is renamed to ``iter_N`` (atomic on one filesystem) and the parent fsynced;
5. ``latest`` is rewritten (temporary file + ``os.replace``);
6. checkpoints beyond ``keep_last`` are moved to ``.del-*`` and then deleted, oldest first.

A crash between 4 and 5 leaves ``latest`` one checkpoint behind, so :meth:`~CheckpointManager.latest`
does not trust it: it returns the newest ``iter_*`` folder whose meta.json checks out, and
skips (with a warning) one that does not, falling back to the one before. Leftover ``.tmp-*`` and
``.del-*`` folders are removed when a manager is opened and before each save. One process writes
a run's checkpoints (the driver, or DeepSpeed rank 0 for the manager's own files).

A full disk while writing (``ENOSPC``, or any error of torch's writer with under 1 MiB left) removes
the half-written folder, which frees the space it took, and raises :class:`DiskFullError`, a user
error naming the checkpoint and the last good one; nothing older is touched.

RNG state: :func:`rng_state` returns Python's, NumPy's global and torch's (CPU and every CUDA
device) generator states as plain types and byte tensors; :func:`dump_rng` writes them (and any
``torch.Generator`` of the caller) as JSON and :func:`load_rng` restores them, so resuming a run
folder from elsewhere unpickles nothing of ours. Each process saves its own.
"""

from __future__ import annotations

import base64
import errno
import hashlib
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


class DiskFullError(UserError):
    """The disk filled up while a checkpoint was written; the half-written one is gone."""


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
        try:
            tmp.mkdir()
            write_fn(tmp)
            files, digests = _fsync_tree(tmp)
            record = {
                "iteration": iteration,
                "time": time.time(),
                "files": files,
                "sha256": digests,
                "meta": dict(meta or {}),
            }
            atomic_write(tmp / META, json.dumps(record, indent=1))
            _fsync_dir(tmp)
        except BaseException as err:
            full = _disk_full(err, self.dir)  # before the removal frees the space again
            shutil.rmtree(tmp, ignore_errors=True)
            if full:
                good = newest.name if newest is not None else "none (this run saved none yet)"
                raise DiskFullError(
                    f"no space left on {_mount_point(self.dir)} while saving checkpoint {name} "
                    f"in {self.dir}; the last good one is {good}"
                ) from err
            raise

        final = self.dir / name
        if final.exists():  # same iteration saved again: move the old one aside, then replace
            os.rename(final, self.dir / f"{DEL_PREFIX}{name}-{os.getpid()}")
        os.rename(tmp, final)
        _fsync_dir(self.dir)
        try:
            atomic_write(self.dir / POINTER, name + "\n")
        except OSError as err:  # the checkpoint is committed; only the pointer is stale
            if not _disk_full(err, self.dir):
                raise
            raise DiskFullError(
                f"no space left on {_mount_point(self.dir)} after saving checkpoint {name} in "
                f"{self.dir}; the last good one is {name}"
            ) from err
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


def read_meta(checkpoint: str | Path, verify: bool = False) -> dict[str, Any]:
    """The checkpoint's meta.json (iteration, time, files, the caller's ``meta``), validated;
    ``verify`` also checks every file's sha256 digest (reads the whole checkpoint)."""
    path = Path(checkpoint)
    problem = _problem(path, digests=verify)
    if problem is not None:
        raise CheckpointError(f"corrupted checkpoint {path}: {problem}")
    return json.loads((path / META).read_text())


def resolve_resume(arg: str, output_dir: str | Path, name: str | None = None) -> Path:
    """The checkpoint folder ``--resume`` names: the newest complete one of a run folder.

    ``arg`` is a run folder, or ``auto``: among the run folders in ``output_dir`` (only those of
    run ``name`` when given), the one whose newest complete checkpoint was saved last. The run
    folder is ``result.parent.parent``. The checkpoint returned has had every file's sha256
    checked against its meta.json; one that fails is skipped with a warning, for the one before
    it. Read-only: leftovers are cleaned by the manager."""
    if arg != "auto":
        run = Path(arg)
        if not run.is_dir():
            raise CheckpointError(f"no run folder {arg}")
        found = _latest_or_reasons(run, digests=True)
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
    newest = max(candidates, key=lambda c: json.loads((c / META).read_text())["time"])
    run = newest.parent.parent
    found = _latest_or_reasons(run, digests=True)  # the digests of the chosen run only
    if isinstance(found, str):
        raise CheckpointError(f"--resume auto: run {run} has no complete checkpoint ({found})")
    return found


def checkpoint_at(run: str | Path, iteration: int) -> Path:
    """The complete checkpoint of iteration ``iteration`` in run folder ``run`` (every file's
    sha256 checked against its meta.json), for exporting or evaluating an older one than the
    newest. CheckpointError names the iterations the run keeps when it has not that one."""
    run = Path(run)
    if not run.is_dir():
        raise CheckpointError(f"no run folder {run}")
    named = _named(run / CHECKPOINTS)
    path = run / CHECKPOINTS / checkpoint_name(iteration)
    if path not in named:
        kept = ", ".join(str(_iteration(p)) for p in named) or "none"
        raise CheckpointError(
            f"run {run} has no checkpoint of iteration {iteration} (it keeps: {kept}; "
            f"train.keep_checkpoints sets how many are kept)"
        )
    problem = _problem(path, digests=True)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is not complete: {problem}")
    return path


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


def dump_rng(generators: Mapping[str, Any] | None = None) -> str:
    """:func:`rng_state` and the states of the caller's ``torch.Generator`` objects as JSON
    (byte tensors as base64), for a checkpoint file that loads without unpickling."""
    state = dict(rng_state())
    state["generators"] = {k: g.get_state() for k, g in (generators or {}).items()}
    return json.dumps(_to_json(state))


def load_rng(text: str, generators: Mapping[str, Any] | None = None) -> None:
    """Restore what :func:`dump_rng` wrote, into the global generators and ``generators``."""
    state = _from_json(json.loads(text))
    for key, generator in (generators or {}).items():
        generator.set_state(state["generators"][key])
    set_rng_state(state)


def _to_json(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        if value.dtype != torch.uint8:
            raise TypeError(f"RNG states are uint8 tensors, got {value.dtype}")
        return {"uint8_base64": base64.b64encode(value.numpy().tobytes()).decode()}
    if isinstance(value, Mapping):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    return value


def _from_json(value: Any) -> Any:
    import torch

    if isinstance(value, dict) and set(value) == {"uint8_base64"}:
        data = bytearray(base64.b64decode(value["uint8_base64"]))
        return torch.frombuffer(data, dtype=torch.uint8).clone()
    if isinstance(value, dict):
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


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


def _problem(path: Path, digests: bool = False) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None if it is; ``digests`` also checks
    the sha256 of every file (checkpoints written before digests were kept pass without)."""
    try:
        record = json.loads((path / META).read_text())
        iteration, files = record["iteration"], record["files"]
        sha256 = record.get("sha256", {})
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
    if digests:
        for rel, digest in sha256.items():
            if _sha256(path / rel) != digest:
                return f"{rel} has changed since it was saved (sha256 differs from {META})"
    return None


def _latest_or_reasons(run: Path, digests: bool = False) -> Path | str:
    """The run's newest complete checkpoint, or why there is none (for the error line)."""
    named = _named(run / CHECKPOINTS)
    if not named:
        return "checkpoints/ is missing or empty"
    reasons = []
    for path in reversed(named):
        problem = _problem(path, digests)
        if problem is None:
            for reason in reasons:  # only when falling back: else the error line says it all
                _log.warning("skipping checkpoint %s/%s", path.parent, reason)
            return path
        reasons.append(f"{path.name}: {problem}")
    return "; ".join(reasons)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _disk_full(err: BaseException, where: Path) -> bool:
    """Whether ``err`` (or what caused it) means the disk under ``where`` is full. torch's zip
    writer reports ENOSPC without the errno ("file write failed", "basic_ios::clear: iostream
    error", "unexpected pos ..."), so without one the free space decides: under 1 MiB left."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(seen) or "disk is full" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    if not isinstance(err, Exception):  # KeyboardInterrupt, SystemExit: never a full disk
        return False
    try:
        return shutil.disk_usage(where).free < 1 << 20
    except OSError:
        return False


def _mount_point(path: Path) -> str:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return str(path)


def _remove_leftovers(ckpt_dir: Path) -> None:
    for path in ckpt_dir.iterdir():
        if path.name.startswith((TMP_PREFIX, DEL_PREFIX)):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _fsync_tree(root: Path) -> tuple[dict[str, int], dict[str, str]]:
    """fsync every file and folder under ``root``; return {relative path: size} and
    {relative path: sha256 hex digest} of the files."""
    files, digests = {}, {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                digest = hashlib.sha256()
                while chunk := os.read(fd, 1 << 20):
                    digest.update(chunk)
            finally:
                os.close(fd)
            files[rel], digests[rel] = path.stat().st_size, digest.hexdigest()
        _fsync_dir(Path(folder))
    return files, digests


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
