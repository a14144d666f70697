"""Envs: the Gymnasium contract, seeds, termination vs truncation, the generic adapter, vectors."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.crafter_env import ACHIEVEMENTS
from envs.pixel import PixelAdapter
from envs.vector import EpisodeTracker, make_vector, play_episodes, unbatch_info


def _rollout(env, seed, steps, action_seed=0):
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(action_seed)
    frames, rewards = [obs], []
    for _ in range(steps):
        obs, reward, terminated, truncated, _ = env.step(int(rng.integers(env.action_space.n)))
        frames.append(obs)
        rewards.append(reward)
        if terminated or truncated:
            break
    return np.stack(frames), np.array(rewards)


@pytest.mark.parametrize(
    ("env_id", "kwargs"),
    [("rig/Crafter-v0", {"length": 50}), ("rig/Catch-v0", {}), ("rig/FakeMineRL-v0", {})],
)
def test_check_env(env_id, kwargs):
    env = envs.make(env_id, size=32, **kwargs)
    check_env(env.unwrapped if env_id != "rig/Catch-v0" else env, skip_render_check=True)
    assert env.observation_space == gym.spaces.Box(0, 255, (32, 32, 3), np.uint8)
    assert isinstance(env.action_space, gym.spaces.Discrete)
    assert env.action_space.n == len(envs.get_codec(env))
    env.close()


def test_crafter_seed_determinism():
    a, b = envs.make("rig/Crafter-v0", length=60), envs.make("rig/Crafter-v0", length=60)
    frames_a, rewards_a = _rollout(a, seed=7, steps=60)
    frames_b, rewards_b = _rollout(b, seed=7, steps=60)
    np.testing.assert_array_equal(frames_a, frames_b)
    np.testing.assert_array_equal(rewards_a, rewards_b)
    other, _ = _rollout(a, seed=8, steps=0)
    assert not np.array_equal(other[0], frames_a[0]), "a different seed should give another world"


def test_crafter_episodes_after_a_seed_repeat():
    env = envs.make("rig/Crafter-v0", length=5)
    first = [env.reset(seed=3)[0], env.reset()[0]]
    second = [env.reset(seed=3)[0], env.reset()[0]]
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[0], first[1])


def test_crafter_time_limit_truncates():
    env = envs.make("rig/Crafter-v0", length=3)
    env.reset(seed=0)
    flags = [env.step(0)[2:4] for _ in range(3)]
    assert flags == [(False, False), (False, False), (False, True)]


def test_crafter_death_terminates():
    env = envs.make("rig/Crafter-v0", length=100)
    env.reset(seed=0)
    env.unwrapped._env._player.health = 0  # as if a zombie had just hit
    _, _, terminated, truncated, info = env.step(0)
    assert terminated and not truncated
    assert info["discount"] == 0.0


def test_crafter_info_and_size():
    env = envs.make("rig/Crafter-v0", size=96, length=10)
    obs, info = env.reset(seed=0)
    assert obs.shape == (96, 96, 3) and obs.dtype == np.uint8
    assert set(info["achievements"]) == set(ACHIEVEMENTS)
    assert info["inventory"]["health"] == 9
    assert info["semantic"].shape == (64, 64)
    assert tuple(info["player_pos"]) == (32, 32)
    _, _, _, _, info = env.step(envs.get_codec(env).decode("move_left"))
    assert info["action_text"] == "move_left"
    assert info["facing"] == (-1, 0)


def test_crafter_rejects_bad_arguments():
    with pytest.raises(ValueError, match="size must be at least 9"):
        envs.make("rig/Crafter-v0", size=4)
    with pytest.raises(ValueError, match="length"):
        envs.make("rig/Crafter-v0", length=0)


def test_catch_through_the_generic_adapter():
    env = envs.make("rig/Catch-v0", size=16)
    assert isinstance(env, PixelAdapter)
    codec = envs.get_codec(env)
    assert codec.vocab == ("left", "stay", "right") and codec.noop == "stay"
    frames_a, rewards_a = _rollout(env, seed=1, steps=20)
    frames_b, rewards_b = _rollout(env, seed=1, steps=20)
    np.testing.assert_array_equal(frames_a, frames_b)
    assert len(rewards_a) == 7 and rewards_a[-1] in (-1.0, 1.0)  # 8 rows: the ball lands at step 7


def test_catch_random_policy_values_match_monte_carlo():
    from envs.catch import CatchEnv, random_policy_values

    values = random_policy_values(gamma=0.9)
    assert values.shape == (7, 8, 8)
    # one step left: caught by the moves that end under the ball (1 of 3; 2 of 3 at a wall)
    k = [[sum(min(max(p + a, 0), 7) == b for a in (-1, 0, 1)) for p in range(8)] for b in range(8)]
    np.testing.assert_allclose(values[6], 2 * np.array(k) / 3 - 1)
    env, rng = CatchEnv(), np.random.default_rng(0)
    for ball, paddle in ((0, 4), (3, 3)):  # the real env from a reset state, random actions
        returns = []
        for _ in range(3000):
            env.reset(seed=int(rng.integers(1 << 30)))
            env._ball[1], env._paddle = ball, paddle
            t, done = 0, False
            while not done:
                _, reward, done, _, _ = env.step(int(rng.integers(3)))
                t += 1
            returns.append(0.9 ** (t - 1) * reward)
        assert abs(np.mean(returns) - values[0, ball, paddle]) < 0.04  # 3 std errors


def test_generic_adapter_renders_state_envs():
    pytest.importorskip("pygame", reason="CartPole's renderer needs pygame")
    env = envs.make("CartPole-v1", size=32, render_mode="rgb_array")
    obs, _ = env.reset(seed=0)
    assert obs.shape == (32, 32, 3) and obs.max() > 0
    assert envs.get_codec(env).vocab == ("action_0", "action_1")


def test_generic_adapter_rejects_unsuitable_envs():
    with pytest.raises(ValueError, match="Discrete actions"):
        PixelAdapter(gym.make("Pendulum-v1"))
    with pytest.raises(ValueError, match="render_mode='rgb_array'"):
        PixelAdapter(gym.make("CartPole-v1"))


class _GridWorld(gym.Env):
    """MiniGrid's observation layout: a Dict whose ``image`` is a (7, 7, 3) uint8 grid of object,
    colour and state codes (0-10), declared as Box(0, 255); render() draws it as RGB."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, render_mode=None, rgb_image=False):
        self.render_mode, self.rgb_image = render_mode, rgb_image
        self.observation_space = gym.spaces.Dict({
            "image": gym.spaces.Box(0, 255, (7, 7, 3), np.uint8),
            "direction": gym.spaces.Discrete(4),
        })  # fmt: skip
        self.action_space = gym.spaces.Discrete(3)

    def _grid(self):
        grid = np.full((7, 7, 3), (1, 0, 0), np.uint8)  # empty floor
        grid[0, :], grid[-1, :], grid[:, 0], grid[:, -1] = (2, 5, 0), (2, 5, 0), (2, 5, 0), (2, 5, 0)
        grid[3, 3] = (10, 0, 0)  # the agent
        return grid * 20 if self.rgb_image else grid

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return {"image": self._grid(), "direction": 0}, {}

    def step(self, action):
        return {"image": self._grid(), "direction": 0}, 0.0, False, False, {}

    def render(self):
        return np.kron(self._grid() * 25, np.ones((8, 8, 1), np.uint8))  # 56 x 56 RGB


