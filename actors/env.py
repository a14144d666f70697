"""Env construction for RLlib's env runners, and a wrapper that turns a crashing step into a
truncated episode instead of a lost fragment.

RLlib 2.60 (``EnvRunner._try_env_step``) answers an exception from ``vector_env.step`` by
rebuilding the whole vector env and throwing away every ongoing episode of the runner (with
``restart_failed_sub_environments``), or by failing the runner. ``RebuildOnError`` keeps the
failure to the one sub-env and one episode, as ``envs.minerl.MineRLEnv`` does for MineRL::

    step t:   env.step(a) raises  -->  (last good obs, 0.0, terminated=False, truncated=True,
                                        info["env_error"], info["env_rebuilds"])
    reset:    the broken env is closed (errors ignored) and a fresh one built by the factory

No per-step deadline here: an in-process Python env that hangs cannot be interrupted from its
own thread without leaving it running; envs that do hang (MineRL) carry their own deadline on a
worker thread (``envs.minerl``), and a hung runner as a whole is caught by Ray's health probes.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import gymnasium as gym

logger = logging.getLogger(__name__)


class RebuildOnError(gym.Env):
    """``factory()``'s env, except that an exception in ``step`` truncates the episode and the
    env is rebuilt at the next ``reset``. Exceptions in ``reset`` propagate (nothing to
    truncate; RLlib then rebuilds the runner's envs or fails the runner)."""

    def __init__(self, factory: Callable[[], gym.Env]):
        self._factory = factory
        self.env = factory()
        self.observation_space = self.env.observation_space
        self.action_space = self.env.action_space
        self.metadata = self.env.metadata
        self.rebuilds = 0  # envs thrown away after a failed step
        self._broken = False
        self._last_obs: Any = None

    @property
    def codec(self):
        return self.env.get_wrapper_attr("codec")

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if self._broken:
            try:
                self.env.close()
            except Exception as error:  # a broken env may fail to close too
                logger.warning("closing a broken env failed: %s", error)
            self.env = self._factory()
            self.rebuilds += 1
            self._broken = False
        obs, info = self.env.reset(seed=seed, options=options)
        self._last_obs = obs
        return obs, {**info, "env_rebuilds": self.rebuilds}

    def step(self, action):
        try:
            obs, reward, terminated, truncated, info = self.env.step(action)
        except Exception as error:
            logger.warning("env step failed (%r); truncating the episode, rebuilding", error)
            self._broken = True
            info = {"env_error": repr(error), "env_rebuilds": self.rebuilds}
            return self._last_obs, 0.0, False, True, info
        self._last_obs = obs
        return obs, reward, terminated, truncated, {**info, "env_rebuilds": self.rebuilds}

    def render(self):
        return self.env.render()

    def close(self):
        self.env.close()


def make_env(env_config: dict[str, Any]) -> gym.Env:
    """RLlib's env creator: ``envs.make(id, size, **kwargs)`` inside ``RebuildOnError``.

    ``env_config`` keys: ``id``, ``size``, ``kwargs``; and ``factory``, a zero-argument callable
    that replaces ``envs.make`` (tests use it for envs that fail on purpose)."""
    import envs

    factory = env_config.get("factory") or functools.partial(
        envs.make, env_config["id"], size=env_config["size"], **env_config.get("kwargs", {})
    )
    return RebuildOnError(factory)
