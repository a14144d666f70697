"""The imagination gate (rl/gate.py): the world model against copy-the-frame and constant
predictors on real transitions, and the verdict that lets imagined rows into the loss."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from rl.gate import (
    CHECKS,
    COMPARISONS,
    RunningConstants,
    beats_baselines,
    logloss,
    pooled,
    world_model_check,
)
from rl.imagine import frame_codes

TASK = "catch the falling ball with the paddle"


def catch_transitions(n: int, seed: int = 0):
    """n real Catch transitions at 64 px from random play: frames s_t, s_{t+1}, r_t, 1 - term."""
    import envs

    env = envs.make("rig/Catch-v0", size=64)
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    frames, following, rewards, continues = [], [], [], []
    while len(frames) < n:
        new, reward, terminated, truncated, _ = env.step(int(rng.integers(3)))
        frames.append(obs)
        following.append(new)
        rewards.append(float(reward))
        continues.append(0.0 if terminated else 1.0)
        obs = env.reset()[0] if terminated or truncated else new
    env.close()
    return (np.stack(frames), np.stack(following), torch.tensor(rewards), torch.tensor(continues))


@pytest.fixture(scope="module")
def transitions():
    return catch_transitions(24)


@pytest.fixture(scope="module")
def acted(tiny_policy, transitions):
    frames = transitions[0]
    return tiny_policy.act(frames, TASK, 2, 1.0, torch.Generator().manual_seed(0))


def fitted_constants(seed: int = 1) -> RunningConstants:
    """Constants fitted on other Catch transitions than the checked ones."""
    _, _, rewards, continues = catch_transitions(64, seed)
    constants = RunningConstants()
    constants.update(rewards, continues)
    return constants


def test_running_constants_are_the_means_of_everything_seen():
    c = RunningConstants()
    c.update(np.array([1.0, 0.0, -1.0, 0.5]), np.array([1.0, 0.0, 1.0, 1.0]))
    c.update(torch.tensor([2.0]), torch.tensor([0.0]))
    assert (c.transitions, c.terminations) == (5, 2)
    assert c.reward == pytest.approx(2.5 / 5) and c.continue_rate == pytest.approx(3 / 5)
    assert RunningConstants(**dataclasses.asdict(c)) == c  # the counters' JSON round trip


def test_logloss_matches_a_slow_reference():
    p, t = torch.tensor([0.9, 0.2, 1.0, 0.0]), torch.tensor([1.0, 0.0, 0.0, 1.0])
    eps = 1e-6
    slow = [-(ti * math.log(min(max(pi, eps), 1 - eps))
              + (1 - ti) * math.log(1 - min(max(pi, eps), 1 - eps)))
            for pi, ti in zip(p.tolist(), t.tolist(), strict=True)]  # fmt: skip
    assert logloss(p, t) == pytest.approx(sum(slow) / 4, rel=1e-9)


def test_the_verdict_needs_every_baseline_beaten():
    better = {}
    for model, baseline, higher in COMPARISONS:
        better[model], better[baseline] = (2.0, 1.0) if higher else (1.0, 2.0)
    assert beats_baselines(better)
    for model, baseline, _ in COMPARISONS:
        assert not beats_baselines({**better, model: better[baseline]})  # a tie is not a win
        assert not beats_baselines({k: v for k, v in better.items() if k != baseline})


def test_the_verdict_asks_only_the_named_checks():
    """imagination.gate_checks: a check left out is not required (its metrics may even be
    missing); the ones named still are; an unknown or empty list is an error."""
    better = {}
    for model, baseline, higher in COMPARISONS:
        better[model], better[baseline] = (2.0, 1.0) if higher else (1.0, 2.0)
    worse_value = {**better, "world/value_error": 3.0}
    assert not beats_baselines(worse_value)
    assert beats_baselines(worse_value, ["codes", "psnr", "reward", "continue"])
    no_value = {k: v for k, v in better.items() if not k.startswith("world/value")}
    assert beats_baselines(no_value, ["codes", "psnr", "reward", "continue"])
    assert not beats_baselines({**worse_value, "world/psnr": 0.5}, ["codes", "psnr"])
    assert beats_baselines({**worse_value, "world/psnr": 0.5}, ["codes"])
    for bad in ([], ["codes", "pixels"]):
        with pytest.raises(ValueError, match="gate checks"):
            beats_baselines(better, bad)


def test_the_config_takes_gate_checks_and_rejects_bad_ones():
    from rig.config import load_config
    from rig.errors import ConfigError

    assert load_config(None).imagination.gate_checks == list(CHECKS)
    cfg = load_config(None, ["imagination.gate_checks=[codes, reward]"])
    assert cfg.imagination.gate_checks == ["codes", "reward"]
    for bad in ("[]", "[codes, codes]", "[codes, pixels]"):
        with pytest.raises(ConfigError, match="gate_checks"):
            load_config(None, [f"imagination.gate_checks={bad}"])


def test_an_untrained_world_model_does_not_pass(tiny_policy, transitions, acted):
    frames, following, rewards, continues = transitions
    m = world_model_check(tiny_policy, acted, following, rewards, continues, fitted_constants(),
                          1.0, torch.Generator().manual_seed(0))  # fmt: skip
    assert m["world/checked_rows"] == 24
    # Catch moves two cells a step; an untrained VQ's codes depend on much of the frame, so even
    # copying gets few codes right (4% here), but the untrained model's samples fewer still
    # (PSNR says nothing here: an untrained VQ decodes any codes to about the same grey, 5.7 dB)
    assert m["world/code_accuracy_copy"] > m["world/code_accuracy"]
    assert not beats_baselines(m)
    # the driver's codes of the next frames, passed in, give the same check
    given = world_model_check(tiny_policy, acted, following, rewards, continues,
                              fitted_constants(), 1.0, torch.Generator().manual_seed(0),
                              frame_codes(tiny_policy, following))  # fmt: skip
    assert given == m


def test_without_fitted_constants_the_gate_stays_shut(tiny_policy, transitions, acted):
    frames, following, rewards, continues = transitions
    m = world_model_check(tiny_policy, acted, following, rewards, continues, RunningConstants())
    assert "world/reward_mse_constant" not in m and not beats_baselines(m)


class _Oracle:
    """A world model that imagines ``codes`` drawn as ``frames`` (the untrained VQ would decode
    any codes to the same grey), and the given reward and continue probability."""

    def __init__(self, policy, codes, frames, reward, continue_prob):
        self.policy, self.codes, self.frames = policy, codes, torch.as_tensor(frames)
        self.reward, self.cont = reward, continue_prob

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def imagine(self, act, temperature=1.0, generator=None):
        return dataclasses.replace(
            self.policy.imagine(act, temperature, generator),
            codes=self.codes, frames=self.frames,
            reward=self.reward, continue_prob=self.cont,
        )  # fmt: skip


def test_a_world_model_that_knows_the_env_passes_and_a_copying_one_does_not(
    tiny_policy, transitions, acted
):
    frames, following, rewards, continues = transitions
    constants = fitted_constants()
    real, current = frame_codes(tiny_policy, following), frame_codes(tiny_policy, frames)
    knows = _Oracle(tiny_policy, real, following, rewards, continues.clamp(0.02, 0.98))
    m = world_model_check(knows, acted, following, rewards, continues, constants, task=TASK)
    assert m["world/code_accuracy"] == 1.0 and m["world/reward_mse"] == 0.0
    assert m["world/value_error"] == 0.0 < m["world/value_error_copy"]
    # the VQ's part: the critic on the real next frames' reconstructions (not a comparison)
    assert m["world/value_error_reconstruction"] > 0.0
    assert "world/value_error_reconstruction" not in {k for c in COMPARISONS for k in c[:2]}
    assert beats_baselines(m), m
    # without the task the critic's values are not read: the value comparison is missing, shut
    assert not beats_baselines(world_model_check(knows, acted, following, rewards, continues,
                                                 constants))  # fmt: skip
    copies = _Oracle(tiny_policy, current, frames, rewards, continues.clamp(0.02, 0.98))
    m = world_model_check(copies, acted, following, rewards, continues, constants, task=TASK)
    assert m["world/code_accuracy"] == m["world/code_accuracy_copy"]
    assert not beats_baselines(m)
    # the frame right, the reward no better than the constant: still shut
    guesses = _Oracle(tiny_policy, real, following, torch.full_like(rewards, constants.reward),
                      continues)
    assert not beats_baselines(world_model_check(guesses, acted, following, rewards, continues,
                                                 constants, task=TASK))  # fmt: skip
    # codes, reward and continue right, but frames the critic reads unlike the real next ones
    # (noise): the imagined rows' bootstrap values would be wrong, so still shut
    noise = np.random.default_rng(5).integers(0, 256, following.shape, dtype=np.uint8)
    misread = _Oracle(tiny_policy, real, noise, rewards, continues.clamp(0.02, 0.98))
    m = world_model_check(misread, acted, following, rewards, continues, constants, task=TASK)
    assert m["world/value_error"] > m["world/value_error_copy"] and not beats_baselines(m)


def test_bad_rows_fail_in_one_line(tiny_policy, transitions, acted):
    frames, following, rewards, continues = transitions
    with pytest.raises(ValueError, match="N >= 1 rows of each"):
        world_model_check(tiny_policy, acted, following[:3], rewards, continues,
                          RunningConstants())  # fmt: skip


def test_the_verdict_is_on_the_mean_of_the_window():
    """imagination.gate_window: one lucky batch does not open the gate, nor one unlucky one shut
    it; a metric some check lacks (the constants before any were fitted) stays out."""
    win = {"world/code_accuracy": 0.5, "world/code_accuracy_copy": 0.3, "world/psnr": 21.0,
           "world/psnr_copy": 20.0, "world/reward_mse": 0.1, "world/reward_mse_constant": 0.2,
           "world/continue_logloss": 0.2, "world/continue_logloss_constant": 0.4,
           "world/value_error": 0.05, "world/value_error_copy": 0.1}  # fmt: skip
    lose = {**win, "world/code_accuracy": 0.1}
    assert pooled([win, lose])["world/code_accuracy"] == pytest.approx(0.3)
    assert not beats_baselines(pooled([lose, lose, lose, win]))  # 0.2 against 0.3
    assert beats_baselines(pooled([win, win, win, lose]))  # 0.4 against 0.3
    first = {k: v for k, v in win.items() if not k.endswith("_constant")}
    assert "world/reward_mse_constant" not in pooled([first, win])
    assert not beats_baselines(pooled([first, win])) and pooled([]) == {}
