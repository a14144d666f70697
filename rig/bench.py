"""``rig bench``: the benchmarks in ``benchmarks/`` as commands, one per measured component.

Each command checks its input (bad input is a ``UserError``: one line, exit code 2), calls the
benchmark's function, prints a rich table and the ratios (one line each: the figures to compare
between machines, since absolute times depend on the load), and can also write the results as
JSON. The measuring code lives in ``benchmarks/<name>.py``, which also runs as a script.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Annotated

import typer

from rig.errors import UserError

app = typer.Typer(
    help="Side by side: policy, rollout, learner (and 2 ranks vs 1), sync, imagination speed; learning vs a peer PPO; imagination on vs off; a checkpoint at lookahead 0..n.",
    no_args_is_help=True,
)

_ROOT = Path(__file__).resolve().parents[1]


def _benchmark(name: str) -> ModuleType:
    """``benchmarks.<name>`` from the repository (the folder is not an installed package)."""
    if not (_ROOT / "benchmarks" / f"{name}.py").is_file():
        raise UserError(
            f"benchmarks/{name}.py is not next to this rig install ({_ROOT}); run rig bench "
            "from a source checkout (pip install -e .)"
        )
    if str(_ROOT) not in sys.path:
        sys.path.insert(0, str(_ROOT))
    return importlib.import_module(f"benchmarks.{name}")


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(
            f"--batch-sizes must be integers separated by commas, got {text!r}"
        ) from None
    if not sizes or min(sizes) < 1:
        raise UserError(f"--batch-sizes must be integers >= 1, got {text!r}")
    return sizes


def _device(device: str, dtype: str) -> None:
    import torch

    if device not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, got {device!r}")
    if dtype not in ("fp32", "bf16"):
        raise UserError(f"--dtype must be fp32 or bf16, got {dtype!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible on this machine; use --device cpu")


def _preset(preset: str) -> None:
    from rl.model import available_presets

    if preset not in available_presets() and not Path(preset).is_file():
        raise UserError(f"unknown policy preset {preset!r}; available: {available_presets()}")


def _check_json_path(path: Path | None) -> None:
    if path is not None and not path.parent.is_dir():
        raise UserError(f"--json: folder {path.parent} does not exist")


def _print(title: str, rows: list[tuple[str, ...]], columns: tuple[str, ...], lines: list[str]):
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.print(title, markup=False, highlight=False, soft_wrap=True)
    console.print(table)
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


# -- rig bench policy ------------------------------------------------------------------------------


@app.command("policy")
def policy(
    preset: Annotated[
        str, typer.Option("--preset", help="policy size preset (configs/policy/)")
    ] = "tiny",
    batch_sizes: Annotated[
        str, typer.Option("--batch-sizes", help="act batch sizes, comma-separated")
    ] = "1,8,32",
    batch: Annotated[
        int,
        typer.Option(
            "--batch", min=1, help="batch of the lookahead, imagine, evaluate and KV-cache rows"
        ),
    ] = 8,
    repeats: Annotated[
        int, typer.Option("--repeats", min=1, help="timed rounds (median reported)")
    ] = 5,
    reasoning_tokens: Annotated[
        int, typer.Option("--reasoning-tokens", min=0, help="max reasoning tokens per act")
    ] = 16,
    kv_tokens: Annotated[
        int, typer.Option("--kv-tokens", min=1, help="tokens decoded in the KV-cache comparison")
    ] = 32,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="torch threads (default: every core)")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="cpu | cuda")] = "cpu",
    dtype: Annotated[str, typer.Option("--dtype", help="fp32 | bf16")] = "fp32",
    json_path: Annotated[
        Path | None, typer.Option("--json", help="also write the results to this JSON file")
    ] = None,
) -> None:
    """act, lookahead, imagine, evaluate and KV-cache throughput of a random-weight policy."""
    sizes = _batch_sizes(batch_sizes)
    _device(device, dtype)
    _preset(preset)
    _check_json_path(json_path)
    bench = _benchmark("policy")
    result = bench.bench_policy(
        preset, sizes, repeats, reasoning_tokens=reasoning_tokens, batch=batch,
        kv_tokens=kv_tokens, threads=threads, device=device, dtype=dtype,
    )  # fmt: skip
    columns = ("measurement", "batch", "s / call", "throughput")
    _print(bench.header(result), bench.table_rows(result), columns, bench.ratio_lines(result))
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        typer.echo(f"results: {json_path}")


def _report(bench: ModuleType, result: dict, json_path: Path | None) -> None:
    _print(bench.header(result), bench.table_rows(result), bench.COLUMNS, bench.ratio_lines(result))
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        typer.echo(f"results: {json_path}")


JsonOpt = Annotated[
    Path | None, typer.Option("--json", help="also write the results to this JSON file")
]
PresetOpt = Annotated[str, typer.Option("--preset", help="policy size preset (configs/policy/)")]
ReasoningOpt = Annotated[
    int, typer.Option("--reasoning-tokens", min=0, help="max reasoning tokens per act")
]


def _ray_free() -> None:
    import ray

    if ray.is_initialized():  # only in-process callers (tests) can get here
        raise UserError("rig bench starts its own local Ray; call it with Ray shut down")


# -- rig bench rollout -----------------------------------------------------------------------------


@app.command("rollout")
def rollout(
    envs: Annotated[int, typer.Option("--envs", min=1, help="sub-envs per runner")] = 4,
    fragment: Annotated[int, typer.Option("--fragment", min=1, help="steps per sub-env")] = 16,
    calls: Annotated[int, typer.Option("--calls", min=1, help="timed sample() calls")] = 5,
    reasoning_tokens: ReasoningOpt = 4,
    preset: PresetOpt = "tiny",
    json_path: JsonOpt = None,
) -> None:
    """Env steps/s of one env runner in-process vs as a Ray actor, and of 2 actors vs 1."""
    _preset(preset)
    _check_json_path(json_path)
    _ray_free()
    bench = _benchmark("rollout")
    _report(bench, bench.bench_rollout(envs, fragment, calls, reasoning_tokens, preset), json_path)


# -- rig bench learner -----------------------------------------------------------------------------


def _stages(text: str) -> list[int]:
    try:
        stages = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--stages must be ZeRO stages separated by commas, got {text!r}") from None
    if not stages or not all(0 <= s <= 3 for s in stages):
        raise UserError(f"--stages must be ZeRO stages 0-3, got {text!r}")
    return stages


@app.command("learner")
def learner(
    model: Annotated[
        str, typer.Option("--model", help="policy (the real PPO update) | mlp (a stand-in)")
    ] = "policy",
    stages: Annotated[str, typer.Option("--stages", help="ZeRO stages, comma-separated")] = "0,1,2",
    precision: Annotated[str, typer.Option("--precision", help="fp32 | bf16 | fp16")] = "fp32",
    rows: Annotated[int, typer.Option("--rows", min=1, help="batch rows per micro-step")] = 32,
    accum: Annotated[int, typer.Option("--accum", min=1, help="micro-steps per update")] = 1,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="timed updates")] = 10,
    preset: PresetOpt = "tiny",
    reasoning_tokens: ReasoningOpt = 8,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="torch threads (default: every core)")
    ] = None,
    json_path: JsonOpt = None,
) -> None:
    """One DeepSpeed update vs the same update in plain torch on the same batch (ratio)."""
    if model not in ("policy", "mlp"):
        raise UserError(f"--model must be policy or mlp, got {model!r}")
    if precision not in ("fp32", "bf16", "fp16"):
        raise UserError(f"--precision must be fp32, bf16 or fp16, got {precision!r}")
    zero = _stages(stages)
    _preset(preset)
    _check_json_path(json_path)
    bench = _benchmark("learner_engine")
    result = bench.bench_learner(
        model, zero, precision, rows, accum, repeats, preset=preset,
        reasoning_tokens=reasoning_tokens, threads=threads,
    )  # fmt: skip
    _report(bench, result, json_path)


# -- rig bench learner-group -----------------------------------------------------------------------


@app.command("learner-group")
def learner_group(
    rows: Annotated[int, typer.Option("--rows", min=2, help="rows in the batch")] = 64,
    minibatch: Annotated[
        int, typer.Option("--minibatch", min=2, help="ppo.minibatch_size (each rank gets half)")
    ] = 32,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="ppo.epochs")] = 1,
    zero_stage: Annotated[int, typer.Option("--zero-stage", min=0, max=3, help="ZeRO stage")] = 2,
    cpus_per_rank: Annotated[
        float, typer.Option("--cpus-per-rank", min=0.1, help="Ray CPUs (torch threads) per rank")
    ] = 1.0,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="timed updates")] = 5,
    preset: PresetOpt = "tiny",
    reasoning_tokens: ReasoningOpt = 8,
    json_path: JsonOpt = None,
) -> None:
    """Learner samples/s of 2 data-parallel ranks vs 1 (Ray actor groups, gloo on CPU)."""
    _preset(preset)
    _check_json_path(json_path)
    bench = _benchmark("learner_group")
    result = bench.bench_learner_group(
        rows, minibatch, epochs, zero_stage, cpus_per_rank, repeats, preset=preset,
        reasoning_tokens=reasoning_tokens,
    )  # fmt: skip
    _report(bench, result, json_path)


# -- rig bench frozen-trunk ------------------------------------------------------------------------


@app.command("frozen-trunk")
def frozen_trunk(
    rows: Annotated[int, typer.Option("--rows", min=1, help="rows in the batch")] = 512,
    epochs: Annotated[
        int | None, typer.Option("--epochs", min=1, help="ppo.epochs (default: catch.yaml's)")
    ] = None,
    minibatch: Annotated[
        int | None, typer.Option("--minibatch", min=1, help="ppo.minibatch_size (catch.yaml's)")
    ] = None,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="timed updates")] = 3,
    reasoning_tokens: ReasoningOpt = 0,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="torch threads (default: every core)")
    ] = None,
    json_path: JsonOpt = None,
) -> None:
    """A frozen trunk once per PPO update vs per minibatch; with and without world terms."""
    _check_json_path(json_path)
    bench = _benchmark("frozen_trunk")
    result = bench.bench_frozen_trunk(rows, epochs, minibatch, repeats,
                                      reasoning_tokens=reasoning_tokens, threads=threads)  # fmt: skip
    _report(bench, result, json_path)


# -- rig bench sync --------------------------------------------------------------------------------


@app.command("sync")
def sync(
    presets: Annotated[
        str, typer.Option("--presets", help="policy presets, comma-separated")
    ] = "tiny,small",
    runners: Annotated[int, typer.Option("--runners", min=1, help="env runners")] = 2,
    imagination_actors: Annotated[
        int, typer.Option("--imagination-actors", min=0, help="imagination actors")
    ] = 1,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="timed syncs")] = 5,
    inference_actors: Annotated[
        int, typer.Option("--inference-actors", min=0,
                          help="inference actors for object store vs collective; 0: skip")
    ] = 1,
    bucket_mb: Annotated[
        float, typer.Option("--bucket-mb", min=0.001, help="collective: MiB per bucket")
    ] = 256,
    json_path: JsonOpt = None,
) -> None:
    """Seconds per weight sync to every runner and actor, and MB/s, zero-copy vs pickled; to
    inference actors, object store vs collective broadcast (rollout.weight_sync)."""
    names = [p.strip() for p in presets.split(",") if p.strip()]
    if not names:
        raise UserError("--presets must name at least one policy preset")
    for name in names:
        _preset(name)
    _check_json_path(json_path)
    _ray_free()
    bench = _benchmark("sync")
    result = bench.bench_sync(names, runners, imagination_actors, repeats,
                              inference_actors=inference_actors, bucket_mb=bucket_mb)  # fmt: skip
    _report(bench, result, json_path)


# -- rig bench imagination -------------------------------------------------------------------------


@app.command("imagination")
def imagination(
    envs: Annotated[int, typer.Option("--envs", min=1, help="envs = start frames")] = 4,
    fragment: Annotated[
        int, typer.Option("--fragment", min=1, help="steps (= imagination horizon) per call")
    ] = 8,
    calls: Annotated[int, typer.Option("--calls", min=1, help="timed calls of each")] = 5,
    reasoning_tokens: ReasoningOpt = 4,
    preset: PresetOpt = "tiny",
    threads: Annotated[int, typer.Option("--threads", min=1, help="torch threads")] = 1,
    json_path: JsonOpt = None,
) -> None:
    """Imagined vs real transitions/s with the same policy, in one process."""
    _preset(preset)
    _check_json_path(json_path)
    bench = _benchmark("imagination")
    result = bench.bench_imagination(envs, fragment, calls, reasoning_tokens, preset, threads)
    _report(bench, result, json_path)


# -- rig bench learning ----------------------------------------------------------------------------


LEARNING_DEFAULTS = {"env": "rig/Catch-v0", "steps": 15000, "seeds": "0,1,2",
                     "config": Path("configs/catch.yaml"), "threshold": 0.8, "only": "both",
                     "peer_epochs": 10}  # fmt: skip
"""``rig bench learning``'s run options when not given (None stands for "not given", so that
``--merge`` can refuse any run option that was, even one set to its default)."""


@app.command("learning")
def learning(
    env: Annotated[str | None, typer.Option(
        "--env", help="env id, the same for both sides [default: rig/Catch-v0]")] = None,
    steps: Annotated[int | None, typer.Option(
        "--steps", help="env-step budget of every run [default: 15000]")] = None,
    seeds: Annotated[str | None, typer.Option(
        "--seeds", help="seeds, comma-separated [default: 0,1,2]")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="rig preset YAML that rig train runs [default: configs/catch.yaml]"
    )] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="key=value override passed to rig train (repeatable)"),
    ] = None,
    threshold: Annotated[float | None, typer.Option(
        "--threshold", help="return for 'env steps to reach' [default: 0.8]")] = None,
    only: Annotated[str | None, typer.Option(
        "--only", help="rig | peer | both [default: both]")] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="results folder (default runs/bench-learning-<time>)"),
    ] = None,
    threads: Annotated[
        int, typer.Option("--threads", min=1, help="torch threads of every process")
    ] = 1,
    peer_epochs: Annotated[int | None, typer.Option(
        "--peer-epochs", min=1, help="PPO epochs per batch of the peer [default: 10]")] = None,
    random: Annotated[bool | None, typer.Option(
        "--random/--no-random", help="also run the uniformly random agent, the baseline "
        "(deterministic per seed: a folder that has it can be merged in) [default: --random]")
    ] = None,
    merge: Annotated[
        list[Path] | None,
        typer.Option("--merge", help="a finished results folder to pool into --out (repeat; "
                     "runs nothing: seeds or sides run as separate processes, then merged)"),
    ] = None,
    eval_episodes: Annotated[int, typer.Option(
        "--eval-episodes", min=0, help="play each side's final policy this many episodes on "
        "held-out worlds (rig eval's protocol; with --merge: every run not yet evaluated so)")
    ] = 0,
    eval_seed: Annotated[int, typer.Option(
        "--eval-seed", min=0, help="reset seed of the held-out worlds")] = 11,
    json_path: JsonOpt = None,
) -> None:
    """rig train vs RLlib's PPO: return vs env steps on one env, budget and seeds; a plot."""
    _check_json_path(json_path)
    bench = _benchmark("learning")  # each run is a subprocess with its own Ray
    given = {"--env": env, "--steps": steps, "--seeds": seeds, "--config": config,
             "--set": overrides or None, "--threshold": threshold, "--only": only,
             "--peer-epochs": peer_epochs, "--random/--no-random": random}  # fmt: skip
    if merge:
        if used := [name for name, value in given.items() if value is not None]:
            raise UserError(f"--merge pools finished runs and takes their settings; drop "
                            f"{', '.join(used)}")  # fmt: skip
        if out is None:
            raise UserError("--merge needs --out, the folder for the pooled results")
        result = bench.merge_results(merge, out, eval_episodes, eval_seed)
    else:
        d = LEARNING_DEFAULTS
        result = bench.bench_learning(
            d["env"] if env is None else env, d["steps"] if steps is None else steps,
            bench.parse_seeds(d["seeds"] if seeds is None else seeds),
            d["config"] if config is None else config, overrides or [],
            d["threshold"] if threshold is None else threshold,
            d["only"] if only is None else only, out, threads,
            d["peer_epochs"] if peer_epochs is None else peer_epochs,
            random_baseline=random is not False, eval_episodes=eval_episodes,
            eval_seed=eval_seed,
        )  # fmt: skip
    _report(bench, result, json_path)


