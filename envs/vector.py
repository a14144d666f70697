"""Vectorised envs (Gymnasium's vector API) with autoreset made explicit, and episode tracking.

We use ``AutoresetMode.SAME_STEP``: when sub-env ``i`` ends at step t, the vector env resets it
inside the same ``step`` call, so

    obs[i]                      is the first observation of the NEXT episode,
    info["final_obs"][i]        is the last observation of the episode that ended,
    info["final_info"][...]     is that episode's last info (``info["_final_info"][i]`` is True),

and the action passed at t+1 is a real action of the new episode (no wasted "reset step", as in
NEXT_STEP mode). Bootstrapping on truncation must use ``final_obs``, never ``obs``.

``sync`` steps the envs in this process (cheapest for fast games and for debugging); ``async``
runs each env in a subprocess (worth it when a step or a reset is slow, as Crafter's 0.8 s world
generation is).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv

from envs.stats import unlocked_from_counts

VECTORIZATION_MODES = ("sync", "async")


def make_vector(
    env_id: str, num_envs: int, size: int = 64, vectorization: str = "sync", **kwargs: Any
) -> gym.vector.VectorEnv:
    """``num_envs`` copies of ``envs.make(env_id, size, **kwargs)`` in one vector env."""
    from envs import make

    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    if vectorization not in VECTORIZATION_MODES:
        raise ValueError(
            f"vectorization must be one of {VECTORIZATION_MODES}, got {vectorization!r}"
        )
    fns = [functools.partial(make, env_id, size=size, **kwargs) for _ in range(num_envs)]
    cls = SyncVectorEnv if vectorization == "sync" else AsyncVectorEnv
    return cls(fns, autoreset_mode=AutoresetMode.SAME_STEP)


def unbatch_info(infos: dict[str, Any], i: int) -> dict[str, Any]:
    """The info of sub-env ``i`` from a vector env's batched info dict (keys it did not set are
    left out, using Gymnasium's ``_key`` masks)."""
    out: dict[str, Any] = {}
    for key, value in infos.items():
        if key.startswith("_"):
            continue
        mask = infos.get(f"_{key}")
        if mask is not None and not mask[i]:
            continue
        out[key] = unbatch_info(value, i) if isinstance(value, dict) else value[i]
    return out


class EpisodeTracker:
    """Accumulates per-env returns and lengths from vector steps; yields finished episodes.

    Each finished episode is a dict: ``return``, ``length``, ``terminated``, ``truncated``, and
    ``unlocked`` (achievement names) when the env reports crafter-style ``achievements``.
    """

    def __init__(self, num_envs: int):
        self.returns = np.zeros(num_envs, np.float64)
        self.lengths = np.zeros(num_envs, np.int64)
        self.finished: list[dict[str, Any]] = []

    def step(self, rewards, terminated, truncated, infos) -> list[dict[str, Any]]:
        """Record one vector step; returns the episodes that ended in it."""
        self.returns += np.asarray(rewards, np.float64)
        self.lengths += 1
        done = np.logical_or(terminated, truncated)
        ended = []
        for i in np.flatnonzero(done):
            episode = {
                "env": int(i),
                "return": float(self.returns[i]),
                "length": int(self.lengths[i]),
                "terminated": bool(terminated[i]),
                "truncated": bool(truncated[i]) and not bool(terminated[i]),
            }
            final = unbatch_info(infos.get("final_info", {}), int(i))
            if "achievements" in final:
                episode["unlocked"] = unlocked_from_counts(final["achievements"])
            ended.append(episode)
            self.returns[i] = 0.0
            self.lengths[i] = 0
        self.finished.extend(ended)
        return ended


def unfinished_episodes(
    tracker: EpisodeTracker, infos: dict[str, Any], crafter_like: bool
) -> list[dict[str, Any]]:
    """The episodes still running when play stopped, as far as they got (``unfinished: True``)."""
    out = []
    for i, length in enumerate(tracker.lengths):
        if length == 0:
            continue
        episode = {"env": i, "return": float(tracker.returns[i]), "length": int(length),
                   "unfinished": True}  # fmt: skip
        if crafter_like:
            episode["unlocked"] = unlocked_from_counts(unbatch_info(infos, i)["achievements"])
        out.append(episode)
    return out


@dataclass
class Played:
    """What :func:`play_episodes` saw: the finished episodes in the order they ended (the first
    ``episodes`` of them when it was given: the vector's other sub-envs may finish more in the
    last step), the ones still running at the stop, vector steps taken, seconds from reset to
    stop, and whether the env reports Crafter-style ``achievements``."""

    finished: list[dict[str, Any]]
    unfinished: list[dict[str, Any]]
    steps: int
    seconds: float
    crafter_like: bool


@dataclass(frozen=True)
class Step:
    """One vector step as :func:`play_episodes` hands it to ``on_step``."""

    obs: np.ndarray  # the observations acted on
    actions: np.ndarray
    # what came back: where sub-env ``i`` ended, ``new_obs[i]`` is the next episode's first frame
    # and ``infos["final_obs"][i]`` the ended one's last
    new_obs: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    infos: dict[str, Any]
    ended: list[dict[str, Any]]  # the episodes that ended in this step
    steps: int  # vector steps so far, this one included
    finished: int  # episodes finished so far


def play_episodes(
    venv: gym.vector.VectorEnv,
    act: Callable[[np.ndarray, dict[str, Any]], np.ndarray],
    seed: int | None,
    episodes: int | None = None,
    max_steps: int | None = None,
    on_reset: Callable[[np.ndarray, dict[str, Any]], None] | None = None,
    on_step: Callable[[Step], None] | None = None,
) -> Played:
    """The play loop of ``rig envs play``, ``rig eval`` and the learning benchmark's peer: reset
    ``venv`` with ``seed``, then step it with ``act(obs, infos)`` (once per vector step) until
    ``episodes`` episodes have finished or ``max_steps`` vector steps were taken (either
    ``None``: no such limit).

    ``on_reset(obs, infos)`` sees the first observation, ``on_step(step)`` every :class:`Step`.
    The caller builds and closes ``venv``."""
    if episodes is None and max_steps is None:
        raise ValueError("play_episodes needs episodes or max_steps, else it never stops")
    tracker = EpisodeTracker(venv.num_envs)
    obs, infos = venv.reset(seed=seed)
    crafter_like = "achievements" in infos  # score achievements for any env that reports them
    if on_reset is not None:
        on_reset(obs, infos)
    steps, start = 0, time.perf_counter()
    while (episodes is None or len(tracker.finished) < episodes) and (
        max_steps is None or steps < max_steps
    ):
        actions = act(obs, infos)
        new_obs, rewards, terminated, truncated, infos = venv.step(actions)
        ended = tracker.step(rewards, terminated, truncated, infos)
        steps += 1
        if on_step is not None:
            on_step(Step(obs, actions, new_obs, terminated, truncated, infos, ended, steps,
                         len(tracker.finished)))  # fmt: skip
        obs = new_obs
    seconds = time.perf_counter() - start
    unfinished = unfinished_episodes(tracker, infos, crafter_like)
    finished = tracker.finished if episodes is None else tracker.finished[:episodes]
    return Played(finished, unfinished, steps, seconds, crafter_like)
