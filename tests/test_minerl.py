"""MineRL: the text codec, the fake MineRL 1.0 env, and the adapter's timeout/rebuild path.

Everything here but the ``minecraft``-marked test runs without Minecraft, on ``FakeMineRL``.
"""

from __future__ import annotations

import importlib.util
import time

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from hypothesis import given, settings
from hypothesis import strategies as st

from envs.errors import EnvFailedError, MissingDependencyError
from envs.fake_minerl import FakeMineRL
from envs.minerl import DEFAULT_KEY_COMBOS, MINERL_BUTTONS, MineRLCodec, MineRLEnv

MINERL_INSTALLED = importlib.util.find_spec("minerl") is not None
CODEC = MineRLCodec()

# MineRL 1.0's spaces as its docs list them (minerl.readthedocs.io/en/v1.0/environments/
# index.html), written out here rather than imported, so the test checks the fake against them.
DOCUMENTED_KEYS = [
    "ESC", "attack", "back", "drop", "forward", "hotbar.1", "hotbar.2", "hotbar.3", "hotbar.4",
    "hotbar.5", "hotbar.6", "hotbar.7", "hotbar.8", "hotbar.9", "inventory", "jump", "left",
    "pickItem", "right", "sneak", "sprint", "swapHands", "use",
]  # fmt: skip
DOCUMENTED_ACTION_SPACE = gym.spaces.Dict(
    {**{k: gym.spaces.Discrete(2) for k in DOCUMENTED_KEYS},
     "camera": gym.spaces.Box(-180.0, 180.0, (2,), np.float32)}
)  # fmt: skip
DOCUMENTED_OBSERVATION_SPACE = gym.spaces.Dict(
    {"pov": gym.spaces.Box(0, 255, (360, 640, 3), np.uint8)}
)


def fake_env(**kwargs) -> MineRLEnv:
    backend_kwargs = kwargs.pop("backend_kwargs", {})
    return MineRLEnv(backend="fake", backend_kwargs=backend_kwargs, **kwargs)


def index_of(text: str, codec: MineRLCodec = CODEC) -> int:
    index = codec.try_decode(text)
    assert index is not None, f"{text!r} should be in the vocabulary"
    return index


# -- spaces and the gymnasium contract -----------------------------------------------------------


def test_fake_spaces_equal_documented_minerl_spaces():
    fake = FakeMineRL()
    assert fake.action_space == DOCUMENTED_ACTION_SPACE
    assert fake.observation_space == DOCUMENTED_OBSERVATION_SPACE
    assert len(fake.action_space.spaces) == 24


# check_env can only try other render modes on envs made by gym.make; ours has one mode anyway.
@pytest.mark.filterwarnings("ignore:.*Not able to test alternative render modes")
def test_check_env_passes_on_fake_backend():
    env = fake_env(render_mode="rgb_array")
    check_env(env)
    assert env.render().shape == (360, 640, 3)
    env.close()
    env.close()  # closing twice is allowed


def test_observation_and_action_spaces():
    env = fake_env(size=48)
    assert env.observation_space == gym.spaces.Box(0, 255, (48, 48, 3), np.uint8)
    assert env.action_space == gym.spaces.Discrete(len(CODEC)) == gym.spaces.Discrete(700)
    obs, info = env.reset(seed=0)
    assert obs.shape == (48, 48, 3) and obs.dtype == np.uint8
    assert info["action_text"] is None and info["env_rebuilds"] == 0
    obs, reward, terminated, truncated, info = env.step(index_of("forward, sprint, camera:[0,10]"))
    assert info["action_text"] == "forward, sprint, camera:[0,10]"
    assert (reward, terminated, truncated) == (0.0, False, False)
    env.close()


def test_registered_fake_id_makes_our_env():
    import envs

    env = envs.make("rig/FakeMineRL-v0", size=32)
    obs, _ = env.reset(seed=1)
    assert obs.shape == (32, 32, 3)
    assert envs.get_codec(env).vocab == CODEC.vocab
    env.close()


# -- determinism and a world that answers --------------------------------------------------------


def rollout(env: MineRLEnv, seed: int, texts: list[str]) -> list[np.ndarray]:
    frames = [env.reset(seed=seed)[0]]
    frames += [env.step(index_of(t))[0] for t in texts]
    return frames


def test_same_seed_same_frames_other_seed_other_frames():
    texts = ["forward", "camera:[5,-10]", "forward, sprint, jump", "back, camera:[-10,5]"]
    env_a, env_b = fake_env(), fake_env()
    run_a, run_b = rollout(env_a, 7, texts), rollout(env_b, 7, texts)
    assert all(np.array_equal(a, b) for a, b in zip(run_a, run_b, strict=True))
    assert not np.array_equal(rollout(env_a, 8, texts)[0], run_a[0])
    # reset(seed) and the unseeded resets after it replay too
    env_a.reset(seed=3)
    first = env_a.reset()[0]
    env_b.reset(seed=3)
    assert np.array_equal(env_b.reset()[0], first)