# -- rig bench lookahead ---------------------------------------------------------------------------


@app.command("lookahead")
def lookahead(
    checkpoint: Annotated[Path, typer.Option(
        "--checkpoint", help="an exported policy directory (what rig eval --checkpoint reads)")],
    lookaheads: Annotated[str, typer.Option(
        "--lookaheads", help="lookaheads n, comma-separated, with 0 (the baseline)")] = "0,1,2,3",
    episodes: Annotated[int, typer.Option(
        "--episodes", min=1, help="finished episodes per lookahead")] = 16,
    num_envs: Annotated[int, typer.Option("--num-envs", min=1, help="envs in parallel")] = 4,
    seed: Annotated[int, typer.Option(
        "--seed", min=0, help="env and sampling seed, the same for every n (the same worlds)")] = 0,
    env: Annotated[str | None, typer.Option(
        "--env", help="env id (default: the checkpoint's)")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="preset YAML, as rig eval -c (env kwargs, policy act settings)")
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="key=value config override (repeatable)")
    ] = None,
    max_reasoning_tokens: Annotated[int | None, typer.Option(
        "--max-reasoning-tokens", min=0, help="default: the checkpoint's, else config")] = None,
    temperature: Annotated[float | None, typer.Option(
        "--temperature", min=1e-6, help="default: policy.temperature")] = None,
    review: Annotated[str, typer.Option(
        "--review", help="sample (RIG's lookahead) or value (best of n candidates by the "
        "world model and critic, rl/review.py)")] = "sample",
    imagine_temperature: Annotated[float | None, typer.Option(
        "--imagine-temperature", min=1e-6, help="--review value's code sampler")] = None,
    review_depth: Annotated[int, typer.Option(
        "--review-depth", help="--review value: imagined steps per candidate")] = 1,
    threads: Annotated[int, typer.Option("--threads", min=1, help="torch CPU threads")] = 1,
    out: Annotated[Path | None, typer.Option(
        "--out", help="results folder (default runs/bench-lookahead-<time>)")] = None,
    json_path: JsonOpt = None,
) -> None:
    """One checkpoint at lookahead 0..n on the same worlds: return, Crafter score, s / decision."""
    _check_json_path(json_path)
    bench = _benchmark("lookahead")
    result = bench.bench_lookahead(
        checkpoint, bench.parse_lookaheads(lookaheads), episodes, num_envs, seed, out, env,
        config, overrides or [], threads, max_reasoning_tokens=max_reasoning_tokens,
        temperature=temperature, review=review, imagine_temperature=imagine_temperature,
        review_depth=review_depth,
    )  # fmt: skip
    _report(bench, result, json_path)


