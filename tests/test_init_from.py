"""`rig train --init-from` with a checkpoint that cannot or must not be used: one line, exit 2,
no traceback and no run folder, by the rule `rig sft --init-from` applies.

Component tier: a tiny policy is saved once; each case damages or relabels a copy of it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")

from rig.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "debug.yaml")
FAST = ["rollout.num_env_runners=0", "imagination.num_actors=0", "tracking.system_metrics=false"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Crafter policy as `rig train` exports it (the config rides in the record)."""
    from envs.crafter_env import crafter_codec
    from rl.policy import RigPolicy

    path = tmp_path_factory.mktemp("ckpt") / "policy"
    policy = RigPolicy.from_preset("tiny", crafter_codec(), seed=0)
    policy.save(path, extra={"config": {"env": {"id": "rig/Crafter-v0"}}})
    return path


def _copy(saved: Path, tmp_path: Path, extra: dict | None = None) -> Path:
    import json

    from rl.model import RIG_FILE

    path = tmp_path / "copy"
    shutil.copytree(saved, path)
    if extra is not None:
        record = json.loads((path / RIG_FILE).read_text())
        record["extra"] = extra
        (path / RIG_FILE).write_text(json.dumps(record))
    return path


def _refused(in_tmp: Path, capsys, *args) -> str:
    code = main(["train", "--config", DEBUG, *FAST, *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    runs = in_tmp / "runs"
    assert not runs.exists() or not [p for p in runs.iterdir() if "-train-" in p.name]
    return err


def test_truncated_heads_file_is_one_line(saved, in_tmp, capsys):
    from rl.policy import HEADS_FILE

    path = _copy(saved, in_tmp)
    heads = path / HEADS_FILE
    heads.write_bytes(heads.read_bytes()[: heads.stat().st_size // 2])
    err = _refused(in_tmp, capsys, "--init-from", str(path))
    assert f"--init-from: corrupted heads file {heads}" in err


def test_heads_that_do_not_fit_are_one_line(saved, in_tmp, capsys):
    """Readable, but not this policy's heads: found only when the policy loads (the Trainer)."""
    import torch
    from safetensors.torch import save_file

    from rl.policy import HEADS_FILE

    path = _copy(saved, in_tmp)
    save_file({"value_head.weight": torch.zeros(3, 3)}, str(path / HEADS_FILE))
    err = _refused(in_tmp, capsys, "--init-from", str(path))
    assert "--init-from: " in err and "does not fit this policy" in err


@pytest.mark.parametrize(
    "extra",
    [{"config": {"env": {"id": "rig/Catch-v0"}}},  # a `rig train` export
     {"sft": {"env_id": "rig/Catch-v0"}}],  # a `rig sft` checkpoint
)  # fmt: skip
def test_a_checkpoint_of_another_env_is_refused(saved, in_tmp, capsys, extra):
    path = _copy(saved, in_tmp, extra)
    err = _refused(in_tmp, capsys, "--init-from", str(path))
    assert f"--init-from {path} was trained on rig/Catch-v0 but env.id is rig/Crafter-v0" in err
    assert "set env.id=rig/Catch-v0" in err


def test_policy_init_from_in_the_config_is_checked_the_same_way(saved, in_tmp, capsys):
    path = _copy(saved, in_tmp, {"sft": {"env_id": "rig/Catch-v0"}})
    err = _refused(in_tmp, capsys, f"policy.init_from={path}")
    assert f"policy.init_from {path} was trained on rig/Catch-v0" in err


def test_rig_eval_applies_the_same_rule(saved, in_tmp, capsys):
    path = _copy(saved, in_tmp, {"config": {"env": {"id": "rig/Catch-v0"}}})
    code = main(["eval", "--checkpoint", str(path), "--env", "rig/Crafter-v0", "--out",
                 str(in_tmp / "eval")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"--checkpoint {path} was trained on rig/Catch-v0 but --env is rig/Crafter-v0" in err
    assert not (in_tmp / "eval").exists()


def test_rig_eval_acts_as_the_rl_run_did(saved, in_tmp, capsys):
    """A `rig train` export is scored with its run's own act settings (reasoning cap, task,
    history, env kwargs), not the eval config's defaults: an RL policy trained without reasoning
    was once evaluated with the default cap of 8 reasoning tokens it had never written."""
    import json

    run = {"env": {"id": "rig/Crafter-v0", "kwargs": {"length": 3}},
           "policy": {"max_reasoning_tokens": 0, "history": 0, "task": "collect wood"}}  # fmt: skip
    path = _copy(saved, in_tmp, {"config": run})
    out = in_tmp / "eval"
    code = main(["eval", "--checkpoint", str(path), "--episodes", "1", "--num-envs", "1",
                 "--psnr-every", "1000", "--out", str(out), "tracking.system_metrics=false"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["max_reasoning_tokens"] == 0  # the config's default is 8
    assert report["settings"]["task"] == "collect wood" and report["settings"]["history"] == 0
    assert report["env_kwargs"] == {"length": 3} and report["summary"]["length_mean"] <= 3


@pytest.mark.parametrize(("fitted", "setting", "frozen"), [
    (True, None, True),  # a trained checkpoint's statistics are part of its policy: kept
    (False, None, False),  # never fitted (a preset saved as is): they have to fit
    (True, False, False),  # learner.freeze_statistics=false: refitted on RL's states
])  # fmt: skip
def test_the_learner_keeps_a_checkpoints_head_statistics(saved, in_tmp, fitted, setting, frozen):
    """learner.freeze_statistics (null: frozen for an --init-from checkpoint with fitted ones):
    the SFT-trained action head reads its state standardised by statistics of the SFT data;
    refitting them on the RL states moved that policy by approx KL ~0.005 per update with no
    gradient at all. Frozen, a training forward leaves them as loaded."""
    import torch

    from envs.crafter_env import crafter_codec
    from learner.rank import LearnerRank
    from rig.config import load_config
    from rl.policy import RigPolicy

    path = saved
    if fitted:
        policy = RigPolicy.load(saved, crafter_codec())
        policy.train()
        policy.value_head.norm(torch.randn(8, policy.value_head.norm.mean.shape[0]) + 3)  # fit
        assert float(policy.value_head.norm.count) == 1
        path = in_tmp / "fitted"
        policy.save(path, extra={"config": {"env": {"id": "rig/Crafter-v0"}}})
    overrides = [f"policy.init_from={path}", "policy.max_reasoning_tokens=0"]
    if setting is not None:
        overrides.append(f"learner.freeze_statistics={str(setting).lower()}")
    rank = LearnerRank(load_config(DEBUG, [*FAST, *overrides]))
    norm = rank.policy.value_head.norm
    before = norm.mean.clone()
    rank.policy.train()
    norm(torch.randn(8, before.shape[0]))  # a training forward on other states
    assert norm.frozen == frozen
    assert torch.equal(norm.mean, before) == frozen


def test_heads_of_another_hidden_width_are_refused_up_front(saved, in_tmp, capsys):
    """The saved heads are linear; a config asking for a hidden layer would not load them."""
    path = _copy(saved, in_tmp)
    err = _refused(in_tmp, capsys, "--init-from", str(path), "policy.head_hidden=8")
    assert f"--init-from {path} has heads with hidden width 0 but policy.head_hidden is 8" in err
    assert "set policy.head_hidden=0" in err


def test_policy_vq_puts_a_trained_tokenizer_into_the_runs_policy(in_tmp, capsys):
    """policy.vq (a `rig tokenizer train` folder): the run's policy codes frames with that VQ,
    frozen; the runners get it with the first publish. A missing folder is refused up front."""
    import torch

    from envs.crafter_env import crafter_codec
    from learner.rank import build_policy
    from rig.config import load_config
    from supervised.vq import save_vq, vq_from_preset

    vq, _ = vq_from_preset("tiny", seed=7)
    save_vq(vq, in_tmp / "vq", {})
    policy = build_policy(load_config(DEBUG, [*FAST, f"policy.vq={in_tmp / 'vq'}"]),
                          crafter_codec())  # fmt: skip
    preset = build_policy(load_config(DEBUG, FAST), crafter_codec())
    loaded, trained = policy.model.model.vqmodel.state_dict(), vq.state_dict()
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)
    assert not all(torch.equal(preset.model.model.vqmodel.state_dict()[k], trained[k])
                   for k in trained)  # fmt: skip
    assert not any(p.requires_grad for p in policy.model.model.vqmodel.parameters())
    err = _refused(in_tmp, capsys, f"policy.vq={in_tmp / 'nothing'}")
    assert f"policy.vq={in_tmp / 'nothing'}: no vq.safetensors there" in err
