"""MLflow tracking against a real SQLite store, read back with MlflowClient.

Creating the database runs MLflow's migrations (seconds), so the module shares one output
folder, and so one database, between its tests; each test uses its own run folder in it."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from PIL import Image

from rig.errors import UserError
from rig.tracking import (
    NONFINITE_KEY,
    Tracker,
    TrackingConfig,
    flatten_params,
    resolve_tracking_uri,
    saved_run_id,
    side_by_side,
)

mlflow = pytest.importorskip("mlflow")

PARAMS = {"run": {"name": "t", "seed": 0}, "env": {"size": 64, "kwargs": {}}, "tags": [1, 2]}


def make_config(**changes) -> TrackingConfig:
    values = dict(
        tracking_uri=None, experiment="test", system_metrics=False, log_every=1, image_every=1
    )
    return TrackingConfig(**(values | changes))


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(autouse=True)
def no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def client(tracker: Tracker):
    return mlflow.MlflowClient(tracker.tracking_uri)


def history(tracker: Tracker, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client(tracker).get_metric_history(tracker.run_id, key)]


def test_run_logs_params_metrics_and_artifacts(output_dir, tmp_path, capfd):
    export = tmp_path / "hf"
    export.mkdir()
    (export / "config.json").write_text("{}")
    frames = np.zeros((2, 8, 8, 3), np.uint8)

    with Tracker(make_config(), output_dir / "a-train-1", PARAMS) as tracker:
        for step in range(3):
            tracker.log_metrics({"loss": 1.0 / (step + 1), "skipped": None}, step)
        tracker.log_metrics({"loss": math.nan, "kl": math.inf, "ok": 2}, 3)
        tracker.log_text("reason: go left", "traces/iter_000003.txt")
        tracker.log_image(side_by_side(frames, frames + 255), "images/iter_000003.png")
        tracker.log_artifacts(export, "hf")

    assert tracker.tracking_uri == f"sqlite:///{output_dir.resolve() / 'mlflow.db'}"
    run = client(tracker).get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "a-train-1"
    assert run.data.params["env.size"] == "64"
    assert run.data.params["env.kwargs"] == "{}"
    assert run.data.params["tags"] == "[1, 2]"
    assert "rig.hostname" in run.data.tags and "rig.command" in run.data.tags
    assert history(tracker, "loss") == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    assert history(tracker, NONFINITE_KEY) == [(3, 2.0)]
    assert history(tracker, "ok") == [(3, 2.0)]
    assert "skipped" not in run.data.metrics

    artifacts = output_dir / "mlartifacts" / tracker.run_id / "artifacts"
    files = {p.relative_to(artifacts).as_posix() for p in artifacts.rglob("*") if p.is_file()}
    assert files == {
        "config.yaml",
        "traces/iter_000003.txt",
        "images/iter_000003.png",
        "hf/config.json",
    }
    assert "seed: 0" in (artifacts / "config.yaml").read_text()
    assert saved_run_id(output_dir / "a-train-1") == tracker.run_id
    assert Image.open(artifacts / "images/iter_000003.png").size == (18, 18)
    assert " INFO " not in capfd.readouterr().err  # migrations on DB creation print INFO lines


def test_resume_continues_same_run_without_repeated_steps(output_dir, caplog):
    run_dir = output_dir / "b-train-1"
    first = Tracker(make_config(), run_dir, PARAMS)
    for step in range(5):  # checkpoint at step 2, crash after step 4
        first.log_metrics({"loss": float(step)}, step)
    first.end("FAILED")

    changed = PARAMS | {"env": {"size": 32, "kwargs": {}}, "new": 1}
    with Tracker(make_config(), run_dir, changed, run_id=saved_run_id(run_dir)) as second:
        assert client(second).get_run(second.run_id).info.status == "RUNNING"
        for step in range(3, 8):  # replays steps 3 and 4 from the checkpoint at step 2
            second.log_metrics({"loss": 10.0 + step}, step)

    assert second.run_id == first.run_id
    steps = [step for step, _ in history(second, "loss")]
    assert steps == list(range(8))
    assert "keeping those and dropping the replayed steps" in caplog.text
    run = client(second).get_run(second.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["env.size"] == "64"  # MLflow params are immutable
    assert run.data.params["new"] == "1"
    assert "env.size" in caplog.text


def test_rewind_makes_replayed_steps_read_as_the_resumed_run(output_dir, caplog):
    """Crash after step 4, resume from the checkpoint at step 2: steps 3 and 4 must hold what
    the resumed attempt logged, once each, and the run's latest value is its last one."""
    run_dir = output_dir / "r-train-1"
    first = Tracker(make_config(), run_dir, PARAMS)
    for step in range(5):
        first.log_metrics({"loss": float(step), "only_before": 1.0}, step)
    first.end("FAILED")

    with Tracker(make_config(), run_dir, PARAMS, run_id=saved_run_id(run_dir)) as second:
        second.rewind(2)
        for step in range(3, 6):
            second.log_metrics({"loss": 10.0 + step}, step)

    assert history(second, "loss") == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0), (5, 15.0)]
    assert [s for s, _ in history(second, "only_before")] == [0, 1, 2]
    run = client(second).get_run(second.run_id)
    assert run.data.metrics["loss"] == 15.0 and run.data.metrics["only_before"] == 1.0
    assert "dropping the replayed steps" not in caplog.text