# -- rig bench imagination-ablation ----------------------------------------------------------------


@app.command("imagination-ablation")
def imagination_ablation(
    env: Annotated[
        str, typer.Option("--env", help="env id, the same for both arms")
    ] = "rig/Catch-v0",
    steps: Annotated[
        int, typer.Option("--steps", help="real env-step budget of every run")
    ] = 15000,
    seeds: Annotated[str, typer.Option("--seeds", help="seeds, comma-separated")] = "0,1,2",
    config: Annotated[
        Path,
        typer.Option(
            "--config",
            "-c",
            help="rig preset YAML that rig train runs (with the --set overrides, its "
            "imagination.horizon must be > 0)",
        ),
    ] = Path("configs/catch.yaml"),
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="key=value override passed to rig train in both arms (repeatable), e.g. "
            "imagination.horizon=3",
        ),
    ] = None,
    threshold: Annotated[
        float, typer.Option("--threshold", help="return for 'real env steps to reach'")
    ] = 0.8,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="results folder (default runs/bench-imagination-ablation-<time>)"
        ),
    ] = None,
    threads: Annotated[
        int, typer.Option("--threads", min=1, help="torch threads of every process")
    ] = 1,
    on: Annotated[
        Path | None,
        typer.Option("--on", help="a finished `rig bench learning --only rig` folder of the on "
                     "arm; with --off, compare the two and run nothing"),
    ] = None,
    off: Annotated[
        Path | None, typer.Option("--off", help="the off arm's finished folder (with --on)")
    ] = None,
    json_path: JsonOpt = None,
) -> None:
    """rig train with imagined rollouts vs the same with imagination.horizon=0: real env steps
    to a return, final returns, the gate; a plot. With --on/--off: the same comparison of two
    finished learning-benchmark folders (arms and seeds run apart, e.g. two at once)."""
    _check_json_path(json_path)
    bench = _benchmark("imagination_ablation")  # each run is a subprocess with its own Ray
    if on is not None or off is not None:
        if on is None or off is None:
            raise UserError("--on and --off go together (the two arms' finished folders)")
        if overrides:
            raise UserError("--set does not apply with --on/--off: they compare finished runs "
                            "(give the overrides to the `rig bench learning` runs)")  # fmt: skip
        _report(bench, bench.ablation_from_folders(on, off, out), json_path)
        return
    result = bench.bench_imagination_ablation(
        env, steps, bench.learning.parse_seeds(seeds), config, overrides or [], threshold, out,
        threads,
    )  # fmt: skip
    _report(bench, result, json_path)
