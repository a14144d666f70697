"""MLflow tracking of training runs: params, per-iteration metrics, traces, images, checkpoints.

Only the driver tracks. Ray workers return numbers to the driver, which logs them; nothing here
is imported by ``actors/`` and ``mlflow`` is imported only when a :class:`Tracker` is built, so
a worker image does not need MLflow and ``import rig.tracking`` stays cheap.

Where runs go. With ``tracking.tracking_uri: null`` the ``MLFLOW_TRACKING_URI`` environment
variable wins (a cluster sets it once for every job); without it, runs go to a SQLite database
next to the run folders, ``<output_dir>/mlflow.db``, with artifacts in ``<output_dir>/mlartifacts``,
so a laptop needs no server and every run of an output folder shows up in one UI::

    mlflow ui --backend-store-uri sqlite:///runs/mlflow.db

SQLite rather than a ``file:`` store because MLflow 3 refuses to open file stores unless
``MLFLOW_ALLOW_FILE_STORE=true`` is set (the file backend is in maintenance mode). Creating the
database runs MLflow's migrations once, a few seconds (1.7 s to 7 s measured on 2 busy CPU cores);
later runs open it in milliseconds. Several runs may share one database at once (two ``rig
train`` started together on one output folder): opening the store, creating the experiment and
the run happen under an exclusive lock on ``mlflow.db.lock``, so only the first process runs the
migrations (two at once fail with "table ... already exists"), and SQLite serialises the later
writes, each run into its own MLflow run.

Recommended section (configs/defaults.yaml)::

    tracking:
      tracking_uri: null     # null: $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db
      experiment: rig-rl     # MLflow experiment the runs are grouped under
      system_metrics: true   # CPU/GPU/memory/disk/network every 10 s as system/* metrics
      log_every: 1           # iterations between metric rows
      image_every: 50        # iterations between real-vs-imagined frame images

System metrics need ``psutil`` (a dependency of deepspeed); GPU rows also need ``nvidia-ml-py``
(``pynvml``), which nothing here installs: without it MLflow logs CPU, memory, disk and network
only. ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` changes the 10 s period.

Resuming (``--resume``) replays the iterations after the checkpoint: :meth:`Tracker.rewind`
deletes the abandoned attempt's rows after the checkpoint's step, so those steps read as the
resumed run computed them. That needs a SQL store (SQLite, or a database MLflow's SQL store
opens); against a tracking server, which has no call to delete metric rows, the new rows are
logged beside the old ones (MLflow's latest value is the new one) and a warning says so.

Metric values that are None are skipped (a metric not computed this iteration). NaN and
infinite values are skipped too, because MLflow's charts show NaN as a gap and store infinity
as +-1.8e308, which flattens every other point; instead ``tracking/nonfinite_metrics`` counts
them at that step and a warning names each key the first time it happens, so a diverging loss is
still seen.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import math
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from rig.config import TrackingConfig
from rig.errors import UserError

_log = logging.getLogger(__name__)

# MLflow's limits (mlflow.utils.validation): a param value holds at most 6000 characters and one
# log_batch call at most 100 params/tags and 1000 metrics.
MAX_PARAM_CHARS = 6000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
NONFINITE_KEY = "tracking/nonfinite_metrics"
SYSTEM_PREFIX = "system/"  # MLflow's system metrics, counted on their own steps
END_STATUSES = ("FINISHED", "FAILED", "KILLED")
RUN_ID_FILE = "mlflow_run_id"


def resolve_tracking_uri(config: TrackingConfig, output_dir: str | Path) -> str:
    """The config's URI, else ``$MLFLOW_TRACKING_URI``, else ``<output_dir>/mlflow.db`` (SQLite)."""
    if config.tracking_uri is not None:
        return config.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(Path(output_dir) / 'mlflow.db').resolve()}"


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"env": {"size": 64}}`` -> ``{"env.size": "64"}``; MLflow params are flat strings.

    Lists are written as JSON and an empty mapping as ``{}`` so that every key of the config
    appears; values longer than MLflow's limit are cut with a marker (config.yaml, logged as an
    artifact next to them, has them whole)."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
            continue
        text = json.dumps(value) if isinstance(value, list | tuple | Mapping) else str(value)
        if len(text) > MAX_PARAM_CHARS:
            marker = f"... [{len(text)} chars, see config.yaml]"
            text = text[: MAX_PARAM_CHARS - len(marker)] + marker
        flat[name] = text
    return flat


