"""What a Crafter policy does: its distribution over the 17 actions, overall and where it could craft.

The policy writes its action as text through the action trie (``rl.constrained``), so the share
of an action is a product of trie choices: the six ``make_*`` actions share one root choice
(``make``), and a policy can push that choice down for all six at once. This probe plays
``--steps`` steps in ``--envs`` Crafter worlds with the policy, and every ``--every`` steps
per world samples ``--samples`` actions from the policy for that frame (Monte Carlo over
``RigPolicy.act``: the exact sampler, reasoning included, no second implementation of the
trie's arithmetic), with the task and reasoning cap the checkpoint was trained with. It prints the mean distribution and its mean per-state entropy over all
sampled states, and over the states where ``make_wood_pickaxe`` would succeed (a table within
reach, wood >= 1).

A probe, not a test: docs/benchmarks.md (session 35) has its figures for a trained and an
untrained policy.

    python -m benchmarks.crafter_actions runs/crafter-train-<time>/export --steps 400
    python -m benchmarks.crafter_actions fresh --steps 60     # the untrained tiny policy
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

CRAFTER_PRESET = Path(__file__).resolve().parents[1] / "configs" / "crafter.yaml"


def load_policy(path: str, head_hidden: int = 256) -> tuple[Any, str, int]:
    """``(policy, task, max_reasoning_tokens)``. ``fresh``: the untrained tiny policy with
    configs/crafter.yaml's heads, task and cap; else a checkpoint directory (``rig export``'s,
    or ``rig train``'s ``export/``) with the settings it was trained with, read as ``rig eval``
    reads them."""
    from envs.crafter_env import crafter_codec
    from rig.config import load_config
    from rig.sft_cli import _checkpoint_record, _trained_settings
    from rl.policy import RigPolicy

    preset = load_config(CRAFTER_PRESET, []).policy
    if path == "fresh":
        policy = RigPolicy.from_preset("tiny", crafter_codec(), 0, head_hidden)
        return policy, preset.task, preset.max_reasoning_tokens
    trained = _trained_settings(_checkpoint_record(Path(path), "checkpoint"))
    policy = RigPolicy.load(path, crafter_codec())
    return (policy, trained.get("task", preset.task),
            int(trained.get("max_reasoning_tokens", preset.max_reasoning_tokens)))  # fmt: skip


def distribution(policy, frame: np.ndarray, samples: int, task: str,
                 reasoning: int) -> np.ndarray:  # fmt: skip
    """(A,) share of each action among ``samples`` draws of the policy on one frame."""
    out = policy.act(np.repeat(frame[None], samples, 0), task, max_reasoning_tokens=reasoning)
    return np.bincount(out.actions.numpy(), minlength=len(policy.codec.vocab)) / samples


def can_make_wood_pickaxe(env) -> bool:
    """Crafter's own rule for ``make_wood_pickaxe``: a table nearby and one wood."""
    world, player = env._env._world, env._env._player
    materials, _ = world.nearby(player.pos, 1)  # (materials, objects) within one tile
    return "table" in materials and player.inventory["wood"] >= 1


def probe(policy, steps: int, envs: int, every: int, samples: int, task: str, reasoning: int,
          seed: int = 100) -> dict[str, list[np.ndarray]]:  # fmt: skip
    """Play ``steps`` steps in ``envs`` worlds; the sampled distributions by kind of state."""
    from envs.crafter_env import CrafterEnv

    worlds = [CrafterEnv(length=1000) for _ in range(envs)]
    frames = [w.reset(seed=seed + i)[0] for i, w in enumerate(worlds)]
    found: dict[str, list[np.ndarray]] = {"all states": [], "wood pickaxe possible": []}
    for t in range(steps):  # act is no_grad itself
        out = policy.act(np.stack(frames), task, max_reasoning_tokens=reasoning)
        for i, world in enumerate(worlds):
            if (t + i) % every == 0:
                d = distribution(policy, frames[i], samples, task, reasoning)
                found["all states"].append(d)
                if can_make_wood_pickaxe(world):
                    found["wood pickaxe possible"].append(d)
            frame, _, terminated, truncated, _ = world.step(int(out.actions[i]))
            frames[i] = world.reset()[0] if terminated or truncated else frame
    for world in worlds:
        world.close()
    return found


def entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def report(names, found: dict[str, list[np.ndarray]]) -> list[str]:
    lines = []
    for label, rows in found.items():
        if not rows:
            lines.append(f"{label}: no such state met")
            continue
        mean = np.mean(rows, 0)
        per_state = np.mean([entropy(r) for r in rows])
        lines.append(f"{label}: {len(rows)} states, mean per-state entropy {per_state:.2f} nats "
                     f"(uniform {np.log(len(names)):.2f})")  # fmt: skip
        lines += [f"  {names[k]:20s} {mean[k]:.3f}" for k in np.argsort(-mean)]
    return lines


def main(argv: list[str] | None = None) -> dict[str, list[np.ndarray]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a policy checkpoint directory, or 'fresh'")
    parser.add_argument("--steps", type=int, default=400, help="env steps per world")
    parser.add_argument("--envs", type=int, default=8, help="worlds played at once")
    parser.add_argument("--every", type=int, default=10, help="sample a world's state every N steps")
    parser.add_argument("--samples", type=int, default=256, help="actions drawn per sampled state")
    parser.add_argument("--reasoning", type=int, default=None,
                        help="max_reasoning_tokens of act (default: the checkpoint's own)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    policy, task, reasoning = load_policy(args.checkpoint)
    policy.eval()
    reasoning = reasoning if args.reasoning is None else args.reasoning
    found = probe(policy, args.steps, args.envs, args.every, args.samples, task, reasoning)
    print("\n".join(report(list(policy.codec.vocab), found)))
    return found


if __name__ == "__main__":
    main()
