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
