"""Non-learning agents that play our envs: the interface, a random agent, the scripted expert.

An agent is any object with two methods (this is the whole contract; `rig collect` and
`rig envs play` accept anything that has them):

    reset() -> None                       called at the start of every episode
    act(obs: np.ndarray, info: dict) -> int
        obs is one (size, size, 3) uint8 frame, info the env's info for that frame (for the
        first step: the info returned by reset); returns an index into the env's codec.

Agents that can explain themselves also have a ``goal`` property (a short text), which the
supervised stage uses as a seed for reasoning text.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

AGENTS = ("random", "scripted")


class Agent(Protocol):
    def reset(self) -> None: ...

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> int: ...


class RandomAgent:
    """Uniformly random actions (the baseline of the Crafter scoreboard: 1.6%)."""

    goal = "act at random"

    def __init__(self, num_actions: int, seed: int = 0):
        self.num_actions = int(num_actions)
        self._rng = np.random.default_rng(seed)

    def reset(self) -> None:
        pass

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> int:
        return int(self._rng.integers(self.num_actions))


class ScriptedCrafterAdapter:
    """``ScriptedCrafterAgent`` (which plans from ``info`` alone) behind the agent interface."""

    def __init__(self, seed: int = 0):
        from envs.crafter_agent import ScriptedCrafterAgent

        self._agent = ScriptedCrafterAgent(seed=seed)

    @property
    def goal(self) -> str:
        return self._agent.goal

    def reset(self) -> None:
        self._agent.reset()

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> int:
        return int(self._agent.act(info))


def make_agent(name: str, env_id: str, num_actions: int, seed: int = 0) -> Agent:
    """Build agent ``name`` for ``env_id``; ValueError if that agent cannot play that env."""
    if name == "random":
        return RandomAgent(num_actions, seed=seed)
    if name == "scripted":
        if env_id != "rig/Crafter-v0":
            raise ValueError(f"the scripted agent plays only rig/Crafter-v0, not {env_id}")
        return ScriptedCrafterAdapter(seed=seed)
    raise ValueError(f"unknown agent {name!r}; choose one of {', '.join(AGENTS)}")