def _concurrent_tracker(output_dir: str, name: str, start_at: float, queue) -> None:
    """One process of the concurrency test: wait for the common start, then log 20 steps."""
    import os

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from pathlib import Path

    while time.time() < start_at:
        time.sleep(0.005)
    try:
        with Tracker(make_config(), Path(output_dir) / name, PARAMS) as tracker:
            for step in range(20):
                tracker.log_metrics({"loss": float(step)}, step)
        queue.put((name, tracker.run_id))
    except Exception as err:  # reported to the test, which fails with it
        queue.put((name, f"{type(err).__name__}: {err}"))


def test_concurrent_runs_on_a_fresh_sqlite_store(tmp_path):
    """Two processes create the same fresh database at the same instant (MLflow's migrations
    race: "table ... already exists" without the lock) and then log side by side."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    start_at = time.time() + 8.0  # both imported and waiting by then, even on a busy machine
    procs = [ctx.Process(target=_concurrent_tracker, args=(str(tmp_path), f"c-train-{k}",
                                                           start_at, queue)) for k in (1, 2)]  # fmt: skip
    for proc in procs:
        proc.start()
    results = dict(queue.get(timeout=300) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    ids = {name: saved_run_id(tmp_path / name) for name in results}
    assert results == ids, results  # each process got its own run, recorded in its own folder
    store = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for run_id in ids.values():
        assert store.get_run(run_id).info.status == "FINISHED"
        assert [m.step for m in store.get_metric_history(run_id, "loss")] == list(range(20))


def test_a_full_disk_under_the_store_is_one_user_error(output_dir, monkeypatch):
    import sqlite3

    tracker = Tracker(make_config(), output_dir / "full-train-1", PARAMS)

    def full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(tracker.client, "log_batch", full)
    monkeypatch.setattr(tracker.client, "set_terminated", full)
    expected = r"^no space left on the disk of MLflow's store .*checkpoints are in .*full-train-1/"
    with pytest.raises(UserError, match=expected), tracker:
        tracker.log_metrics({"loss": 1.0}, 1)  # ending FAILED fails too: warned, not raised


def test_failure_marks_run_failed_and_interrupt_killed(output_dir):
    with pytest.raises(RuntimeError), Tracker(make_config(), output_dir / "c-1", PARAMS) as failed:
        raise RuntimeError("boom")
    with pytest.raises(KeyboardInterrupt), Tracker(make_config(), output_dir / "c-2", {}) as killed:
        raise KeyboardInterrupt
    assert client(failed).get_run(failed.run_id).info.status == "FAILED"
    assert client(killed).get_run(killed.run_id).info.status == "KILLED"


def test_system_metrics_are_logged(output_dir, monkeypatch):
    pytest.importorskip("psutil")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    with Tracker(make_config(system_metrics=True), output_dir / "d-1", {}) as tracker:
        for _ in range(50):  # the sampler's first row comes after one interval
            if any(
                key.startswith("system/")
                for key in client(tracker).get_run(tracker.run_id).data.metrics
            ):
                break
            time.sleep(0.1)
    metrics = client(tracker).get_run(tracker.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics


def test_unknown_resume_run_id_is_a_user_error(output_dir):
    with pytest.raises(UserError, match="MLflow tracking at"):
        Tracker(make_config(), output_dir / "e-1", {}, run_id="0" * 32)


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    default = f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    assert resolve_tracking_uri(make_config(), tmp_path) == default
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(make_config(), tmp_path) == "http://env:5000"
    config = make_config(tracking_uri="http://config:5000")
    assert resolve_tracking_uri(config, tmp_path) == "http://config:5000"


def test_flatten_params_nests_dotted_and_cuts_long_values():
    flat = flatten_params({"a": {"b": {"c": 1}, "d": None}, "e": "x" * 7000, "f": {}})
    assert flat["a.b.c"] == "1"
    assert flat["a.d"] == "None"
    assert flat["f"] == "{}"
    assert len(flat["e"]) == 6000 and flat["e"].endswith("[7000 chars, see config.yaml]")


def test_side_by_side_layout():
    real = np.full((2, 3, 4, 3), 10, np.uint8)
    imagined = np.full((2, 3, 4, 3), 20, np.uint8)
    image = side_by_side(real, imagined, gap=1)
    assert image.shape == (7, 9, 3) and image.dtype == np.uint8
    assert (image[:3, :4] == 10).all() and (image[:3, 5:] == 20).all()
    assert (image[4:, :4] == 10).all() and (image[3] == 255).all() and (image[:, 4] == 255).all()
    with pytest.raises(ValueError, match="one shape"):
        side_by_side(real, imagined[:1])


def test_config_is_strict():
    with pytest.raises(ValueError, match="log_every"):
        make_config(log_every=0)
    with pytest.raises(ValueError, match="extra"):
        make_config(colour="red")
