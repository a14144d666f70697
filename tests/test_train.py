"""The whole loop in debug mode (rig/train.py, `rig train`, `rig export`): a few iterations of the
tiny policy on Crafter, tracked in MLflow, resumed, exported, and refused on bad input.

Whole-loop tier. In-process runners and imagination (no Ray) keep most of these fast; one test
runs the Ray path with two env runners and kills one mid-run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("deepspeed")

from rig.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "debug.yaml")
# in-process, tiny: 1 runner x 2 envs x 4 steps, imagination 2 starts x horizon 2
FAST = [
    "rollout.num_env_runners=0", "env.num_envs=2", "rollout.fragment_length=4",
    "imagination.num_actors=0", "imagination.num_starts=2", "imagination.horizon=2",
    "imagination.gate=open", "policy.max_reasoning_tokens=2", "env.kwargs.length=6",
    "train.checkpoint_every=2", "train.traces_every=1", "tracking.image_every=1",
    "tracking.system_metrics=false", "policy.history=1",
]  # fmt: skip


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def mlflow_run(run_dir: Path):
    import mlflow

    from rig.tracking import saved_run_id

    client = mlflow.MlflowClient(f"sqlite:///{(run_dir.parent / 'mlflow.db').resolve()}")
    return client, client.get_run(saved_run_id(run_dir))


def only_run(root: Path) -> Path:
    runs = [p for p in (root / "runs").iterdir() if p.is_dir() and "-train-" in p.name]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One debug run of 3 iterations (in-process), shared by the checks below; its heads have
    a hidden layer (``policy.head_hidden``), which resume and export must carry."""
    import os

    root = tmp_path_factory.mktemp("train")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        code = main(["train", "--config", DEBUG, *FAST, "train.iterations=3",
                     "policy.head_hidden=8"])  # fmt: skip
    finally:
        os.chdir(cwd)
    assert code == 0
    return only_run(root)


def test_debug_run_logs_metrics_and_artifacts(trained):
    client, run = mlflow_run(trained)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for key in ("loss/policy", "loss/value", "loss/kl", "loss/next_frame", "loss/reward",
                "loss/continue", "loss/total", "policy/clip_frac", "entropy/mean",
                "next_frame/accuracy", "rollout/env_steps_per_s", "sync/seconds",
                "rollout/policy_lag", "counters/dropped_stale", "learner/samples_per_s",
                "imagination/steps_per_s", "imagination/reward_mean", "rollout/reward_mean",
                "episode/return_mean", "crafter/success/collect_wood",
                "crafter/score", "imagination/row_weight_mean", "world/code_accuracy",
                "world/code_accuracy_copy", "world/psnr", "world/psnr_copy", "world/reward_mse",
                "world/reward_mse_constant", "world/continue_logloss",
                "world/continue_logloss_constant", "world/value_error",
                "world/value_error_copy", "world/value_error_reconstruction"):  # fmt: skip
        assert key in metrics, key
    assert metrics["imagination/gate_open"] == 1.0  # gate open: imagined rows every iteration
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/total")]
    assert steps == [1, 2, 3]
    assert metrics["counters/env_steps"] == 3 * 2 * 4
    assert run.data.params["policy.preset"] == "tiny"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "traces", "imagination", "policy"} <= artifacts
    traces = client.list_artifacts(run.info.run_id, "traces")
    assert len(traces) == 3
    # checkpoints: iterations 2 and 3 (the end), the last K kept; the export loads
    names = sorted(p.name for p in (trained / "checkpoints").iterdir() if p.name.startswith("iter"))
    assert names == ["iter_000002", "iter_000003"]
    counters = json.loads((trained / "checkpoints" / "iter_000003" / "counters.json").read_text())
    # the gate's constant predictors saw every fresh real row, and are checkpointed
    assert counters["world_constants"]["transitions"] == 24 - counters["dropped_stale"]
    assert len(counters["world_checks"]) == 3  # the gate's window (4) of checks so far
    from envs.crafter_env import crafter_codec
    from rl.policy import RigPolicy

    policy = RigPolicy.load(trained / "export", crafter_codec())
    assert policy.heads_loaded and policy.record["extra"]["iteration"] == 3
    assert policy.head_hidden == 8  # the run's policy.head_hidden, read back from the heads