@pytest.fixture
def fresh_announcements(monkeypatch):
    import envs.pixel

    monkeypatch.setattr(envs.pixel, "_ANNOUNCED", set(), raising=False)


def test_generic_adapter_renders_a_symbolic_grid_observation(caplog, fresh_announcements):
    env = PixelAdapter(_GridWorld(render_mode="rgb_array"), size=28)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (28, 28, 3) and obs.max() == 250  # the rendered frame, not codes 0-10
    np.testing.assert_array_equal(obs, env.step(0)[0])
    (said,) = [r.getMessage() for r in caplog.records if r.name == "envs.pixel"]
    assert "grid of symbolic codes ((7, 7, 3) values 0..10" in said
    assert "using render() RGB frames" in said
    caplog.clear()
    PixelAdapter(_GridWorld(render_mode="rgb_array")).reset(seed=1)
    assert not [r for r in caplog.records if r.name == "envs.pixel"]  # said once


def test_generic_adapter_refuses_a_symbolic_grid_it_cannot_render(fresh_announcements):
    with pytest.raises(ValueError, match="grid of symbolic codes.*render_mode=rgb_array"):
        PixelAdapter(_GridWorld())
    with pytest.raises(ValueError, match="grid of symbolic codes"):  # the same grid as a Box
        PixelAdapter(_BoxOnly(_GridWorld())).reset(seed=0)


