"""``FakeMineRL``: MineRL 1.0's spaces and old gym API without Minecraft, for tests and debugging.

What is the same as MineRL 1.0 (BASALT envs; sources cited in ``envs.minerl``, "MineRL 1.0
facts"): the action space (23 ``Discrete(2)`` keys + ``camera`` ``Box(-180, 180, (2,),
float32)``), the observation space (``pov`` ``Box(0, 255, (360, 640, 3), uint8)``), the old API
(``seed(s)`` then ``reset() -> obs``; ``step(action) -> obs, reward, done, info``), ``ESC``
ending the episode and a step limit (BASALT's DoneOnESCWrapper and BasaltTimeoutWrapper), an
empty ``info`` (BASALT has no monitors), and ``RuntimeError`` when stepped after ``done``.
Stricter than MineRL: an action dict must have exactly the 24 keys with valid values (MineRL
skips missing keys), so that a wrong dict from our adapter fails loudly here.

The world is a seeded panorama (sky, a hilly horizon, coloured blocks) seen through a 70-degree
window: the camera action turns the view (positive pitch looks down, as in Minecraft; pitch is
clamped to ±90), and walking forward brightens the frame (back darkens it), so a test can see
that actions arrive. The same seed gives the same frames.

Failure hooks make one instance hang, crash, or report MineRL's socket error, so the adapter's
timeout-and-rebuild path is tested; every count restarts with each new instance.
"""

from __future__ import annotations

import time
from typing import Any

import gymnasium as gym
import numpy as np

from envs.minerl import CAMERA_LIMIT_DEG, MINERL_BUTTONS, POV_SHAPE

FOV_DEG = 70.0
"""Vertical field of view, MineRL 1.0's default ``fov_range=[70, 70]``."""

_PX_PER_DEG = POV_SHAPE[0] / FOV_DEG  # view pixels per degree (same on both axes)
_PAN_PX_PER_DEG = 2  # panorama resolution; the view samples it nearest-neighbour
_PAN_TOP_DEG = 130  # the panorama covers elevations ±130: pitch ±90 plus half the view


def minerl_action_space() -> gym.spaces.Dict:
    """MineRL 1.0's action space, in Gymnasium spaces."""
    keys = {k: gym.spaces.Discrete(2) for k in MINERL_BUTTONS}
    camera = gym.spaces.Box(-CAMERA_LIMIT_DEG, CAMERA_LIMIT_DEG, (2,), np.float32)
    return gym.spaces.Dict({**keys, "camera": camera})


def minerl_observation_space() -> gym.spaces.Dict:
    """MineRL 1.0 BASALT's observation space (only ``pov``), in Gymnasium spaces."""
    return gym.spaces.Dict({"pov": gym.spaces.Box(0, 255, POV_SHAPE, np.uint8)})


