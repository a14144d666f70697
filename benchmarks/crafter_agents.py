"""Benchmark the scripted Crafter expert against a uniform-random agent.

Runs N full Crafter episodes per agent (world seeds 0..N-1, the same worlds for both agents), one
episode per task in a process pool, and prints side by side: the Crafter score, mean return, mean
length, each achievement's success rate and the throughput. The Crafter score (Hafner 2021) is
``exp(mean_i ln(1 + s_i)) - 1`` over the 22 achievements, ``s_i`` the percent of episodes that
unlocked achievement ``i``; published figures: random 1.6%, human experts 50.5%.

    python benchmarks/crafter_agents.py --episodes 20 --workers 2
    python benchmarks/crafter_agents.py --episodes 4 --length 3000 --json /tmp/figures.json

Both agents play ``rig/Crafter-v0`` (``envs.crafter_env.CrafterEnv``, which makes Crafter
deterministic for a seed) through the agent interface of ``envs.agents``, and the figures come
from ``envs.stats``, the same code `rig envs play` reports with, so a rerun prints the same table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

AGENTS = ("scripted", "random")


def run_episode(task: tuple[str, int, int]) -> dict:
    """Play one episode of ``agent_name`` on world ``seed``; return its figures."""
    agent_name, seed, length = task
    import envs
    from envs.agents import make_agent
    from envs.stats import unlocked_from_counts

    env = envs.make("rig/Crafter-v0", length=length)
    agent = make_agent(agent_name, "rig/Crafter-v0", env.action_space.n, seed=seed)
    obs, info = env.reset(seed=seed)
    agent.reset()
    start = time.perf_counter()  # after the reset: world generation is not the agent's speed
    total, steps, terminated, truncated = 0.0, 0, False, False
    while not (terminated or truncated):
        obs, reward, terminated, truncated, info = env.step(agent.act(obs, info))
        total += reward
        steps += 1
    seconds = time.perf_counter() - start
    env.close()
    return {
        "agent": agent_name, "seed": seed, "return": total, "length": steps,
        "terminated": terminated, "truncated": truncated, "seconds": seconds,
        "unlocked": unlocked_from_counts(info["achievements"]),
    }  # fmt: skip


def summarise(episodes: list[dict]) -> dict:
    from envs.crafter_env import ACHIEVEMENTS
    from envs.stats import summarize

    figures = summarize(episodes, ACHIEVEMENTS)
    steps = sum(e["length"] for e in episodes)
    figures["steps_per_s"] = steps / max(sum(e["seconds"] for e in episodes), 1e-9)
    return figures


def print_table(figures: dict[str, dict], achievements: list[str]) -> None:
    rows = [
        ("Crafter score (%)", "score", "{:.1f}"),
        ("mean return", "return_mean", "{:.2f}"),
        ("mean length", "length_mean", "{:.0f}"),
        ("deaths (terminated)", "terminated", "{:d}"),
        ("time limit (truncated)", "truncated", "{:d}"),
        ("steps/s (per process)", "steps_per_s", "{:.0f}"),
    ]
    print(f"{'':26s}" + "".join(f"{a:>12s}" for a in figures))
    for label, key, fmt in rows:
        print(f"{label:26s}" + "".join(f"{fmt.format(f[key]):>12s}" for f in figures.values()))
    print("success rate (%)")
    for a in achievements:
        cells = "".join(f"{f['success_rates'][a]:>12.0f}" for f in figures.values())
        print(f"  {a:24s}{cells}")


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=20, help="episodes per agent")
    parser.add_argument("--workers", type=int, default=2, help="parallel processes")
    parser.add_argument("--length", type=int, default=10000, help="episode time limit")
    parser.add_argument("--agents", nargs="+", default=list(AGENTS), choices=AGENTS)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)

    tasks = [(a, s, args.length) for a in args.agents for s in range(args.episodes)]
    # Longest first (the scripted agent survives, random dies early) so that workers end together.
    tasks.sort(key=lambda t: t[0] != "scripted")
    start = time.perf_counter()
    with mp.get_context("spawn").Pool(args.workers) as pool:
        episodes = list(pool.imap_unordered(run_episode, tasks))
    wall = time.perf_counter() - start

    from envs.crafter_env import ACHIEVEMENTS

    achievements = list(ACHIEVEMENTS)
    figures = {a: summarise([e for e in episodes if e["agent"] == a]) for a in args.agents}
    print(
        f"{args.episodes} episodes per agent, length {args.length}, {args.workers} workers, "
        f"{wall:.0f} s wall-clock"
    )
    print_table(figures, achievements)
    if args.json:
        payload = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "wall_seconds": wall,
            "agents": figures,
            "episodes": sorted(episodes, key=lambda e: (e["agent"], e["seed"])),
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return figures


if __name__ == "__main__":
    main()
