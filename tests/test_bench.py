"""`rig bench policy`: a smoke run on the tiny preset (structure and sanity of the figures, never
their size: timings depend on the machine's load) and its input errors."""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import typer

from rig import bench, cli

SMOKE = ["--batch-sizes", "1,2", "--batch", "2", "--repeats", "1", "--reasoning-tokens", "2",
         "--kv-tokens", "4", "--threads", "1"]  # fmt: skip


@pytest.fixture
def rig_main(monkeypatch):
    """``rig.cli.main`` (its one-line errors, exit codes) over an app with ``bench`` mounted."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.add_typer(bench.app, name="bench")
    monkeypatch.setattr(cli, "app", app)
    return cli.main


def test_policy_benchmark_prints_table_ratios_and_json(rig_main, tmp_path, capsys):
    out_file = tmp_path / "policy.json"
    assert rig_main(["bench", "policy", *SMOKE, "--json", str(out_file)]) == 0
    out = capsys.readouterr().out
    for text in ("up to 2 reasoning tokens", "act, lookahead 2", "imagine (codes + pixels)",
                 "evaluate + backward", "decode 4 tokens, KV cache", "decode 4 tokens, recompute",
                 "act batch 2 vs 1:", "act lookahead 2 vs 0 (batch 2):", "KV cache vs recompute"):  # fmt: skip
        assert text in out, text

    result = json.loads(out_file.read_text())
    assert result["config"]["preset"] == "tiny" and result["config"]["threads"] == 1
    assert [r["batch"] for r in result["act"]] == [1, 2]
    assert [(s["batch"], s["base"]) for s in result["act_speedup"]] == [(2, 1)]
    rows = [*result["act"], result["lookahead"], result["imagine"], result["evaluate"]]
    assert all(r["seconds"] > 0 and r["per_s"] > 0 for r in rows)
    assert result["act_speedup"][0]["ratio"] > 0 and result["lookahead"]["cost_ratio"] > 0
    kv = result["kv_cache"]
    assert kv["tokens"] == 4 and kv["batch"] == 2 and kv["ratio"] > 0
    assert kv["max_abs_diff"] < 1e-3  # the two decodings compute the same logits


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--preset", "huge"], "unknown policy preset 'huge'"),
        (["--batch-sizes", "1,0"], "--batch-sizes must be integers >= 1"),
        (["--batch-sizes", "one"], "--batch-sizes must be integers separated by commas"),
        (["--dtype", "fp8"], "--dtype must be fp32 or bf16"),
        (["--json", "no/such/folder/x.json"], "--json: folder no/such/folder does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(rig_main, capsys, args, expected):
    assert rig_main(["bench", "policy", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err


def test_cuda_without_gpu_is_a_user_error(rig_main, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert rig_main(["bench", "policy", "--device", "cuda"]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err


def test_bad_flag_value_exits_2(rig_main, capsys):
    assert rig_main(["bench", "policy", "--repeats", "0"]) == 2


# -- rollout, learner, sync, imagination: smoke runs of the smallest set-ups --------------------


def _run(rig_main, capsys, tmp_path, args: list[str]) -> tuple[str, dict]:
    out_file = tmp_path / "result.json"
    assert rig_main(["bench", *args, "--json", str(out_file)]) == 0
    return capsys.readouterr().out, json.loads(out_file.read_text())


@pytest.mark.slow
def test_rollout_benchmark_ratios(rig_main, capsys, tmp_path):
    args = ["rollout", "--envs", "1", "--fragment", "2", "--calls", "1", "--reasoning-tokens", "0"]
    out, result = _run(rig_main, capsys, tmp_path, args)
    assert "Ray overhead ratio (1 actor / in-process):" in out and "scaling ratio" in out
    assert set(result["setups"]) == {"in-process", "1 actor", "2 actors", "2 + central"}
    assert all(r["median"] > 0 for r in result["setups"].values())
    setups = result["setups"]
    assert result["overhead"] == pytest.approx(
        setups["1 actor"]["median"] / setups["in-process"]["median"]
    )
    assert "central inference ratio (2 + central / 2 actors):" in out
    assert result["central"] == pytest.approx(
        setups["2 + central"]["median"] / setups["2 actors"]["median"]
    )


def test_learner_benchmark_times_the_policy_update(rig_main, capsys, tmp_path):
    args = ["learner", "--stages", "0,2", "--repeats", "1", "--rows", "4", "--threads", "1",
            "--reasoning-tokens", "2"]  # fmt: skip
    out, result = _run(rig_main, capsys, tmp_path, args)
    assert "PPO update of the tiny policy" in out
    assert "DeepSpeed / plain torch, ZeRO 2:" in out
    assert [r["zero_stage"] for r in result["rows"]] == [0, 2]
    assert all(r["deepspeed_s"] > 0 and r["plain_s"] > 0 for r in result["rows"])
    # the VQ is frozen as in rig train: fewer trainable parameters than the whole policy
    assert 1e6 < result["config"]["parameters"] < 5.3e6
    # tokens/s of the DeepSpeed update; no MFU on a CPU (no peak to measure it against)
    assert "learner tokens/s, ZeRO 2 fp32:" in out and "MFU, ZeRO 2: none (no peak known" in out
    assert all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in result["rows"])


def test_learner_tokens_and_flops_follow_the_formula(monkeypatch):
    """Tokens are the positions of the learner's forward, FLOPs PaLM's 6 N + 12 l d T per
    position plus the KL reference's forward (benchmarks/learner_engine.py's docstring)."""
    from benchmarks import learner_engine as le

    case = le.policy_case("tiny", rows=3, reasoning_tokens=2)
    work, exp, policy = case.work, case.batch, case.factory()
    with torch.no_grad():
        learner = policy.forward_sequence(exp.act, exp.next_codes)[0]  # (B, P + L + 1 + G, D)
        reference = policy.forward_sequence(exp.act)[0]  # (B, P + L, D): reference.evaluate's
    assert (work.rows, work.sequence, work.reference_sequence) == (
        3, learner.shape[1], reference.shape[1])  # fmt: skip
    assert work.tokens == 3 * learner.shape[1]
    assert (work.layers, work.hidden) == (4, 256)  # configs/policy/tiny.yaml
    layers = policy.model.model.language_model.layers
    assert work.decoder_parameters == sum(p.numel() for p in layers.parameters())
    n, t, r = 4_000_000, work.sequence, work.reference_sequence
    flops = 3 * t * (6 * n + 12 * 4 * 256 * t) + 3 * r * (2 * n + 4 * 4 * 256 * r)
    assert work.flops(n) == flops
    # an update of 2 micro-steps in 0.5 s against a peak of 1 TFLOP/s
    out = le.throughput({"deepspeed_s": 0.5, "parameters": n}, work, accum=2, peak=1.0)
    assert out["tokens_per_s"] == pytest.approx(2 * 3 * t / 0.5)
    assert out["mfu"] == pytest.approx(2 * flops / 0.5 / 1e12)
    assert out["mfu_decoder"] == pytest.approx(2 * work.flops(work.decoder_parameters) / 0.5 / 1e12)
    assert le.throughput({"deepspeed_s": None, "parameters": n}, work, 1, 1.0) == {}


@pytest.mark.parametrize(
    ("name", "precision", "peak"),
    [("NVIDIA H100 80GB HBM3", "bf16", 989.0), ("NVIDIA H100 PCIe", "bf16", 756.0),
     ("NVIDIA H200", "bf16", 989.0), ("NVIDIA H200 NVL", "bf16", 835.0),
     ("Tesla T4", "bf16", None), ("NVIDIA H100 80GB HBM3", "fp32", None)],
)  # fmt: skip
def test_mfu_peak_by_gpu_name(monkeypatch, name, precision, peak):
    from benchmarks.learner_engine import peak_tflops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert peak_tflops("cuda", precision)[0] == peak
    assert peak_tflops("cuda", precision, 500.0) == (500.0, "--peak-tflops")
    assert peak_tflops("cpu", "bf16") == (None, "no peak known for cpu: give --peak-tflops")


@pytest.mark.slow
def test_learner_group_benchmark_prints_the_ratio_of_two_ranks_to_one(rig_main, capsys, tmp_path):
    args = ["learner-group", "--rows", "8", "--minibatch", "8", "--repeats", "1",
            "--reasoning-tokens", "2"]  # fmt: skip
    out, result = _run(rig_main, capsys, tmp_path, args)
    assert "samples/s, 2 ranks / 1 rank:" in out
    setups = result["setups"]
    assert set(setups) == {"1 rank", "2 ranks"}
    assert result["ratio"] == pytest.approx(
        setups["2 ranks"]["samples_per_s"] / setups["1 rank"]["samples_per_s"]
    )


def test_frozen_trunk_benchmark_prints_the_ratio_of_recomputing_to_once(rig_main, capsys, tmp_path):
    args = ["frozen-trunk", "--rows", "8", "--epochs", "2", "--minibatch", "4", "--repeats", "1",
            "--threads", "1"]  # fmt: skip
    out, result = _run(rig_main, capsys, tmp_path, args)
    assert "seconds per update, trunk per minibatch / once per update:" in out
    assert result["config"]["freeze"] == ["model"] and result["config"]["epochs"] == 2
    once, each = (result["setups"][k]["median_s"] for k in ("trunk once per update",
                                                            "trunk per minibatch"))  # fmt: skip
    assert once > 0 and each > 0 and result["ratio"] == pytest.approx(each / once)
    assert "with the world terms / without them:" in out
    bare, codes = (result["setups"][k]["median_s"] for k in ("trunk once, no world terms",
                                                             "next-frame codes (driver)"))  # fmt: skip
    assert result["world_ratio"] == pytest.approx((once + codes) / bare)


@pytest.mark.slow
def test_sync_benchmark_payload_and_encodings(rig_main, capsys, tmp_path):
    args = ["sync", "--presets", "tiny", "--runners", "1", "--imagination-actors", "1",
            "--repeats", "1", "--inference-actors", "1", "--bucket-mb", "4"]  # fmt: skip
    out, result = _run(rig_main, capsys, tmp_path, args)
    assert "zero-copy vs pickled tensors" in out
    rows = result["presets"]
    assert [r["encoding"] for r in rows] == ["zero-copy", "pickled"]
    # fp32 weights: 4 bytes per parameter (buffers such as the VQ codebook counted in both)
    assert rows[0]["megabytes"] == pytest.approx(rows[0]["parameters"] * 4 / 1e6, rel=0.05)
    assert all(r["sync_s"] > 0 and r["receivers"] == 2 for r in rows)
    # to the inference actor: rollout.weight_sync's two paths side by side, with their ratio
    assert [r["path"] for r in result["inference"]] == ["object store", "collective"]
    assert all(r["sync_s"] > 0 and r["receivers"] == 1 for r in result["inference"])
    assert "tiny to 1 inference actor(s): collective" in out


def test_sync_without_ray_times_each_step_and_delivers_the_weights(capsys, tmp_path):
    from benchmarks import sync

    out_file = tmp_path / "sync.json"
    sync.main(["--no-ray", "--presets", "tiny", "--repeats", "2", "--json", str(out_file)])
    assert "s per sync" in capsys.readouterr().out
    (row,) = json.loads(out_file.read_text())["presets"]
    assert list(row["steps"]) == ["host copy", "finite check", "pack", "put copy", "load"]
    assert row["sync_s"] >= sum(row["steps"].values()) * 0.5 > 0
    assert row["megabytes"] == pytest.approx(row["parameters"] * 4 / 1e6, rel=0.05)  # fp32
    assert row["max_abs_diff"] == 0.0  # the receiver started from other weights


def test_imagination_benchmark_ratio(rig_main, capsys, tmp_path):
    args = ["imagination", "--envs", "2", "--fragment", "1", "--calls", "1",
            "--reasoning-tokens", "0"]  # fmt: skip
    out, result = _run(rig_main, capsys, tmp_path, args)
    assert "imagined / real transitions per second:" in out
    assert result["config"]["rows_per_call"] == {"real": 2, "imagined": 2}
    assert result["ratio"] == pytest.approx(result["imagined"]["median"] / result["real"]["median"])
    assert set(result["phases"]) == {"act", "codes", "decode"}
    assert result["phases"]["act"] > 0 and result["phases"]["decode"] > 0
    assert "an imagined step, seconds per call: act " in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["learner", "--stages", "0,4"], "--stages must be ZeRO stages 0-3"),
        (["learner", "--model", "cnn"], "--model must be policy or mlp"),
        (["sync", "--presets", "tiny,huge"], "unknown policy preset 'huge'"),
        (["rollout", "--preset", "huge"], "unknown policy preset 'huge'"),
        (["imagination", "--json", "no/such/x.json"], "--json: folder no/such does not exist"),
    ],
)
def test_bad_input_of_the_other_benchmarks(rig_main, capsys, args, expected):
    assert rig_main(["bench", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err


# -- rig bench learning: the curve maths, the rig curve reader, input errors, a peer smoke run ----

learning = bench._benchmark("learning")
DEBUG_CATCH = [  # configs/debug.yaml made a Catch preset, until configs/catch.yaml exists
    str(learning._ROOT / "configs" / "debug.yaml"),
    *("--set", "env.kwargs={}", "--set", "imagination.horizon=0"),
    *("--set", "policy.max_reasoning_tokens=0"),
]


def test_windowed_weights_iteration_means_by_episode_counts():
    points = [(64, -1.0, 8), (128, 0.0, 0), (192, 1.0, 2), (256, 0.5, 100)]
    # 192: its 2 episodes are too few for a window of 10, so the 8 of step 64 join them:
    # (1.0 * 2 - 1.0 * 8) / 10 = -0.6; 256 alone holds 100 >= 10 episodes
    assert learning.windowed(points, window=10) == [[64, -1.0, 8], [192, -0.6, 10],
                                                    [256, 0.5, 100]]  # fmt: skip
    assert learning.windowed([(64, 0.3, 0)], window=10) == []


def test_steps_to_threshold_needs_a_full_window_and_can_be_never():
    curve = [[100, 0.2, 50], [200, 0.9, 60], [300, 0.85, 120], [400, 0.95, 150]]
    at = [150, 250, 350, 450]
    assert learning.steps_to_threshold(curve, at, 0.8, min_episodes=100) == 350
    assert learning.steps_to_threshold(curve, at, 0.8, min_episodes=0) == 250  # 60 episodes
    assert learning.steps_to_threshold(curve, at, 0.99) is None
    assert learning.steps_to_threshold([], at, 0.0) is None
    assert learning.steps_to_threshold(curve, [50], -1.0, min_episodes=0) is None  # no point yet


def test_median_curve_over_seeds_with_uneven_marks():
    a = [[100, 0.0, 1], [300, 1.0, 1]]
    b = [[150, 0.5, 1], [250, -0.5, 1]]
    c = [[400, 2.0, 1]]
    # each seed's value at a mark is its last point at or before it; seeds with none yet drop out
    assert learning.median_curve([a, b, c], [50, 100, 200, 300, 400]) == [
        None, 0.0, 0.25, 0.25, 1.0]  # fmt: skip


def test_median_steps_counts_never_as_infinitely_late():
    assert learning.median_steps([1000, None, 3000]) == 3000
    assert learning.median_steps([1000, 2000]) == 1500
    assert learning.median_steps([1000, None]) is None  # half the seeds never got there
    assert learning.median_steps([None, None, 500]) is None
    assert learning.median_steps([]) is None
    assert learning.ratio(1500, 3000) == 0.5 and learning.ratio(None, 3000) is None


def test_marks_and_plans_honour_the_budget():
    assert learning.marks(15000, 10) == list(range(1500, 15001, 1500))
    assert learning.marks(3, 10) == [1, 2, 3]
    assert learning.peer_plan(15000) == {"iterations": 15, "batch": 1000, "minibatch": 128}
    assert learning.peer_plan(1024) == {"iterations": 1, "batch": 1024, "minibatch": 128}
    assert learning.peer_plan(100) == {"iterations": 1, "batch": 104, "minibatch": 104}
    ns = types.SimpleNamespace
    cfg = ns(rollout=ns(num_env_runners=0, fragment_length=8), env=ns(num_envs=4))
    assert learning.rig_plan(cfg, 100) == {"steps_per_iteration": 32, "iterations": 4}
    cfg = ns(rollout=ns(num_env_runners=2, fragment_length=8), env=ns(num_envs=4))
    assert learning.rig_plan(cfg, 15000) == {"steps_per_iteration": 64, "iterations": 235}


def test_rig_command_puts_the_benchmarks_keys_last(tmp_path):
    command = learning.rig_command(tmp_path / "c.yaml", ["run.seed=9", "ppo.epochs=1"],
                                   "rig/Catch-v0", 3, 12, tmp_path / "rig-seed3")  # fmt: skip
    assert command[2:6] == ["rig.cli", "train", "-c", str(tmp_path / "c.yaml")]
    assert command.index("ppo.epochs=1") < command.index("run.seed=3")
    run_out = tmp_path / "rig-seed3"
    assert command[-5:] == ["env.id=rig/Catch-v0", "run.seed=3", f"run.output_dir={run_out}",
                            "train.iterations=12",
                            f"tracking.tracking_uri=sqlite:///{run_out}/mlflow.db"]  # fmt: skip


def test_read_rig_curve_from_what_rig_train_logs(tmp_path, monkeypatch):
    from rig.config import load_config
    from rig.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking = load_config(None, []).tracking.model_copy(update={"system_metrics": False})
    run_out = tmp_path / "rig-seed0"
    with Tracker(tracking, run_out / "rig-train-x", {}) as tracker:  # -> run_out/mlflow.db
        tracker.log_metrics({"episode/return_mean": -0.5, "episode/count": 8.0,
                             "counters/env_steps": 64.0}, step=1)  # fmt: skip
        tracker.log_metrics({"counters/env_steps": 128.0}, step=2)  # no episode ended
        tracker.log_metrics({"episode/return_mean": 1.0, "episode/count": 4.0,
                             "counters/env_steps": 192.0}, step=3)  # fmt: skip
    assert learning.read_rig_curve(run_out) == [[64.0, -0.5, 8.0], [192.0, 1.0, 4.0]]
    assert learning.read_rig_curve(tmp_path / "nothing-here") == []


def test_read_rig_diagnostics_and_their_late_means(tmp_path, monkeypatch):
    """rig's side of the PPO diagnostics the peer also reports, per iteration at its env steps,
    and their mean over a run's last tenth (what the report prints per side)."""
    from rig.config import load_config
    from rig.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking = load_config(None, []).tracking.model_copy(update={"system_metrics": False})
    run_out = tmp_path / "rig-seed0"
    with Tracker(tracking, run_out / "rig-train-x", {}) as tracker:
        tracker.log_metrics({"counters/env_steps": 500.0, "policy/action_entropy": 1.0,
                             "policy/approx_kl": 0.02, "loss/value": 3.0}, step=1)  # fmt: skip
        tracker.log_metrics({"counters/env_steps": 950.0, "policy/action_entropy": 0.5,
                             "value/explained_variance": 0.8}, step=2)  # fmt: skip
        tracker.log_metrics({"counters/env_steps": 1000.0, "policy/action_entropy": 0.3},
                            step=3)  # fmt: skip
    diagnostics = learning.read_rig_diagnostics(run_out)
    assert diagnostics == [
        [500.0, {"policy/action_entropy": 1.0, "policy/approx_kl": 0.02}],
        [950.0, {"policy/action_entropy": 0.5, "value/explained_variance": 0.8}],
        [1000.0, {"policy/action_entropy": 0.3}]]  # fmt: skip
    assert learning.late_means(diagnostics, 1000) == {
        "policy/action_entropy": pytest.approx(0.4), "value/explained_variance": 0.8}
    assert learning.read_rig_diagnostics(tmp_path / "nothing-here") == []