def test_fake_frames_follow_camera_and_walking():
    fake = FakeMineRL()
    fake.seed(11)
    start = fake.reset()["pov"]
    turned = fake.step(CODEC.to_minerl(index_of("camera:[0,10]")))[0]["pov"]
    back = fake.step(CODEC.to_minerl(index_of("camera:[0,-10]")))[0]["pov"]
    assert np.array_equal(back, start)  # turning back restores the view exactly
    # a 10-degree turn right moves the picture left by 10 * 360 / 70 ~ 51 pixels
    shift = 51
    moved = np.abs(turned[:, :-shift].astype(int) - start[:, shift:]).mean()
    unmoved = np.abs(turned.astype(int) - start).mean()
    assert moved < 0.2 * unmoved
    lit = [fake.step(CODEC.to_minerl(index_of("forward")))[0]["pov"].mean() for _ in range(3)]
    assert start.mean() < lit[0] < lit[1] < lit[2]


def test_fake_rejects_wrong_action_dicts():
    fake = FakeMineRL()
    fake.reset()
    good = CODEC.to_minerl(CODEC.noop_index)
    assert good in fake.action_space
    bad_dicts = [
        {k: v for k, v in good.items() if k != "ESC"},  # missing key
        {**good, "chat": "hello"},  # unknown key
        {**good, "forward": np.array(2)},  # not Discrete(2)
        {**good, "camera": np.array([0.0, 200.0])},  # beyond ±180
        {**good, "camera": np.array([0.0])},  # wrong shape
    ]
    for bad in bad_dicts:
        with pytest.raises(ValueError):
            fake.step(bad)


# -- the codec -----------------------------------------------------------------------------------


def test_vocabulary_is_product_of_combos_and_camera_bins():
    assert len(CODEC) == len(DEFAULT_KEY_COMBOS) * 25 == 700
    assert CODEC.noop == "noop" and CODEC.vocab[CODEC.noop_index] == "noop"
    assert "forward, sprint, camera:[0,10]" in CODEC.vocab
    assert "forward, sprint, jump" in CODEC.vocab
    assert not any("camera:[0,0]" in t for t in CODEC.vocab)  # a zero camera is left out
    assert CODEC.canonical("forward, ") == "forward"  # stray separators are forgiven
    small = MineRLCodec(camera_max=0, key_combos=["noop", "forward"])
    assert small.vocab == ("noop", "forward")


def test_every_entry_round_trips_through_text_and_minerl_dicts():
    for index, text in enumerate(CODEC.vocab):
        assert CODEC.encode(CODEC.decode(text)) == text
        assert CODEC.from_minerl(CODEC.to_minerl(index)) == index
    assert CODEC.invalid_count == 0


def test_to_minerl_matches_minerl_noop_layout():
    action = CODEC.to_minerl(index_of("forward, jump, camera:[-5,10]"))
    assert tuple(action) == tuple(sorted(DOCUMENTED_KEYS + ["camera"]))
    assert action["forward"] == 1 and action["jump"] == 1 and action["attack"] == 0
    assert isinstance(action["attack"], np.ndarray) and action["attack"].shape == ()
    assert action["camera"].dtype == np.float32 and action["camera"].tolist() == [-5.0, 10.0]


_SPELLINGS = {
    "pickItem": ["pickItem", "pick_item", "pick item", "PICKITEM"],
    "swapHands": ["swapHands", "swap_hands", "Swap-Hands"],
    **{
        f"hotbar.{i}": [f"hotbar.{i}", f"hotbar {i}", f"Hotbar_{i}", f"HOTBAR{i}"]
        for i in range(1, 10)
    },
}


@st.composite
def respelled_entries(draw):
    """(canonical text, the same action respelled: key order, case, spacing, separators)."""
    index = draw(st.integers(0, len(CODEC) - 1))
    keys, (pitch, yaw) = CODEC.parts(index)
    words = [draw(st.sampled_from(_SPELLINGS.get(k, [k, k.upper(), k.capitalize()]))) for k in keys]
    words = draw(st.permutations(words))
    separator = draw(st.sampled_from([",", ", ", " , ", "+", " + ", ";"]))
    parts = list(words)
    if (pitch, yaw) != (0, 0) or draw(st.booleans()):
        camera = draw(st.sampled_from(
            ["camera:[{p},{y}]", "camera: [ {p} , {y} ]", "Camera=({p}.0,{y})", "CAMERA:[{p:+d},{y}]"]
        )).format(p=pitch, y=yaw)  # fmt: skip
        parts.insert(draw(st.integers(0, len(parts))), camera)
    if not keys and len(parts) <= 1 and (pitch, yaw) == (0, 0):
        parts = [draw(st.sampled_from(["noop", "NOOP", " No-Op ", "noop, camera:[0,0]"]))]
    text = separator.join(parts)
    return CODEC.vocab[index], draw(st.sampled_from(["", " ", "\t"])) + text


