"""What `rig train` guarantees when things go wrong (docs/reliability.md), drilled on the tiny
debug preset in-process: weights or a loss turning non-finite, a full disk while saving, a resume
that replays logged steps, a resume with a changed ZeRO stage, reading checkpoints with
DeepSpeed's own tool, and two runs started at once on one output folder.

Whole-loop tier: each run is a few iterations of the tiny policy (tens of seconds)."""

from __future__ import annotations

import errno
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")

from test_train import DEBUG, FAST, mlflow_run, only_run, run_cli  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
ROOT = Path(__file__).resolve().parents[1]


def checkpoints_of(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("iter_*"))


def error_line(err: str) -> str:
    """The one ``error:`` line a failed run ends its stderr with (after its progress lines)."""
    lines = err.splitlines()
    assert "Traceback" not in err, err
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


# -- non-finite weights or loss ---------------------------------------------------------------------


@pytest.mark.parametrize("what", ["weights", "loss"])
def test_a_non_finite_update_stops_and_keeps_the_last_good_checkpoint(in_tmp, capsys, monkeypatch, what):
    """Iteration 5's update yields NaN weights (or a NaN loss). Without the guard the run saves
    a NaN checkpoint at 6 and prunes iter_000004, the last good one (keep_checkpoints=1)."""
    import learner.ppo

    real = learner.ppo.ppo_update
    calls = []

    def poisoned(engine, *args, **kwargs):
        metrics = real(engine, *args, **kwargs)
        calls.append(1)
        if len(calls) == 5:
            if what == "weights":
                with torch.no_grad():
                    next(engine.module.parameters()).fill_(float("nan"))
            else:
                metrics["loss/total"] = float("nan")
        return metrics

    monkeypatch.setattr(learner.ppo, "ppo_update", poisoned)
    code, _, err = run_cli(capsys, "train", "--config", DEBUG, *FAST, "train.iterations=6",
                           "train.keep_checkpoints=1", "train.export_at_end=false")  # fmt: skip
    line = error_line(err)
    assert code == 2 and line.startswith("error: iteration 5: "), err
    named = "weights " if what == "weights" else "loss/total"
    assert named in line and "not finite" in line and "the last good checkpoint is iter_000004" in line
    run = only_run(in_tmp)
    assert checkpoints_of(run) == ["iter_000004"]
    _, mlrun = mlflow_run(run)
    assert mlrun.info.status == "FAILED"


# -- a full disk ------------------------------------------------------------------------------------


def test_a_full_disk_while_saving_is_one_line_and_exit_2(in_tmp, capsys, monkeypatch):
    """ENOSPC simulated in the second checkpoint's engine files (tests/test_checkpoints.py fills
    a real tmpfs where one can be mounted): one line, exit 2, iter_000002 kept."""
    from learner.engine import DeepSpeedEngine

    real = DeepSpeedEngine.save_checkpoint
    saves = []

    def fill_up(self, directory, tag, client_state=None):
        saves.append(1)
        if len(saves) == 2:
            (Path(directory) / "partial.bin").write_bytes(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, directory, tag, client_state)

    monkeypatch.setattr(DeepSpeedEngine, "save_checkpoint", fill_up)
    code, _, err = run_cli(capsys, "train", "--config", DEBUG, *FAST, "train.iterations=4",
                           "train.export_at_end=false")  # fmt: skip
    line = error_line(err)
    assert code == 2 and re.fullmatch(r"error: no space left on /\S* while saving checkpoint "
                                      r"iter_000004 in \S+/checkpoints; the last good one is "
                                      r"iter_000002", line), err  # fmt: skip
    run = only_run(in_tmp)
    assert checkpoints_of(run) == ["iter_000002"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


# -- resume: replayed steps, a changed ZeRO stage ---------------------------------------------------


def test_replayed_steps_read_as_the_resumed_run_computed(in_tmp, capsys):
    """Attempt 1 logs steps 1-3 and dies before saving iter_000003 (its checkpoint removed);
    attempt 2 resumes from iter_000002 with 1 env instead of 2 (4 env steps an iteration, not
    8). MLflow must show attempt 2's step 3 (20 env steps), not attempt 1's (24)."""
    import shutil

    code, _, err = run_cli(capsys, "train", "--config", DEBUG, *FAST, "train.iterations=3",
                           "train.export_at_end=false")  # fmt: skip
    assert code == 0, err
    run = only_run(in_tmp)
    shutil.rmtree(run / "checkpoints" / "iter_000003")  # the crash came before that save
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "train.iterations=4",
                           "env.num_envs=1")  # fmt: skip
    assert code == 0, err
    client, mlrun = mlflow_run(run)
    rows = [(m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, "counters/env_steps")]
    assert rows == [(1, 8.0), (2, 16.0), (3, 20.0), (4, 24.0)]
    assert mlrun.data.metrics["counters/env_steps"] == 24.0


