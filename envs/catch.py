"""Catch: a tiny pixel game (bsuite's classic) that any RL loop should solve in seconds.

A ball falls from a random column of the top row; the paddle on the bottom row moves left, stays
or moves right; +1 if the paddle is under the ball when it lands, -1 otherwise; the episode then
terminates. It is deliberately a *plain* Gymnasium env with no codec of its own, so that it goes
through the same generic adapter as any third-party pixel env (``envs.pixel.PixelAdapter``), and
it names its actions with ``get_action_meanings()`` the way Atari envs do.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np


class CatchEnv(gym.Env):
    """Catch on a ``rows x cols`` board rendered as an RGB image of ``rows*cell x cols*cell``."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 5}
    _MEANINGS = ("left", "stay", "right")

    def __init__(self, rows: int = 8, cols: int = 8, cell: int = 4, render_mode: str | None = None):
        if rows < 2 or cols < 2 or cell < 1:
            raise ValueError(f"need rows >= 2, cols >= 2, cell >= 1; got {rows}, {cols}, {cell}")
        self.rows, self.cols, self.cell = rows, cols, cell
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(0, 255, (rows * cell, cols * cell, 3), np.uint8)
        self.action_space = gym.spaces.Discrete(3)
        self._ball = np.zeros(2, np.int64)  # (row, col)
        self._paddle = cols // 2

    def get_action_meanings(self) -> list[str]:
        return list(self._MEANINGS)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._ball = np.array([0, self.np_random.integers(self.cols)])
        self._paddle = self.cols // 2
        return self._frame(), {}

    def step(self, action):
        if not self.action_space.contains(int(action)):
            raise ValueError(f"action {action} is outside Discrete(3)")
        self._paddle = int(np.clip(self._paddle + int(action) - 1, 0, self.cols - 1))
        self._ball[0] += 1
        landed = self._ball[0] == self.rows - 1
        reward = (1.0 if self._ball[1] == self._paddle else -1.0) if landed else 0.0
        return self._frame(), reward, bool(landed), False, {}

    def render(self):
        return self._frame() if self.render_mode == "rgb_array" else None

    def _frame(self) -> np.ndarray:
        board = np.zeros((self.rows, self.cols, 3), np.uint8)
        board[self._ball[0], self._ball[1]] = (255, 80, 80)
        board[self.rows - 1, self._paddle] = (80, 160, 255)
        return np.repeat(np.repeat(board, self.cell, axis=0), self.cell, axis=1)


def random_policy_values(rows: int = 8, cols: int = 8, gamma: float = 0.99) -> np.ndarray:
    """Exact state values of the uniformly random policy on :class:`CatchEnv`, by dynamic
    programming: ``(rows - 1, cols, cols)`` float64, ``V[r, b, p]`` the expected discounted
    return from the frame with the ball at row ``r``, column ``b`` and the paddle at column ``p``
    (the frames a decision is taken on; the ball lands at row ``rows - 1``). What a perfect
    critic predicts before the policy has learned anything: the ceiling of its explained
    variance then (benchmarks/frame_signal.py)."""
    values = np.zeros((rows, cols, cols))
    paddles = np.arange(cols)
    moved = [np.clip(paddles + a, 0, cols - 1) for a in (-1, 0, 1)]  # paddle after each action
    caught = np.where(np.arange(cols)[:, None] == paddles[None, :], 1.0, -1.0)  # [ball, paddle]
    for r in range(rows - 2, -1, -1):
        after = caught if r + 1 == rows - 1 else gamma * values[r + 1]
        values[r] = np.mean([after[:, m] for m in moved], axis=0)
    return values[: rows - 1]


def decisive_frames(
    rng: np.random.Generator, n: int, size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` Catch frames one step before the ball lands, the paddle at most one column from it,
    resized to ``size`` px: ``(n, size, size, 3)`` uint8, and ``(n,)`` int64 ball column minus
    paddle column (-1, 0 or 1; the catching action is that + 1: left, stay, right). The states
    where one decision decides the episode: what the probes of the policy and the critic read
    (benchmarks/catch_bandit.py, benchmarks/frame_signal.py, tests/test_conditioning.py)."""
    from envs.pixel import resize_frame

    env, frames, offsets = CatchEnv(), [], []
    for _ in range(n):
        env.reset(seed=int(rng.integers(1 << 30)))
        env._ball[:] = [env.rows - 2, rng.integers(env.cols)]
        env._paddle = int(np.clip(env._ball[1] + rng.integers(-1, 2), 0, env.cols - 1))
        frames.append(resize_frame(env._frame(), size))
        offsets.append(int(env._ball[1] - env._paddle))
    return np.stack(frames), np.asarray(offsets, np.int64)