@settings(max_examples=300, deadline=None)
@given(respelled_entries())
def test_lenient_spellings_map_to_the_same_entry(pair):
    canonical, text = pair
    assert CODEC.canonical(text) == canonical


@pytest.mark.parametrize(
    "text",
    [
        "", "   ", "fly", "forward, fly", "forward sprint jump attack", "camera:[0,7]",
        "camera:[0,2.5]", "camera:[0,15]", "camera:[20,0]", "forward, camera:[0,5], camera:[5,0]",
        "camera:[0,10", "forward+back", "ESC", "noop, forward", "camera:[0,10], camera", "camera",
    ],
)  # fmt: skip
def test_invalid_text_decodes_to_noop_and_is_counted(text):
    codec = MineRLCodec()
    assert codec.canonical(text) is None
    assert codec.decode(text) == codec.noop_index
    assert codec.invalid_count == 1


def test_key_combos_are_validated():
    with pytest.raises(ValueError, match="noop"):
        MineRLCodec(key_combos=["forward"])
    with pytest.raises(ValueError, match="fly"):
        MineRLCodec(key_combos=["noop", "fly"])
    with pytest.raises(ValueError, match="repeats"):
        MineRLCodec(key_combos=["noop", "forward+jump", "jump, forward"])
    with pytest.raises(ValueError, match="multiple of 5"):
        MineRLCodec(camera_max=12)
    with_esc = MineRLCodec(key_combos=[*DEFAULT_KEY_COMBOS, "ESC"])
    assert with_esc.canonical("esc") == "ESC"


def test_from_minerl_reduces_keys_to_the_closest_combination():
    noop = CODEC.to_minerl(CODEC.noop_index)

    def nearest(**pressed) -> str:
        action = {**noop, **{k.replace("_", "."): np.array(1) for k in pressed}}
        return CODEC.encode(CODEC.from_minerl(action))

    assert nearest(forward=1, sprint=1, attack=1) == "forward, sprint"  # drops one key
    assert nearest(left=1, right=1) == "left"  # tie: the earlier combination
    assert nearest(forward=1, sprint=1, jump=1) == "forward, sprint, jump"
    assert nearest(swapHands=1) == "noop"  # not in the vocabulary: released
    assert nearest(hotbar_3=1) == "hotbar.3"
    # recorded dicts may miss keys and carry extra ones
    assert CODEC.encode(CODEC.from_minerl({"forward": 1, "chat": "hi"})) == "forward"


@settings(max_examples=200, deadline=None)
@given(
    pressed=st.sets(st.sampled_from(MINERL_BUTTONS)),
    camera=st.tuples(*[st.floats(-180, 180, allow_nan=False)] * 2),
)
def test_from_minerl_picks_nearest_bin_and_a_closest_combination(pressed, camera):
    action = {**{k: np.array(int(k in pressed)) for k in MINERL_BUTTONS}, "camera": camera}
    keys, (pitch, yaw) = CODEC.parts(CODEC.from_minerl(action))
    # camera: the nearest 5-degree bin, clamped to ±10 (a slow, obvious reference)
    for got, raw in zip((pitch, yaw), camera, strict=True):
        want = max(-10, min(10, 5 * round(raw / 5)))
        assert got == want or abs(abs(raw / 5 - round(raw / 5)) - 0.5) < 1e-9  # halves: either
    # keys: no allowed combination differs from the pressed set in fewer keys
    best = min(len(set(c) ^ pressed) for c in CODEC.combos)
    assert len(set(keys) ^ pressed) == best


# -- timeouts, crashes and rebuilds --------------------------------------------------------------


def test_hung_step_truncates_within_timeout_and_rebuilds():
    env = fake_env(step_timeout_s=0.3, backend_kwargs={"hang_at_step": 2, "hang_s": 3.0})
    obs, _ = env.reset(seed=0)
    obs, *_ = env.step(index_of("forward"))
    started = time.monotonic()
    after, reward, terminated, truncated, info = env.step(index_of("camera:[0,10]"))
    assert time.monotonic() - started < 1.0  # the timeout, not the 3 s hang
    assert (reward, terminated, truncated) == (0.0, False, True)
    assert np.array_equal(after, obs)  # the last good observation
    assert "step timed out after 0.3 s" in info["env_error"]
    assert info["env_rebuilds"] == 1 and info["action_text"] == "camera:[0,10]"
    with pytest.raises(RuntimeError, match="reset"):
        env.step(CODEC.noop_index)
    obs, info = env.reset()  # a fresh instance
    assert info["env_rebuilds"] == 1 and obs.shape == (64, 64, 3)
    assert env.step(index_of("forward"))[3] is False
    env.close()


