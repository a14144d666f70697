"""The cluster of docker-compose.yml without Docker: its Ray nodes and its MLflow server, started
on this machine with the very scripts the compose services run (docker/ray-node.sh,
docker/mlflow-server.sh).

- Multi-node Ray: a head and a second node, each offering 1 CPU so that the 2 env runners (1 CPU
  each) must go one to a node; `rig train` joins the cluster by address (train.ray_address, as
  configs/cluster.yaml does with `auto`), runners are seen on both nodes in the GCS actor table,
  then the second node's raylet is killed (a lost machine) and training still finishes on the head.
- MLflow: the server with basic auth, as the compose service runs it, but on SQLite with a local
  artifact folder instead of Postgres and MinIO (no database server or S3 store is run by the
  tests); the training run above logs to it over HTTP with credentials from the environment, and
  a client without credentials (or with a wrong password) gets 401.

Every process is started in its own session with its own ports and Ray temp dir, and stopped by
process id at the end (never `ray stop`, which would stop other Ray clusters on this machine).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("mlflow")
psutil = pytest.importorskip("psutil")

ROOT = Path(__file__).resolve().parents[1]
RAY_NODE = ROOT / "docker" / "ray-node.sh"
MLFLOW_SERVER = ROOT / "docker" / "mlflow-server.sh"
BIN = Path(sys.executable).parent  # ray, rig and mlflow live next to this interpreter
ADMIN, PASSWORD = "admin", "a-test-password-" + secrets.token_hex(8)
ITERATIONS = 5
# configs/cluster.yaml made small for 2 cores: the tiny policy on short Crafter episodes, 2 runners
# x 1 env x 4 steps, imagination off, a plain fp32 learner on the CPU.
TINY = [
    "policy.preset=tiny", "env.id=rig/Crafter-v0", "env.size=64", "env.num_envs=1",
    "env.vectorization=sync", "env.kwargs={length: 6}", "policy.max_reasoning_tokens=2",
    "rollout.num_env_runners=2", "rollout.fragment_length=4", "rollout.resources={}",
    "rollout.num_inference_actors=0",  # 1 CPU per node: the runners act themselves here
    "imagination.horizon=0",
    "learner.zero_stage=0", "learner.precision=fp32", "learner.device=cpu",
    "ppo.minibatch_size=8", "tracking.system_metrics=false", f"train.iterations={ITERATIONS}",
    "train.checkpoint_every=100", "train.export_at_end=false",
]  # fmt: skip

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", OMP_NUM_THREADS="1", **extra)
    return env


def stop(proc: subprocess.Popen | None, timeout: float = 20.0) -> None:
    """SIGTERM a process we started and everything below it, then SIGKILL what is left."""
    if proc is None:
        return
    try:
        tree = [psutil.Process(proc.pid)]
        tree += tree[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


def wait_for(check, timeout: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


def http_status(url: str, user: str | None = None, password: str | None = None) -> int:
    request = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


# -- the MLflow service --------------------------------------------------------------------------


class MlflowServer:
    """docker/mlflow-server.sh on 127.0.0.1, SQLite stores and a local artifact folder."""

    def __init__(self, root: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "mlflow.log"
        env = base_env(
            MLFLOW_BACKEND_STORE_URI=f"sqlite:///{root}/mlflow.db",
            MLFLOW_AUTH_DATABASE_URI=f"sqlite:///{root}/auth.db",
            MLFLOW_ARTIFACTS_DESTINATION=str(root / "artifacts"),
            MLFLOW_ADMIN_USERNAME=ADMIN,
            MLFLOW_ADMIN_PASSWORD=PASSWORD,
            MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
            MLFLOW_HOST="127.0.0.1",
            MLFLOW_PORT=str(self.port),
            MLFLOW_WORKERS="1",
            MLFLOW_AUTH_CONFIG_DIR=str(root / "auth"),
        )
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                ["bash", str(MLFLOW_SERVER)], cwd=root, env=env, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def wait_ready(self) -> None:
        def ready():
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            return http_status(f"{self.url}/health") == 200

        wait_for(ready, 180, "the MLflow server", self.log)


def has_auth_app() -> bool:
    """MLflow's basic-auth app needs Flask-WTF (`mlflow[auth]`), which the images install."""
    import importlib.util

    return importlib.util.find_spec("flask_wtf") is not None


NO_AUTH_APP = "MLflow's basic-auth app needs Flask-WTF: pip install 'mlflow[auth]'"


@pytest.fixture(scope="module")
def mlflow_server():
    if not has_auth_app():
        yield None  # the Ray test then tracks to SQLite; the MLflow test skips
        return
    root = Path(tempfile.mkdtemp(prefix="rigm"))
    server = MlflowServer(root)  # started now, waited for where first needed
    try:
        yield server
    finally:
        stop(server.proc, timeout=5)
        shutil.rmtree(root, ignore_errors=True)


