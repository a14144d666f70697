"""actors/: RLlib env runners acting with RigPolicy, in-process and as Ray actors.

Local mode (no Ray) checks the data: the PPO invariant (stored log-probs = a fresh evaluate),
alignment, episode statistics, env failures. The remote tests share one group of 2 runners x 2
envs: fragments, weight sync, and a runner process killed mid-sample.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from policies import assert_evaluate_reproduces, end_biased, state_readouts, wait_for_runner

import envs
from actors.env import RebuildOnError
from actors.rollout import RolloutWorkers, preset_policy
from rl.policy import RigPolicy

ACT = {"task": "collect wood", "max_reasoning_tokens": 3, "temperature": 0.7}
SMALL_WORLD = {"area": [16, 16]}  # Crafter's world generation: 0.1 s instead of 1 s a reset


def ending_policy(codec) -> RigPolicy:
    """Tiny policy whose <end> logit is raised, so rows stop reasoning at different lengths
    and the generated columns get padded (conftest's tiny_policy trick)."""
    return state_readouts(end_biased(RigPolicy.from_preset("tiny", codec, seed=0)))


class FailingStep(gym.Wrapper):
    """Raises in its ``fail_at``-th step (counted from construction): a crashing game."""

    def __init__(self, env: gym.Env, fail_at: int):
        super().__init__(env)
        self.fail_at, self.steps = fail_at, 0

    def step(self, action):
        self.steps += 1
        if self.steps == self.fail_at:
            raise RuntimeError("the game crashed")
        return self.env.step(action)


def failing_catch(fail_at: int = 3) -> gym.Env:
    return FailingStep(envs.make("rig/Catch-v0", size=64), fail_at)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The in-process runner acts in this process: one torch thread, as each Ray runner uses,
    keeps it from spinning against the runner actors and other jobs on 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- in-process ----------------------------------------------------------------------------------


def test_rebuild_on_error_truncates_then_rebuilds():
    built = []

    def factory():
        built.append(failing_catch(fail_at=2))
        return built[-1]

    env = RebuildOnError(factory)
    obs, _ = env.reset(seed=0)
    obs1, *_ = env.step(0)
    obs2, reward, terminated, truncated, info = env.step(0)
    assert (terminated, truncated, reward) == (False, True, 0.0)
    assert "the game crashed" in info["env_error"]
    np.testing.assert_array_equal(obs2, obs1)  # the last good frame
    env.reset()
    assert (len(built), env.rebuilds) == (2, 1)
    assert not env.step(0)[3]  # the fresh env steps


@pytest.fixture(scope="module")
def local_workers():
    workers = RolloutWorkers(
        num_env_runners=0,
        num_envs_per_env_runner=2,
        rollout_fragment_length=3,
        env_kwargs={"length": 4, **SMALL_WORLD},  # time limit: episodes end across fragments
        policy_factory=ending_policy,
        act_kwargs=ACT,
    )
    yield workers
    workers.stop()


def test_local_sample_keeps_act_outputs_exact(local_workers):
    batch = local_workers.sample()
    policy = local_workers.local.module.policy
    act = batch.act
    assert len(batch) == 6 and act.frames.shape == (6, 64, 64, 3)
    assert act.frames.dtype == torch.uint8 and act.tokens.dtype == torch.int64
    width = ACT["max_reasoning_tokens"] + 2 + policy.trie.max_len
    assert act.tokens.shape == (6, width)
    assert len(set(act.reasoning_mask.sum(1).tolist())) > 1  # padded rows of several lengths
    assert act.action_texts == [policy.codec.vocab[int(a)] for a in act.actions]
    assert act.temperature == 0.7  # exactly: not narrowed to float32 on the way
    np.testing.assert_array_equal(batch.chunks, [0, 0, 0, 1, 1, 1])
    assert batch.last_frames.shape == (2, 64, 64, 3)

    # The PPO invariant through RLlib: what act recorded is what the learner recomputes.
    assert_evaluate_reproduces(policy, act, values=True)


def test_local_episode_stats_and_versions(local_workers):
    policy = local_workers.local.module.policy
    batch = local_workers.sample()  # steps 4..6: each sub-env's episode ends at its step 4
    assert [e["length"] for e in batch.episodes] == [4, 4]
    assert all(e["truncated"] and not e["terminated"] for e in batch.episodes)
    assert all(isinstance(e["unlocked"], list) for e in batch.episodes)
    assert batch.truncated.sum() == 2 and (batch.versions == 0).all()

    state = {k: v.clone() for k, v in policy.state_dict().items()}
    state["value_head.out.weight"].zero_()
    state["value_head.out.bias"].fill_(7.0)
    batch = local_workers.sample(weights=state, version=3)
    assert local_workers.version == 3 and (batch.versions == 3).all()
    torch.testing.assert_close(batch.act.values, torch.full((6,), 7.0))


def test_history_comes_from_the_episodes_across_sample_calls():
    """policy.history through the runner: each sub-env's last k steps (its lookback buffer
    reaches into the previous sample() call), reset at a new episode, and still exact."""
    workers = RolloutWorkers(
        num_envs_per_env_runner=2,
        rollout_fragment_length=3,
        env_kwargs={"length": 4, **SMALL_WORLD},
        policy_factory=ending_policy,
        act_kwargs=ACT,
        history=2,
    )
    try:
        policy = workers.local.module.policy
        first, second = workers.sample(), workers.sample()
        for batch in (first, second):
            act = batch.act
            assert act.history_frames.shape == (len(batch), 2, 64, 64, 3)
            assert_evaluate_reproduces(policy, act)
        # first call: two episodes from their start, steps 0, 1, 2 each
        a = first.act
        expected = [[False, False], [False, True], [True, True]] * 2
        assert a.history_mask.tolist() == expected
        for c in (0, 3):  # each chunk: slot 1 of step t is step t-1's frame
            assert torch.equal(a.history_frames[c + 1, 1], a.frames[c])
            assert torch.equal(a.history_frames[c + 2, 0], a.frames[c])
            assert torch.equal(a.history_frames[c + 2, 1], a.frames[c + 1])
        # second call: step 3 ends each episode (length 4) with history from the first call,
        # then new episodes start with none
        b = second.act
        lengths = np.bincount(second.chunks).tolist()
        assert sorted(lengths) == [1, 1, 2, 2], lengths
        row = 0
        for c, n in enumerate(lengths):
            if n == 1:  # the end of a first-call episode: steps 1 and 2 of that chunk
                old = 0 if c == 0 else 3
                assert b.history_mask[row].tolist() == [True, True]
                assert torch.equal(b.history_frames[row, 0], a.frames[old + 1])
                assert torch.equal(b.history_frames[row, 1], a.frames[old + 2])
            else:  # a new episode
                assert b.history_mask[row : row + 2].tolist() == [[False, False], [False, True]]
                assert torch.equal(b.history_frames[row + 1, 1], b.frames[row])
            row += n
    finally:
        workers.stop()


def test_lookahead_outputs_survive_the_runner():
    """Lookahead widens prompts (imagined codes) and the generated columns; still exact."""
    workers = RolloutWorkers(
        num_envs_per_env_runner=2,
        rollout_fragment_length=2,
        env_kwargs=SMALL_WORLD,
        policy_factory=ending_policy,
        act_kwargs={**ACT, "lookahead": 1},
    )
    try:
        act = workers.sample().act
        policy = workers.local.module.policy
        assert act.imagined_frames.shape == (4, 1, 64, 64, 3) and act.prompt_codes.any()
        assert_evaluate_reproduces(policy, act)
    finally:
        workers.stop()


def test_env_error_truncates_the_episode_and_rebuilds_the_env():
    workers = RolloutWorkers(
        env_id="rig/Catch-v0",
        env_factory=functools.partial(failing_catch, fail_at=3),
        num_envs_per_env_runner=1,
        rollout_fragment_length=5,
        policy_factory=preset_policy("tiny"),
        act_kwargs=ACT,
    )
    try:
        batch = workers.sample()
        broken = [e for e in batch.episodes if "env_error" in e]
        assert len(broken) == 1 and broken[0]["length"] == 3 and broken[0]["truncated"]
        assert batch.truncated[2] and not batch.terminated[2]
        assert len(batch) == 5  # the runner went on with a rebuilt env
        sub_env = workers.local.env.unwrapped.envs[0].unwrapped
        assert sub_env.rebuilds == 1
    finally:
        workers.stop()


# -- Ray actors ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def remote_workers():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    workers = RolloutWorkers(
        num_env_runners=2,
        num_envs_per_env_runner=2,
        rollout_fragment_length=3,
        env_kwargs=SMALL_WORLD,
        act_kwargs=ACT,
    )
    yield workers
    workers.stop()
    ray.shutdown()


