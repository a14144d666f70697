"""Learner samples per second: 2 data-parallel ranks against 1, side by side in one run.

Both learners are learner actor groups (``actors/learner.py``) on a local Ray, so both pay the
same Ray and object-store costs: one of 1 rank and one of 2 (gloo on CPU, NCCL on GPUs), each rank
with ``--cpus-per-rank`` CPUs (Ray gives an actor as many torch threads). They get the same batch
(the tiny policy's own ``act`` outputs, as ``rig bench learner`` builds it) and run the same PPO
update (``learner.ppo.ppo_update``: ``--epochs`` over minibatches of ``--minibatch`` rows),
interleaved, after ``--warmup`` untimed updates each. Samples per second = rows x epochs /
seconds of one ``update`` call, from the driver (shipping the batch to the ranks included).

    rig bench learner-group                    # 64 rows, ZeRO-2, 1 CPU per rank
    python -m benchmarks.learner_group --rows 128 --zero-stage 1

The ratio (2 ranks / 1 rank) is the figure to compare: 2 at best (each rank does half the
forward and backward work; the gradient all-reduce, the global-count all-reduce and the
statistics' all-reduces are what it costs), below 1 where the machine has fewer free cores than
ranks.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.common import interleaved, print_result  # noqa: E402
from benchmarks.common import setups as common_setups  # noqa: E402


def bench_learner_group(
    rows: int = 64,
    minibatch: int = 32,
    epochs: int = 1,
    zero_stage: int = 2,
    cpus_per_rank: float = 1.0,
    repeats: int = 5,
    warmup: int = 1,
    preset: str = "tiny",
    reasoning_tokens: int = 8,
) -> dict[str, Any]:
    """Median seconds per update and samples/s of a 1-rank and a 2-rank learner group; their
    ratio. Starts a local Ray if none is running (and stops it after)."""
    import ray
    import torch

    from actors.learner import LearnerGroup
    from actors.local import init_ray
    from benchmarks.learner_engine import policy_update
    from rig.config import load_config

    _, exp, _ = policy_update(preset, rows, reasoning_tokens)
    overrides = [
        f"policy.preset={preset}", f"policy.max_reasoning_tokens={reasoning_tokens}",
        f"learner.zero_stage={zero_stage}", "learner.device=cpu", "learner.warmup_steps=0",
        f"learner.num_cpus_per_rank={float(cpus_per_rank)}", f"ppo.epochs={epochs}",
        f"ppo.minibatch_size={minibatch}", "ppo.sync_check_rows=0", "learner.timeout_s=600",
    ]  # fmt: skip
    started = not ray.is_initialized()
    if started:
        init_ray(num_cpus=max(os.cpu_count() or 1, int(3 * cpus_per_rank + 0.999)))
    groups: dict[str, LearnerGroup] = {}
    try:
        for ranks in (1, 2):
            config = load_config(None, [*overrides, f"learner.num_ranks={ranks}"])
            groups[f"{ranks} rank" + ("s" if ranks > 1 else "")] = LearnerGroup(config)
        gens = {name: torch.Generator().manual_seed(0) for name in groups}
        version = iter(range(1, 10**9))
        times = interleaved(
            {name: (lambda g=group, n=name: g.update(exp, gens[n], next(version)))
             for name, group in groups.items()},
            repeats, warmup,
        )  # fmt: skip
        parameters = groups["1 rank"].num_trainable
    finally:
        for group in groups.values():
            group.stop()
        if started:
            ray.shutdown()
    setups = common_setups(times, rows * epochs)
    return {
        "config": {"rows": rows, "minibatch": minibatch, "epochs": epochs, "zero_stage": zero_stage,
                   "cpus_per_rank": cpus_per_rank, "repeats": repeats, "warmup": warmup,
                   "preset": preset, "parameters": parameters, "cores": os.cpu_count(),
                   "load": os.getloadavg()[0]},  # fmt: skip
        "setups": setups,
        "ratio": setups["2 ranks"]["samples_per_s"] / setups["1 rank"]["samples_per_s"],
    }


COLUMNS = ("learner", "update s (median)", "update s (min)", "samples/s")


def header(result: dict[str, Any]) -> str:
    c = result["config"]
    return (
        f"PPO update of the {c['preset']} policy ({c['parameters'] / 1e6:.1f}M trainable), "
        f"{c['rows']} rows x {c['epochs']} epoch(s) in minibatches of {c['minibatch']}, ZeRO "
        f"{c['zero_stage']}, gloo on CPU, {c['cpus_per_rank']:g} CPU(s) per rank; {c['cores']} "
        f"cores, load {c['load']:.1f}; median of {c['repeats']} interleaved updates"
    )


def table_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    return [(name, f"{s['median_s']:.3f}", f"{s['min_s']:.3f}", f"{s['samples_per_s']:.1f}")
            for name, s in result["setups"].items()]  # fmt: skip


def ratio_lines(result: dict[str, Any]) -> list[str]:
    return [f"samples/s, 2 ranks / 1 rank: {result['ratio']:.2f} (ideal 2.00)"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64, help="rows in the batch")
    parser.add_argument("--minibatch", type=int, default=32, help="ppo.minibatch_size")
    parser.add_argument("--epochs", type=int, default=1, help="ppo.epochs")
    parser.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    parser.add_argument("--cpus-per-rank", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5, help="timed updates per learner")
    parser.add_argument("--warmup", type=int, default=1, help="untimed updates per learner")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--reasoning-tokens", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    result = bench_learner_group(
        args.rows, args.minibatch, args.epochs, args.zero_stage, args.cpus_per_rank,
        args.repeats, args.warmup, args.preset, args.reasoning_tokens,
    )  # fmt: skip
    print_result(sys.modules[__name__], result, args.json)
    return result


if __name__ == "__main__":
    main()
