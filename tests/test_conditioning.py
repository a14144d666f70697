"""The critic reads the frame: the check that would have caught the value head stuck at EV 0.

On Catch frames with the ball one row above the paddle, the value (read where PPO reads it, from
the frame's columns of the prompt, through the learner engine with the catch preset's learner section)
regresses onto ball column - paddle column, a function of the frame alone. Before rl.heads (an
MLP on the raw state, the whole model at one rate) the trunk shrank the frame's share of the
state within 50 steps and the explained variance stayed at 0.00 at lr 1e-4 to 1e-3
(docs/benchmarks.md, "Learning"). The preset now freezes the trunk (learner.freeze), so this
checks the standardised read-out of the untrained trunk's frame columns; a preset that lets the
trunk train again is checked by the same test against the trunk erasing the frame."""

from pathlib import Path

import numpy as np
import torch

import envs
from envs.catch import decisive_frames
from learner.engine import LearnerConfig, PlainTorchEngine
from rig.config import load_config
from rl.policy import History, RigPolicy, positions, shown


def catch_frames(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    frames, offsets = decisive_frames(rng, n)
    return torch.as_tensor(frames), torch.as_tensor(offsets, dtype=torch.float32)


def test_the_value_learns_a_function_of_the_frame_through_the_trunk():
    torch.manual_seed(0)
    policy = RigPolicy.from_preset("tiny", envs.get_codec(envs.make("rig/Catch-v0", 64)), seed=0)
    policy.model.model.vqmodel.requires_grad_(False)
    learner = load_config(Path(__file__).resolve().parent.parent / "configs" / "catch.yaml").learner
    engine = PlainTorchEngine(policy, LearnerConfig(**{**learner.model_dump(), "device": "cpu"}))
    rng = np.random.default_rng(0)
    test_frames, test_y = catch_frames(rng, 128)

    def values(frames: torch.Tensor) -> torch.Tensor:
        none = History.empty(len(frames), 0, policy.image_size)
        ids, mask = policy.prompt("catch the ball", len(frames), none)
        embeds = policy.embed(ids, torch.zeros_like(mask), shown(frames, none.frames, none.mask))
        hidden, _ = policy.hidden(None, mask, positions(mask), inputs_embeds=embeds)
        return policy.value(hidden, torch.full((len(frames),), ids.shape[1] - 1))

    policy.train()
    for _ in range(200):
        frames, y = catch_frames(rng, 32)
        engine.backward_step(((values(frames) - y) ** 2).mean())
    policy.eval()
    with torch.no_grad():
        ev = 1 - float(((values(test_frames) - test_y) ** 2).mean() / test_y.var())
    print(f"held-out explained variance after 200 steps: {ev:.2f}")
    assert ev > 0.8