def side_by_side(real: np.ndarray, imagined: np.ndarray, gap: int = 2) -> np.ndarray:
    """One image comparing real and imagined frames: row i is step i, real left, imagined right.

    ``real`` and ``imagined`` are (N, H, W, 3) uint8; the result is
    (N*H + (N-1)*gap, 2*W + gap, 3) uint8 with white ``gap``-pixel separators."""
    if real.shape != imagined.shape or real.ndim != 4 or real.shape[-1] != 3:
        raise ValueError(
            f"side_by_side needs two (N, H, W, 3) arrays of one shape, got {real.shape} "
            f"and {imagined.shape}"
        )
    if real.dtype != np.uint8 or imagined.dtype != np.uint8:
        raise ValueError(f"side_by_side needs uint8 frames, got {real.dtype}, {imagined.dtype}")
    n, h, w, _ = real.shape
    out = np.full((n * h + (n - 1) * gap, 2 * w + gap, 3), 255, dtype=np.uint8)
    for i in range(n):
        top = i * (h + gap)
        out[top : top + h, :w] = real[i]
        out[top : top + h, w + gap :] = imagined[i]
    return out


def saved_run_id(run_dir: str | Path) -> str | None:
    """The MLflow run id a :class:`Tracker` recorded in ``run_dir``, for resuming that run."""
    path = Path(run_dir) / RUN_ID_FILE
    return path.read_text().strip() if path.is_file() else None