def test_generic_adapter_keeps_an_rgb_image_entry(caplog, fresh_announcements):
    env = PixelAdapter(_GridWorld(render_mode="rgb_array", rgb_image=True), size=7)
    obs, _ = env.reset(seed=0)
    assert obs.max() == 200  # the entry itself (codes x 20), not render()'s x 25
    assert "using observation['image'] as RGB frames" in caplog.text


class _BoxOnly(gym.ObservationWrapper):
    def __init__(self, env):
        super().__init__(env)
        self.observation_space = env.observation_space["image"]

    def observation(self, obs):
        return obs["image"]


def test_unknown_env_id_suggests_ours():
    with pytest.raises(ValueError, match="did you mean 'rig/Crafter-v0'"):
        envs.make("Crafter-v0")
    with pytest.raises(ValueError, match="cannot import module"):
        envs.check_env_id("not_a_module_xyz:Foo-v0")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_vector_autoreset_same_step(mode):
    venv = make_vector("rig/Catch-v0", num_envs=3, size=16, vectorization=mode)
    tracker = EpisodeTracker(3)
    obs, _ = venv.reset(seed=0)
    for _ in range(6):
        obs, rewards, terminated, truncated, infos = venv.step(np.ones(3, np.int64))
        assert not tracker.step(rewards, terminated, truncated, infos)
    obs, rewards, terminated, truncated, infos = venv.step(np.ones(3, np.int64))
    ended = tracker.step(rewards, terminated, truncated, infos)
    # Catch with 8 rows lasts 7 steps: all three ended at the 7th step, in that same call...
    assert terminated.all() and len(ended) == 3
    assert all(e["length"] == 7 and e["return"] in (-1.0, 1.0) for e in ended)
    # ...and were reset in it: obs is the next episode's first frame (ball on the top row),
    # the final frame (ball on the bottom row) is in final_obs.
    assert obs[:, :2].max() > 0
    assert infos["final_obs"][0][-4:].max() > 0
    venv.close()


def test_play_episodes_stops_at_episodes_or_steps_and_reports_every_step():
    """The one play loop of rig envs play, rig eval and the peer's evaluation: Catch (8 rows)
    ends every episode at step 7, so 3 envs finish 3 episodes per 7 steps."""
    venv = make_vector("rig/Catch-v0", num_envs=3, size=16)
    seen, first = [], []
    stay = lambda obs, infos: np.ones(len(obs), np.int64)  # noqa: E731

    def on_step(step):
        seen.append((step.steps, step.finished, len(step.ended), bool(step.terminated.all())))
        assert step.new_obs.shape == step.obs.shape and step.actions.tolist() == [1, 1, 1]

    played = play_episodes(venv, stay, seed=0, episodes=4, on_reset=lambda o, i: first.append(o),
                           on_step=on_step)  # fmt: skip
    # the 4th episode ends at step 14 with the 5th and 6th: the first 4 to end are kept
    assert played.steps == 14 and len(played.finished) == 4 and not played.unfinished
    assert [e["env"] for e in played.finished] == [0, 1, 2, 0]
    assert [s for s, *_ in seen] == list(range(1, 15)) and len(first) == 1
    assert seen[6] == (7, 3, 3, True) and seen[13] == (14, 6, 3, True)
    assert not played.crafter_like
    # max_steps first: the running episodes come back as unfinished, as far as they got
    played = play_episodes(venv, stay, seed=0, episodes=100, max_steps=3)
    assert played.steps == 3 and not played.finished
    assert [e["length"] for e in played.unfinished] == [3, 3, 3]
    assert all(e["unfinished"] for e in played.unfinished)
    with pytest.raises(ValueError, match="never stops"):
        play_episodes(venv, stay, seed=0)
    venv.close()


def test_vector_tracks_crafter_achievements():
    venv = make_vector("rig/Crafter-v0", num_envs=2, length=20)
    tracker = EpisodeTracker(2)
    venv.reset(seed=0)
    for _ in range(20):
        _, rewards, terminated, truncated, infos = venv.step(np.zeros(2, np.int64))
        tracker.step(rewards, terminated, truncated, infos)
    assert len(tracker.finished) == 2
    assert all(e["truncated"] and e["length"] == 20 and "unlocked" in e for e in tracker.finished)
    info0 = unbatch_info(infos, 0)
    assert info0["semantic"].shape == (64, 64)
    venv.close()
