"""An MLflow server that nothing answers at is one line within seconds, before any run folder
exists (MLflow's own client retries for minutes); a run whose tracking fails to start leaves no
folder behind.

Component tier: a closed local port, a listening one, and `rig train` refusing up front."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from rig.cli import main
from rig.config import load_config
from rig.errors import UserError
from rig.tracking import check_tracking_reachable

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "debug.yaml")
FAST = ["rollout.num_env_runners=0", "imagination.num_actors=0", "tracking.system_metrics=false",
        "env.num_envs=1", "rollout.fragment_length=2", "imagination.horizon=0",
        "policy.max_reasoning_tokens=1", "train.iterations=1"]  # fmt: skip


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy",
                 "ALL_PROXY", "MLFLOW_TRACKING_URI"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


def _tracking(uri: str | None):
    return load_config(None, [f"tracking.tracking_uri={uri}" if uri else "tracking.tracking_uri=null"]).tracking


def test_a_closed_port_fails_in_seconds(tmp_path):
    uri = f"http://127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    with pytest.raises(UserError, match=r"MLflow tracking server .* is not reachable \(Connection refused\)"):
        check_tracking_reachable(_tracking(uri), tmp_path)
    assert time.monotonic() - start < 5


def test_a_listening_server_and_local_stores_pass(tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        assert check_tracking_reachable(_tracking(uri), tmp_path) == uri
    assert check_tracking_reachable(_tracking(None), tmp_path).startswith("sqlite:///")


def test_the_environment_variable_gets_its_own_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(UserError, match="unset MLFLOW_TRACKING_URI"):
        check_tracking_reachable(_tracking(None), tmp_path)


def test_rig_train_refuses_up_front_and_leaves_no_folder(in_tmp, capsys):
    pytest.importorskip("torch")
    uri = f"http://127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    code = main(["train", "--config", DEBUG, *FAST, f"tracking.tracking_uri={uri}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is not reachable" in err, err
    assert time.monotonic() - start < 30
    runs = in_tmp / "runs"
    assert not runs.exists() or not any(runs.iterdir())


def test_tracking_that_fails_to_start_leaves_no_folder(in_tmp, capsys, monkeypatch):
    """Reachable at the check, failing when the run is created (a server that went away, a
    refused login): the folder claimed for the run goes again."""
    pytest.importorskip("torch")
    import rig.tracking

    def refuse(*args, **kwargs):
        raise UserError("MLflow tracking at 'http://x': 401 Unauthorized")

    monkeypatch.setattr(rig.tracking, "Tracker", refuse)
    code = main(["train", "--config", DEBUG, *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "401 Unauthorized" in err
    assert not [p for p in (in_tmp / "runs").iterdir() if "-train-" in p.name]


def test_rig_eval_and_rig_tokenizer_check_up_front_too(in_tmp, capsys, monkeypatch):
    uri = f"http://127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    code = main(["eval", "--checkpoint", str(in_tmp / "nowhere"), f"tracking.tracking_uri={uri}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is not reachable" in err, err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # rig tokenizer train reads no overrides
    code = main(["tokenizer", "train", "--frames-from-env", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "is not reachable" in err and "unset MLFLOW_TRACKING_URI" in err, err
    assert time.monotonic() - start < 30
    assert not (in_tmp / "runs").exists() or not any((in_tmp / "runs").iterdir())
