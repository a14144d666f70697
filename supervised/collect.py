"""S1: run an existing agent in parallel envs and store its trajectories (``rig collect``).

Episode ``k`` of a collection with seed ``s`` is always played in the world
``world_seed(s, k)`` by an agent seeded from the same pair, whichever worker plays it, so a
collection is reproducible and an interrupted one resumes by playing exactly the episodes whose
ids are not on disk yet (episode id = k).

Agents (``--agent``), all behind the interface of ``envs/agents.py`` (``reset()``,
``act(obs, info) -> int``, optional ``goal`` text):

- ``random``, ``scripted``: the built-in agents;
- a policy checkpoint directory: ``rl.policy.RigPolicy.load(dir, codec)``, acting with
  lookahead 0; its decoded reasoning is its ``goal``;
- ``module.path:ClassName``: any class with that interface; its constructor gets those of
  ``num_actions``, ``seed``, ``env_id``, ``codec`` that it accepts by name.

Workers: ``EpisodeCollector`` plays whole episodes in this process; with more than one worker it
runs as one Ray actor per worker (one env + one agent each), a thin wrapper over the same class.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rig.errors import UserError

CRAFTER = "rig/Crafter-v0"
BUILTIN = ("random", "scripted")


class AgentError(UserError):
    """``--agent`` names nothing that can play."""


def world_seed(seed: int, episode: int) -> int:
    """The world seed of episode ``episode`` of a collection seeded ``seed`` (stable, < 2**31)."""
    return int(np.random.SeedSequence([int(seed), int(episode)]).generate_state(1)[0] >> 1)


# -- agents ---------------------------------------------------------------------------------------


class PolicyAgent:
    """A RIG policy checkpoint behind the agent interface (lookahead 0, no history)."""

    def __init__(
        self,
        path: str | os.PathLike,
        codec,
        task: str = "survive and unlock as many achievements as you can",
        max_reasoning_tokens: int = 32,
        temperature: float = 1.0,
        seed: int = 0,
    ):
        import torch

        from rl.model import CheckpointError
        from rl.policy import RigPolicy

        torch.set_num_threads(1)
        try:
            self.policy = RigPolicy.load(path, codec)
        except CheckpointError as err:
            raise AgentError(f"--agent {path}: {err}") from None
        self.task = task
        self.max_reasoning_tokens = int(max_reasoning_tokens)
        self.temperature = float(temperature)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.goal = ""

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(int(seed))

    def reset(self) -> None:
        self.goal = ""

    def act(self, obs: np.ndarray, info: dict[str, Any]) -> int:
        out = self.policy.act(
            obs[None], self.task, self.max_reasoning_tokens, self.temperature, self.generator,
            lookahead=0,
        )  # fmt: skip
        ids = out.tokens[0][out.reasoning_mask[0]].tolist()
        self.goal = self.policy.tok.decode(ids, skip_special_tokens=True).strip()
        return int(out.actions[0])


def check_agent_spec(spec: str, env_id: str) -> str:
    """Fail early, in one line, on an agent spec that cannot work; returns its kind."""
    if spec in BUILTIN:
        if spec == "scripted" and env_id != CRAFTER:
            raise AgentError(f"the scripted agent plays only {CRAFTER}, not {env_id}")
        return "builtin"
    if Path(spec).is_dir():
        from rl.model import CheckpointError, check_pretrained_dir

        try:
            check_pretrained_dir(Path(spec))
        except CheckpointError as err:
            raise AgentError(f"--agent {spec}: {err}") from None
        return "policy"
    if ":" in spec:
        _agent_class(spec)
        return "class"
    raise AgentError(
        f"--agent {spec!r} is neither random, scripted, a policy checkpoint directory nor "
        f"module.path:ClassName"
    )


def _agent_class(spec: str) -> type:
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise AgentError(f"--agent {spec}: cannot import {module_name} ({err})") from None
    cls = getattr(module, name, None)
    if cls is None or not callable(cls):
        raise AgentError(f"--agent {spec}: {module_name} has no class {name}")
    if not all(callable(getattr(cls, m, None)) for m in ("reset", "act")):
        raise AgentError(f"--agent {spec}: {name} needs reset() and act(obs, info) methods")
    return cls


def agent_factory(spec: str, env_id: str, codec, **policy_kwargs: Any) -> Callable[[int], Any]:
    """``factory(seed) -> agent``. Built-in and class agents are built afresh per episode (cheap,
    and the episode then does not depend on which worker played what before); a policy is
    loaded once and reseeded."""
    kind = check_agent_spec(spec, env_id)
    if kind == "builtin":
        from envs.agents import make_agent

        return lambda seed: make_agent(spec, env_id, len(codec), seed=seed)
    if kind == "policy":
        agent = PolicyAgent(spec, codec, **policy_kwargs)

        def reseeded(seed: int) -> PolicyAgent:
            agent.reseed(seed)
            return agent

        return reseeded
    cls = _agent_class(spec)
    offered = {"num_actions": len(codec), "env_id": env_id, "codec": codec}
    params = inspect.signature(cls).parameters
    accepts_all = any(p.kind is p.VAR_KEYWORD for p in params.values())

    def build(seed: int):
        kwargs = {k: v for k, v in {**offered, "seed": seed}.items() if accepts_all or k in params}
        return cls(**kwargs)

    return build


# -- what is kept of each step's info ------------------------------------------------------------


def crafter_view_shape(env_kwargs: dict[str, Any]) -> tuple[int, int]:
    """Cells of the world the frame shows, (width, height): crafter's view minus the inventory
    rows at the bottom (9 x 9 -> 9 x 7)."""
    from crafter import constants

    view = tuple(env_kwargs.get("view", (9, 9)))
    item_rows = int(np.ceil(len(constants.items) / view[0]))
    return int(view[0]), int(view[1]) - item_rows


def crafter_step_info(infos: list[dict[str, Any]], view: tuple[int, int]) -> dict[str, np.ndarray]:
    """The compact per-step info of Crafter that the reasoner and the review stage read.

    ``inventory`` (L, 16) int16 in ``INVENTORY`` order; ``achievements`` (L, 22) int16 counts in
    ``ACHIEVEMENTS`` order; ``local_view`` (L, w, h) uint8 semantic ids of the cells the frame
    shows, ``[dx, dy]`` like ``semantic[x, y]``, 63 off the map; ``player_pos`` (L, 2) int16;
    ``facing`` (L, 2) int8; ``sleeping`` (L,) bool."""
    from envs.crafter_env import ACHIEVEMENTS

    w, h = view
    out = {
        "inventory": np.array([[i["inventory"][k] for k in INVENTORY] for i in infos], np.int16),
        "achievements": np.array(
            [[i["achievements"][k] for k in ACHIEVEMENTS] for i in infos], np.int16
        ),
        "player_pos": np.array([i["player_pos"] for i in infos], np.int16),
        "facing": np.array([i["facing"] for i in infos], np.int8),
        "sleeping": np.array([i["sleeping"] for i in infos], bool),
    }
    views = np.full((len(infos), w, h), 63, np.uint8)
    for n, info in enumerate(infos):
        sem = np.asarray(info["semantic"])
        x, y = (int(v) for v in info["player_pos"])
        x0, y0 = x - w // 2, y - h // 2
        xs = slice(max(x0, 0), min(x0 + w, sem.shape[0]))
        ys = slice(max(y0, 0), min(y0 + h, sem.shape[1]))
        views[n, xs.start - x0 : xs.stop - x0, ys.start - y0 : ys.stop - y0] = sem[xs, ys]
    out["local_view"] = views
    return out


INVENTORY = (
    "health", "food", "drink", "energy", "sapling", "wood", "stone", "coal", "iron", "diamond",
    "wood_pickaxe", "stone_pickaxe", "iron_pickaxe", "wood_sword", "stone_sword", "iron_sword",
)  # fmt: skip
"""Crafter's inventory keys, the column order of the stored ``inventory``."""


