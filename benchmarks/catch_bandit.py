"""Does the policy learn to read the frame? PPO on the contextual bandit of Catch frames.

Each iteration draws ``--batch`` Catch frames with the ball one row above the paddle row and the
paddle at most one column away, so exactly one action catches it; the policy acts on them
(``RigPolicy.act``, no reasoning), every row is a one-step episode with reward +1 for the
catching action and -1 otherwise, and the update is the real one: ``rl.experience
.real_experience`` -> ``learner.ppo.ppo_update`` through ``PlainTorchEngine`` with the learner
and PPO sections of ``--config`` (configs/catch.yaml). It separates the policy side from credit
assignment: Catch itself rewards only the last of 7 decisions, this gives every decision its
own answer. Held-out accuracy (greedy action on ``--held-out`` fixed frames, 256) after
each iteration, per mode:

* ``head``: as ``rig train`` runs (the action head, rl/heads.py, learns);
* ``no-head``: the action head frozen at zero, the policy reads the frame through the LM head
  alone (the policy before the action head);
* ``frozen-trunk``: the LM, vision path and world heads frozen at initialisation, only the
  value and action heads learn (a linear policy on the untrained standardised state: how fast
  the heads alone read the frame; use a higher ``learner.lr`` in ``--config``, e.g. 1e-3);
* ``rllib``: the learning benchmark's peer on the same bandit: RLlib's PPO with its default CNN
  and the peer's settings (benchmarks/learning.py: lr 3e-4, minibatch 128, 10 epochs, 8 envs,
  frames as ``NormalizedImageEnv`` gives them), train batches of ``--batch`` one-step episodes,
  greedy (argmax) accuracy on the same held-out frames: how many decisions a CNN needs.

It also prints the share of the most common answer among the held-out frames (what a policy
that ignores the frame can score at best). docs/benchmarks.md ("Learning")
records what it printed.

    python benchmarks/catch_bandit.py [--iterations 15] [--batch 512] [--seeds 0] [--modes head,no-head,frozen-trunk,rllib]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # learning.py's peer settings

MODES = ("head", "no-head", "frozen-trunk", "rllib")


def bandit_frames(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 64, 64, 3) uint8 frames and (n,) int64 catching action (0 left, 1 stay, 2 right)."""
    from envs.catch import decisive_frames

    frames, offsets = decisive_frames(rng, n)
    return frames, offsets + 1


