"""Config layering and the CLI's error contract: one line naming key and file, exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rig.cli import main
from rig.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "debug.yaml")


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_layers_defaults_preset_overrides():
    cfg = load_config(DEBUG, ["env.size=96", "run.seed=5"])
    assert cfg.run.name == "debug"  # from the preset
    assert cfg.env.vectorization == "sync"  # from the defaults
    assert cfg.env.size == 96 and cfg.run.seed == 5  # from the command line
    assert cfg.env.kwargs == {"length": 64}
    assert load_config(DEBUG, ["env.kwargs={}"]).env.kwargs == {}  # a mapping value replaces whole


@pytest.mark.parametrize(
    ("text", "value"),
    [("3e-4", 3e-4), ("1e5", 1e5), ("1E-3", 1e-3), ("+2e-4", 2e-4), ("5e+2", 500.0),
     ("3.0e-4", 3e-4), ("0.0003", 3e-4), (".5", 0.5), ("1", 1.0)],
)  # fmt: skip
def test_floats_as_users_type_them(text, value, tmp_path):
    """YAML 1.1 reads 3e-4 (no dot) as a string; a float field must take it, from the command
    line and from a preset file alike."""
    assert load_config(None, [f"learner.lr={text}"]).learner.lr == pytest.approx(value)
    preset = tmp_path / "p.yaml"
    preset.write_text(f"learner:\n  lr: {text}\n")
    assert load_config(preset).learner.lr == pytest.approx(value)


def test_non_numbers_stay_strings():
    assert load_config(None, ["policy.task=1e5x"]).policy.task == "1e5x"
    assert load_config(None, ["policy.task=e5"]).policy.task == "e5"


def test_a_dotted_override_changes_one_mapping_entry():
    base = load_config(DEBUG).ppo.loss_scales
    scales = load_config(DEBUG, ["ppo.loss_scales.next_frame=0.0"]).ppo.loss_scales
    assert scales == {**base, "next_frame": 0.0} and base["next_frame"] != 0.0
    kwargs = load_config(DEBUG, ["env.kwargs.view=[9, 9]"]).env.kwargs
    assert kwargs == {"length": 64, "view": [9, 9]}  # the preset's length stays
    # a whole mapping still replaces: names missing from it are an error on the command line
    code = main(["config", "show", "-c", DEBUG, "ppo.loss_scales={policy: 1.0}"])
    assert code == 2


def test_a_dotted_override_naming_an_unknown_entry_blames_the_command_line(capsys):
    code, _, err = run_cli(capsys, "config", "show", "-c", DEBUG, "ppo.loss_scales.nxt_frame=0")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("error: command line: ppo.loss_scales:") and "unknown ['nxt_frame']" in err


def test_every_preset_validates():
    for preset in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(preset)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["env.num_envs=0"], "command line: env.num_envs: Input should be greater than or equal to 1 (got 0)"),
        (["env.num_envs=-3"], "command line: env.num_envs: Input should be greater than or equal to 1 (got -3)"),
        (["env.num_env=3"], "unknown key 'env.num_env' (allowed here: id, kwargs, num_envs, size, vectorization); did you mean 'num_envs'?"),
        (["env.size=big"], "command line: env.size: Input should be a valid integer (got 'big')"),
        (["env.id=Pong-v9"], "command line: env.id: unknown env id 'Pong-v9'"),
        (["env.vectorization=threads"], "env.vectorization: Input should be 'sync' or 'async'"),
        (["env.kwargs={lenght: 3}"], "env.kwargs.lenght: rig/Crafter-v0 takes no argument 'lenght'"),
        (["nonsense"], "override 'nonsense' is not of the form section.key=value"),
        (["ppo.sync_check_rows=-1"], "command line: ppo.sync_check_rows: Input should be greater than or equal to 0 (got -1)"),
        (["ppo.sync_check_rows=all"], "command line: ppo.sync_check_rows: Input should be a valid integer (got 'all')"),
        (["imagination.min_accuracy=0.3"], "imagination: min_accuracy was replaced by gate (earned, open or closed) and gate_rows"),
        (["imagination.gate_rows=0"], "imagination: gate earned needs gate_rows > 0"),
        (["imagination.gate=maybe"], "imagination.gate: Input should be 'earned', 'open' or 'closed' (got 'maybe')"),
        (["policy.sees=reconstructions"], "command line: policy: sees=reconstructions reads frames through the policy's VQ, and a preset's is untrained; give a trained one with policy.vq=<rig tokenizer train folder>"),
        (["policy.sees=pixels"], "policy.sees: Input should be 'frames' or 'reconstructions' (got 'pixels')"),
    ],
)
def test_bad_overrides(capsys, args, expected):
    code, out, err = run_cli(capsys, "config", "show", "--config", DEBUG, *args)
    assert code == 2
    assert expected in err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "Traceback" not in err and out == ""


def test_bad_file_values_name_the_file(tmp_path, capsys):
    preset = tmp_path / "mine.yaml"
    preset.write_text(yaml.safe_dump({"env": {"num_envs": 2, "size": "large"}}))
    code, _, err = run_cli(capsys, "config", "show", "-c", str(preset))
    assert code == 2 and "mine.yaml: env.size: Input should be a valid integer (got 'large')" in err
    preset.write_text(yaml.safe_dump({"trainer": {"lr": 1}}))
    code, _, err = run_cli(capsys, "config", "show", "-c", str(preset))
    assert code == 2 and "mine.yaml: unknown key 'trainer'" in err
    preset.write_text("env: [unclosed")
    code, _, err = run_cli(capsys, "config", "show", "-c", str(preset))
    assert code == 2 and "mine.yaml" in err and "not valid YAML" in err


def test_a_check_across_a_sections_keys_names_the_layer_that_set_them(tmp_path, capsys):
    """A section's own validator (rollout: collective sync needs inference actors) names the
    command line or the preset that set the keys, not configs/defaults.yaml."""
    bad = "rollout: weight_sync=collective broadcasts to inference actors"
    code, _, err = run_cli(capsys, "config", "show", "-c", DEBUG, "rollout.weight_sync=collective")
    assert code == 2 and err.startswith(f"error: command line: {bad}")
    preset = tmp_path / "mine.yaml"
    preset.write_text(yaml.safe_dump({"rollout": {"weight_sync": "collective"}}))
    code, _, err = run_cli(capsys, "config", "show", "-c", str(preset))
    assert code == 2 and err.startswith("error: ") and f"mine.yaml: {bad}" in err


def test_missing_config_file(capsys):
    code, _, err = run_cli(capsys, "config", "show", "-c", "no/such.yaml")
    assert code == 2 and err == "error: config file 'no/such.yaml' does not exist (presets live in " + str(ROOT / "configs") + ")\n"


def test_debug_flag_shows_traceback(capsys):
    code, _, err = run_cli(capsys, "--debug", "config", "show", "env.num_envs=0")
    assert code == 2 and "Traceback" in err and "ConfigError" in err


def test_usage_errors_exit_2(capsys):
    code, _, err = run_cli(capsys, "envs", "play", "--steps", "0")
    assert code == 2 and "--steps" in err
    code, _, err = run_cli(capsys, "envs", "play", "--episodes", "1", "--record", "out.gif")
    assert code == 2 and err == "error: --record out.gif: the file must end in .mp4\n"
    code, _, err = run_cli(capsys, "envs", "play")
    assert code == 2 and "--steps" in err


def test_help_for_every_command(capsys):
    for args in ([], ["envs"], ["envs", "list"], ["envs", "play"], ["config"], ["config", "show"]):
        code, out, _ = run_cli(capsys, *args, "--help")
        assert code == 0 and "Usage: rig" in out


def test_process_exit_code_and_no_traceback(in_tmp):
    proc = subprocess.run(
        [sys.executable, "-m", "rig.cli", "envs", "play", "--steps", "5", "env.num_envs=0"],
        capture_output=True, text=True, cwd=in_tmp, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr == "error: command line: env.num_envs: Input should be greater than or equal to 1 (got 0)\n"
    assert not (in_tmp / "runs").exists(), "a rejected config must not create a run folder"


def test_envs_list(capsys):
    code, out, _ = run_cli(capsys, "envs", "list", "--json")
    rows = {row["id"]: row for row in json.loads(out)}
    assert code == 0
    assert rows["rig/Crafter-v0"]["actions"] == "Discrete(17)"
    assert rows["rig/Crafter-v0"]["observation"] == "(64, 64, 3) uint8"
    assert rows["rig/Catch-v0"]["noop"] == "stay"
    assert rows["rig/FakeMineRL-v0"]["noop"] == "noop"
    assert set(rows) >= {"rig/Crafter-v0", "rig/MineRL-v0", "rig/FakeMineRL-v0", "rig/Catch-v0"}


def test_play_writes_run_folder_video_and_stats(in_tmp, capsys):
    import imageio.v3 as iio

    video = in_tmp / "catch.mp4"
    code, out, err = run_cli(
        capsys, "envs", "play", "--env", "rig/Catch-v0", "--episodes", "6", "--num-envs", "2",
        "--record", str(video), "env.kwargs={}", "env.size=32",
    )  # fmt: skip
    assert code == 0, err
    frames = iio.imread(video)
    assert frames.ndim == 4 and frames.shape[-1] == 3 and len(frames) >= 20
    (run_dir,) = (in_tmp / "runs").iterdir()
    assert run_dir.name.startswith("rig-play-")
    saved = load_config(run_dir / "config.yaml")
    assert saved.env.id == "rig/Catch-v0" and saved.env.num_envs == 2
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["summary"]["finished"]["episodes"] == 6
    assert all(e["length"] == 7 for e in stats["episodes"] if not e.get("unfinished"))
    assert "6 finished episode(s)" in out


def test_play_crafter_prints_score(in_tmp, capsys):
    code, out, err = run_cli(
        capsys, "envs", "play", "--agent", "random", "--steps", "30", "--num-envs", "1",
        "env.kwargs={length: 20}",
    )  # fmt: skip
    assert code == 0, err
    assert "Crafter score %" in out and "1 finished episode(s)" in out


def test_bad_env_values_and_paths_leave_nothing_behind(in_tmp, capsys):
    code, _, err = run_cli(capsys, "envs", "play", "--steps", "3", "env.kwargs={length: -4}")
    assert code == 2
    assert err == "error: env rig/Crafter-v0 with env.size=64, env.kwargs={'length': -4}: length must be >= 1 or None, got -4\n"
    code, _, err = run_cli(capsys, "envs", "play", "--steps", "3", "--env", "rig/Catch-v0", "--agent", "scripted")
    assert code == 2 and err == "error: the scripted agent plays only rig/Crafter-v0, not rig/Catch-v0\n"
    assert not any((in_tmp / "runs").iterdir()), "no run folder for a run that never started"
    (in_tmp / "file").write_text("x")
    code, _, err = run_cli(capsys, "envs", "play", "--steps", "3", "--record", "file/x.mp4")
    assert code == 2 and err.startswith("error: --record file/x.mp4: cannot create folder 'file'")
    code, _, err = run_cli(capsys, "envs", "play", "--steps", "3", "run.output_dir=file/runs")
    assert code == 2 and err.startswith("error: run.output_dir 'file/runs': cannot create folder 'file/runs'")


def test_missing_optional_dependency_is_a_user_error(in_tmp, capsys):
    pytest.importorskip("gymnasium")
    try:
        import minerl  # noqa: F401

        pytest.skip("minerl is installed here; the missing-dependency path cannot be shown")
    except ImportError:
        pass
    code, _, err = run_cli(capsys, "envs", "play", "--steps", "1", "--env", "rig/MineRL-v0")
    assert code == 2 and err.startswith("error: minerl is not installed") and "JDK 8" in err


def test_envs_list_table_shows_brackets_as_text(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_cli(capsys, "envs", "list")
    assert code == 0
    assert "'forward, sprint, jump, camera:[5,0]'" in out  # not swallowed as rich markup
    assert "rig/Catch-v0" in out and "'noop', 'move_up', 'place_furnace'" in out


@pytest.mark.parametrize("columns", ["80", "60"])
def test_envs_list_never_wraps_an_id(capsys, monkeypatch, columns):
    """On a narrow terminal the other columns fold; every id stays whole on one line."""
    from rig.envinfo import describe_envs

    monkeypatch.setenv("COLUMNS", columns)
    code, out, _ = run_cli(capsys, "envs", "list")
    assert code == 0
    assert max(len(line) for line in out.splitlines()) <= int(columns)
    for row in describe_envs():
        assert row["id"] in out, row["id"]
