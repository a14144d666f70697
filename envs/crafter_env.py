"""Crafter as a Gymnasium 1.x env (the embedded default game).

``crafter`` speaks the old gym API (``reset() -> obs``, ``step -> obs, reward, done, info``) and
folds death and the time limit into one ``done``. RL needs them apart: death is ``terminated``
(no bootstrap), the time limit is ``truncated`` (bootstrap from the value of the last state), so
this wrapper keeps its own step counter instead of crafter's ``length``.

Seeding: ``reset(seed=s)`` rebuilds crafter's seed so that episode k after that reset is the same
world every time; crafter derives each episode's world from ``hash((seed, episode))``, which is
stable across processes for integers. Crafter itself is not deterministic: it keeps the creatures
of each chunk in a ``set`` ordered by object id (memory address), and picks which creature to
despawn by position in that order. ``_DeterministicWorld`` hands them out in insertion order.

``info`` (on reset and step): ``inventory``, ``achievements`` (counts this episode),
``semantic`` (the whole world's material/object id map, ``semantic[x, y]``), ``player_pos``,
``facing``, ``sleeping``, ``discount`` (0.0 on death), ``action_text``.
"""

from __future__ import annotations

import functools
from typing import Any

import gymnasium as gym
import numpy as np

from envs.codecs import ActionCodec

ACHIEVEMENTS = (
    "collect_coal", "collect_diamond", "collect_drink", "collect_iron", "collect_sapling",
    "collect_stone", "collect_wood", "defeat_skeleton", "defeat_zombie", "eat_cow", "eat_plant",
    "make_iron_pickaxe", "make_iron_sword", "make_stone_pickaxe", "make_stone_sword",
    "make_wood_pickaxe", "make_wood_sword", "place_furnace", "place_plant", "place_stone",
    "place_table", "wake_up",
)  # fmt: skip
"""Crafter's 22 achievements, in crafter's own (alphabetical) order."""

ACTIONS = (
    "noop", "move_left", "move_right", "move_up", "move_down", "do", "sleep", "place_stone",
    "place_table", "place_furnace", "place_plant", "make_wood_pickaxe", "make_stone_pickaxe",
    "make_iron_pickaxe", "make_wood_sword", "make_stone_sword", "make_iron_sword",
)  # fmt: skip
"""Crafter's 17 actions; the index is crafter's action id."""


@functools.cache
def _deterministic_world_class():
    from crafter import engine

    class _DeterministicWorld(engine.World):
        @property
        def chunks(self):
            # Same content as crafter's, but each chunk's objects in the order they were added
            # (their index in the object table) instead of set order, which varies by run.
            return {
                key: sorted(objs, key=lambda obj: int(self._obj_map[tuple(obj.pos)]))
                for key, objs in self._chunks.items()
            }

    return _DeterministicWorld


def crafter_codec() -> ActionCodec:
    """Crafter's action names as the vocabulary; the fallback is ``noop``."""
    return ActionCodec(ACTIONS, noop="noop")


class CrafterEnv(gym.Env):
    """Crafter with separate termination and truncation, seeded resets and a rich ``info``.

    Args:
        size: observation height and width in pixels (64 as in the Crafter paper; larger
            renders for policies with larger image encoders, e.g. 384 for Janus).
        area: world size in cells.
        view: cells shown (width, height); the bottom rows of the view show the inventory.
        length: time limit in steps; reaching it truncates the episode (None: no limit).
        reward: if False, the reward is always 0 (``info["reward"]`` still has crafter's).
        render_mode: ``"rgb_array"`` makes ``render()`` return the current frame.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self,
        size: int = 64,
        area: tuple[int, int] = (64, 64),
        view: tuple[int, int] = (9, 9),
        length: int | None = 10000,
        reward: bool = True,
        render_mode: str | None = None,
    ):
        import crafter  # heavy-ish import (textures, opensimplex): only when an env is built

        if int(size) < 9:
            raise ValueError(f"size must be at least 9 pixels, got {size}")
        if length is not None and int(length) < 1:
            raise ValueError(f"length must be >= 1 or None, got {length}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.size = int(size)
        self.length = None if length is None else int(length)
        self.render_mode = render_mode
        self.codec = crafter_codec()
        # seed=0 here only fixes construction; every reset sets the real seed.
        self._env = crafter.Env(
            area=tuple(area), view=tuple(view), size=(self.size, self.size),
            reward=reward, length=None, seed=0,
        )  # fmt: skip
        self._env._world.__class__ = _deterministic_world_class()
        self.observation_space = gym.spaces.Box(0, 255, (self.size, self.size, 3), np.uint8)
        self.action_space = gym.spaces.Discrete(len(ACTIONS))
        self._steps = 0
        self._obs: np.ndarray | None = None
        self._seeded = False

    # -- gymnasium API ---------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if seed is not None or not self._seeded:
            # Draw crafter's world seed from gymnasium's RNG so that an unseeded first reset is
            # still random, and a seeded one is reproducible episode after episode.
            self._env._seed = int(self.np_random.integers(0, 2**31 - 1))
            self._env._episode = 0
            self._seeded = True
        self._steps = 0
        self._obs = self._env.reset()
        info = self._info(reward=0.0, discount=1.0)
        info["action_text"] = None
        return self._obs, info

    def step(self, action):
        if self._obs is None:
            raise RuntimeError("call reset() before step()")
        action = int(action)
        if not self.action_space.contains(action):
            raise ValueError(f"action {action} is outside Discrete({self.action_space.n})")
        obs, reward, _done, crafter_info = self._env.step(action)
        self._steps += 1
        self._obs = obs
        terminated = crafter_info["discount"] == 0.0  # health reached 0
        truncated = not terminated and self.length is not None and self._steps >= self.length
        info = self._info(reward=crafter_info["reward"], discount=crafter_info["discount"])
        info["action_text"] = ACTIONS[action]
        return obs, float(reward), bool(terminated), bool(truncated), info

    def render(self):
        if self.render_mode == "rgb_array":
            return None if self._obs is None else self._obs.copy()
        return None

    # -- helpers ---------------------------------------------------------------------------------

    def _info(self, reward: float, discount: float) -> dict[str, Any]:
        player = self._env._player
        return {
            "inventory": dict(player.inventory),
            "achievements": dict(player.achievements),
            "semantic": self._env._sem_view(),
            "player_pos": np.array(player.pos, dtype=np.int64),
            "facing": tuple(int(v) for v in player.facing),
            "sleeping": bool(player.sleeping),
            "discount": float(discount),
            "reward": float(reward),
        }