def _two_adaptive_kl_iterations(in_tmp, capsys, *flags: str) -> tuple[Path, dict]:
    """A 2-iteration debug run with ppo.behaviour_kl_coeff 0.2 and a target no update reaches
    (1e6, so the coefficient halves after every policy update); its folder and last counters."""
    code, _, err = run_cli(capsys, "train", "--config", DEBUG, *FAST, "train.iterations=2",
                           "ppo.behaviour_kl_coeff=0.2", "ppo.behaviour_kl_target=1000000.0",
                           "train.export_at_end=false", *flags)  # fmt: skip
    assert code == 0, err
    run = only_run(in_tmp)
    return run, json.loads((run / "checkpoints" / "iter_000002" / "counters.json").read_text())


def test_the_adaptive_kl_coefficient_adapts_and_survives_a_resume(in_tmp, capsys):
    """ppo.behaviour_kl_coeff 0.2 with a target no update reaches (1e6): halved after every
    update, logged as learner/kl_coeff, kept in the checkpoint's counters, so the resumed
    iteration 3 uses 0.05, not the config's 0.2 again."""
    run, counters = _two_adaptive_kl_iterations(in_tmp, capsys)
    assert counters["kl_coeff"] == pytest.approx(0.05)
    code, _, err = run_cli(capsys, "train", "--resume", str(run), "train.iterations=3")
    assert code == 0, err
    client, mlrun = mlflow_run(run)
    rows = [m.value for m in client.get_metric_history(mlrun.info.run_id, "learner/kl_coeff")]
    assert rows == pytest.approx([0.2, 0.1, 0.05])
    assert mlrun.data.metrics["policy/kl_penalty"] > 0


def test_frozen_actor_iterations_fit_the_critic_first_and_hold_the_kl_coefficient(in_tmp, capsys):
    """ppo.freeze_actor_iterations 1: iteration 1's update has no policy term (policy/pg_loss
    weighted 0: learner/actor_frozen 1) and leaves the adaptive KL coefficient alone; iteration
    2 updates the policy and adapts it (0.2 -> 0.1)."""
    run, counters = _two_adaptive_kl_iterations(in_tmp, capsys, "ppo.freeze_actor_iterations=1")
    assert counters["kl_coeff"] == pytest.approx(0.1)
    client, mlrun = mlflow_run(run)
    frozen = [m.value for m in client.get_metric_history(mlrun.info.run_id, "learner/actor_frozen")]
    assert frozen == [1.0, 0.0]
    rows = [m.value for m in client.get_metric_history(mlrun.info.run_id, "learner/kl_coeff")]
    assert rows == pytest.approx([0.2])


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory):
    """A 2-iteration ZeRO-2 run, shared by the resume and export checks below."""
    import os

    from rig.cli import main

    root = tmp_path_factory.mktemp("zero2")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        code = main(["train", "--config", DEBUG, *FAST, "train.iterations=2",
                     "learner.zero_stage=2", "train.export_at_end=false"])  # fmt: skip
    finally:
        os.chdir(cwd)
    assert code == 0
    return only_run(root)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_with_another_zero_stage_names_the_setting(zero2_run, capsys):
    """A valid ZeRO-2 checkpoint resumed with learner.zero_stage=0 is a config mismatch, not
    corruption: the line names the setting and both values, and says nothing about deleting."""
    before = _tree(zero2_run / "checkpoints")
    code, _, err = run_cli(capsys, "train", "--resume", str(zero2_run), "train.iterations=3",
                           "learner.zero_stage=0")  # fmt: skip
    line = error_line(err)
    assert code == 2 and "learner.zero_stage=0 (saved: 2)" in line, err
    assert "corrupt" not in line and "delete" not in line
    assert _tree(zero2_run / "checkpoints") == before