class FakeMineRL:
    """A fake MineRL 1.0 env with the real spaces and old gym API (see module docstring).

    Args:
        max_episode_steps: ``done`` after this many steps (FindCave's limit is 3600).
        forward_reward: reward for each step with ``forward`` pressed (BASALT has none: 0).
        hang_at_step: the n-th ``step`` call (1-based) sleeps ``hang_s`` seconds first.
        hang_s: how long a hang lasts.
        raise_at_step: the n-th ``step`` call raises ``RuntimeError`` (a game crash).
        socket_error_at_step: the n-th ``step`` call answers as MineRL does when its socket
            times out: a random observation, reward 0, ``done=True``, ``info["error"]``.
        raise_at_reset: the n-th ``reset`` call raises ``RuntimeError``.
        hang_on_close_s: ``close`` sleeps this long (a game that will not die).
    """

    def __init__(
        self,
        max_episode_steps: int = 3600,
        forward_reward: float = 0.0,
        hang_at_step: int | None = None,
        hang_s: float = 5.0,
        raise_at_step: int | None = None,
        socket_error_at_step: int | None = None,
        raise_at_reset: int | None = None,
        hang_on_close_s: float = 0.0,
    ):
        self.action_space = minerl_action_space()
        self.observation_space = minerl_observation_space()
        self.max_episode_steps = int(max_episode_steps)
        self.forward_reward = float(forward_reward)
        self.hang_at_step, self.hang_s = hang_at_step, float(hang_s)
        self.raise_at_step, self.socket_error_at_step = raise_at_step, socket_error_at_step
        self.raise_at_reset, self.hang_on_close_s = raise_at_reset, float(hang_on_close_s)
        self.step_calls = 0
        self.reset_calls = 0
        self.closed = False
        self._seed: int | None = None
        self._done = True  # step() needs a reset() first
        self._panorama: np.ndarray | None = None  # the world, built by reset()
        self._pitch = self._yaw = 0.0  # degrees; pitch > 0 looks down
        self._distance = self._steps = 0  # forward minus back (sprint counts double); steps

    # -- MineRL's old gym API --------------------------------------------------------------------

    def seed(self, seed: int | None = None) -> None:
        """Set the world seed used by the next ``reset`` (None: a random world, like MineRL)."""
        if seed is not None and not isinstance(seed, (int, np.integer)):
            raise TypeError(f"Seed must be an int! got {seed!r}")
        self._seed = None if seed is None else int(seed)

    def reset(self) -> dict[str, np.ndarray]:
        self._check_open()
        self.reset_calls += 1
        if self.reset_calls == self.raise_at_reset:
            raise RuntimeError(f"fake crash in reset #{self.reset_calls}")
        seed = self._seed
        if seed is None:  # never seeded: a random world, as in MineRL
            seed = int(np.random.default_rng().integers(2**31))
        rng = np.random.default_rng(seed)
        self._panorama = _panorama(rng)
        self._pitch, self._yaw = 0.0, float(rng.integers(0, 360))
        self._distance, self._steps, self._done = 0, 0, False
        return {"pov": self._frame()}

    def step(self, action: dict[str, Any]):
        self._check_open()
        self.step_calls += 1
        if self.step_calls == self.hang_at_step:
            time.sleep(self.hang_s)
        if self.step_calls == self.raise_at_step:
            raise RuntimeError(f"fake crash in step #{self.step_calls}")
        if self._done:
            raise RuntimeError("Attempted to step an environment server with done=True")
        self._check_action(action)
        if self.step_calls == self.socket_error_at_step:
            self._done = True
            return self.observation_space.sample(), 0.0, True, {"error": "Connection timed out!"}
        pressed = {k for k in MINERL_BUTTONS if int(np.asarray(action[k])) == 1}
        self._move(pressed, np.asarray(action["camera"], dtype=np.float64))
        self._steps += 1
        self._done = "ESC" in pressed or self._steps >= self.max_episode_steps
        reward = self.forward_reward if "forward" in pressed else 0.0
        return {"pov": self._frame()}, reward, self._done, {}

    def close(self) -> None:
        time.sleep(self.hang_on_close_s)
        self.closed = True

    # -- the fake world --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this FakeMineRL instance is closed")

    def _check_action(self, action: Any) -> None:
        """Raise ValueError naming the first thing wrong with ``action``."""
        if not isinstance(action, dict):
            raise ValueError(f"a MineRL action is a dict, got {type(action).__name__}")
        expected = set(self.action_space.spaces)
        if set(action) != expected:
            missing, unknown = sorted(expected - set(action)), sorted(set(action) - expected)
            raise ValueError(f"bad action keys: missing {missing}, unknown {unknown}")
        for key in MINERL_BUTTONS:
            if not self.action_space[key].contains(action[key]):
                raise ValueError(f"action[{key!r}] = {action[key]!r} is not in Discrete(2)")
        camera = np.asarray(action["camera"])
        if camera.shape != (2,) or not np.issubdtype(camera.dtype, np.number):
            raise ValueError(f"action['camera'] must be 2 numbers, got {action['camera']!r}")
        if not np.all(np.isfinite(camera)) or np.any(np.abs(camera) > CAMERA_LIMIT_DEG):
            raise ValueError(f"action['camera'] = {camera} is outside [-180, 180]")

    def _move(self, pressed: set[str], camera: np.ndarray) -> None:
        self._pitch = float(np.clip(self._pitch + camera[0], -90.0, 90.0))
        self._yaw = (self._yaw + camera[1]) % 360.0
        speed = 2 if "sprint" in pressed else 1
        self._distance += speed * (("forward" in pressed) - ("back" in pressed))

    def _frame(self) -> np.ndarray:
        """The 360x640 view of the panorama at the current pitch/yaw, lit by distance walked."""
        height, width, _ = POV_SHAPE
        elevation = -self._pitch + (height / 2 - 0.5 - np.arange(height)) / _PX_PER_DEG
        yaw = self._yaw + (np.arange(width) - width / 2 + 0.5) / _PX_PER_DEG
        rows = np.clip(np.round((_PAN_TOP_DEG - elevation) * _PAN_PX_PER_DEG), 0, None).astype(int)
        rows = np.minimum(rows, self._panorama.shape[0] - 1)
        cols = np.floor(yaw * _PAN_PX_PER_DEG).astype(int) % self._panorama.shape[1]
        view = self._panorama[rows[:, None], cols[None, :]].astype(np.int16)
        light = int(np.clip(4 * self._distance, -80, 120))
        return np.clip(view + light, 0, 255).astype(np.uint8)


def _panorama(rng: np.random.Generator) -> np.ndarray:
    """A seeded 360-degree world texture, rows from elevation +130 (top) to -130 degrees."""
    rows, cols = 2 * _PAN_TOP_DEG * _PAN_PX_PER_DEG, 360 * _PAN_PX_PER_DEG
    elevation = _PAN_TOP_DEG - (np.arange(rows) + 0.5) / _PAN_PX_PER_DEG  # (rows,)
    yaw = np.radians(np.arange(cols) / _PAN_PX_PER_DEG)  # (cols,)
    waves = rng.uniform(0, 2 * np.pi, size=3)
    horizon = sum(
        a * np.sin(k * yaw + p) for a, k, p in zip((6, 3, 1.5), (1, 3, 7), waves, strict=True)
    )
    ground = elevation[:, None] < horizon[None, :]  # (rows, cols) hills below the horizon line
    sky_tint = rng.uniform(0.8, 1.0)
    blue = np.full_like(elevation, 230 * sky_tint)
    sky = np.stack([90 + elevation / 2, 140 + elevation / 3, blue], axis=-1)  # (rows, 3)
    dirt = np.array(rng.integers(60, 140, size=3), dtype=np.float64)
    checks = (np.add.outer(np.arange(rows) // 8, np.arange(cols) // 8) % 2) * 20.0  # 4-degree tiles
    image = np.where(ground[..., None], dirt + checks[..., None], np.clip(sky, 0, 255)[:, None, :])
    for _ in range(40):  # blocks: trees, rocks, caves; wrap around in yaw
        top, left = rng.integers(0, rows - 40), rng.integers(0, cols)
        h, w = rng.integers(6, 40, size=2)
        image[top : top + h, (left + np.arange(w)) % cols] = rng.integers(0, 256, size=3)
    return image.astype(np.uint8)