def info_card(env_id: str, env_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Card entries that say how to read the stored info (column names, semantic ids)."""
    if env_id != CRAFTER:
        return {}
    from envs.crafter_agent import ID, OUTSIDE
    from envs.crafter_env import ACHIEVEMENTS

    return {
        "info": {
            "inventory": list(INVENTORY),
            "achievements": list(ACHIEVEMENTS),
            "local_view": list(crafter_view_shape(env_kwargs)),
            "semantic_ids": {**ID, "outside": OUTSIDE},
        }
    }


# -- playing episodes -----------------------------------------------------------------------------


class EpisodeCollector:
    """One env and one agent; ``play(k)`` plays episode ``k`` and returns its arrays.

    Plain class (runs in-process in tests); ``collect`` wraps it in a Ray actor per worker."""

    def __init__(
        self,
        env_id: str,
        size: int,
        env_kwargs: dict[str, Any],
        agent: str,
        seed: int,
        max_steps: int | None = None,
        policy_kwargs: dict[str, Any] | None = None,
    ):
        import envs

        try:
            import torch

            torch.set_num_threads(1)
        except ImportError:
            pass
        self.env = envs.make(env_id, size=size, **env_kwargs)
        self.codec = envs.get_codec(self.env)
        self.env_id = env_id
        self.seed = int(seed)
        self.max_steps = max_steps
        self.view = crafter_view_shape(env_kwargs) if env_id == CRAFTER else None
        self.make_agent = agent_factory(agent, env_id, self.codec, **(policy_kwargs or {}))

    def play(self, episode: int) -> dict[str, Any]:
        from envs.stats import unlocked_from_counts

        wseed = world_seed(self.seed, episode)
        agent = self.make_agent(world_seed(self.seed + 1, episode))
        obs, info = self.env.reset(seed=wseed)
        agent.reset()
        frames, infos, actions, goals, rewards = [obs], [info], [], [], []
        terminated = truncated = False
        while not (terminated or truncated):
            action = int(agent.act(obs, info))
            goals.append(str(getattr(agent, "goal", "") or ""))
            obs, reward, terminated, truncated, info = self.env.step(action)
            if self.max_steps is not None and len(actions) + 1 >= self.max_steps:
                truncated = truncated or not terminated
            frames.append(obs)
            infos.append(info)
            actions.append(action)
            rewards.append(reward)
        length = len(actions)
        ep: dict[str, Any] = {
            "episode_id": int(episode),
            "world_seed": wseed,
            "frames": np.stack(frames).astype(np.uint8),
            "action": np.array(actions, np.int16),
            "action_text": np.array([self.codec.vocab[a] for a in actions]),
            "reward": np.array(rewards, np.float32),
            "terminated": np.eye(1, length, length - 1, dtype=bool)[0] & terminated,
            "truncated": np.eye(1, length, length - 1, dtype=bool)[0] & truncated,
            "goal": np.array(goals),
            "step": np.arange(length, dtype=np.int32),
        }
        summary: dict[str, Any] = {"terminated": bool(terminated), "truncated": bool(truncated)}
        if self.view is not None:
            ep.update(crafter_step_info(infos[:-1], self.view))
            summary["unlocked"] = unlocked_from_counts(infos[-1]["achievements"])
        ep["summary"] = summary
        return ep

    def close(self) -> None:
        self.env.close()


def collect(
    out: str | os.PathLike,
    *,
    env_id: str,
    size: int,
    env_kwargs: dict[str, Any],
    agent: str,
    episodes: int,
    workers: int = 1,
    seed: int = 0,
    shard_steps: int = 4096,
    max_steps: int | None = None,
    policy_kwargs: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
    after_shard: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Fill ``out`` with ``episodes`` episodes (resuming what is there); returns the card.

    ``progress(done, total)`` is called after each episode; ``after_shard(n_shards)`` after each
    shard written (tests interrupt a collection there)."""
    from supervised.dataset import DatasetWriter

    agent_name = agent if agent in BUILTIN or ":" in agent else str(Path(agent).resolve())
    check_agent_spec(agent, env_id)
    card = dict(
        env_id=env_id, env_kwargs=dict(env_kwargs), size=int(size), agent=agent_name,
        stage="collect", seed=int(seed), max_steps_per_episode=max_steps,
        **info_card(env_id, env_kwargs),
    )  # fmt: skip
    writer = DatasetWriter(out, resume=True, shard_steps=shard_steps, **card)
    todo = [k for k in range(episodes) if k not in writer.episode_ids]
    total, done = episodes, episodes - len(todo)
    if progress:
        progress(done, total)
    args = (env_id, size, dict(env_kwargs), agent, seed, max_steps, policy_kwargs)

    def store(ep: dict[str, Any]) -> None:
        nonlocal done
        shards = len(writer.index["shards"])
        writer.add_episode(ep)
        done += 1
        if progress:
            progress(done, total)
        if after_shard and len(writer.index["shards"]) > shards:
            after_shard(len(writer.index["shards"]))

    if todo and workers <= 1:
        collector = EpisodeCollector(*args)
        try:
            for k in todo:
                store(collector.play(k))
        finally:
            collector.close()
    elif todo:
        _collect_ray(args, todo, min(workers, len(todo)), store)
    writer.close()
    return writer.index["card"]


def _collect_ray(args: tuple, todo: list[int], workers: int, store: Callable) -> None:
    """One Ray actor per worker, each playing one episode at a time; episodes are stored in the
    order they finish (ids keep them apart)."""
    import ray

    from actors.local import init_ray

    started = not ray.is_initialized()
    if started:
        init_ray(num_cpus=workers)  # loopback only, nothing left running after a kill
    try:
        remote = ray.remote(num_cpus=1)(EpisodeCollector)
        actors = [remote.remote(*args) for _ in range(workers)]
        queue = list(todo)
        running = {}
        for actor in actors:
            if queue:
                running[actor.play.remote(queue.pop(0))] = actor
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            actor = running.pop(ready[0])
            store(ray.get(ready[0]))
            if queue:
                running[actor.play.remote(queue.pop(0))] = actor
    finally:
        if started:
            ray.shutdown()
