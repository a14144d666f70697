"""ColorBandit: the smallest pixel task where the right action is visible in the frame.

Each step shows a frame filled with one of three colours, drawn at random; the action that
colour names (red -> left, green -> stay, blue -> right) gets +1, any other -1, and the next step
shows a new colour. An episode is ``length`` such steps. A policy that ignores the frame earns
-1/3 per step on average (``RANDOM_RETURN_PER_STEP``); one that reads it earns +1.

It is the learning smoke test of the RL loop (tests/test_learning.py): every bookkeeping error
between env step and weight update (a reward on the wrong row, a value of the wrong state, a
log-prob of the wrong token) keeps the return at the random level, while the frame signal is
so strong that the tiny policy's from-scratch vision reads it at once (a sparse frame such as
Catch's is harder: docs/benchmarks.md, "why Catch is hard for the tiny policy"). Like Catch it
is a plain Gymnasium env with ``get_action_meanings``, so it takes the generic adapter path.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

COLOURS = np.array([[230, 40, 40], [40, 200, 40], [40, 40, 230]], np.uint8)  # left, stay, right
RANDOM_RETURN_PER_STEP = -1.0 / 3.0


class ColorBanditEnv(gym.Env):
    """``length`` steps of ``side x side`` frames of one colour each; see the module doc."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 5}
    _MEANINGS = ("left", "stay", "right")

    def __init__(self, length: int = 8, side: int = 32, render_mode: str | None = None):
        if length < 1 or side < 1:
            raise ValueError(f"need length >= 1 and side >= 1; got {length}, {side}")
        self.length, self.side = length, side
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(0, 255, (side, side, 3), np.uint8)
        self.action_space = gym.spaces.Discrete(3)
        self._colour = 0
        self._t = 0

    def get_action_meanings(self) -> list[str]:
        return list(self._MEANINGS)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._t = 0
        self._colour = int(self.np_random.integers(3))
        return self._frame(), {}

    def step(self, action):
        if not self.action_space.contains(int(action)):
            raise ValueError(f"action {action} is outside Discrete(3)")
        reward = 1.0 if int(action) == self._colour else -1.0
        self._t += 1
        self._colour = int(self.np_random.integers(3))
        return self._frame(), reward, self._t >= self.length, False, {}

    def render(self):
        return self._frame() if self.render_mode == "rgb_array" else None

    def _frame(self) -> np.ndarray:
        return np.broadcast_to(COLOURS[self._colour], (self.side, self.side, 3)).copy()