def test_an_intact_checkpoint_that_does_not_fit_names_the_changed_settings(zero2_run, capsys):
    """Another optimiser layout (a parameter group more, learner.lr_scales): the files are intact
    (sha256), so the line says so and lists the settings that changed, and deletes nothing."""
    before = _tree(zero2_run / "checkpoints")
    code, _, err = run_cli(capsys, "train", "--resume", str(zero2_run), "train.iterations=3",
                           "learner.lr_scales={world: 10.0}")  # fmt: skip
    line = error_line(err)
    assert code == 2 and "is intact (sha256 checked) but does not load" in line, err
    assert "learner.lr_scales.world=10.0 (saved: None)" in line and "delete" not in line
    assert _tree(zero2_run / "checkpoints") == before


def test_checkpoint_files_hold_no_pickled_rng(zero2_run):
    ckpt = zero2_run / "checkpoints" / "iter_000002"
    assert (ckpt / "rng.json").is_file() and not (ckpt / "rng.pt").exists()
    json.loads((ckpt / "rng.json").read_text())


# -- reading checkpoints with DeepSpeed's tool (docs/reliability.md) --------------------------------


def _exported_weights(run: Path, out: Path, capsys) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    code, _, err = run_cli(capsys, "export", str(run), str(out))
    assert code == 0, err
    weights = {}
    for file in out.glob("*.safetensors"):
        weights.update(load_file(file))
    return weights


def _assert_matches_export(state: dict[str, torch.Tensor], exported: dict[str, torch.Tensor]):
    """Every trainable tensor DeepSpeed gives back is in the export with the same values."""
    assert state
    for key, value in state.items():
        match = [k for k in exported if k.endswith(key) or key.endswith(k)]
        if match:
            torch.testing.assert_close(exported[match[0]].float(), value.float(), rtol=0, atol=0)
    assert sum(1 for key in state if any(k.endswith(key) or key.endswith(k) for k in exported))


def test_zero2_checkpoints_read_with_zero_to_fp32(zero2_run, capsys, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = zero2_run / "checkpoints" / "iter_000002"
    assert (ckpt / "zero_to_fp32.py").is_file()
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="engine")
    _assert_matches_export(state, _exported_weights(zero2_run, tmp_path / "hf", capsys))


def test_zero0_checkpoints_read_with_the_documented_command(in_tmp, capsys, tmp_path):
    """ZeRO-0 keeps no ZeRO partitions, so zero_to_fp32 has nothing to merge; the weights are
    whole in the model-states file, read as docs/reliability.md says."""
    code, _, err = run_cli(capsys, "train", "--config", DEBUG, *FAST, "train.iterations=2",
                           "train.export_at_end=false")  # fmt: skip
    assert code == 0, err
    run = only_run(in_tmp)
    states = run / "checkpoints" / "iter_000002" / "engine" / "mp_rank_00_model_states.pt"
    module = torch.load(states, map_location="cpu", weights_only=True)["module"]
    _assert_matches_export(module, _exported_weights(run, tmp_path / "hf", capsys))


# -- two runs at once -------------------------------------------------------------------------------


def test_two_runs_started_at_once_on_a_fresh_output_folder(tmp_path):
    """Two `rig train` processes, same output folder, same second, no MLflow database yet:
    both finish, each in its own run folder with its own MLflow run."""
    start_at = int(time.time()) + 3  # both wait for the same whole second before starting
    script = ("import sys, time\nfrom rig.cli import main\n"
              f"while time.time() < {start_at}: time.sleep(0.01)\n"
              "sys.exit(main(sys.argv[1:]))\n")  # fmt: skip
    args = ["train", "--config", DEBUG, *FAST, "train.iterations=2", "train.export_at_end=false"]
    procs = [subprocess.Popen([sys.executable, "-c", script, *args], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    outs = [proc.communicate(timeout=900) for proc in procs]
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    runs = sorted(p for p in (tmp_path / "runs").iterdir() if "-train-" in p.name)
    assert len(runs) == 2, runs
    ids = {(run / "mlflow_run_id").read_text().strip() for run in runs}
    assert len(ids) == 2
    for run in runs:
        assert checkpoints_of(run) == ["iter_000002"]
        _, mlrun = mlflow_run(run)
        assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == run.name