def held_out_set(seed: int, n: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The fixed held-out frames of ``seed``, their catching actions, and the share of the most
    common one (the best a policy that ignores the frame can score)."""
    frames, best = bandit_frames(np.random.default_rng(10_000 + seed), n)
    return frames, best, float(np.bincount(best).max() / n)


def run(
    mode: str, seed: int, iterations: int, batch: int, config_path: Path, held_out: int = 256
) -> tuple[list[float], float]:
    import envs
    from learner.engine import LearnerConfig, PlainTorchEngine
    from learner.ppo import ppo_update
    from rig.config import load_config
    from rl.experience import real_experience
    from rl.policy import RigPolicy

    config = load_config(config_path)
    codec = envs.get_codec(envs.make("rig/Catch-v0", 64))
    policy = RigPolicy.from_preset(config.policy.preset, codec, seed=seed)
    policy.model.model.vqmodel.requires_grad_(False)
    learner = config.learner.model_dump()
    learner["device"] = "cpu"
    if mode == "frozen-trunk":
        policy.model.requires_grad_(False)
        policy.world.requires_grad_(False)
    if mode == "no-head":
        policy.action_head.requires_grad_(False)
    # the engine refuses lr_scales/warmup_skip keys that name no trainable parameter: drop the
    # ones the mode froze
    trainable = [n for n, q in policy.named_parameters() if q.requires_grad]
    names = lambda key: any(n.startswith(key) for n in trainable)  # noqa: E731
    learner["lr_scales"] = {k: v for k, v in learner["lr_scales"].items() if names(k)}
    learner["warmup_skip"] = [k for k in learner["warmup_skip"] if names(k)]
    engine = PlainTorchEngine(policy, LearnerConfig(**learner))
    cfg = config.ppo
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    held_frames, held_best, blind = held_out_set(seed, held_out)
    task = config.policy.task

    def accuracy() -> float:
        with torch.no_grad():
            out = policy.act(held_frames, task, 0, 1e-3, torch.Generator().manual_seed(0))  # ~argmax
        return float((out.actions.cpu().numpy() == held_best).mean())

    curve = [accuracy()]
    zeros = np.zeros(batch, np.int64)
    for _ in range(iterations):
        frames, best = bandit_frames(rng, batch)
        with torch.no_grad():
            act = policy.act(frames, task, 0, config.policy.temperature, gen)
        reward = np.where(act.actions.cpu().numpy() == best, 1.0, -1.0).astype(np.float32)
        exp = real_experience(
            act, reward, np.ones(batch, bool), np.zeros(batch, bool), np.arange(batch),
            torch.zeros(batch), torch.zeros(batch, policy.image_tokens, dtype=torch.int64),
            zeros, cfg.gamma, cfg.lam,
        )  # fmt: skip
        ppo_update(engine, policy, None, exp, cfg, gen, version=0)  # the rows' version: zeros
        curve.append(accuracy())
    return curve, blind


class BanditEnv(gym.Env):
    """One-step episodes of :func:`bandit_frames` as a Gymnasium env (for RLlib): reward +1 for
    the catching action, -1 otherwise."""

    observation_space = gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
    action_space = gym.spaces.Discrete(3)

    def __init__(self, config: dict | None = None):
        self._best = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        frames, best = bandit_frames(self.np_random, 1)
        self._best = int(best[0])
        return frames[0], {}

    def step(self, action):
        frames, _ = bandit_frames(self.np_random, 1)  # the next episode's frame: never seen
        return frames[0], 1.0 if int(action) == self._best else -1.0, True, False, {}


def run_rllib(seed: int, iterations: int, batch: int, held_out: int = 256
              ) -> tuple[list[float], float]:  # fmt: skip
    """RLlib's PPO (the learning benchmark's peer settings) on the bandit; held-out greedy
    accuracy before the first and after each train call."""
    import logging

    import ray
    from learning import PEER_EPOCHS, PEER_MINIBATCH, peer_config
    from ray.rllib.core.columns import Columns
    from ray.rllib.env.wrappers.atari_wrappers import NormalizedImageEnv
    from ray.tune.registry import register_env

    held_frames, held_best, blind = held_out_set(seed, held_out)
    register_env("rig-catch-bandit", lambda cfg: NormalizedImageEnv(BanditEnv(cfg)))
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        algo = peer_config("rig-catch-bandit", {}, batch, min(PEER_MINIBATCH, batch),
                           PEER_EPOCHS, seed).build_algo()  # fmt: skip
        module = algo.get_module()
        obs = torch.as_tensor(held_frames, dtype=torch.float32) / 128.0 - 1.0  # NormalizedImageEnv

        def accuracy() -> float:
            with torch.no_grad():
                logits = module.forward_inference({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
            return float((logits.argmax(-1).numpy() == held_best).mean())

        curve = [accuracy()]
        for _ in range(iterations):
            algo.train()
            curve.append(accuracy())
        algo.stop()
    finally:
        ray.shutdown()
    return curve, blind


def main(argv: list[str] | None = None) -> list[tuple[str, int, list[float]]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--config", type=Path,
                        default=Path(__file__).resolve().parents[1] / "configs" / "catch.yaml")
    parser.add_argument("--held-out", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    modes = [m for m in args.modes.split(",") if m]
    bad = sorted(set(modes) - set(MODES))
    if bad:
        parser.error(f"unknown --modes {bad}; choose from {list(MODES)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    results = []
    for seed in seeds:
        for mode in modes:
            start = time.perf_counter()
            if mode == "rllib":
                curve, blind = run_rllib(seed, args.iterations, args.batch, args.held_out)
            else:
                curve, blind = run(mode, seed, args.iterations, args.batch, args.config,
                                   args.held_out)
            marks = " ".join(f"{a:.2f}" for a in curve)
            print(f"seed {seed} {mode:8s} held-out accuracy by iteration: {marks}  (frame-blind "
                  f"best {blind:.2f}; {time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
            results.append((mode, seed, curve))
    return results


if __name__ == "__main__":
    main()