class Tracker:
    """One MLflow run of one run folder, logged through an explicit ``MlflowClient``.

    The client rather than the ``mlflow.*`` fluent API: no process-global active run or
    tracking URI, so two trackers (or a test and a tracker) on different stores coexist.

    ``run_id=None`` starts a new run named after the run folder and logs ``params`` (the
    resolved config, flattened to dotted keys, and whole as ``config.yaml``). A ``run_id``
    resumes that run: same id, status back to RUNNING, and metrics continue after the highest
    step already logged; :meth:`rewind` to the checkpoint's step first makes the replayed steps
    log again (module docstring). Without it, rows for steps the run already has are dropped
    with one warning, so every step has one value.
    On resume, params MLflow already holds keep their first value (MLflow params are immutable);
    keys whose value changed are named in a warning and the new config is logged as
    ``config-resume-<k>.yaml``.

    Use as a context manager: a normal exit ends the run FINISHED, an exception FAILED and
    Ctrl-C (KeyboardInterrupt) KILLED; the exception propagates.
    """

    def __init__(
        self,
        config: TrackingConfig,
        run_dir: str | Path,
        params: Mapping[str, Any],
        run_id: str | None = None,
    ) -> None:
        import mlflow
        from mlflow.exceptions import MlflowException

        # Both print INFO lines when a database is created or migrated: noise on every first run.
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)

        self.config = config
        self.run_dir = Path(run_dir)
        output_dir = self.run_dir.parent
        self.tracking_uri = resolve_tracking_uri(config, output_dir)
        try:
            with _store_lock(self.tracking_uri):  # one process at a time creates the database
                self.client = mlflow.MlflowClient(self.tracking_uri)
                experiment_id = self._experiment_id(output_dir)
                if run_id is None:
                    run = self.client.create_run(
                        experiment_id, run_name=self.run_dir.name, tags=_context_tags()
                    )
                else:
                    run = self.client.get_run(run_id)
        except MlflowException as err:
            raise UserError(
                f"MLflow tracking at {self.tracking_uri!r}: {err.message.splitlines()[0]}"
            ) from None
        self.run_id = run.info.run_id
        self.resumed = run_id is not None
        self._ended = False
        self._warned_nonfinite: set[str] = set()
        self._warned_replayed = False
        self.next_step = _next_step(run) if self.resumed else 0

        if self.resumed:
            self.client.update_run(self.run_id, status="RUNNING")
            self._log_resumed_params(run, params)
        else:
            self._log_params(flatten_params(params))
            self.client.log_text(self.run_id, _dump(params), "config.yaml")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / RUN_ID_FILE).write_text(self.run_id + "\n")
        self._monitor = self._start_system_metrics() if config.system_metrics else None

    # -- logging ----------------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log one row of metrics at ``step`` (the iteration) in one batched call.

        Values are anything ``float()`` takes (Python and NumPy numbers, one-element tensors).
        None is skipped; NaN/inf are skipped and counted (module docstring)."""
        from mlflow.entities import Metric

        if step < self.next_step:
            if not self._warned_replayed:
                _log.warning(
                    "MLflow run %s already has metrics up to step %d (logged before the crash this "
                    "run resumed from); keeping those and dropping the replayed steps",
                    self.run_id,
                    self.next_step - 1,
                )
                self._warned_replayed = True
            return
        now = int(time.time() * 1000)
        rows, nonfinite = [], 0
        for key, value in metrics.items():
            if value is None:
                continue
            number = float(value)
            if not math.isfinite(number):
                nonfinite += 1
                if key not in self._warned_nonfinite:
                    _log.warning(
                        "metric %s is %s at step %d; not logged, counted", key, number, step
                    )
                    self._warned_nonfinite.add(key)
                continue
            rows.append(Metric(key, number, now, step))
        if nonfinite:
            rows.append(Metric(NONFINITE_KEY, float(nonfinite), now, step))
        with self._disk_full_is_one_line():
            for i in range(0, len(rows), METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=rows[i : i + METRICS_PER_BATCH])

    def rewind(self, step: int) -> None:
        """Forget this run's training metrics after ``step`` (the iteration a resume restored),
        so the replayed steps are logged again and read as this attempt computed them. System
        metrics keep their own steps and stay."""
        if step + 1 >= self.next_step:
            return  # nothing was logged after it
        store = self.client._tracking_client.store
        try:
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
        except ImportError:  # pragma: no cover - mlflow without SQLAlchemy
            SqlAlchemyStore = ()  # noqa: N806
        if isinstance(store, SqlAlchemyStore):
            _delete_metrics_after(store, self.run_id, step)
        else:
            _log.warning(
                "MLflow at %s cannot delete metric rows: steps %d-%d of run %s keep the values "
                "of the attempt before the resume next to this one's",
                self.tracking_uri, step + 1, self.next_step - 1, self.run_id,
            )  # fmt: skip
        self.next_step = step + 1

    def log_text(self, text: str, artifact_file: str) -> None:
        """Write ``text`` (e.g. the reasoning traces of an iteration) as an artifact file."""
        with self._disk_full_is_one_line():
            self.client.log_text(self.run_id, text, artifact_file)

    def log_image(self, image: np.ndarray, artifact_file: str) -> None:
        """Write an (H, W, 3) uint8 image as an artifact, e.g. ``images/iter_000100.png``."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(
                f"log_image needs an (H, W, 3) uint8 array, got {image.dtype} {image.shape}"
            )
        with self._disk_full_is_one_line():
            self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        """Copy a folder (an exported HF checkpoint) into the run's artifacts."""
        with self._disk_full_is_one_line():
            self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        """Stop system metrics, then mark the run ``status`` (FINISHED, FAILED or KILLED).

        Ending twice does nothing, so ``end`` inside a ``with`` block is allowed."""
        if status not in END_STATUSES:
            raise ValueError(f"status must be one of {', '.join(END_STATUSES)}, got {status!r}")
        if self._ended:
            return
        self._ended = True
        if self._monitor is not None:
            self._monitor.finish()
        if status == "FINISHED":
            self.client.set_terminated(self.run_id, status)
            return
        try:  # a failing run (a full disk, a lost server) must not hide its error behind this
            self.client.set_terminated(self.run_id, status)
        except Exception as err:
            _log.warning("could not mark MLflow run %s %s: %s", self.run_id, status, err)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.end("KILLED")
        else:
            self.end("FAILED")

    # -- helpers ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _disk_full_is_one_line(self):
        """A full disk under the store or the artifacts (SQLite: "database or disk is full")
        is a user error naming where the run's checkpoints are, not a traceback."""
        try:
            yield
        except Exception as err:
            import errno

            text = str(err)
            full = "disk is full" in text or "No space left" in text or (
                isinstance(err, OSError) and err.errno == errno.ENOSPC)  # fmt: skip
            if not full:
                raise
            raise UserError(
                f"no space left on the disk of MLflow's store {self.tracking_uri} while logging "
                f"run {self.run_id}; its checkpoints are in {self.run_dir / 'checkpoints'}"
            ) from err

    def _experiment_id(self, output_dir: Path) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(self.config.experiment)
        if found is not None:
            return found.experiment_id
        # A local store keeps artifacts next to the run folders; a server decides for itself.
        local = self.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in self.tracking_uri
        location = str((output_dir / "mlartifacts").resolve()) if local else None
        try:
            return self.client.create_experiment(self.config.experiment, artifact_location=location)
        except MlflowException:  # another run created it in between
            return self.client.get_experiment_by_name(self.config.experiment).experiment_id

    def _log_params(self, flat: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key, value) for key, value in flat.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + PARAMS_PER_BATCH])

    def _log_resumed_params(self, run: Any, params: Mapping[str, Any]) -> None:
        old = run.data.params
        flat = flatten_params(params)
        changed = sorted(key for key in flat if key in old and old[key] != flat[key])
        self._log_params({key: value for key, value in flat.items() if key not in old})
        resumes = int(run.data.tags.get("rig.resumes", "0")) + 1
        self.client.set_tag(self.run_id, "rig.resumes", str(resumes))
        self.client.log_text(self.run_id, _dump(params), f"config-resume-{resumes}.yaml")
        if changed:
            _log.warning(
                "resumed MLflow run %s keeps its first values of %s (see config-resume-%d.yaml)",
                self.run_id,
                ", ".join(changed),
                resumes,
            )

    def _start_system_metrics(self) -> Any:
        """MLflow's system-metrics sampler on this run, or None (with a warning) if unavailable.

        Built directly rather than through ``mlflow.start_run(log_system_metrics=True)`` so that
        it logs to this tracker's URI, not the process-global one."""
        try:
            import psutil  # noqa: F401  (the sampler needs it; mlflow does not depend on it)
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                self.run_id, resume_logging=self.resumed, tracking_uri=self.tracking_uri
            )
            monitor.start()
        except Exception as err:  # system metrics are a nicety; never stop training for them
            _log.warning("system metrics are off: %s", err)
            return None
        return monitor