def test_remote_runners_sample_fragments(remote_workers):
    batch = remote_workers.sample()
    assert len(batch) == 2 * 2 * 3  # runners x envs x fragment length
    assert len(batch.last_frames) == 4 and np.bincount(batch.chunks).tolist() == [3] * 4
    assert batch.act.frames.dtype == torch.uint8 and (batch.versions == 0).all()


def _value_seven_state() -> dict[str, torch.Tensor]:
    """The factory's weights with a value head that answers 7.0 for everything."""
    state = RigPolicy.from_preset("tiny", envs.get_codec(envs.make()), seed=0).state_dict()
    state["value_head.out.weight"].zero_()
    state["value_head.out.bias"].fill_(7.0)
    return state


def test_sync_weights_reaches_every_runner(remote_workers):
    before = remote_workers.sample()
    assert not torch.allclose(before.act.values, torch.full((12,), 7.0))
    remote_workers.sync_weights(_value_seven_state(), version=1)
    batch = remote_workers.sample()
    assert len(batch) == 12 and (batch.versions == 1).all()
    torch.testing.assert_close(batch.act.values, torch.full((12,), 7.0))


def test_killed_runner_is_restarted_with_current_weights(remote_workers):
    pids = remote_workers.group.foreach_env_runner(lambda r: os.getpid(), local_env_runner=False)
    threading.Timer(0.5, os.kill, (pids[0], 9)).start()  # while it samples
    survivors = remote_workers.sample()
    assert len(survivors) in (6, 12)  # 6 when the kill landed mid-sample, as it should

    deadline = (
        time.monotonic() + 180
    )  # a restart rebuilds policy and envs: slow on a loaded machine
    while remote_workers.num_restarts == 0 and time.monotonic() < deadline:
        remote_workers.sample()
    assert remote_workers.num_restarts == 1
    batch = remote_workers.sample()
    assert len(batch) == 12 and (batch.versions == 1).all()  # the restarted one got version 1
    torch.testing.assert_close(batch.act.values, torch.full((12,), 7.0))
    new_pids = remote_workers.group.foreach_env_runner(
        lambda r: os.getpid(), local_env_runner=False
    )
    assert pids[0] not in new_pids


