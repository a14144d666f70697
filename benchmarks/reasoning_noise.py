"""How much do sampled reasoning tokens move the untrained LM's action distribution?

A diagnosis, not a benchmark of speed: on ``--frames`` decisive Catch frames
(``envs.catch.decisive_frames``), the tiny policy at initialisation (action head at zero, so the
distribution is the LM's own over the action trie's first choice) acts ``--samples`` times per
frame with ``--reasoning`` sampled tokens, and the LM's log-probs of the 3 choices at
``<action>`` are compared within a frame (across reasoning samples: the noise reasoning adds)
and between frames (the frame's own effect). With 0 reasoning tokens the within-frame spread is
0 by construction. docs/benchmarks.md (session 25) records what it printed.

    python benchmarks/reasoning_noise.py [--seeds 0,1] [--reasoning 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TASK = "catch the falling ball with the paddle"  # configs/catch.yaml's policy.task


def first_choice_log_probs(policy, frames: np.ndarray, reasoning: int, samples: int, seed: int):
    """(F, samples, C) log-probs of the C choices at the first action token, LM only."""
    rep = np.repeat(frames, samples, axis=0)
    with torch.no_grad():
        out = policy.act(rep, TASK, reasoning, 1.0, torch.Generator().manual_seed(seed))
        full, _, _ = policy.forward_sequence(out)
        prompt = out.prompt_ids.shape[1]
        first = out.action_mask.float().argmax(1)  # column of the first action token
        rows = torch.arange(len(first))
        logits = policy.logits(full[rows, prompt + first - 1]).float()
        nodes = policy.trie.path_nodes(out.tokens, out.action_mask)[rows, first]
        zero = torch.zeros(len(first), policy.action_head.weight.shape[1])
        logp = policy.action_log_softmax(logits, nodes, zero, 1.0)
    allowed = torch.isfinite(logp[0])
    return logp[:, allowed].reshape(len(frames), samples, -1)


def main(argv: list[str] | None = None) -> None:
    import envs
    from envs.catch import decisive_frames
    from rl.policy import RigPolicy

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--reasoning", type=int, default=4)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--samples", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    codec = envs.get_codec(envs.make("rig/Catch-v0", 64))
    frames, _ = decisive_frames(np.random.default_rng(0), args.frames)
    print("seed reasoning | log-prob std within a frame | between frames | max-min p within a frame")
    for seed in (int(s) for s in args.seeds.split(",") if s):
        policy = RigPolicy.from_preset("tiny", codec, seed=seed).eval()
        for reasoning in (0, args.reasoning):
            lp = first_choice_log_probs(policy, frames, reasoning, args.samples, seed + 1)
            p = lp.exp()
            print(f"{seed:4d} {reasoning:9d} | {lp.std(1).mean().item():27.3f} | "
                  f"{lp.mean(1).std(0).mean().item():14.3f} | "
                  f"{(p.max(1).values - p.min(1).values).mean().item():.3f}")


if __name__ == "__main__":
    main()
