"""Run folders and output paths: checked before any work starts, never reused or overwritten."""

from __future__ import annotations

import os
import time
from pathlib import Path

from rig.errors import UserError


def ensure_writable_dir(path: Path, what: str) -> None:
    """Create ``path`` if needed; UserError naming ``what`` if it cannot be created or written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{what}: cannot create folder {str(path)!r} ({err.strerror})") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"{what}: folder {str(path)!r} is not writable")


def check_writable_file(path: Path, flag: str, suffix: str) -> None:
    """Fail early if ``path`` cannot be written: wrong suffix, a folder, a bad parent."""
    if path.suffix.lower() != suffix:
        raise UserError(f"{flag} {path}: the file must end in {suffix}")
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file name")
    ensure_writable_dir(path.parent, f"{flag} {path}")


def new_run_dir(output_dir: str | Path, name: str, command: str) -> Path:
    """A fresh ``<output_dir>/<name>-<command>-<timestamp>[-k]`` path (not created yet).

    Two processes started in the same second can get the same path; a command whose folder
    must be its own alone (``rig train``) uses :func:`claim_run_dir`."""
    out = Path(output_dir)
    ensure_writable_dir(out, f"run.output_dir {str(out)!r}")
    base = out / f"{name}-{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, k = base, 1
    while path.exists():  # never reuse (and so never overwrite) an existing run folder
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    return path


def claim_run_dir(output_dir: str | Path, name: str, command: str) -> Path:
    """Create and return a fresh ``<output_dir>/<name>-<command>-<timestamp>[-k]`` folder.

    The claim is the ``mkdir`` itself (no ``exist_ok``), which the filesystem makes atomic: of
    two processes started in the same second, one gets ``...-<timestamp>``, the other
    ``...-<timestamp>-2``, and neither ever writes into the other's folder."""
    out = Path(output_dir)
    ensure_writable_dir(out, f"run.output_dir {str(out)!r}")
    base = out / f"{name}-{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, k = base, 1
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            k += 1
            path = base.with_name(f"{base.name}-{k}")
        except OSError as err:
            raise UserError(f"run.output_dir: cannot create {str(path)!r} ({err.strerror})") from None