def test_window_score_is_the_crafter_score_of_the_final_windows_episodes():
    from envs.crafter_env import ACHIEVEMENTS
    from envs.stats import crafter_score

    unlocks = [[100, 50, {"collect_wood": 50}], [200, 0, {}], [300, 60, {"collect_wood": 30}],
               [400, 40, {"collect_wood": 10, "place_table": 4}]]  # fmt: skip
    # the newest iterations holding >= 100 episodes: 40 + 60; wood 40 of 100, table 4 of 100
    rates = dict.fromkeys(ACHIEVEMENTS, 0.0) | {"collect_wood": 40.0, "place_table": 4.0}
    assert learning.window_score(unlocks, window=100) == [pytest.approx(crafter_score(rates)), 100]
    assert learning.window_score(unlocks, window=10)[1] == 40  # the last iteration alone
    assert learning.window_score(unlocks[:2], window=1000)[1] == 50  # all there is
    assert learning.window_score([], window=10) is None
    everything = dict.fromkeys(ACHIEVEMENTS, 0.0) | {"collect_wood": 60.0, "place_table": 400 / 150}
    assert learning.window_score(unlocks, window=math.inf) == [
        pytest.approx(crafter_score(everything)), 150]  # Crafter's own: every episode of the run


def test_random_agent_records_returns_and_crafter_unlocks_per_iteration():
    catch = learning.random_agent("rig/Catch-v0", 64, {}, seed=3, steps=700, iteration=256)
    assert [p[0] for p in catch["points"]] == [256, 512, 700] and catch["unlocks"] == []
    assert all(-1.0 <= p[1] <= 1.0 and p[2] > 0 for p in catch["points"])
    assert learning.random_agent("rig/Catch-v0", 64, {}, seed=3, steps=700, iteration=256) == catch
    crafter = learning.random_agent("rig/Crafter-v0", 64, {"length": 40}, seed=0, steps=200,
                                    iteration=100)  # fmt: skip
    # 40-step episodes (or sooner, by death): every episode is counted, achievements or none
    assert [u[0] for u in crafter["unlocks"]] == [100, 200]
    assert [u[1] for u in crafter["unlocks"]] == [p[2] for p in crafter["points"]]
    assert sum(u[1] for u in crafter["unlocks"]) >= 5
    for _, episodes, counts in crafter["unlocks"]:
        assert all(0 < n <= episodes for n in counts.values())


