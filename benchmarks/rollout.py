"""Rollout throughput: one env runner in-process vs the same runner as a Ray actor, and 2 vs 1.

Three ``actors.rollout.RolloutWorkers`` set-ups sample ``rig/Crafter-v0`` with the tiny policy,
measured side by side in one run:

    in-process   num_env_runners=0: SingleAgentEnvRunner in this process (torch: 1 thread)
    1 actor      num_env_runners=1: the same runner as a Ray actor (1 CPU, 1 torch thread)
    2 actors     num_env_runners=2: two of them

and prints env steps/s (steps from all sub-envs per wall-clock second of one ``sample()``; median,
min, max over ``--calls`` calls, interleaved across the set-ups so that a busy moment on a shared
machine hits all of them; one warm-up call first pays the envs' first reset), the Ray overhead
ratio (1 actor / in-process, 1.0 = free) and the scaling ratio (2 actors / 1 actor; 2.0 is
linear, needs 2 free cores).

    python benchmarks/rollout.py --envs 4 --fragment 16 --calls 5 --reasoning 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere


def build(num_env_runners: int, args: argparse.Namespace):
    from actors.rollout import RolloutWorkers

    workers = RolloutWorkers(
        num_env_runners=num_env_runners,
        num_envs_per_env_runner=args.envs,
        rollout_fragment_length=args.fragment,
        act_kwargs={"task": "collect wood", "max_reasoning_tokens": args.reasoning},
    )
    workers.sample()  # warm-up: first resets (world generation), first act
    return workers


def timed_sample(workers) -> float:
    """Env steps/s of one ``sample()`` call."""
    start = time.perf_counter()
    steps = len(workers.sample())
    return steps / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Measure the three set-ups, print the table and ratios; returns the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", type=int, default=4, help="sub-envs per runner")
    parser.add_argument("--fragment", type=int, default=16, help="steps per sub-env per call")
    parser.add_argument("--calls", type=int, default=5, help="timed sample() calls per set-up")
    parser.add_argument("--reasoning", type=int, default=4, help="max_reasoning_tokens")
    args = parser.parse_args(argv)

    import ray
    import torch

    torch.set_num_threads(1)  # as each actor runs (num_cpus_per_env_runner=1)
    # 3 logical CPUs for 3 actors on 2 cores: only one set-up samples at any time.
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    setups = {"in-process": 0, "1 actor": 1, "2 actors": 2}
    try:
        workers = {name: build(n, args) for name, n in setups.items()}
        rates: dict[str, list[float]] = {name: [] for name in setups}
        for _ in range(args.calls):  # interleaved, so a busy moment hits every set-up
            for name, w in workers.items():
                rates[name].append(timed_sample(w))
        for w in workers.values():
            w.stop()
    finally:
        ray.shutdown()
    results = {name: {"median": statistics.median(r), "min": min(r), "max": max(r)}
               for name, r in rates.items()}  # fmt: skip

    print(f"\n{args.envs} envs per runner, fragment {args.fragment}, {args.calls} timed calls, "
          f"max_reasoning_tokens {args.reasoning}\n")  # fmt: skip
    print("| set-up | env steps/s (median) | min | max |\n| --- | ---: | ---: | ---: |")
    for name, r in results.items():
        print(f"| {name} | {r['median']:.1f} | {r['min']:.1f} | {r['max']:.1f} |")
    overhead = results["1 actor"]["median"] / results["in-process"]["median"]
    scaling = results["2 actors"]["median"] / results["1 actor"]["median"]
    print(f"\nRay overhead ratio (1 actor / in-process): {overhead:.2f}")
    print(f"scaling ratio (2 actors / 1 actor): {scaling:.2f}")
    return results


if __name__ == "__main__":
    main()