def test_crashed_step_truncates_and_rebuilds():
    env = fake_env(backend_kwargs={"raise_at_step": 1})
    env.reset(seed=0)
    _, reward, terminated, truncated, info = env.step(index_of("attack"))
    assert (reward, terminated, truncated) == (0.0, False, True)
    assert "RuntimeError: fake crash in step #1" in info["env_error"]
    assert info["env_rebuilds"] == 1
    env.reset()
    # the new instance counts its own steps, so its step 1 crashes too: rebuild number 2
    assert env.step(index_of("attack"))[4]["env_rebuilds"] == 2


def test_minerl_socket_error_report_is_a_failure_not_a_termination():
    env = fake_env(backend_kwargs={"socket_error_at_step": 2})
    obs, _ = env.reset(seed=0)
    obs, *_ = env.step(CODEC.noop_index)
    after, _, terminated, truncated, info = env.step(CODEC.noop_index)
    assert (terminated, truncated) == (False, True)
    assert info["env_error"] == "minerl reported: Connection timed out!"
    assert np.array_equal(after, obs)  # not MineRL's random observation
    assert info["env_rebuilds"] == 1


def test_hung_close_does_not_block():
    env = fake_env(step_timeout_s=0.3, backend_kwargs={"raise_at_step": 1, "hang_on_close_s": 5.0})
    env.reset(seed=0)
    started = time.monotonic()
    assert env.step(CODEC.noop_index)[3] is True  # the broken instance's close hangs: not waited
    assert time.monotonic() - started < 0.5
    env.reset()
    env.close()  # the healthy instance's close hangs too: waited for step_timeout_s only
    assert time.monotonic() - started < 1.2


def test_failed_reset_is_retried_on_a_fresh_instance():
    env = fake_env(backend_kwargs={"raise_at_reset": 2})
    assert env.reset(seed=0)[1]["env_rebuilds"] == 0
    obs, info = env.reset()  # the instance's 2nd reset crashes; a new one takes over
    assert info["env_rebuilds"] == 1 and obs.shape == (64, 64, 3)


def test_reset_gives_up_after_repeated_failures():
    env = fake_env(backend_kwargs={"raise_at_reset": 1})
    with pytest.raises(EnvFailedError, match="3 fresh instances failed"):
        env.reset(seed=0)


def test_episode_ends_by_time_limit_or_by_the_game():
    env = fake_env(max_episode_steps=3)
    env.reset(seed=0)
    flags = [env.step(CODEC.noop_index)[2:4] for _ in range(3)]
    assert flags == [(False, False), (False, False), (False, True)]
    env = fake_env(key_combos=[*DEFAULT_KEY_COMBOS, "ESC"])
    env.reset(seed=0)
    _, _, terminated, truncated, info = env.step(env.codec.decode("ESC"))  # BASALT: ESC ends it
    assert (terminated, truncated) == (True, False) and "env_error" not in info
    env = fake_env(backend_kwargs={"max_episode_steps": 2})  # the game's own limit
    env.reset(seed=0)
    assert env.step(CODEC.noop_index)[2] is False and env.step(CODEC.noop_index)[2] is True


def test_reward_passes_through():
    env = fake_env(backend_kwargs={"forward_reward": 0.5})
    env.reset(seed=0)
    assert env.step(index_of("forward"))[1] == 0.5
    assert env.step(index_of("back"))[1] == 0.0


# -- the real backend ----------------------------------------------------------------------------


@pytest.mark.skipif(MINERL_INSTALLED, reason="minerl is installed, so it cannot be missing")
def test_minerl_backend_without_minerl_says_how_to_install():
    with pytest.raises(MissingDependencyError) as caught:
        MineRLEnv(backend="minerl")
    message = str(caught.value)
    assert 'pip install -e ".[minerl]"' in message
    assert "JDK 8" in message and "docs/minecraft.md" in message


@pytest.mark.minecraft
@pytest.mark.skipif(
    not MINERL_INSTALLED, reason="needs MineRL 1.0 + JDK 8 (pip install -e '.[minerl]')"
)
def test_real_minecraft_runs_a_few_steps():
    env = MineRLEnv(backend="minerl", size=64, step_timeout_s=120.0)
    try:
        obs, info = env.reset(seed=0)
        assert obs.shape == (64, 64, 3) and obs.dtype == np.uint8
        for text in ["forward", "forward, jump", "camera:[0,10]", "attack"]:
            obs, reward, terminated, truncated, info = env.step(index_of(text))
            assert "env_error" not in info, info
            assert obs in env.observation_space and info["action_text"] == text
    finally:
        env.close()
