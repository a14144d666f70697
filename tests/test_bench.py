"""`rig bench policy`: a smoke run on the tiny preset (structure and sanity of the figures, never
their size: timings depend on the machine's load) and its input errors."""

from __future__ import annotations

import json

import pytest
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
    assert set(result["setups"]) == {"in-process", "1 actor", "2 actors"}
    assert all(r["median"] > 0 for r in result["setups"].values())
    setups = result["setups"]
    assert result["overhead"] == pytest.approx(
        setups["1 actor"]["median"] / setups["in-process"]["median"]
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


@pytest.mark.slow
def test_sync_benchmark_payload_and_encodings(rig_main, capsys, tmp_path):
    args = ["sync", "--presets", "tiny", "--runners", "1", "--imagination-actors", "1",
            "--repeats", "1"]  # fmt: skip
    out, result = _run(rig_main, capsys, tmp_path, args)
    assert "zero-copy vs pickled tensors" in out
    rows = result["presets"]
    assert [r["encoding"] for r in rows] == ["zero-copy", "pickled"]
    # fp32 weights: 4 bytes per parameter (buffers such as the VQ codebook counted in both)
    assert rows[0]["megabytes"] == pytest.approx(rows[0]["parameters"] * 4 / 1e6, rel=0.05)
    assert all(r["sync_s"] > 0 and r["receivers"] == 2 for r in rows)


def test_imagination_benchmark_ratio(rig_main, capsys, tmp_path):
    args = ["imagination", "--envs", "2", "--fragment", "1", "--calls", "1",
            "--reasoning-tokens", "0"]  # fmt: skip
    out, result = _run(rig_main, capsys, tmp_path, args)
    assert "imagined / real transitions per second:" in out
    assert result["config"]["rows_per_call"] == {"real": 2, "imagined": 2}
    assert result["ratio"] == pytest.approx(result["imagined"]["median"] / result["real"]["median"])


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
