"""Rollout throughput: one env runner in-process vs the same runner as a Ray actor, 2 vs 1,
and 2 runners acting themselves vs the same 2 runners sending to one central inference actor.

Four ``actors.rollout.RolloutWorkers`` set-ups sample ``rig/Crafter-v0`` with a random-weight
policy of one preset, measured side by side in one run:

    in-process   num_env_runners=0: SingleAgentEnvRunner in this process (torch: 1 thread)
    1 actor      num_env_runners=1: the same runner as a Ray actor (1 CPU, 1 torch thread)
    2 actors     num_env_runners=2: two of them, each acting on its own envs
    2 + central  the same 2 runners (envs only) and one inference actor with as many torch
                 threads as the 2 runners have together, acting on both runners' envs in one
                 forward (``rollout.num_inference_actors: 1``, actors/inference.py)

and reports env steps/s (steps from all sub-envs per wall-clock second of one ``sample()``;
median, min, max over ``calls`` calls, interleaved across the set-ups so that a busy moment on a
shared machine hits all of them; one warm-up call first pays the envs' first reset), the Ray
overhead ratio (1 actor / in-process, 1.0 = free), the scaling ratio (2 actors / 1 actor;
2.0 is linear and needs 2 free cores) and the central-inference ratio (2 + central / 2 actors:
the same envs and cores, a batch twice the size per forward).

    rig bench rollout --envs 4 --fragment 16 --calls 5 --reasoning-tokens 4
    python -m benchmarks.rollout --envs 4 --fragment 16 --calls 5 --reasoning-tokens 4
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.common import print_result, spread  # noqa: E402

SETUPS = {"in-process": (0, 0), "1 actor": (1, 0), "2 actors": (2, 0), "2 + central": (2, 1)}
"""name: (env runners, inference actors)"""
TASK = "collect wood"


def bench_rollout(
    envs: int = 4,
    fragment: int = 16,
    calls: int = 5,
    reasoning_tokens: int = 4,
    preset: str = "tiny",
) -> dict[str, Any]:
    """Measure the four set-ups; returns ``{"config", "setups": {name: {"median", "min",
    "max", "samples"}}, "overhead", "scaling", "central"}`` (env steps/s). Starts a local Ray
    with 7 logical CPUs (what the set-ups reserve together; only one set-up samples at any
    time) unless one is running."""
    import ray
    import torch

    from actors.rollout import RolloutWorkers, preset_policy

    if min(envs, fragment, calls) < 1 or reasoning_tokens < 0:
        raise ValueError("envs, fragment and calls must be >= 1, reasoning_tokens >= 0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each actor runs (num_cpus_per_env_runner=1)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=7, include_dashboard=False, log_to_driver=False)
    workers: dict[str, RolloutWorkers] = {}
    try:
        for name, (runners, inference) in SETUPS.items():
            workers[name] = RolloutWorkers(
                num_env_runners=runners,
                num_inference_actors=inference,
                num_cpus_per_inference_actor=2,  # the 2 runners' torch threads together
                num_envs_per_env_runner=envs,
                rollout_fragment_length=fragment,
                policy_factory=preset_policy(preset),
                act_kwargs={"task": TASK, "max_reasoning_tokens": reasoning_tokens},
            )
            workers[name].sample()  # warm-up: first resets (world generation), first act
        rates: dict[str, list[float]] = {name: [] for name in SETUPS}
        for i in range(calls):  # interleaved, the order rotated, so busy moments hit every set-up
            k = i % len(SETUPS)
            names = list(SETUPS)[k:] + list(SETUPS)[:k]
            for name in names:
                start = time.perf_counter()
                steps = len(workers[name].sample())
                rates[name].append(steps / (time.perf_counter() - start))
    finally:
        for w in workers.values():
            w.stop()
        if started:
            ray.shutdown()
        torch.set_num_threads(threads)
    setups = {name: {**spread(r), "samples": r} for name, r in rates.items()}
    return {
        "config": {
            "envs": envs,
            "fragment": fragment,
            "calls": calls,
            "reasoning_tokens": reasoning_tokens,
            "preset": preset,
        },  # fmt: skip
        "setups": setups,
        "overhead": setups["1 actor"]["median"] / setups["in-process"]["median"],
        "scaling": setups["2 actors"]["median"] / setups["1 actor"]["median"],
        "central": setups["2 + central"]["median"] / setups["2 actors"]["median"],
    }


def header(result: dict[str, Any]) -> str:
    c = result["config"]
    return (
        f"rig/Crafter-v0, {c['preset']} policy, {c['envs']} envs per runner, fragment "
        f"{c['fragment']}, up to {c['reasoning_tokens']} reasoning tokens, 1 torch thread per "
        f"runner; median of {c['calls']} interleaved sample() calls"
    )


def table_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    return [(name, f"{r['median']:.1f}", f"{r['min']:.1f}", f"{r['max']:.1f}")
            for name, r in result["setups"].items()]  # fmt: skip


COLUMNS = ("set-up", "env steps/s", "min", "max")


def ratio_lines(result: dict[str, Any]) -> list[str]:
    return [
        f"Ray overhead ratio (1 actor / in-process): {result['overhead']:.2f} (goal >= 0.95)",
        f"scaling ratio (2 actors / 1 actor): {result['scaling']:.2f} (2.0 is linear)",
        f"central inference ratio (2 + central / 2 actors): {result['central']:.2f} "
        f"(> 1: one batched forward for both runners is faster)",
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", type=int, default=4, help="sub-envs per runner")
    parser.add_argument("--fragment", type=int, default=16, help="steps per sub-env per call")
    parser.add_argument("--calls", type=int, default=5, help="timed sample() calls per set-up")
    parser.add_argument("--reasoning-tokens", type=int, default=4)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    result = bench_rollout(args.envs, args.fragment, args.calls, args.reasoning_tokens,
                           args.preset)  # fmt: skip
    print_result(sys.modules[__name__], result, args.json)
    return result


if __name__ == "__main__":
    main()