def test_restart_between_calls_is_noticed_by_process_id(remote_workers):
    """A runner that died and came back between two samples answers RLlib's next call as if
    nothing happened; its new process id gives it away, and it gets the current weights."""
    restarts = remote_workers.num_restarts
    pids = remote_workers.group.foreach_env_runner(lambda r: os.getpid(), local_env_runner=False)
    os.kill(pids[1], 9)
    wait_for_runner(remote_workers, 2, 180)  # runner index 2, until Ray has rebuilt it
    batch = remote_workers.sample()
    assert remote_workers.num_restarts == restarts + 1
    assert (batch.versions == 0).sum() == 6  # its fragment, sampled with the factory's weights
    batch = remote_workers.sample()
    assert (batch.versions == 1).all()
    torch.testing.assert_close(batch.act.values, torch.full((12,), 7.0))


def test_rllib_config_takes_the_restart_delay_and_the_preset_passes_it():
    """``rollout.restart_delay_s`` reaches RLlib (RLlib's own default, 60 s, is how long a
    failed runner sleeps before it exits, and so how long a dead inference actor went unseen)."""
    from actors.rollout import RolloutSettings, rllib_config
    from rig.config import load_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    config = rllib_config(RolloutSettings(env_id="rig/Catch-v0", restart_delay_s=2.5))
    assert config.delay_between_env_runner_restarts_s == 2.5
    assert config.restart_failed_env_runners
    assert load_config(str(configs / "defaults.yaml"), []).rollout.restart_delay_s == 5
    assert load_config(str(configs / "cluster.yaml"), []).rollout.restart_delay_s == 30