def test_read_rig_unlocks_from_the_success_rates_rig_train_logs(tmp_path, monkeypatch):
    from rig.config import load_config
    from rig.tracking import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking = load_config(None, []).tracking.model_copy(update={"system_metrics": False})
    run_out = tmp_path / "rig-seed0"
    wood, table = "crafter/success/collect_wood", "crafter/success/place_table"
    with Tracker(tracking, run_out / "rig-train-x", {}) as tracker:
        # 3 episodes, 1 unlocked wood; then 4 more (7), 3 more with wood and 1 with a table
        tracker.log_metrics({"episode/count": 3.0, "counters/env_steps": 64.0,
                             wood: 100 / 3, table: 0.0}, step=1)  # fmt: skip
        tracker.log_metrics({"counters/env_steps": 128.0, wood: 100 / 3, table: 0.0}, step=2)
        tracker.log_metrics({"episode/count": 4.0, "counters/env_steps": 192.0,
                             wood: 400 / 7, table: 100 / 7}, step=3)  # fmt: skip
    assert learning.read_rig_unlocks(run_out) == [
        [64.0, 3, {"collect_wood": 1}], [192.0, 4, {"collect_wood": 3, "place_table": 1}]]
    assert learning.read_rig_unlocks(tmp_path / "nothing-here") == []


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--env", "rig/Nope-v0"], "--env: unknown env id 'rig/Nope-v0'"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--seeds", "0,x"], "--seeds must be integers separated by commas"),
        (["--seeds", "-1"], "--seeds must be integers >= 0"),
        (["--seeds", ","], "--seeds must be integers >= 0"),
        (["--seeds", "1,1"], "--seeds names a seed twice"),
        (["--only", "rllib"], "--only must be rig, peer or both"),
        (["--config", "no/such.yaml"], "--config no/such.yaml: no such file"),
        (["--config", *DEBUG_CATCH, "--set", "ppo.epochz=1"], "unknown key 'ppo.epochz'"),
        (["--json", "no/such/x.json"], "--json: folder no/such does not exist"),
    ],
)
def test_learning_bad_input_is_one_line_and_exit_2(rig_main, capsys, tmp_path, args, expected):
    assert rig_main(["bench", "learning", "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()  # nothing ran


def test_learning_refuses_a_used_out_folder(rig_main, capsys, tmp_path):
    (tmp_path / "results.json").write_text("{}")
    assert rig_main(["bench", "learning", "--config", *DEBUG_CATCH, "--out", str(tmp_path)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def _finished(folder, method, seeds, steps=1024, config="configs/catch.yaml", overrides=(),
              variant=None):  # fmt: skip
    """A results folder as ``bench_learning`` writes it, from made-up curves: seed s's return
    goes from -0.5 to 0.1 * s, 100 episodes per 512-step iteration."""
    runs = {method: [learning._run(s, 0, 10.0 + s, folder / f"{method}-seed{s}.log",
                                   [[512, -0.5, 100], [1024, 0.1 * s, 100]]) for s in seeds]}
    result = learning.summarize(runs, steps, 0.8)
    plan = {"rig": {"iterations": 2, "steps_per_iteration": 512},
            "random": {"steps_per_iteration": learning.RANDOM_ITERATION}}.get(method) or {
        **learning.peer_plan(steps), "epochs": 10}
    result["config"] = {"env": "rig/Catch-v0", "size": 64, "env_kwargs": {}, "steps": steps,
                        "seeds": list(seeds), "config": config, "overrides": list(overrides),
                        "threshold": 0.8, "window": 100, "threads": 1, "only": method,
                        "out": str(folder), "plans": {method: plan}, "ray": "2.x"}  # fmt: skip
    if variant is not None:
        result["config"]["rig_variant"] = variant
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(result))
    return folder


def test_learning_merge_pools_finished_runs_and_summarises_them_afresh(rig_main, capsys,
                                                                       tmp_path):
    a = _finished(tmp_path / "a", "rig", [2])
    b = _finished(tmp_path / "b", "rig", [0, 1])
    peer = _finished(tmp_path / "peer", "peer", [0])
    out = tmp_path / "merged"
    args = ["bench", "learning", "--merge", str(a), "--merge", str(b), "--merge", str(peer),
            "--out", str(out)]  # fmt: skip
    assert rig_main(args) == 0
    printed = capsys.readouterr().out
    assert "merged from:" in printed and "rig return" in printed
    result = json.loads((out / "results.json").read_text())
    rig = result["methods"]["rig"]
    assert [r["seed"] for r in rig["runs"]] == [0, 1, 2]
    assert rig["median"]["final_return"] == pytest.approx(0.1)  # seeds end at 0.0, 0.1, 0.2
    assert rig["median"]["wall_s"] == pytest.approx(11.0)
    assert result["methods"]["peer"]["median"]["final_return"] == pytest.approx(0.0)
    assert result["config"]["seeds"] == [0, 1, 2] and result["config"]["only"] == "both"
    assert set(result["config"]["plans"]) == {"rig", "peer"}
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_learning_merge_keeps_one_random_baseline_per_seed_and_scores_crafter(rig_main,
                                                                               tmp_path):
    a = _finished(tmp_path / "a", "rig", [0])
    b = _finished(tmp_path / "b", "peer", [0])
    for folder in (a, b):  # each side's process ran the random agent for its seed
        result = json.loads((folder / "results.json").read_text())
        runs = [learning._run(0, 0, 1.0, folder / "random-seed0.log", [[1024, -0.75, 150]])]
        runs[0]["unlocks"] = [[1024, 150, {"collect_wood": 15}]]
        result["methods"]["random"] = learning.summarize({"random": runs}, 1024, 0.8)[
            "methods"]["random"]
        result["config"]["plans"]["random"] = {"steps_per_iteration": learning.RANDOM_ITERATION}
        (folder / "results.json").write_text(json.dumps(result))
    out = tmp_path / "merged"
    assert rig_main(["bench", "learning", "--merge", str(a), "--merge", str(b),
                     "--out", str(out)]) == 0  # fmt: skip
    result = json.loads((out / "results.json").read_text())
    random = result["methods"]["random"]
    assert [r["seed"] for r in random["runs"]] == [0]
    assert random["median"]["final_return"] == pytest.approx(-0.75)
    # wood in 10% of the episodes, nothing else: exp(ln(11) / 22) - 1
    assert random["median"]["final_score"] == pytest.approx(11 ** (1 / 22) - 1)
    assert random["median"]["run_score"] == pytest.approx(11 ** (1 / 22) - 1)  # one iteration
    assert result["methods"]["rig"]["median"]["final_score"] is None  # Catch: no achievements
    assert result["ratios"]["steps"] is None and result["config"]["only"] == "both"


@pytest.mark.parametrize(
    ("second", "extra", "expected"),
    [
        ({"seeds": [0]}, [], "rig seed 0 is in more than one folder"),
        ({"seeds": [1], "steps": 2048}, [], "has steps 2048"),
        ({"seeds": [1], "overrides": ["ppo.epochs=10"]}, [], "different variants"),
        (None, [], "no results.json"),
        ({"seeds": [1]}, ["--steps", "2048"], "--merge pools finished runs"),
        ({"seeds": [1]}, ["--steps", "15000"], "drop --steps"),  # given at its default, too
        ({"seeds": [1]}, ["--no-random"], "drop --random/--no-random"),
    ],
)
def test_learning_merge_refuses_runs_that_do_not_belong_together(rig_main, capsys, tmp_path,
                                                                 second, extra, expected):
    a = _finished(tmp_path / "a", "rig", [0])
    b = tmp_path / "b"
    if second is None:
        b.mkdir()
    else:
        _finished(b, "rig", **second)
    out = tmp_path / "merged"
    args = ["bench", "learning", "--merge", str(a), "--merge", str(b), "--out", str(out), *extra]
    assert rig_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err
    assert not out.exists()


CATCH_PRESET = Path(__file__).resolve().parents[1] / "configs" / "catch.yaml"


def test_learning_merge_compares_rig_runs_by_their_resolved_config(rig_main, capsys, tmp_path):
    """Two folders are one rig variant when their resolved configs agree (less the keys each
    run sets for itself), whatever their command lines: a preset later edited to what an
    override set merges with the runs of that override. A real difference is refused, naming
    the key. Folders from before the variant was recorded get it from their runs' saved
    config.yaml; without either, the command lines are compared as before."""
    import yaml

    from rig.config import load_config

    def variant(*overrides):
        return learning.rig_variant(load_config(CATCH_PRESET, list(overrides))
                                    .model_dump(mode="json"))  # fmt: skip

    same = variant("learner.lr_scales.action_head=0.1")
    assert same == variant("learner.lr_scales.action_head=0.1", "run.seed=3", "run.name=x",
                           "train.iterations=7")  # per-run keys are left out  # fmt: skip
    a = _finished(tmp_path / "a", "rig", [0], overrides=["learner.lr_scales.action_head=0.1"],
                  variant=same)  # fmt: skip
    b = _finished(tmp_path / "b", "rig", [1], variant=same)  # the preset says 0.1 by itself
    assert rig_main(["bench", "learning", "--merge", str(a), "--merge", str(b),
                     "--out", str(tmp_path / "m1")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "m1" / "results.json").read_text())["config"][
        "rig_variant"] == same

    c = _finished(tmp_path / "c", "rig", [2], variant=variant("learner.lr_scales.action_head=0.2"))
    assert rig_main(["bench", "learning", "--merge", str(a), "--merge", str(c),
                     "--out", str(tmp_path / "m2")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "different rig variants (learner.lr_scales.action_head 0.1 / 0.2)" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "m2").exists()

    old = _finished(tmp_path / "old", "rig", [3])  # no rig_variant: its run's config.yaml
    saved = old / "rig-seed3" / "catch-train-1"
    saved.mkdir(parents=True)
    resolved = load_config(CATCH_PRESET, ["learner.lr_scales.action_head=0.1", "run.seed=3"])
    (saved / "config.yaml").write_text(yaml.safe_dump(resolved.model_dump(mode="json")))
    assert rig_main(["bench", "learning", "--merge", str(a), "--merge", str(old),
                     "--out", str(tmp_path / "m3")]) == 0  # fmt: skip

    bare = _finished(tmp_path / "bare", "rig", [4])  # neither: the command lines differ
    assert rig_main(["bench", "learning", "--merge", str(a), "--merge", str(bare),
                     "--out", str(tmp_path / "m4")]) == 2  # fmt: skip
    assert "different variants" in capsys.readouterr().err


def test_learning_no_random_skips_the_baseline_and_merges_with_a_folder_that_has_it(
        rig_main, capsys, tmp_path, monkeypatch):  # fmt: skip
    """``--no-random`` runs the side(s) without the random agent (not called, not in the
    results); merged with a folder of the same seed that has it, the pool has the baseline."""
    ran = []

    def fake_rig(config, overrides, env, seed, iterations, out, threads):
        ran.append(("rig", seed))
        return learning._run(seed, 0, 1.0, out / f"rig-seed{seed}.log",
                             [[512, -0.5, 100], [1024, 0.2, 100]])  # fmt: skip

    def fake_random(*args, **kwargs):
        ran.append(("random",))
        raise AssertionError("the random agent ran under --no-random")

    monkeypatch.setattr(learning, "run_rig", fake_rig)
    monkeypatch.setattr(learning, "run_random", fake_random)
    out = tmp_path / "no-random"
    args = ["bench", "learning", "--only", "rig", "--steps", "1024", "--seeds", "1",
            "--config", *DEBUG_CATCH, "--no-random", "--out", str(out)]  # fmt: skip
    assert rig_main(args) == 0, capsys.readouterr().err
    assert ran == [("rig", 1)]
    result = json.loads((out / "results.json").read_text())
    assert set(result["methods"]) == {"rig"} and "random" not in result["config"]["plans"]
    baseline = _finished(tmp_path / "random", "random", [1])
    merged = tmp_path / "merged"
    assert rig_main(["bench", "learning", "--merge", str(out), "--merge", str(baseline),
                     "--out", str(merged)]) == 0  # fmt: skip
    pooled = json.loads((merged / "results.json").read_text())["methods"]
    assert set(pooled) == {"rig", "random"}


def test_learning_merge_needs_two_folders_and_an_out(rig_main, capsys, tmp_path):
    a = _finished(tmp_path / "a", "rig", [0])
    assert rig_main(["bench", "learning", "--merge", str(a), "--out", str(tmp_path / "o")]) == 2
    assert "at least two result folders" in capsys.readouterr().err
    assert rig_main(["bench", "learning", "--merge", str(a), "--merge", str(a)]) == 2
    assert "--merge needs --out" in capsys.readouterr().err


# -- held-out evaluation of the final policies ----------------------------------------------------


def test_peer_frames_are_what_rllibs_normalized_image_env_gives():
    from ray.rllib.env.wrappers.atari_wrappers import NormalizedImageEnv

    frames = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    ours = learning._peer_frames(frames)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, NormalizedImageEnv.observation(None, frames))


class _FixedModule:
    """A stand-in for the peer's RLModule: logits that put (almost) all mass on ``action``;
    it keeps the frames it was shown."""

    def __init__(self, action: int, actions: int = 3):
        self.action, self.actions, self.seen = action, actions, []

    def forward_inference(self, batch):
        self.seen.append(batch["obs"])
        logits = torch.full((len(batch["obs"]), self.actions), -30.0)
        logits[:, self.action] = 30.0
        return {"action_dist_inputs": logits}


def test_play_peer_plays_rig_evals_worlds_and_reports_its_shape():
    """play_peer: the first N finished episodes of a vector env reset with the eval seed, the
    module fed the peer's normalised frames; the same seed gives the same episodes, and the
    report has what eval_spread reads (Crafter: unlocked achievements and success rates)."""
    module = _FixedModule(action=1)  # Catch's "stay"
    report = learning.play_peer(module, "rig/Catch-v0", 64, {}, episodes=12, num_envs=4, seed=5)
    assert len(report["episodes"]) == 12 and report["summary"]["episodes"] == 12
    assert report["settings"] == {"episodes": 12, "num_envs": 4, "seed": 5,
                                  "sampling": "stochastic"}  # fmt: skip
    first = module.seen[0]
    assert first.dtype == torch.float32 and first.shape == (4, 64, 64, 3)
    assert float(first.min()) >= -1.0 and float(first.max()) < 1.0
    again = learning.play_peer(_FixedModule(action=1), "rig/Catch-v0", 64, {}, 12, 4, seed=5)
    assert [e["return"] for e in again["episodes"]] == [e["return"] for e in report["episodes"]]
    crafter = learning.play_peer(_FixedModule(action=0, actions=17), "rig/Crafter-v0", 64,
                                 {"length": 8}, episodes=4, num_envs=2, seed=0)  # fmt: skip
    assert all("unlocked" in e for e in crafter["episodes"])
    assert "score" in crafter["summary"] and "success_rates" in crafter["summary"]


def _eval_report(path: Path, returns, unlocked=None) -> dict:
    """A report as rig eval writes it, of episodes with ``returns`` (and ``unlocked``)."""
    from envs.crafter_env import ACHIEVEMENTS
    from envs.stats import summarize

    episodes = [{"return": r, "length": 10} for r in returns]
    if unlocked is not None:
        for episode, names in zip(episodes, unlocked, strict=True):
            episode["unlocked"] = names
    path.mkdir(parents=True)
    summary = summarize(episodes, ACHIEVEMENTS if unlocked is not None else None)
    (path / "report.json").write_text(json.dumps({"episodes": episodes, "summary": summary}))
    return learning.eval_digest(path / "report.json")


def test_eval_spread_has_no_score_without_achievements(tmp_path):
    from benchmarks.eval_spread import describe, describe_difference, difference, spread

    _eval_report(tmp_path / "a", [1.0, -1.0, 1.0, 1.0])
    _eval_report(tmp_path / "b", [1.0, 1.0, 1.0, 1.0])
    a, b = (spread(json.loads((tmp_path / n / "report.json").read_text())) for n in "ab")
    assert a["return"] == pytest.approx(0.5) and a["score"] is None and a["score_lo"] is None
    d = difference(a, b)
    assert d["return"] == pytest.approx(0.5) and d["score"] is None
    assert "score" not in describe(a) and "score" not in describe_difference(d)


def test_summary_pools_each_sides_held_out_episodes_and_compares_them(tmp_path):
    """summarize: per-seed held-out figures, their medians, each side's episodes pooled over
    seeds with bootstrap intervals, and rig - peer; the report prints them."""
    rig_evals = [_eval_report(tmp_path / f"rig{s}", [2.0] * 20, [["collect_wood"]] * 20)
                 for s in range(2)]  # fmt: skip
    peer_eval = _eval_report(tmp_path / "peer0", [1.0] * 20,
                             [["collect_wood"]] * 10 + [[]] * 10)  # fmt: skip
    runs = {"rig": [learning._run(s, 0, 1.0, tmp_path / "log", [[1024, 0.0, 100]])
                    for s in range(2)],
            "peer": [learning._run(0, 0, 1.0, tmp_path / "log", [[1024, 0.0, 100]])]}  # fmt: skip
    for run, found in zip(runs["rig"], rig_evals, strict=True):
        run["eval"] = found
    runs["peer"][0]["eval"] = peer_eval
    result = learning.summarize(runs, 1024, 0.8)
    assert result["methods"]["rig"]["median"]["eval_return"] == pytest.approx(2.0)
    assert result["methods"]["peer"]["median"]["eval_score"] == pytest.approx(peer_eval["score"])
    pooled = result["eval"]
    assert pooled["rig"]["episodes"] == 40 and pooled["rig"]["seeds"] == 2
    assert pooled["peer"]["episodes"] == 20
    d = pooled["rig_minus_peer"]
    assert d["return"] == pytest.approx(1.0) and d["score"] > 0 and d["score_lo"] > 0
    result["config"] = {"eval": {"episodes": 20, "seed": 11, "envs": 8}}
    lines = "\n".join(learning.eval_lines(result))
    assert "20 episodes per run" in lines and "rig, 2 seeds pooled: 40 episodes" in lines
    assert "rig - peer, pooled: return +1.00" in lines
    result["config"]["eval"] = None
    assert learning.eval_lines(result) == []


def test_pooled_figures_survive_the_run_folders_from_the_outcomes_results_json_keeps(tmp_path):
    """eval_digest keeps each episode's return and achievements in results.json; with every
    report deleted, the pooled figures and rig - peer are the same to the last digit. A digest
    without them (written before they were kept) whose report is gone leaves its side unpooled."""
    import shutil

    rng = np.random.default_rng(0)
    names = ["collect_wood", "place_table", "make_wood_pickaxe"]

    def evals(side, seeds, p):
        return [_eval_report(tmp_path / f"{side}{s}", rng.normal(2.0, 1.0, 16).tolist(),
                             [[n for n in names if rng.random() < p] for _ in range(16)])
                for s in range(seeds)]  # fmt: skip

    def runs(rig_evals, peer_evals):
        out = {side: [learning._run(s, 0, 1.0, tmp_path / "log", [[1024, 0.0, 100]])
                      for s in range(len(found))]
               for side, found in (("rig", rig_evals), ("peer", peer_evals))}  # fmt: skip
        for side, found in (("rig", rig_evals), ("peer", peer_evals)):
            for run, digest in zip(out[side], found, strict=True):
                run["eval"] = json.loads(json.dumps(digest))  # as results.json holds it
        return out

    def pooled(found):
        return learning.summarize(found, 1024, 0.8)["eval"]

    rig_evals, peer_evals = evals("rig", 2, 0.6), evals("peer", 2, 0.3)
    before = pooled(runs(rig_evals, peer_evals))
    for side in ("rig", "peer"):
        for s in range(2):
            shutil.rmtree(tmp_path / f"{side}{s}")
    after = pooled(runs(rig_evals, peer_evals))
    assert after == before and before["rig"]["episodes"] == 32
    assert before["rig_minus_peer"]["score"] > 0
    old = runs(rig_evals, peer_evals)
    del old["peer"][1]["eval"]["outcomes"]
    partial = pooled(old)
    assert "peer" not in partial and "rig_minus_peer" not in partial
    assert partial["rig"] == before["rig"]


def test_learning_merge_evaluates_the_runs_not_yet_evaluated_alike(rig_main, capsys, tmp_path,
                                                                    monkeypatch):  # fmt: skip
    """--merge --eval-episodes: every rig and peer run whose folder did not evaluate it with
    those settings is evaluated from the policy it kept (rig: its run folder, with its preset
    and overrides; peer: its saved module); a run evaluated alike keeps its figures. Without
    --eval-episodes, folders evaluated differently are refused."""
    called = []

    def fake_rig(run_out, out, seed, config, overrides, episodes, eval_seed, threads):
        called.append(("rig", seed, run_out.name, str(config), list(overrides), episodes,
                       eval_seed))  # fmt: skip
        return _eval_report(out / f"rig-seed{seed}-eval", [1.0] * episodes)

    def fake_peer(module_dir, out, seed, env, size, kwargs, episodes, eval_seed, module=None):
        called.append(("peer", seed, module_dir.name, env, episodes, eval_seed))
        return _eval_report(out / f"peer-seed{seed}-eval", [0.0] * episodes)

    monkeypatch.setattr(learning, "eval_rig", fake_rig)
    monkeypatch.setattr(learning, "eval_peer", fake_peer)
    a = _finished(tmp_path / "a", "rig", [0], overrides=["ppo.epochs=2"])
    b = _finished(tmp_path / "b", "peer", [0])
    done = _finished(tmp_path / "done", "rig", [1], overrides=["ppo.epochs=2"])
    result = json.loads((done / "results.json").read_text())  # seed 1 was evaluated alike
    result["config"]["eval"] = {"episodes": 4, "seed": 3, "envs": learning.EVAL_ENVS}
    result["methods"]["rig"]["runs"][0]["eval"] = _eval_report(tmp_path / "kept", [5.0] * 4)
    (done / "results.json").write_text(json.dumps(result))
    out = tmp_path / "merged"
    assert rig_main(["bench", "learning", "--merge", str(a), "--merge", str(b), "--merge",
                     str(done), "--out", str(out), "--eval-episodes", "4", "--eval-seed",
                     "3"]) == 0, capsys.readouterr().err  # fmt: skip
    assert sorted(called) == [
        ("peer", 0, "peer-seed0-module", "rig/Catch-v0", 4, 3),
        ("rig", 0, "rig-seed0", "configs/catch.yaml", ["ppo.epochs=2"], 4, 3),
    ]
    merged = json.loads((out / "results.json").read_text())
    assert merged["config"]["eval"] == {"episodes": 4, "seed": 3, "envs": learning.EVAL_ENVS}
    assert [r["eval"]["return"] for r in merged["methods"]["rig"]["runs"]] == [1.0, 5.0]
    assert merged["eval"]["rig_minus_peer"]["return"] == pytest.approx(3.0)
    assert "final policies on held-out worlds (4 episodes per run" in capsys.readouterr().out
    # a kept report gone: the outcomes results.json kept of it stand in (not played again)...
    (tmp_path / "kept" / "report.json").unlink()
    called.clear()
    assert rig_main(["bench", "learning", "--merge", str(a), "--merge", str(done), "--out",
                     str(tmp_path / "again"), "--eval-episodes", "4", "--eval-seed", "3"]) == 0
    assert sorted(c[:2] for c in called) == [("rig", 0)]
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["eval"]["rig"]["return"] == pytest.approx(3.0)  # 1.0 and 5.0 pooled
    # ... and without them (a results.json of before they were kept), that run is played anew
    result = json.loads((done / "results.json").read_text())
    del result["methods"]["rig"]["runs"][0]["eval"]["outcomes"]
    (done / "results.json").write_text(json.dumps(result))
    called.clear()
    assert rig_main(["bench", "learning", "--merge", str(a), "--merge", str(done), "--out",
                     str(tmp_path / "again2"), "--eval-episodes", "4", "--eval-seed", "3"]) == 0
    assert sorted(c[:2] for c in called) == [("rig", 0), ("rig", 1)]
    other = _finished(tmp_path / "other", "peer", [2])
    result = json.loads((other / "results.json").read_text())
    result["config"]["eval"] = {"episodes": 8, "seed": 3, "envs": learning.EVAL_ENVS}
    (other / "results.json").write_text(json.dumps(result))
    assert rig_main(["bench", "learning", "--merge", str(done), "--merge", str(other),
                     "--out", str(tmp_path / "refused")]) == 2  # fmt: skip
    assert "held-out evaluations with different settings" in capsys.readouterr().err


@pytest.mark.slow
def test_learning_peer_smoke_run_writes_results_and_plot(rig_main, capsys, tmp_path):
    out = tmp_path / "out"
    args = ["bench", "learning", "--only", "peer", "--steps", "1024", "--seeds", "0",
            "--peer-epochs", "1", "--config", *DEBUG_CATCH, "--out", str(out),
            "--eval-episodes", "16"]  # fmt: skip
    assert rig_main(args) == 0
    printed = capsys.readouterr().out
    assert "peer return" in printed and "1 iterations x 1024 env steps" in printed
    result = json.loads((out / "results.json").read_text())
    (run,) = result["methods"]["peer"]["runs"]
    assert run["ok"] and run["wall_s"] > 0 and "rig" not in result["methods"]
    steps, mean, episodes = run["points"][0]
    # Catch episodes last 7 steps: 8 envs x 128 steps end about 144 of them, each return +-1
    assert steps == 1024 and 100 <= episodes <= 150 and -1.0 <= mean <= 1.0
    assert run["curve"][0] == [steps, mean, episodes]  # one iteration holds a full window
    assert result["methods"]["peer"]["median"]["returns"][-1] == pytest.approx(mean)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "peer-seed0.log").is_file()
    ((at, diagnostics),) = run["diagnostics"]  # RLlib's learner metrics, under rig's names
    assert at == 1024 and 0.0 < diagnostics["policy/action_entropy"] <= math.log(3) + 1e-6
    assert {"policy/approx_kl", "value/explained_variance"} <= set(diagnostics)
    assert "PPO diagnostics" in printed and "peer: action entropy (nats)" in printed
    (baseline,) = result["methods"]["random"]["runs"]  # the random agent, always beside
    assert baseline["ok"] and baseline["points"][-1][0] == 1024 and "random return" in printed
    assert -1.0 <= result["methods"]["random"]["median"]["final_return"] <= -0.3
    # the final module, saved and played on held-out worlds; loaded back, it plays the same
    assert run["eval"]["episodes"] == 16 and -1.0 <= run["eval"]["return"] <= 1.0
    assert "peer: seed 0 return" in printed
    again = learning.eval_peer(out / "peer-seed0-module", tmp_path / "again", 0, "rig/Catch-v0",
                               64, {}, 16)  # fmt: skip
    assert again["return"] == pytest.approx(run["eval"]["return"])


def test_catch_bandit_runs_the_real_update_in_both_modes(capsys):
    """benchmarks/catch_bandit.py end to end on a tiny budget: both modes, one update each,
    accuracies in [0, 1], an unknown mode refused."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import catch_bandit

    results = catch_bandit.main(["--iterations", "1", "--batch", "8", "--held-out", "8",
                                  "--modes", "head,no-head"])
    assert [(mode, seed) for mode, seed, _ in results] == [("head", 0), ("no-head", 0)]
    for _, _, curve in results:
        assert len(curve) == 2 and all(0.0 <= a <= 1.0 for a in curve)
    assert "frame-blind best" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        catch_bandit.main(["--modes", "both"])


def test_catch_bandit_frozen_trunk_moves_only_the_heads(monkeypatch):
    """--modes frozen-trunk: after an update the LM and vision weights are the initial ones and
    the action head has moved off zero."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import catch_bandit

    from rl.policy import RigPolicy

    made = []
    build = RigPolicy.from_preset.__func__

    def keep(cls, *args, **kwargs):
        made.append(build(cls, *args, **kwargs))
        made.append({k: v.clone() for k, v in made[-1].model.state_dict().items()})
        return made[-2]

    monkeypatch.setattr(RigPolicy, "from_preset", classmethod(keep))
    (mode, _, curve), = catch_bandit.main(["--iterations", "1", "--batch", "8", "--held-out",
                                           "8", "--modes", "frozen-trunk"])  # fmt: skip
    policy, before = made
    assert mode == "frozen-trunk" and len(curve) == 2
    after = policy.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert float(policy.action_head.weight.abs().sum()) > 0


def test_frame_signal_critic_probes():
    """benchmarks/frame_signal.py's critic figures: a perfect critic of random Catch play
    explains about a tenth of the returns' variance (0.105 over 4,000 episodes), and the ridge
    read-out of the untrained state is an explained variance on held-out decisions."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import frame_signal

    assert 0.06 < frame_signal.critic_ceiling(1000, seed=1) < 0.15
    frames, values, returns = frame_signal.random_decisions(20, seed=0, size=64)
    assert frames.shape == (len(values), 64, 64, 3) and len(values) == len(returns) == 20 * 7
    assert set(returns[6::7]) <= {-1.0, 1.0}  # the 7th decision of each episode gets the reward
    ridge, exact = frame_signal.critic_readout(frame_signal.policy_for("tiny", 0), 40, seed=0)
    assert ridge <= 1.0 and -1.0 < exact <= 1.0


def test_world_probe_reads_cells_and_fits_a_read_out_that_beats_copying():
    """benchmarks/world_probe.py: transitions never end an episode (the ball is one row lower in
    s' than in s, the paddle moved by the action), ``cells`` finds the ball and the paddle
    where the env drew them, and on a tiny budget the four predictors are scored on the
    held-out rows."""
    from benchmarks import world_probe as wp

    s, a, s2 = wp.transitions(40, seed=2)
    assert s.shape == s2.shape == (40, 64, 64, 3) and set(a) <= {0, 1, 2}
    ball, ball2 = wp.cells(s, 0), wp.cells(s2, 0)
    assert np.array_equal(ball2, ball + 8)  # one 8-cell row down, same column
    paddle, paddle2 = wp.cells(s, 2) % 8, wp.cells(s2, 2) % 8
    assert np.array_equal(paddle2, np.clip(paddle + a - 1, 0, 7))
    assert (wp.cells(s, 2) // 8 == 7).all()

    import envs
    from rl.policy import RigPolicy

    policy = RigPolicy.from_preset("tiny", envs.get_codec(envs.make("rig/Catch-v0", 64)), 0)
    rows = wp.probe(policy.eval(), 160, 20, heldout=32)
    assert list(rows) == ["copy the current codes", "MLP on the trunk's frame state + action",
                          "shared read-out, own column + state + action",
                          "MLP on the 8x8 board + action (control)"]  # fmt: skip
    for row in rows.values():
        assert set(row) == {"code_accuracy", "ball_cell", "paddle_cell"}
        assert all(0.0 <= v <= 1.0 for v in row.values())


def test_crafter_features_probe_labels_and_features():
    """benchmarks/crafter_features.py: the 9 x 7 tile labels are crafter's semantic map around
    the player in the frame's row-major layout (the centre tile is always the player), the
    inventory labels are the player's counts (a new world starts at 9 health, food, drink and
    energy and nothing else), and the frozen features are what the heads read (16 image
    columns x 256 of the tiny policy)."""
    from benchmarks.crafter_features import ITEMS, VIEW_H, VIEW_W, collect, policy_features

    frames, tiles, inventory, acts = collect(40, eps=0.5, seed=0)
    assert frames.shape == (40, 64, 64, 3) and tiles.shape == (40, VIEW_W * VIEW_H)
    assert (tiles[:, (VIEW_H // 2) * VIEW_W + VIEW_W // 2] == 13).all()  # crafter's Player id
    assert inventory.shape == (40, len(ITEMS)) and ((inventory >= 0) & (inventory <= 9)).all()
    assert inventory[0].tolist() == [9, 9, 9, 9] + [0] * (len(ITEMS) - 4)
    assert ((acts >= 0) & (acts < 17)).all()
    feats = policy_features("tiny", frames[:4])
    assert feats.shape == (4, 16 * 256) and torch.isfinite(feats).all()


def test_catch_bandit_rllib_peer_mode(capsys):
    """The bandit's peer mode: RLlib's PPO on the same one-step episodes, one train call."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import catch_bandit

    env = catch_bandit.BanditEnv()
    frame, _ = env.reset(seed=0)
    best = env._best
    assert frame.shape == (64, 64, 3) and env.step(best)[1:3] == (1.0, True)
    assert env.step((best + 1) % 3)[1] == -1.0
    (mode, seed, curve), = catch_bandit.main(["--iterations", "1", "--batch", "16",
                                              "--held-out", "8", "--modes", "rllib"])  # fmt: skip
    assert (mode, seed, len(curve)) == ("rllib", 0, 2) and all(0.0 <= a <= 1.0 for a in curve)


def test_eval_spread_difference_interval():
    """benchmarks/eval_spread.py: the bootstrap interval of one report's difference from
    another holds the difference and excludes 0 for clearly different policies, includes it for
    the same episodes drawn apart."""
    import numpy as np

    from benchmarks.eval_spread import difference, spread

    def report(returns, wood):
        episodes = [{"return": r, "unlocked": ["collect_wood"] if w else []}
                    for r, w in zip(returns, wood, strict=True)]  # fmt: skip
        return {"episodes": episodes, "summary": {"success_rates": {"collect_wood": 0.0}}}

    rng = np.random.default_rng(0)
    low = report(rng.normal(1.0, 0.5, 128), rng.random(128) < 0.2)
    high = report(rng.normal(2.0, 0.5, 128), rng.random(128) < 0.8)
    d = difference(spread(low, seed=1), spread(high, seed=2))
    assert d["return_lo"] > 0 and d["return_lo"] < d["return"] < d["return_hi"]
    assert d["score_lo"] > 0 and d["score_lo"] < d["score"] < d["score_hi"]
    same = difference(spread(low, seed=1), spread(low, seed=2))
    assert same["return"] == 0 and same["return_lo"] < 0 < same["return_hi"]
    assert same["score_lo"] < 0 < same["score_hi"]


def test_eval_spread_pools_seeds_into_one_set_of_episodes():
    """``--pool``: the pooled figures are those of all episodes together (the mean of means
    for equal counts; the score of the pooled unlock rates), and reports of different envs
    are refused."""
    import numpy as np

    from benchmarks.eval_spread import pool, spread

    def report(returns, wood, names=("collect_wood",)):
        episodes = [{"return": r, "unlocked": ["collect_wood"] if w else []}
                    for r, w in zip(returns, wood, strict=True)]  # fmt: skip
        return {"episodes": episodes, "summary": {"success_rates": dict.fromkeys(names, 0.0)}}

    a, b = report([1.0, 3.0], [True, False]), report([2.0, 6.0], [True, True])
    pooled = spread(pool([a, b]))
    assert pooled["episodes"] == 4 and pooled["return"] == pytest.approx(3.0)
    assert pooled["score"] == pytest.approx(spread(report([0.0] * 4, [1, 0, 1, 1]))["score"])
    assert pooled["return_lo"] <= 3.0 <= pooled["return_hi"]
    with pytest.raises(ValueError, match="different envs"):
        pool([a, report([1.0], [True], names=("collect_wood", "eat_cow"))])
    assert np.isfinite(pooled["score_lo"])


def test_crafter_actions_probe_distributions_and_the_crafting_rule():
    """benchmarks/crafter_actions.py: every sampled distribution sums to 1 over the 17 actions;
    a state counts as 'wood pickaxe possible' exactly when Crafter would allow the craft (a
    table within reach and one wood)."""
    import numpy as np

    from benchmarks.crafter_actions import can_make_wood_pickaxe, entropy, load_policy, probe
    from envs.crafter_env import CrafterEnv

    policy, task, reasoning = load_policy("fresh")
    assert task.startswith("survive") and reasoning == 0  # configs/crafter.yaml's
    found = probe(policy, steps=2, envs=2, every=1, samples=8, task=task, reasoning=reasoning)
    assert len(found["all states"]) == 4
    for d in found["all states"]:
        assert d.shape == (17,) and abs(d.sum() - 1.0) < 1e-9
    assert entropy(np.full(17, 1 / 17)) == pytest.approx(np.log(17))

    env = CrafterEnv(length=10)
    env.reset(seed=0)
    player, world = env._env._player, env._env._world
    assert not can_make_wood_pickaxe(env)  # a new world: no wood
    player.inventory["wood"] = 1
    world[player.pos + player.facing] = "table"
    assert can_make_wood_pickaxe(env)
    env.step(env.codec.vocab.index("make_wood_pickaxe"))
    assert env._env._player.inventory["wood_pickaxe"] == 1  # Crafter agrees
    env.close()


# -- rig bench lookahead: one checkpoint at lookahead 0..n on the same worlds ---------------------

lookahead_bench = bench._benchmark("lookahead")


@pytest.fixture(scope="module")
def catch_checkpoint(tmp_path_factory):
    """A tiny Catch policy as `rig train` exports it: its env and act settings in the record."""
    import envs
    from rl.policy import RigPolicy

    env = envs.make("rig/Catch-v0", 64)
    codec = envs.get_codec(env)
    env.close()
    path = tmp_path_factory.mktemp("lookahead") / "policy"
    run = {"env": {"id": "rig/Catch-v0"},
           "policy": {"max_reasoning_tokens": 0, "task": "catch the falling ball"}}  # fmt: skip
    RigPolicy.from_preset("tiny", codec, seed=0).save(path, extra={"config": run})
    return path


def test_lookahead_benchmark_plays_one_checkpoint_on_the_same_worlds(
    rig_main, capsys, tmp_path, catch_checkpoint
):
    out = tmp_path / "out"
    args = ["lookahead", "--checkpoint", str(catch_checkpoint), "--lookaheads", "1,0",
            "--episodes", "4", "--num-envs", "2", "--seed", "3", "--out", str(out)]  # fmt: skip
    printed, result = _run(rig_main, capsys, tmp_path, args)
    assert "env seed 3 for every n" in printed and "lookahead 1 vs 0: return" in printed
    assert "over 4 shared worlds" in printed
    assert json.loads((out / "results.json").read_text()) == result
    c = result["config"]
    assert c["env"] == "rig/Catch-v0" and c["lookaheads"] == [0, 1] and c["seed"] == 3
    assert c["max_reasoning_tokens"] == 0 and c["task"] == "catch the falling ball"
    assert not c["scored"]  # Catch has no Crafter score

    rows = result["lookaheads"]
    assert [r["lookahead"] for r in rows] == [0, 1]
    for row in rows:
        n, kept = row["lookahead"], row["outcomes"]
        assert row["settings"]["lookahead"] == n and row["settings"]["seed"] == 3
        report = json.loads(Path(row["report"]).read_text())  # rig eval's report of this n
        assert report["settings"]["lookahead"] == n and Path(row["report"]).parent.name == f"lookahead-{n}"
        # the same worlds for every n: env 0's and env 1's first two episodes
        assert row["episodes"] == len(kept["returns"]) == 4
        assert kept["worlds"] == [[0, 0], [1, 0], [0, 1], [1, 1]]
        assert set(kept["returns"]) <= {-1.0, 1.0}
        assert row["return"] == pytest.approx(np.mean(kept["returns"]))
        assert row["return_lo"] <= row["return"] <= row["return_hi"]
        assert row["score"] is None and row["score_lo"] is None
        # every env plays 7-step episodes side by side: the decisions are the episodes' steps
        assert row["decisions"] == sum(e["length"] for e in report["episodes"]) == 28
        assert row["s_per_decision"] == pytest.approx(row["seconds"] / row["decisions"])
        assert row["s_per_decision"] > 0
    assert "vs_0" not in rows[0]
    d = rows[1]["vs_0"]
    assert d["paired_worlds"] == 4 and d["score"] is None
    assert d["return"] == pytest.approx(rows[1]["return"] - rows[0]["return"])
    assert d["return_lo"] <= d["return"] <= d["return_hi"]

    table = lookahead_bench.table_rows(result)
    assert [row[0] for row in table] == ["0", "1"] and len(table[0]) == len(lookahead_bench.COLUMNS)
    assert table[0][4] == "-" and table[1][4].startswith(f"{d['return']:+.2f} [")
    assert (out / "lookahead.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lookahead_with_review_by_value_plays_candidates(rig_main, capsys, tmp_path,
                                                         catch_checkpoint):  # fmt: skip
    """``--review value``: lookahead n plays the best of n imagined candidates (rl/review.py),
    recorded in the results and in each n's rig eval report."""
    out = tmp_path / "out"
    args = ["lookahead", "--checkpoint", str(catch_checkpoint), "--lookaheads", "0,2",
            "--episodes", "2", "--num-envs", "2", "--review", "value",
            "--imagine-temperature", "0.5", "--review-depth", "2", "--out", str(out)]  # fmt: skip
    printed, result = _run(rig_main, capsys, tmp_path, args)
    assert "review value, 2 imagined steps per candidate" in printed
    c = result["config"]
    assert c["review"] == "value" and c["imagine_temperature"] == 0.5 and c["gamma"] == 0.99
    assert c["review_depth"] == 2
    for row in result["lookaheads"]:
        assert row["settings"]["review"] == "value" and row["episodes"] == 2
        assert row["settings"]["review_depth"] == 2


def test_lookahead_difference_resamples_the_shared_worlds_as_pairs():
    """The interval of the difference to n = 0 resamples worlds, not each side on its own: a
    policy exactly 1 better on every world, however differently its episodes finished, differs
    by exactly +1 [+1, +1]; a world only one side played is left out."""
    from benchmarks.eval_spread import difference, spread

    def report(episodes):
        return {"episodes": [{"env": e, "return": r} for e, r in episodes], "summary": {}}

    base = report([(0, 0.0), (1, 5.0), (0, 10.0), (1, 20.0)])  # worlds (0,0) (1,0) (0,1) (1,1)
    other = report([(1, 6.0), (0, 1.0), (1, 21.0), (0, 11.0), (0, 100.0)])  # + world (0, 2)
    assert lookahead_bench.worlds(other["episodes"]) == [[1, 0], [0, 0], [1, 1], [0, 1], [0, 2]]
    a, b = lookahead_bench.paired(base, other)
    assert [e["return"] for e in a["episodes"]] == [0.0, 10.0, 5.0, 20.0]
    assert [e["return"] for e in b["episodes"]] == [1.0, 11.0, 6.0, 21.0]
    seed = lookahead_bench.DIFF_SEED
    d = difference(spread(a, seed=seed), spread(b, seed=seed))
    assert (d["return"], d["return_lo"], d["return_hi"]) == pytest.approx((1.0, 1.0, 1.0))
    unpaired = difference(spread(base, seed=1), spread(other, seed=2))
    assert unpaired["return_hi"] - unpaired["return_lo"] > 10  # what pairing takes away


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--checkpoint", "no/such/ckpt"], "--checkpoint: checkpoint directory no/such/ckpt does not exist"),
        (["--lookaheads", "-1"], "--lookaheads must be integers >= 0, got '-1'"),
        (["--lookaheads", "a"], "--lookaheads must be integers separated by commas, got 'a'"),
        (["--lookaheads", "1,2"], "--lookaheads must include 0"),
        (["--lookaheads", "0,1,1"], "--lookaheads names a lookahead twice"),
        (["--json", "no/such/x.json"], "--json: folder no/such does not exist"),
        (["--review", "vote"], "--review must be one of sample, value, got 'vote'"),
        (["--review-depth", "0"], "--review-depth must be >= 1 (1: judge the next imagined frame), got 0"),
    ],
)  # fmt: skip
def test_lookahead_bad_input_is_one_line_and_exit_2(rig_main, capsys, tmp_path, args, expected):
    out = tmp_path / "out"
    assert rig_main(["bench", "lookahead", "--checkpoint", "no/such/ckpt", *args,
                     "--out", str(out)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err
    assert "Traceback" not in err and not out.exists()


def test_lookahead_refuses_a_used_out_folder(rig_main, capsys, tmp_path, catch_checkpoint):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text("{}")
    assert rig_main(["bench", "lookahead", "--checkpoint", str(catch_checkpoint),
                     "--out", str(tmp_path / "out")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("error: --out ") and "exists and is not empty" in err, err
    assert err.count("\n") == 1 and (tmp_path / "out" / "results.json").read_text() == "{}"


# -- rig bench imagination-ablation: imagined rollouts on vs off at the same real budget ---------

ablation = bench._benchmark("imagination_ablation")
# in-process, tiny: 1 runner x 2 envs x 4 steps = 8 real env steps an iteration; imagination 2
# starts x horizon 2, the gate open from the start, so imagined rows really enter the "on" loss
ABLATION = [
    *DEBUG_CATCH, *("--set", "imagination.horizon=2"),
    *(f"--set={item}" for item in (
        "rollout.num_env_runners=0", "env.num_envs=2", "rollout.fragment_length=4",
        "imagination.num_actors=0", "imagination.num_starts=2", "imagination.gate=open",
        "tracking.system_metrics=false", "policy.history=1",
    )),
]  # fmt: skip


def _arm(steps_to_threshold: list[int | None], finals: list[float]) -> dict:
    """An arm's digest as ``ablation.digest`` gives it, from made-up figures (seeds 0, 1, 2)."""
    runs = [{"seed": s, "ok": True, "steps_to_threshold": at, "final_return": final,
             "imagination": {"gate_first_open": s + 1, "gate_first_open_env_steps": 64 * (s + 1),
                             "gate_open_iterations": 10 - s}}
            for s, (at, final) in enumerate(zip(steps_to_threshold, finals, strict=True))]  # fmt: skip
    return {"runs": runs, "median": {
        "steps_to_threshold": learning.median_steps(steps_to_threshold),
        "final_return": float(np.median(finals))}}  # fmt: skip


def test_ablation_compares_real_steps_to_threshold_on_over_off():
    on, off = _arm([1000, 2000, None], [0.9, 0.8, 0.1]), _arm([3000, 4000, 5000], [0.5, 0.6, 0.7])
    found = ablation.compare({"on": on, "off": off}, steps=10000)
    m = found["median"]
    assert (m["on_steps"], m["off_steps"], m["ratio"]) == (2000, 4000, 0.5) and found["met"]
    assert m["ratio_below"] is None and (m["on_final"], m["off_final"]) == (0.8, 0.6)
    assert m["gate_first_open"] == 2 and m["gate_open_iterations"] == 9
    assert [(s["seed"], s["ratio"]) for s in found["seeds"]] == [(0, 1000 / 3000), (1, 0.5),
                                                                 (2, None)]  # fmt: skip
    slower = ablation.compare({"on": on, "off": _arm([3000, 3000, 3000], [0.5] * 3)}, 10000)
    assert slower["median"]["ratio"] == pytest.approx(2000 / 3000) and not slower["met"]
    # off never reached it within the budget, on did: the ratio is below on / budget
    never = ablation.compare({"on": on, "off": _arm([None] * 3, [0.1] * 3)}, steps=10000)
    assert never["median"]["ratio"] is None and never["median"]["ratio_below"] == 0.2
    assert never["met"]
    assert not ablation.compare({"on": _arm([None] * 3, [0.1] * 3), "off": off}, 10000)["met"]


@pytest.mark.slow
def test_ablation_runs_both_arms_on_the_same_seeds_and_real_budget(rig_main, capsys, tmp_path):
    out = tmp_path / "ablation"
    args = ["imagination-ablation", "--config", *ABLATION, "--steps", "16", "--seeds", "3",
            "--threshold", "0.5", "--out", str(out)]  # fmt: skip
    printed, result = _run(rig_main, capsys, tmp_path, args)
    assert json.loads((out / "results.json").read_text()) == result
    c, arms = result["config"], result["arms"]
    assert c["seeds"] == [3] and c["steps"] == 16 and c["threshold"] == 0.5 and c["gate"] == "open"
    # the same seeds, plan and real env steps in both arms; only the horizon differs
    assert arms["on"]["horizon"] == 2 and arms["off"]["horizon"] == 0
    assert arms["off"]["overrides"] == [*arms["on"]["overrides"], "imagination.horizon=0"]
    for arm in ablation.ARMS:
        assert arms[arm]["plan"] == {"steps_per_iteration": 8, "iterations": 2}
        (run,) = arms[arm]["runs"]
        assert run["ok"] and run["seed"] == 3 and run["imagination"]["env_steps"] == 16
        assert run["imagination"]["iterations"] == 2
        (saved,) = (out / arm / "rig-seed3").glob("*/config.yaml")  # the run's resolved config
        text = saved.read_text()
        assert "seed: 3" in text and f"horizon: {arms[arm]['horizon']}" in text
        own = json.loads((out / arm / "results.json").read_text())  # the learning benchmark's
        assert set(own["methods"]) == {"rig"} and own["config"]["seeds"] == [3]
        assert own["config"]["rig_variant"]["imagination.horizon"] == arms[arm]["horizon"]
        assert (out / arm / "curves.png").is_file()
    on, off = arms["on"]["runs"][0]["imagination"], arms["off"]["runs"][0]["imagination"]
    # gate open: imagined rows from the first iteration on; off imagines nothing
    assert on["gate_first_open"] == 1 and on["gate_open_iterations"] == 2
    assert on["gate_first_open_env_steps"] == 8 and on["imagined_steps"] > 0
    assert off["gate_first_open"] is None and off["gate_open_iterations"] == 0
    assert off["imagined_steps"] == 0

    (seed,) = result["comparison"]["seeds"]
    assert seed["seed"] == 3 and seed["ok"] and seed["gate_first_open"] == 1
    assert seed["gate_open_iterations"] == 2
    # 16 steps end a few Catch episodes, never the 100-episode window: never, on both sides
    assert seed["on_steps"] is None and seed["off_steps"] is None and seed["ratio"] is None
    assert -1.0 <= seed["on_final"] <= 1.0 and -1.0 <= seed["off_final"] <= 1.0
    assert result["comparison"]["target"] == 0.5 and not result["comparison"]["met"]
    assert result["marks"] == learning.marks(16, learning.TABLE_MARKS)
    assert len(ablation.table_rows(result)) == len(result["marks"])
    assert "on return" in printed and "off: the same + imagination.horizon=0" in printed
    assert "ratio on / off (medians): n/a (on never reached it)" in printed
    assert "seed 3 first open at iteration 1 (8 real env steps), open 2 iterations" in printed
    assert "steps sampled, off: seed 3 16 real / 0 imagined" in printed
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the same arms' finished folders compared apart (--on/--off): the same figures, nothing run
    again = tmp_path / "again"
    printed2, apart = _run(rig_main, capsys, tmp_path, ["imagination-ablation", "--on",
                           str(out / "on"), "--off", str(out / "off"), "--out", str(again)])  # fmt: skip
    assert apart["comparison"] == result["comparison"] and apart["marks"] == result["marks"]
    for arm in ablation.ARMS:
        assert apart["arms"][arm]["runs"] == arms[arm]["runs"]  # the gate read from each run
    assert apart["config"]["from"] == {"on": str(out / "on"), "off": str(out / "off")}
    assert apart["config"]["gate"] == "open" and apart["config"]["seeds"] == [3]
    assert "seed 3 first open at iteration 1 (8 real env steps), open 2 iterations" in printed2
    assert (again / "ablation.png").is_file() and sorted(p.name for p in again.iterdir()) == [
        "ablation.png", "results.json"]  # fmt: skip


def _arm_folder(root, name: str, horizon: int, steps: int = 16, seeds=(0,), **variant) -> str:
    """A finished learning-benchmark folder as --on/--off read it, each run only its seed."""
    folder = root / name
    folder.mkdir()
    config = {"env": "rig/Catch-v0", "size": 32, "env_kwargs": {}, "steps": steps,
              "threshold": 0.8, "window": 100, "config": "c.yaml", "overrides": [],
              "rig_variant": {"imagination.horizon": horizon,
                              "imagination.num_starts": 8 if horizon else 64,
                              "ppo.epochs": 4, **variant}}  # fmt: skip
    runs = [{"seed": seed} for seed in seeds]
    (folder / "results.json").write_text(json.dumps({"config": config,
                                                     "methods": {"rig": {"runs": runs}}}))  # fmt: skip
    return str(folder)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda r: (_arm_folder(r, "a", 2), str(r / "nowhere")), "--off "),
        (lambda r: (_arm_folder(r, "a", 0), _arm_folder(r, "b", 0)), "nothing was imagined"),
        (lambda r: (_arm_folder(r, "a", 2), _arm_folder(r, "b", 2)), "must imagine nothing"),
        (lambda r: (_arm_folder(r, "a", 2), _arm_folder(r, "b", 0, steps=32)), "has steps 16"),
        (lambda r: (_arm_folder(r, "a", 2), _arm_folder(r, "b", 0, **{"ppo.epochs": 10})),
         "differ beyond imagination (ppo.epochs 4 / 10)"),
        (lambda r: (_arm_folder(r, "a", 2, seeds=(0, 1)), _arm_folder(r, "b", 0)),
         "ran seeds [0, 1], --off"),
    ],
)  # fmt: skip
def test_ablation_of_finished_folders_checks_they_differ_in_imagination_alone(
    rig_main, capsys, tmp_path, make, expected
):
    on, off = make(tmp_path)
    out = tmp_path / "out"
    # the arms differ in imagination.num_starts too (_arm_folder), which is not an error: the
    # last case names ppo.epochs, not that key, which sorts first
    assert rig_main(["bench", "imagination-ablation", "--on", on, "--off", off,
                     "--out", str(out)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err
    assert not out.exists()
    assert rig_main(["bench", "imagination-ablation", "--on", on, "--out", str(out)]) == 2
    assert "--on and --off go together" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "resolves imagination.horizon to 0: imagination is off already, nothing to ablate"),
        (["--set", "imagination.horizon=2", "--env", "rig/Nope-v0"], "--env: unknown env id"),
        (["--set", "imagination.horizon=2", "--seeds", "1,1"], "--seeds names a seed twice"),
        (["--set", "imagination.horizon=2", "--steps", "0"], "--steps must be >= 1, got 0"),
        (["--set", "imagination.horizon=2", "--set", "ppo.epochz=1"], "unknown key 'ppo.epochz'"),
    ],
)  # fmt: skip
def test_ablation_bad_input_is_one_line_and_exit_2(rig_main, capsys, tmp_path, args, expected):
    out = tmp_path / "out"
    # DEBUG_CATCH sets imagination.horizon=0
    assert rig_main(["bench", "imagination-ablation", "--config", *DEBUG_CATCH, *args,
                     "--out", str(out)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err
    assert "Traceback" not in err and not out.exists()  # no run folder left