# -- the Ray nodes -------------------------------------------------------------------------------

# Prints the cluster's nodes and actors from the GCS (one JSON line every half second). Ray's
# `ray.util.state` API serves the same table through the dashboard, which needs `ray[default]`
# (in the images, not in this project's test environment), so the table is read directly. Run in a
# process of its own so the test process never becomes a Ray driver.
WATCHER = """
import json, sys, time
import ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
while True:
    nodes = {n["NodeID"]: {"alive": n["Alive"], "head": "node:__internal_head__" in n["Resources"]}
             for n in ray.nodes()}
    actors = [{"cls": a["ActorClassName"], "state": a["State"], "node": a["Address"]["NodeID"],
               "restarts": a["NumRestarts"]} for a in ray._private.state.actors().values()]
    print(json.dumps({"nodes": nodes, "actors": actors}), flush=True)
    time.sleep(0.5)
"""


class RayCluster:
    """A head and a worker node from docker/ray-node.sh, ``cpus`` CPUs each (1) and the custom
    ``resources`` (JSON, none) on each, token auth on."""

    def __init__(self, root: Path, cpus: int = 1, resources: str | None = None):
        self.root = root
        self.gcs_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.env = base_env(
            RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_NODE_IP="127.0.0.1",
            RAY_TEMP_DIR=str(root), RAY_NUM_CPUS=str(cpus), RAY_DASHBOARD_HOST="127.0.0.1",
            RAY_DASHBOARD_PORT=str(free_port()), RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
            # The test environment has no `ray[default]`/`ray[client]`: no dashboard, no client.
            RAY_INCLUDE_DASHBOARD="false", RAY_CLIENT_PORT="",
            **({"RAY_RESOURCES": resources} if resources else {}),
        )  # fmt: skip
        self.head = self.worker = self.watcher = None
        self.states: list[dict] = []

    def _node(self, role: str, **env: str) -> subprocess.Popen:
        # Two nodes on one host: each needs its own dashboard-agent and metrics ports.
        extra = f"--dashboard-agent-listen-port={free_port()} --metrics-export-port={free_port()}"
        with (self.root / f"{role}.log").open("w") as out:
            return subprocess.Popen(
                ["bash", str(RAY_NODE), role], cwd=ROOT, env={**self.env, **env,
                "RAY_EXTRA_ARGS": extra}, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def start(self) -> None:
        self.head = self._node("head", RAY_PORT=str(self.gcs_port))

        def gcs_up():
            assert self.head.poll() is None, (self.root / "head.log").read_text()[-3000:]
            try:
                socket.create_connection(("127.0.0.1", self.gcs_port), 1).close()
                return True
            except OSError:
                return False

        wait_for(gcs_up, 60, "the head's GCS", self.root / "head.log")
        self.worker = self._node("worker", RAY_HEAD_ADDRESS=self.address)
        self.watcher = subprocess.Popen(
            [sys.executable, "-c", WATCHER, self.address], env=self.env, stdout=subprocess.PIPE,
            stderr=(self.root / "watcher.log").open("w"), text=True, start_new_session=True,
        )  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.watcher.stdout:
            if line.startswith("{"):
                self.states.append(json.loads(line))

    def latest(self) -> dict:
        return self.states[-1] if self.states else {"nodes": {}, "actors": []}

    def runners(self, state: dict | None = None) -> list[dict]:
        return self.actors("SingleAgentEnvRunner", state)

    def actors(self, cls: str, state: dict | None = None) -> list[dict]:
        state = state or self.latest()
        return [a for a in state["actors"] if a["cls"] == cls]

    def kill_worker_raylet(self) -> None:
        """SIGKILL the second node's raylet: its workers and the node go down, as with a lost
        machine (`ray start --block` then stops the node's other processes)."""
        raylets = [p for p in psutil.Process(self.worker.pid).children(recursive=True)
                   if p.name() == "raylet"]  # fmt: skip
        assert len(raylets) == 1, raylets
        raylets[0].kill()

    def stop(self) -> None:
        for proc in (self.watcher, self.worker, self.head):
            stop(proc)


@pytest.fixture
def ray_cluster():
    # A short path of our own: Ray's socket paths must stay under 107 characters.
    root = Path(tempfile.mkdtemp(prefix="rigc", dir="/tmp"))
    cluster = RayCluster(root)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


# -- tests ---------------------------------------------------------------------------------------


def test_training_spans_two_nodes_and_survives_losing_one(ray_cluster, mlflow_server, monkeypatch):
    """`rig train -c configs/cluster.yaml` on a 2-node cluster: one env runner on each node, the
    second node killed after iteration 2, all iterations finish on the head's runner, and the
    run is in the MLflow server (over HTTP, basic auth) with the lost runner visible in it."""
    cluster = ray_cluster
    cluster.start()
    two_nodes = wait_for(
        lambda: len([n for n in cluster.latest()["nodes"].values() if n["alive"]]) == 2,
        90, "two alive Ray nodes", cluster.root / "worker.log",
    )  # fmt: skip
    assert two_nodes
    head_id = next(i for i, n in cluster.latest()["nodes"].items() if n["head"])
    worker_id = next(i for i in cluster.latest()["nodes"] if i != head_id)
    if mlflow_server is not None:
        mlflow_server.wait_ready()
        tracking_uri = mlflow_server.url
    else:
        tracking_uri = f"sqlite:///{cluster.root}/mlflow.db"

    err = cluster.root / "train.err"
    train = subprocess.Popen(
        [str(BIN / "rig"), "train", "--config", str(ROOT / "configs" / "cluster.yaml"), *TINY,
         f"train.ray_address={cluster.address}", f"tracking.tracking_uri={tracking_uri}",
         f"run.output_dir={cluster.root / 'runs'}"],
        cwd=ROOT, env={**cluster.env, "MLFLOW_TRACKING_USERNAME": ADMIN,
                       "MLFLOW_TRACKING_PASSWORD": PASSWORD},
        stdout=subprocess.PIPE, stderr=err.open("w"), text=True, start_new_session=True,
    )  # fmt: skip
    try:
        # 1. the runners are placed one per node (1 CPU each, 1 CPU per node)
        def placed():
            assert train.poll() is None, err.read_text()[-3000:]
            alive = [r for r in cluster.runners() if r["state"] == "ALIVE"]
            return len(alive) == 2 and alive

        alive = wait_for(placed, 120, "2 alive env runners", err)
        assert {r["node"] for r in alive} == {head_id, worker_id}

        # 2. after iteration 2, the second node goes down
        wait_for(lambda: "iter 2:" in err.read_text() or train.poll() is not None, 120,
                 "iteration 2", err)  # fmt: skip
        cluster.kill_worker_raylet()
        wait_for(lambda: not cluster.latest()["nodes"][worker_id]["alive"], 60,
                 "the GCS to mark the second node dead", err)  # fmt: skip

        # 3. training finishes on the head alone
        out, _ = train.communicate(timeout=180)
    finally:
        stop(train)
    log = err.read_text()
    assert train.returncode == 0, log[-3000:]
    assert f"iter {ITERATIONS}:" in log
    lost = [r for r in cluster.runners() if r["restarts"] >= 1 or r["state"] != "ALIVE"]
    assert lost, cluster.runners()  # Ray tried to restart the lost runner (no free CPU left)

    # 4. the run, its metrics and an artifact are in MLflow, read back with credentials
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    run_id = out.split("(run ")[1].split(")")[0]
    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.ray_address"] == cluster.address
    healthy = [m.value for m in client.get_metric_history(run_id, "rollout/healthy_runners")]
    assert len(healthy) == ITERATIONS and healthy[0] == 2 and healthy[-1] == 1
    steps = client.get_metric_history(run_id, "counters/env_steps")
    assert max(m.value for m in steps) < ITERATIONS * 2 * 4  # one runner fewer after the loss
    assert "config.yaml" in {f.path for f in client.list_artifacts(run_id)}  # proxied upload
    if mlflow_server is None:
        pytest.skip(f"trained and tracked to SQLite, not the MLflow server: {NO_AUTH_APP}")


# configs/cluster.yaml's layout at its smallest: each node offers one `game` (as a Minecraft
# worker offers {minecraft: 1}), so the 2 runners go one to a node; they hold no policy and send
# their steps to one inference actor (1 s wait, so both runners' envs meet in each forward);
# 2 learner ranks (ZeRO-2 over gloo) train. 2 CPUs a node: 1 + 1 runners, 0.5 inference,
# 2 x 0.5 ranks.
SCALED = [
    *(o for o in TINY if not o.startswith(("rollout.num_inference_actors=", "rollout.resources=",
                                           "learner.zero_stage=", "train.iterations=",
                                           "train.checkpoint_every="))),
    "rollout.resources={game: 1}", "rollout.num_inference_actors=1",
    "rollout.num_cpus_per_inference_actor=0.5", "rollout.num_gpus_per_inference_actor=0",
    "rollout.inference_wait_ms=1000",
    "learner.num_ranks=2", "learner.num_cpus_per_rank=0.5", "learner.zero_stage=2",
    "train.iterations=3", "train.checkpoint_every=3",
]  # fmt: skip


def test_runners_on_both_nodes_act_through_an_inference_actor_and_two_ranks_learn(tmp_path):
    """`rig train -c configs/cluster.yaml` as the cluster runs it, on 2 loopback nodes: one env
    runner on each node, both acting through the same inference actor (the batches hold both
    runners' envs), and a 2-rank ZeRO-2 learner group that trains and writes a checkpoint of
    both ranks' shards. (Killing an inference actor or a learner rank ends the run with a
    one-line error, never a hang: tests/test_inference.py, tests/test_learner_group.py.)"""
    root = Path(tempfile.mkdtemp(prefix="rigs", dir="/tmp"))
    cluster = RayCluster(root, cpus=2, resources='{"game": 1}')
    try:
        cluster.start()
        wait_for(lambda: len([n for n in cluster.latest()["nodes"].values() if n["alive"]]) == 2,
                 90, "two alive Ray nodes", cluster.root / "worker.log")  # fmt: skip
        err = root / "train.err"
        db = f"sqlite:///{root}/mlflow.db"
        train = subprocess.Popen(
            [str(BIN / "rig"), "train", "--config", str(ROOT / "configs" / "cluster.yaml"),
             *SCALED, f"train.ray_address={cluster.address}", f"tracking.tracking_uri={db}",
             f"run.output_dir={root / 'runs'}"],
            cwd=ROOT, env=cluster.env, stdout=subprocess.PIPE, stderr=err.open("w"), text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            def placed():
                assert train.poll() is None, err.read_text()[-3000:]
                state = cluster.latest()
                alive = {cls: [a for a in cluster.actors(cls, state) if a["state"] == "ALIVE"]
                         for cls in ("SingleAgentEnvRunner", "InferenceActor", "LearnerActor")}
                counts = {cls: len(a) for cls, a in alive.items()}
                return counts == {"SingleAgentEnvRunner": 2, "InferenceActor": 1,
                                  "LearnerActor": 2} and alive  # fmt: skip

            alive = wait_for(placed, 240, "2 runners, 1 inference actor and 2 learner ranks", err)
            nodes = {n for n, a in cluster.latest()["nodes"].items() if a["alive"]}
            assert {r["node"] for r in alive["SingleAgentEnvRunner"]} == nodes
            out, _ = train.communicate(timeout=300)
        finally:
            stop(train)
        log = err.read_text()
        assert train.returncode == 0, log[-3000:]
        assert "iter 3:" in log

        import mlflow

        run_id = out.split("(run ")[1].split(")")[0]
        client = mlflow.MlflowClient(db)
        metrics = client.get_run(run_id).data.metrics
        assert metrics["rollout/inference_rows_per_batch"] > 1.5  # both runners' envs together
        assert metrics["rollout/healthy_runners"] == 2
        assert metrics["counters/env_steps"] == 3 * 2 * 4
        assert 0 <= metrics["sync/logp_abs_diff_max"] < 1e-4  # the actor acts on the learner's weights
        (run,) = (root / "runs").glob("*-train-*")
        shards = sorted(p.name for p in (run / "checkpoints" / "iter_000003").rglob("*optim_states.pt"))
        assert len(shards) == 2, shards  # ZeRO-2: one optimiser shard per rank
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_mlflow_server_refuses_clients_without_credentials(mlflow_server, monkeypatch, tmp_path):
    """Basic auth is on: no credentials or a wrong password get 401; the admin from the env
    (MLFLOW_TRACKING_USERNAME/PASSWORD, as the compose nodes set them) logs through rig's Tracker."""
    if mlflow_server is None:
        pytest.skip(NO_AUTH_APP)
    mlflow_server.wait_ready()
    search = f"{mlflow_server.url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert http_status(search) == 401
    assert http_status(search, ADMIN, "wrong-password-123") == 401
    assert http_status(search, ADMIN, PASSWORD) == 200

    from rig.config import TrackingConfig
    from rig.errors import UserError
    from rig.tracking import Tracker

    cfg = TrackingConfig(tracking_uri=mlflow_server.url, experiment="auth-check",
                         system_metrics=False, log_every=1, image_every=1)  # fmt: skip
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with pytest.raises(UserError, match="401|[Uu]nauthori|[Aa]uthenticat"):
        Tracker(cfg, tmp_path / "runs" / "anonymous", {"a": 1})

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    with Tracker(cfg, tmp_path / "runs" / "admin", {"a": 1}) as tracker:
        tracker.log_metrics({"x": 1.5}, step=3)
    import mlflow

    run = mlflow.MlflowClient(mlflow_server.url).get_run(tracker.run_id)
    assert run.data.metrics["x"] == 1.5 and run.info.status == "FINISHED"