def test_an_untrained_world_model_keeps_the_earned_gate_shut(tmp_path, monkeypatch):
    """The default gate (earned): the untrained world model is checked and logged against its
    baselines every iteration, loses, and nothing is imagined (its rows would not be used)."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", DEBUG, *FAST, "imagination.gate=earned",
                 "train.iterations=2", "imagination.updates=2"]) == 0  # fmt: skip
    client, run = mlflow_run(only_run(tmp_path))
    gate = client.get_metric_history(run.info.run_id, "imagination/gate_open")
    assert [m.value for m in gate] == [0.0, 0.0]
    metrics = run.data.metrics
    assert metrics["counters/imagined_steps"] == 0 and "imagination/steps_per_s" not in metrics
    assert metrics["world/code_accuracy"] < metrics["world/code_accuracy_copy"]
    assert "imagination/extra_updates" not in metrics  # no imagined updates behind a shut gate


def test_imagined_updates_follow_the_real_one_each_on_fresh_dreams_of_the_new_weights(in_tmp):
    """imagination.updates 2: each iteration updates on real + imagined rows, then twice on
    imagined rows only, each imagined by the weights the update before left (the learner's sync
    check finds the imagination actor's log-probs equal to its own), each a weight version;
    samples in flight (max_policy_lag 1) are not dropped as stale for it."""
    code = main(["train", "--config", DEBUG, *FAST, "train.iterations=2", "imagination.updates=2",
                 "ppo.max_policy_lag=1"])  # fmt: skip
    assert code == 0
    run_dir = only_run(in_tmp)
    client, run = mlflow_run(run_dir)
    metrics = run.data.metrics
    counters = json.loads((run_dir / "checkpoints" / "iter_000002" / "counters.json").read_text())
    assert counters["version"] == 1 + 2 * 3 and counters["dropped_stale"] == 0
    assert counters["imagined_steps"] == 2 * 3 * 2 * 2  # iterations x rounds x starts x horizon
    assert metrics["imagination/extra_updates"] == 2 and metrics["imagination/extra_rows"] == 8
    assert metrics["imagination/extra_sync_rows_checked"] == 8  # every imagined row, both rounds
    assert metrics["imagination/extra_sync_diff_max"] < 1e-3
    # the imagined-only updates scale their advantages by the real rows' spread (ppo.normalize)
    assert metrics["imagination/extra_real_advantage_std"] == pytest.approx(
        metrics["advantage/std"], rel=1e-4)


def test_resume_continues_counters_and_the_mlflow_run(trained, capsys, monkeypatch):
    monkeypatch.chdir(trained.parent.parent)
    _, before = mlflow_run(trained)
    code, _, err = run_cli(capsys, "train", "--resume", str(trained), "train.iterations=5")
    assert code == 0, err
    client, run = mlflow_run(trained)
    assert run.info.run_id == before.info.run_id and run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/total")]
    assert steps == [1, 2, 3, 4, 5]  # none repeated, none missing
    counters = json.loads((trained / "checkpoints" / "iter_000005" / "counters.json").read_text())
    assert counters["iteration"] == 5 and counters["env_steps"] == 5 * 8
    assert counters["version"] > 5


def test_export_command_writes_a_loadable_directory(trained, capsys, tmp_path):
    out = tmp_path / "exported"
    code, stdout, err = run_cli(capsys, "export", str(trained), str(out))
    assert code == 0, err
    from transformers import JanusForConditionalGeneration

    JanusForConditionalGeneration.from_pretrained(out, local_files_only=True)
    code, _, err = run_cli(capsys, "export", str(trained), str(out))
    assert code == 2 and "exists" in err and err.count("\n") == 1


def test_export_command_exports_an_older_iteration(trained, capsys, tmp_path):
    """`--iteration N` exports iteration N's checkpoint (its weights, not the newest's); one the
    run does not keep is a one-line error naming those it keeps."""
    import torch
    from safetensors.torch import load_file

    kept = sorted(int(p.name[5:]) for p in (trained / "checkpoints").glob("iter_*"))
    assert len(kept) >= 2, kept
    outs = {}
    for it in (kept[0], kept[-1]):
        outs[it] = tmp_path / f"it{it}"
        code, stdout, err = run_cli(capsys, "export", str(trained), str(outs[it]),
                                    "--iteration", str(it))  # fmt: skip
        assert code == 0, err
        assert f"iter_{it:06d}" in stdout
    old, new = (load_file(str(outs[it] / "rig_heads.safetensors")) for it in (kept[0], kept[-1]))
    assert any(not torch.equal(old[k], new[k]) for k in old)  # two different checkpoints
    code, _, err = run_cli(capsys, "export", str(trained), str(tmp_path / "x"), "--iteration", "999")
    assert code == 2 and err.count("\n") == 1
    assert "no checkpoint of iteration 999" in err and f"keeps: {', '.join(map(str, kept))}" in err


def test_learning_benchmark_evaluates_a_runs_final_policy_on_held_out_worlds(trained, tmp_path):
    """benchmarks/learning.eval_rig on a real run folder: `rig export` of its newest checkpoint,
    then `rig eval` of that on the held-out worlds (lookahead 0), read back as a digest; a
    folder without a run is an error entry, not an exception."""
    from rig import bench

    learning = bench._benchmark("learning")
    found = learning.eval_rig(trained.parent, tmp_path, 7, Path(DEBUG), FAST, episodes=2)
    assert found.get("error") is None, found
    assert found["episodes"] == 2 and found["score"] is not None
    report = json.loads(Path(found["report"]).read_text())
    assert report["settings"]["seed"] == learning.EVAL_SEED
    assert report["settings"]["lookahead"] == 0 and len(report["episodes"]) == 2
    assert (tmp_path / "rig-seed7-final" / "config.json").is_file()
    assert "no rig train run" in learning.eval_rig(tmp_path / "none", tmp_path, 8, Path(DEBUG),
                                                   FAST, episodes=2)["error"]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--init-from", "nowhere"], "--init-from: checkpoint directory nowhere does not exist"),
        (["ppo.loss_scales={policy: 1.0}"], "ppo.loss_scales"),
        (["--resume", "runs/none"], "runs/none"),
        (["policy.preset=huge"], "unknown policy preset 'huge'"),
        (["rollout.weight_sync=collective"], "set rollout.num_inference_actors >= 1"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(in_tmp, capsys, args, message):
    code, _, err = run_cli(capsys, "train", "--config", DEBUG, *FAST, *args)
    assert code == 2 and message in err and err.count("\n") == 1, err
    runs = in_tmp / "runs"
    assert not runs.exists() or not [p for p in runs.iterdir() if "-train-" in p.name]


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_resume_from_a_corrupted_checkpoint_is_one_line(trained, capsys, tmp_path, damage):
    """Every checkpoint of a copy of the run damaged: cut short (the size check catches it) or
    zeroed in place at the same size (the sha256 digests in meta.json do). One line, exit 2,
    and nothing in the run folder changes."""
    import shutil

    run = tmp_path / "runs" / trained.name
    shutil.copytree(trained, run)
    for ckpt in (run / "checkpoints").glob("iter_*"):
        states = max((p for p in ckpt.rglob("*.pt")), key=lambda p: p.stat().st_size)
        size = states.stat().st_size
        states.write_bytes(b"" if damage == "truncated" else bytes(size))
    before = _tree(run)
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "train.iterations=5")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    expected = "bytes, meta.json says" if damage == "truncated" else "has changed since it was saved"
    assert "has no complete checkpoint" in err and expected in err and str(run) in err, err
    assert _tree(run) == before


def test_init_from_a_foreign_directory_is_refused(in_tmp, capsys):
    foreign = in_tmp / "bert"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "bert"}))
    code, _, err = run_cli(capsys, "train", "--config", DEBUG, *FAST, "--init-from", str(foreign))
    assert code == 2 and "not a Janus policy" in err and err.count("\n") == 1


def test_max_policy_lag_keeps_that_many_samples_in_flight_and_decoupled_ppo_logs(in_tmp):
    """ppo.max_policy_lag 3: three samples stay queued on the runners while the learner updates,
    each weight sync behind them, so the lag climbs 0, 1, 2, 3 and stays at 3, and no row is
    dropped as stale; decoupled PPO logs its importance weight, 1 on rows of the learner's own
    weights (the first iteration)."""
    code = main(["train", "--config", DEBUG, *FAST, "imagination.horizon=0",
                 "train.iterations=5", "ppo.max_policy_lag=3", "ppo.decoupled=true"])  # fmt: skip
    assert code == 0
    client, run = mlflow_run(only_run(in_tmp))

    def history(key):
        return [m.value for m in client.get_metric_history(run.info.run_id, key)]

    assert history("rollout/policy_lag") == [0.0, 1.0, 2.0, 3.0, 3.0]
    assert history("counters/dropped_stale")[-1] == 0.0
    weights = history("policy/behaviour_weight_mean")
    assert len(weights) == 5 and all(math.isfinite(w) for w in weights)
    assert weights[0] == pytest.approx(1.0, abs=1e-4)


def test_rig_train_acts_through_an_inference_actor(in_tmp):
    """``rollout.num_inference_actors: 1`` with the debug preset's 2 Ray runners: the runners
    hold no policy, the actor acts on both runners' envs per forward, the rows it acted carry its
    weights version (the sync-health alarm re-scores them: near 0, the learner's own weights),
    and the run trains and finishes."""
    pytest.importorskip("ray")
    code = main(["train", "--config", DEBUG, "env.num_envs=2", "rollout.fragment_length=4",
                 "imagination.horizon=0", "policy.max_reasoning_tokens=2", "env.kwargs.length=6",
                 "train.iterations=3", "tracking.system_metrics=false", "ppo.max_policy_lag=0",
                 "rollout.num_inference_actors=1", "rollout.inference_wait_ms=2000"])  # fmt: skip
    assert code == 0
    client, run = mlflow_run(only_run(in_tmp))

    def history(key):
        return [m.value for m in client.get_metric_history(run.info.run_id, key)]

    assert history("counters/env_steps")[-1] == 3 * 2 * 2 * 4  # iterations x runners x envs x T
    assert history("rollout/inference_rows_per_batch")[-1] == 4.0  # 2 runners x 2 envs
    assert all(d < 1e-3 for d in history("sync/logp_abs_diff_max")), history("sync/logp_abs_diff_max")
    assert len(history("sync/logp_abs_diff_max")) == 3 and history("counters/dropped_stale")[-1] == 0


def test_rig_train_broadcasts_weights_to_the_inference_actor(in_tmp):
    """``rollout.weight_sync: collective``: the inference actor gets every version by the
    driver's gloo broadcast instead of the object store; the rows it acts carry that version and
    re-score under the learner's weights to float noise (the sync-health alarm)."""
    pytest.importorskip("ray")
    code = main(["train", "--config", DEBUG, "env.num_envs=2", "rollout.fragment_length=4",
                 "imagination.horizon=0", "policy.max_reasoning_tokens=2", "env.kwargs.length=6",
                 "train.iterations=3", "tracking.system_metrics=false", "ppo.max_policy_lag=0",
                 "rollout.num_inference_actors=1", "rollout.inference_wait_ms=2000",
                 "rollout.weight_sync=collective", "rollout.weight_sync_bucket_mb=1"])  # fmt: skip
    assert code == 0
    client, run = mlflow_run(only_run(in_tmp))

    def history(key):
        return [m.value for m in client.get_metric_history(run.info.run_id, key)]

    diffs = history("sync/logp_abs_diff_max")
    assert len(diffs) == 3 and all(d < 1e-4 for d in diffs), diffs
    assert all(n > 0 for n in history("sync/logp_rows_checked"))
    assert history("counters/dropped_stale")[-1] == 0


def test_ray_runners_survive_a_killed_runner(in_tmp):
    """The Ray path of the debug preset, smaller: 2 env-runner actors and 1 imagination actor.
    One runner process is killed after the first iteration; training still finishes, and the
    restart is counted in the logged metrics."""
    import os
    import signal

    ray = pytest.importorskip("ray")
    from policies import wait_for_runner

    from rig.config import load_config
    from rig.train import Trainer

    cfg = load_config(DEBUG, [
        "env.num_envs=1", "rollout.fragment_length=4", "imagination.num_starts=2",
        "imagination.horizon=1", "policy.max_reasoning_tokens=2", "env.kwargs.length=6",
        "train.iterations=5", "tracking.system_metrics=false", "policy.head_hidden=8",
    ])  # fmt: skip
    run_dir = in_tmp / "runs" / "ray-train"
    logged: list[dict] = []

    class Tracker:  # the MLflow side is tested above; here only what was logged
        def log_metrics(self, metrics, step):
            logged.append({**metrics, "step": step})

        def log_text(self, *args):
            pass

        def log_image(self, *args):
            pass

    killed = []

    def progress(counters, metrics):
        if counters.iteration == 1:
            pids = trainer.rollouts.group.foreach_env_runner(
                lambda runner: os.getpid(), local_env_runner=False
            )
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])
        elif counters.iteration == 2:
            # On a loaded machine Ray may take longer than the next iterations to bring the
            # process back; wait for it here (bounded), so the run sees it return.
            wait_for_runner(trainer.rollouts, 1, 120)  # pids[0]'s runner

    trainer = Trainer(cfg, run_dir)
    try:
        trainer.run(Tracker(), progress)
    finally:
        trainer.close()
        ray.shutdown()
    assert killed and [m["step"] for m in logged] == [1, 2, 3, 4, 5]
    assert logged[-1]["rollout/runner_restarts"] >= 1
    assert logged[-1]["rollout/healthy_runners"] == 2  # the restarted one is back
    assert logged[-1]["counters/env_steps"] >= 5 * 4  # the survivor sampled every iteration