@contextlib.contextmanager
def _store_lock(tracking_uri: str):
    """An exclusive lock on ``<db>.lock`` beside a SQLite store (a no-op for other stores)."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        yield
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no flock; MLflow's own retries remain
        yield
        return
    path = Path(tracking_uri[len(prefix) :]).with_suffix(".db.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _delete_metrics_after(store: Any, run_id: str, step: int) -> None:
    """Delete the run's non-system metric rows with a step > ``step`` and recompute the
    latest value of every key they touched (MLflow's latest_metrics table), in one transaction."""
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric

    with store.ManagedSessionMaker(read_only=False) as session:
        later = session.query(SqlMetric).filter(
            SqlMetric.run_uuid == run_id, SqlMetric.step > step,
            ~SqlMetric.key.startswith(SYSTEM_PREFIX),
        )  # fmt: skip
        keys = {key for (key,) in later.with_entities(SqlMetric.key).distinct()}
        later.delete(synchronize_session=False)
        for key in keys:
            latest = session.query(SqlLatestMetric).filter_by(run_uuid=run_id, key=key).one_or_none()
            newest = (
                session.query(SqlMetric)
                .filter_by(run_uuid=run_id, key=key)
                .order_by(SqlMetric.step.desc(), SqlMetric.timestamp.desc(), SqlMetric.value.desc())
                .first()
            )
            if latest is None:
                continue
            if newest is None:
                session.delete(latest)
            else:
                latest.value, latest.timestamp = newest.value, newest.timestamp
                latest.step, latest.is_nan = newest.step, newest.is_nan


def _next_step(run: Any) -> int:
    """One past the highest step of the run's training metrics (system metrics count apart).

    ``_metric_objs`` holds each key's latest row, the one at its highest step; MLflow's own
    system-metrics resume reads it for the same reason: the full histories could be millions of
    rows."""
    steps = [m.step for m in run.data._metric_objs if not m.key.startswith(SYSTEM_PREFIX)]
    return max(steps) + 1 if steps else 0


def _dump(params: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(params), sort_keys=False)


def _context_tags() -> dict[str, str]:
    """Where and from what the run was started: commit, host, user, command line."""
    tags = {"rig.hostname": socket.gethostname(), "rig.command": shlex.join(sys.argv)}
    with contextlib.suppress(OSError, KeyError):  # a container user with no passwd entry/$USER
        tags["mlflow.user"] = getpass.getuser()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        tags["mlflow.source.git.commit"] = commit  # the key MLflow's UI shows as "Git commit"
    except (OSError, subprocess.SubprocessError):
        pass  # not a git checkout (an installed wheel) or no git binary
    return tags


def check_tracking_reachable(config: TrackingConfig, output_dir: str | Path, timeout: float = 3.0) -> str:
    """The tracking URI a run will use; UserError within ``timeout`` seconds if it names an
    HTTP(S) server that nothing answers at.

    Checked before a run folder exists: MLflow's client retries a dead server with backoff for
    minutes (287 s measured) before it fails. A TCP connect is the check, so it says nothing of
    credentials (MLflow reports those in one line itself); where a proxy serves the host, the
    proxy is MLflow's route and the check is left to MLflow."""
    import urllib.parse
    import urllib.request

    uri = resolve_tracking_uri(config, output_dir)
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return uri  # a local store (sqlite:, file:, a path) or a scheme MLflow resolves itself
    if parts.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(
        parts.hostname
    ):
        return uri
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as err:  # a port out of range or not a number
        raise UserError(f"tracking.tracking_uri {uri!r}: {err}") from None
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as err:
        why = err.strerror or str(err) or type(err).__name__
        fix = (
            "set tracking.tracking_uri=null for a local store in run.output_dir"
            if config.tracking_uri is not None
            else "unset MLFLOW_TRACKING_URI for a local store in run.output_dir"
        )
        raise UserError(
            f"MLflow tracking server {uri!r} is not reachable ({why}); start it, or {fix}"
        ) from None
    return uri
