"""Real-env rollouts through RLlib's env runners (new API stack), in our batch format.

``RolloutWorkers`` builds RLlib's ``EnvRunnerGroup`` of ``SingleAgentEnvRunner`` actors (or one
in-process ``SingleAgentEnvRunner`` when ``num_env_runners == 0``, for single-process debugging
without Ray). Each runner steps a Gymnasium vector env of ``num_envs_per_env_runner`` sub-envs
and calls ``RigRLModule`` (one ``policy.act`` for the vector) per step. On the runner, its
episode chunks are turned into a ``RolloutBatch`` (so only the arrays we need cross the wire, not
RLlib's episode objects with their infos), which the driver concatenates.

Alignment (per row n of a batch, one env step; RLlib's SingleAgentEpisode convention)::

    act.frames[n] = obs_t  --act-->  act.actions[n] = a_t  --env-->  rewards[n] = r_{t+1},
                                                                    terminated/truncated[n]
    the obs after a chunk's last step, obs_{t+1}: last_frames[chunks[n]] (bootstrap a cut or
    truncated chunk from it; a terminated one needs none)

RLlib 2.60 vectorises with ``gym.make_vec`` in NEXT_STEP autoreset mode: after sub-env i ends,
its next vector step is a reset whose action is ignored; the runner starts a new episode there
and records no step for it (the module still computes that row: one wasted row per episode).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig
from ray.rllib.callbacks.callbacks import RLlibCallback
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.connectors.env_to_module import (
    AddObservationsFromEpisodesToBatch,
    BatchIndividualItems,
    NumpyToTensor,
)
from ray.rllib.core import COMPONENT_RL_MODULE
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner
from ray.rllib.utils.metrics import WEIGHTS_SEQ_NO

from actors.env import make_env
from actors.inference import ACTED_VERSION
from actors.module import (
    ACT_PREFIX,
    HISTORY_ACTIONS,
    HISTORY_FRAMES,
    HISTORY_MASK,
    RigRLModule,
)
from actors.weights import publish
from envs.stats import unlocked_from_counts
from rl.policy import ActOutput, RigPolicy

# -- policy specs: what builds the policy inside each runner -----------------------------------


def _preset_policy(preset: str, seed: int, codec, **heads: Any) -> RigPolicy:
    return RigPolicy.from_preset(preset, codec, seed=seed, **heads)


def _checkpoint_policy(path: str, codec, **heads: Any) -> RigPolicy:
    return RigPolicy.load(path, codec, **heads)


def preset_policy(preset: str = "tiny", seed: int = 0, **heads: Any) -> Callable:
    """Policy factory: a freshly initialised ``preset`` (weights identical for a seed);
    ``heads``: ``RigPolicy``'s head options (``head_hidden``, ``sees``, ``frame_head``)."""
    return functools.partial(_preset_policy, preset, seed, **heads)


def checkpoint_policy(path: str, **heads: Any) -> Callable:
    """Policy factory: ``RigPolicy.load(path, codec, **heads)``, a checkpoint directory."""
    return functools.partial(_checkpoint_policy, path, **heads)


# -- settings and the RLlib config built from them ---------------------------------------------


@dataclass
class RolloutSettings:
    """The keyword arguments of ``RolloutWorkers``; a YAML ``rollout`` section maps onto it.

    ``act_kwargs`` go to ``policy.act`` untouched (``task`` and ``max_reasoning_tokens`` at
    least). ``env_factory`` (zero-argument, picklable) replaces ``envs.make`` for tests."""

    env_id: str = "rig/Crafter-v0"
    env_size: int = 64
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    num_env_runners: int = 0  # 0: one in-process runner, no Ray actors
    num_envs_per_env_runner: int = 1
    rollout_fragment_length: int = 16  # steps per sub-env per sample() call
    policy_factory: Callable = field(default_factory=preset_policy)
    act_kwargs: dict[str, Any] = field(
        default_factory=lambda: {"task": "collect diamonds", "max_reasoning_tokens": 32}
    )
    seed: int = 0
    history: int = 0  # past steps (frame + action) of each sub-env in act's prompt
    num_cpus_per_env_runner: float = 1
    num_gpus_per_env_runner: float = 0  # > 0: the runner's policy acts on the GPU Ray assigns
    custom_resources_per_env_runner: dict[str, float] = field(default_factory=dict)
    max_num_env_runner_restarts: int = 1000
    # a runner whose call failed waits this long before its process exits and Ray restarts it
    # (RLlib's delay_between_env_runner_restarts_s, 60 s by default there): the driver learns
    # of the failure (e.g. a dead inference actor) only then
    restart_delay_s: float = 5.0
    env_factory: Callable | None = None
    # Central batched inference (actors.inference): 0 runners act themselves; n > 0 of them
    # act for all runners, each on its runners' steps in one forward.
    num_inference_actors: int = 0
    num_cpus_per_inference_actor: float = 1
    num_gpus_per_inference_actor: float = 0
    inference_wait_s: float = 0.02
    # How weights reach the inference actors: "object_store" (one put, each actor fetches) or
    # "collective" (a bucketed broadcast from the driver, actors/collective.py)
    weight_sync: str = "object_store"
    weight_sync_bucket_mb: float = 256


class _RigConfig(AlgorithmConfig):
    """An ``AlgorithmConfig`` whose default RLModule is ours (the base class has none)."""

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        return RLModuleSpec(module_class=RigRLModule)


class AddHistoryToBatch(ConnectorV2):
    """Each sub-env's last ``k`` steps, read from its episode (the lookback buffer reaches back
    across ``sample()`` calls: ``episode_lookback_horizon >= k``), as three batch columns:

        HISTORY_FRAMES  (k, H, W, 3) uint8  the observations acted on, oldest first
        HISTORY_ACTIONS (k,) int64          the actions taken on them
        HISTORY_MASK    (k,) bool           real steps; the first steps of an episode have
                                            fewer than k before them (rows fill from the right)

    ``RigRLModule`` turns them into ``rl.policy.History`` for ``act``; the layout is History's."""

    def __init__(self, input_observation_space=None, input_action_space=None, *, k: int, **kw):
        super().__init__(input_observation_space, input_action_space, **kw)
        self.k = int(k)

    def __call__(self, *, rl_module, batch, episodes, explore=None, shared_data=None, **kw):
        k = self.k
        for episode in self.single_agent_episode_iterator(episodes):
            shape = np.shape(episode.get_observations(-1))
            frames = episode.get_observations(indices=slice(-k - 1, -1), fill=0)
            actions = episode.get_actions(indices=slice(-k, None), fill=0)
            real = min(k, int(episode.t))  # steps taken in this episode so far
            mask = np.arange(k) >= k - real
            items = {
                HISTORY_FRAMES: np.asarray(frames, np.uint8).reshape(k, *shape),
                HISTORY_ACTIONS: np.asarray(actions, np.int64).reshape(k),
                HISTORY_MASK: mask,
            }
            for column, item in items.items():
                self.add_batch_item(batch, column, item, single_agent_episode=episode)
        return batch


def _env_to_module_pipeline(history: int):
    """The whole env-to-module pipeline: latest obs per sub-env -> (B, H, W, 3) -> tensor, and
    with ``history`` k > 0 the last k steps of each (``AddHistoryToBatch``).

    RLlib's default adds time-rank and state pieces (no-ops for a stateless module), and
    ``NumpyToTensor`` keeps uint8 (it only casts float64); nothing flattens or scales images.
    We still list the pieces ourselves so no future default slips in a preprocessor."""

    def build(env=None, spaces=None, device=None) -> list:
        pieces = [AddObservationsFromEpisodesToBatch()]
        if history:
            pieces.append(AddHistoryToBatch(k=history))
        return [*pieces, BatchIndividualItems(), NumpyToTensor()]

    return build


class EpisodeStats(RLlibCallback):
    """Stores a finished episode's return, length and achievements in its last chunk's
    ``custom_data``; RLlib hands the earlier chunks to ``on_episode_end`` only."""

    def on_episode_end(self, *, episode, prev_episode_chunks=None, **kwargs) -> None:
        chunks = [*(prev_episode_chunks or []), episode]
        stats = {
            "return": float(sum(c.get_return() for c in chunks)),
            "length": int(sum(len(c) for c in chunks)),
            "terminated": bool(episode.is_terminated),
            "truncated": bool(episode.is_truncated),
        }
        info = episode.get_infos(-1)
        if "achievements" in info:
            stats["unlocked"] = unlocked_from_counts(info["achievements"])
        if info.get("env_error"):
            stats["env_error"] = info["env_error"]
        episode.custom_data["stats"] = stats


def env_codec(s: RolloutSettings) -> Any:
    """The action codec of ``s``'s env (the policy's trie is built on it wherever it acts)."""
    import envs

    env = s.env_factory() if s.env_factory else envs.make(s.env_id, s.env_size, **s.env_kwargs)
    try:
        return envs.get_codec(env)
    finally:
        env.close()


def rllib_config(s: RolloutSettings, inference: list | None = None) -> AlgorithmConfig:
    """The RLlib config for ``s``: our env creator, module, connectors and fault tolerance;
    ``inference``: the handles of the inference actors the runners send to (none: they act)."""
    codec = env_codec(s)
    env_config = {"id": s.env_id, "size": s.env_size, "kwargs": dict(s.env_kwargs)}
    if s.env_factory is not None:
        env_config["factory"] = s.env_factory
    return (
        _RigConfig()
        .environment(env=make_env, env_config=env_config)
        .env_runners(
            num_env_runners=s.num_env_runners,
            num_envs_per_env_runner=s.num_envs_per_env_runner,
            rollout_fragment_length=s.rollout_fragment_length,
            batch_mode="truncate_episodes",
            num_cpus_per_env_runner=s.num_cpus_per_env_runner,
            num_gpus_per_env_runner=s.num_gpus_per_env_runner,
            custom_resources_per_env_runner=dict(s.custom_resources_per_env_runner),
            env_to_module_connector=_env_to_module_pipeline(s.history),
            episode_lookback_horizon=max(1, s.history),
            add_default_connectors_to_env_to_module_pipeline=False,
            # Our per-step extras may change shape between steps (prompt width); we stack
            # them ourselves instead of RLlib's to_numpy().
            episodes_to_numpy=False,
        )
        .rl_module(
            model_config={
                "policy_factory": s.policy_factory,
                "codec": codec,
                "act_kwargs": dict(s.act_kwargs),
                "history": s.history,
                "num_threads": max(1, int(s.num_cpus_per_env_runner))
                if s.num_env_runners
                else None,
                "device": "cuda" if s.num_env_runners and s.num_gpus_per_env_runner else "cpu",
                "inference": list(inference or []),
            }
        )
        .fault_tolerance(
            restart_failed_env_runners=True,
            max_num_env_runner_restarts=s.max_num_env_runner_restarts,
            delay_between_env_runner_restarts_s=s.restart_delay_s,
        )
        .callbacks(EpisodeStats)
        .debugging(seed=s.seed)
    )


#: ``stored_fields`` kinds of fields that hold one value per act call (prompt_length, ...).
SCALAR_KINDS = (int, float, bool)

# -- our batch format --------------------------------------------------------------------------


@dataclass
class RolloutBatch:
    """N env steps from C episode chunks (contiguous steps of one episode), chunk by chunk."""

    act: ActOutput  # N rows: what act produced at each step; act.frames (N, H, W, 3) are obs_t
    rewards: np.ndarray  # (N,) float32 r_{t+1}
    terminated: np.ndarray  # (N,) bool the episode ended for real after this step
    truncated: np.ndarray  # (N,) bool cut by a time limit or a crashed env (bootstrap)
    versions: np.ndarray  # (N,) int64 weights version that acted
    chunks: np.ndarray  # (N,) int64 chunk index of each row
    last_frames: np.ndarray  # (C, H, W, 3) uint8 obs after each chunk's last step
    episodes: list[dict]  # finished episodes: return, length, terminated, truncated, unlocked?

    def __len__(self) -> int:
        return len(self.rewards)

    @staticmethod
    def concat(batches: list[RolloutBatch], pad_id: int) -> RolloutBatch:
        """Batches of several runners or calls as one (chunk indices renumbered)."""
        offsets = np.cumsum([0] + [len(b.last_frames) for b in batches[:-1]])
        return RolloutBatch(
            act=ActOutput.collate([b.act for b in batches], pad_id),
            rewards=np.concatenate([b.rewards for b in batches]),
            terminated=np.concatenate([b.terminated for b in batches]),
            truncated=np.concatenate([b.truncated for b in batches]),
            versions=np.concatenate([b.versions for b in batches]),
            chunks=np.concatenate([b.chunks + o for b, o in zip(batches, offsets, strict=True)]),
            last_frames=np.concatenate([b.last_frames for b in batches]),
            episodes=[e for b in batches for e in b.episodes],
        )


def _steps_as_act_outputs(episode, stored_fields: dict[str, Any]) -> list[ActOutput]:
    """The ``ActOutput`` rows of one episode chunk, from its stored extras and the kinds and
    dtypes the module recorded (``RigRLModule.stored_fields``); ``frames``/``actions`` come from
    the episode (see ``actors.module``). Steps whose shapes and per-call values agree (all of
    them, while the prompt keeps its width) are stacked into one ActOutput; ``ActOutput.collate``
    then pads the rest as ``act`` pads (prompts on the left, generated columns on the right)."""
    T = len(episode)
    kinds = {"frames": torch.uint8, "actions": torch.int64, **stored_fields}
    steps: dict[str, list] = {
        "frames": list(episode.get_observations(slice(0, T))),
        "actions": list(episode.get_actions()),
    }
    for name in stored_fields:
        steps[name] = list(episode.get_extra_model_outputs(ACT_PREFIX + name))

    def signature(t: int) -> tuple:
        return tuple(v[t] if kinds[n] in SCALAR_KINDS else np.shape(v[t]) for n, v in steps.items())

    outputs, start = [], 0
    for t in range(1, T + 1):
        if t < T and signature(t) == signature(start):
            continue
        values: dict[str, Any] = {f.name: None for f in dataclasses.fields(ActOutput)}
        for name, rows in steps.items():
            x = np.stack(rows[start:t])  # (t - start, ...)
            if isinstance(kinds[name], torch.dtype):  # TensorToNumpy narrowed int64; restore
                values[name] = torch.from_numpy(x).to(kinds[name])
            elif kinds[name] is list:
                values[name] = x.tolist()
            else:  # one value per act call, equal within the group
                values[name] = kinds[name](x[0])
        outputs.append(ActOutput(**values))
        start = t
    return outputs


def batch_from_episodes(episodes: list, module: RigRLModule) -> RolloutBatch:
    """Our batch from a runner's ``sample()`` result (episode chunks, done ones first)."""
    chunks = [e for e in episodes if len(e) > 0]
    # with inference actors, the version that computed each step; else the runner's own
    version_key = ACTED_VERSION if module.handles else WEIGHTS_SEQ_NO
    acts, rewards, terminated, truncated, versions, ids, last, finished = ([] for _ in range(8))
    for c, ep in enumerate(chunks):
        T = len(ep)
        acts += _steps_as_act_outputs(ep, module.stored_fields)
        rewards.append(np.asarray(ep.get_rewards(), np.float32))
        term, trunc = np.zeros(T, bool), np.zeros(T, bool)
        term[-1], trunc[-1] = ep.is_terminated, ep.is_truncated
        terminated.append(term)
        truncated.append(trunc)
        versions.append(np.asarray(ep.get_extra_model_outputs(version_key), np.int64))
        ids.append(np.full(T, c, np.int64))
        last.append(np.asarray(ep.get_observations(-1)))
        if "stats" in ep.custom_data:
            finished.append({**ep.custom_data["stats"], "version": int(versions[-1][-1])})
    return RolloutBatch(
        act=ActOutput.collate(acts, module.pad_id),
        rewards=np.concatenate(rewards),
        terminated=np.concatenate(terminated),
        truncated=np.concatenate(truncated),
        versions=np.concatenate(versions),
        chunks=np.concatenate(ids),
        last_frames=np.stack(last),
        episodes=finished,
    )


def _sample_on_runner(runner: SingleAgentEnvRunner) -> tuple[int, int, RolloutBatch]:
    """One fragment per sub-env from ``runner``, converted where it was sampled; with the
    runner's index and process id, by which the driver notices a restarted runner."""
    runner.module.use_inference(runner.worker_index)  # a restarted runner picks its actor again
    episodes = runner.sample()
    # Also drains the runner's episode bookkeeping for metrics, which grows until read.
    runner.get_metrics()
    return runner.worker_index, os.getpid(), batch_from_episodes(episodes, runner.module)


def _tensors(state: dict[str, Any] | Any) -> dict[str, torch.Tensor]:
    """A state dict of tensors from a state dict, a packed one or an ``ObjectRef`` of either."""
    import ray

    from actors.weights import unpack_state

    if isinstance(state, ray.ObjectRef):
        state = ray.get(state)
    return unpack_state(state)


# -- the workers -------------------------------------------------------------------------------


class RolloutWorkers:
    """A group of RLlib env runners acting with our policy; see the module doc.

    ``sample`` collects ``rollout_fragment_length`` steps from every sub-env of every healthy
    runner. A runner process that died is restarted by Ray (``max_num_env_runner_restarts``),
    with the arguments it was first built with: the factory's weights and the same seeds.
    RLlib marks it unhealthy when a call to it fails; the next ``sample`` (which until then
    returns the others' steps only) probes it back into service and gives it the latest weights.
    A restart RLlib never saw (the process came back between two calls) shows as a new process
    id in the runner's answer: its rows then carry the factory's version 0, and it gets the
    latest weights before the next call. Both count in ``num_restarts``.
    """

    def __init__(self, settings: RolloutSettings | None = None, **kwargs: Any):
        self.settings = s = settings or RolloutSettings(**kwargs)
        self.inference: list = []  # actors.inference.InferenceActor handles
        if s.weight_sync not in ("object_store", "collective"):
            raise ValueError(
                f"weight_sync must be object_store or collective, got {s.weight_sync!r}"
            )
        if s.weight_sync == "collective" and not s.num_inference_actors:
            raise ValueError("rollout.weight_sync=collective broadcasts to inference actors: "
                             "it needs rollout.num_inference_actors >= 1")  # fmt: skip
        if s.num_inference_actors:
            from actors.inference import start_inference_actors

            if s.num_env_runners < 1:
                raise ValueError("rollout.num_inference_actors > 0 needs rollout.num_env_runners "
                                 ">= 1 (an in-process runner acts itself)")  # fmt: skip
            self.inference = start_inference_actors(
                s.num_inference_actors, s.num_env_runners, s.inference_wait_s, s.policy_factory,
                env_codec(s), s.act_kwargs, s.seed, s.num_cpus_per_inference_actor,
                s.num_gpus_per_inference_actor,
            )  # fmt: skip
        self._broadcast = None  # actors.collective.ActorBroadcast, for weight_sync: collective
        if s.weight_sync == "collective":
            from actors.collective import ActorBroadcast

            self._broadcast = ActorBroadcast(self.inference, s.weight_sync_bucket_mb)
        self.config = rllib_config(s, self.inference)
        self.version = 0  # the weights the runners hold (0: the factory's)
        self._weights: dict[str, Any] | None = None  # last published state, for restarts
        if self.settings.num_env_runners == 0:
            self.local = SingleAgentEnvRunner(config=self.config)
            self.group = None
        else:
            from ray.rllib.env.env_runner_group import EnvRunnerGroup

            self.local = None
            self.group = EnvRunnerGroup(config=self.config, local_env_runner=False)
        self.pad_id: int | None = None
        self.num_restarts = 0  # runner processes seen replaced (0 in local mode)
        self._pids: dict[int, int] = {}  # runner index -> process id of its last answer

    @property
    def num_healthy_runners(self) -> int:
        """Runners in service (1 in local mode)."""
        return self.group.num_healthy_remote_workers() if self.group else 1

    def sample(
        self, weights: dict[str, Any] | None = None, version: int | None = None
    ) -> RolloutBatch:
        """Sync ``weights`` (as version ``version``) if given, then one fragment per sub-env.

        Rows carry the version of the weights that acted, so a batch straddling a sync (an
        episode continuing across it) is visible to the learner."""
        if weights is not None:
            self.sync_weights(weights, self.version + 1 if version is None else version)
        if self.local is not None:
            answers = [_sample_on_runner(self.local)]
        else:
            self._restore_restarted()
            answers = self.group.foreach_env_runner(_sample_on_runner, local_env_runner=False)
            if self.inference and len(answers) < self.group.num_remote_workers():
                self._check_inference()  # runners fail when their inference actor is gone
            if not answers:
                raise RuntimeError("no healthy env runner returned a sample")
        replaced = [i for i, pid, _ in answers if self._pids.setdefault(i, pid) != pid]
        if replaced:
            self.num_restarts += len(replaced)
            self._pids.update({i: pid for i, pid, _ in answers})
            if self._weights is not None:
                self._apply(self._weights, replaced)
        return RolloutBatch.concat([batch for *_, batch in answers], self._pad_id())

    def sync_weights(self, state: dict[str, Any] | Any, version: int) -> None:
        """Give every runner ``state`` (a ``RigPolicy.state_dict()``, or an ``ObjectRef`` of one
        already in the object store) as weights ``version``.

        Through the object store (``actors.weights``: one zero-copy put, none for a
        reference), each runner fetches the reference itself (``SingleAgentEnvRunner.set_state``
        resolves an ``ObjectRef``). With inference actors the weights go to them only, and with
        ``weight_sync="collective"`` by a broadcast from this process (``actors/collective.py``;
        a reference is fetched here first)."""
        if version <= self.version:
            raise ValueError(f"version {version} is not newer than the runners' {self.version}")
        if self.inference:  # the weights live in the inference actors; rows carry theirs
            import ray

            if self._broadcast is not None:
                self._broadcast.sync(_tensors(state), version)
                self.version = version
                return
            ref = self._publish(state)
            ray.get([a.set_weights.remote(ref, version) for a in self.inference])
            self.version = version
            return
        self._weights = {COMPONENT_RL_MODULE: self._publish(state), WEIGHTS_SEQ_NO: version}
        self._apply(self._weights)
        self.version = version

    def _check_inference(self) -> None:
        """Raise a one-line error naming a dead inference actor. It is not restarted: its
        weights are the learner's latest, which only the driver holds (the run stops; resume
        it from its last checkpoint with ``--resume``)."""
        import ray

        for j, actor in enumerate(self.inference):
            try:
                ray.get(actor.meta.remote(), timeout=30)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                raise RuntimeError(
                    f"inference actor {j} of {len(self.inference)} is gone "
                    f"({type(exc).__name__}); the env runners it served cannot act. Resume the "
                    f"run from its last checkpoint (rig train --resume)"
                ) from None

    def inference_stats(self) -> dict[str, float]:
        """``rollout/inference_rows_per_batch``: the mean batch the inference actors acted on
        (empty without them)."""
        if not self.inference:
            return {}
        import ray

        stats = ray.get([a.stats.remote() for a in self.inference])
        batches = sum(x["batches"] for x in stats)
        rows = sum(x["rows_per_batch"] * x["batches"] for x in stats)
        return {"rollout/inference_rows_per_batch": rows / batches if batches else 0.0}

    def stop(self) -> None:
        """Close the envs and end the runner actors."""
        if self.group is not None:
            self.group.stop()
        else:
            self.local.stop()
        if self.inference:
            import ray

            for actor in self.inference:
                ray.kill(actor)
            self.inference = []
            self._broadcast = None

    # -- helpers ------------------------------------------------------------------------------

    def _publish(self, state: dict[str, Any] | Any) -> Any:
        import ray

        if isinstance(state, ray.ObjectRef):
            return ray.get(state) if self.group is None else state
        if self.group is None:
            return {k: v.detach().cpu() for k, v in state.items()}
        return publish(state)

    def _apply(self, weights: dict[str, Any], runner_ids: list[int] | None = None) -> None:
        if self.group is None:
            self.local.set_state(weights)
            return
        self.group.foreach_env_runner(
            lambda runner: runner.set_state(weights),
            local_env_runner=False,
            remote_worker_ids=runner_ids,
        )

    def _restore_restarted(self) -> None:
        """Mark runners that Ray restarted healthy again and give them the latest weights."""
        if self.group.num_healthy_remote_workers() == self.group.num_remote_workers():
            return
        # A short ping: a runner still rebuilding (a slow env) is left for a later sample
        # rather than holding this one up for RLlib's default 30 s.
        restored = self.group.probe_unhealthy_env_runners(timeout_seconds=1.0)
        if restored and self._weights is not None:
            self._apply(self._weights, restored)

    def _pad_id(self) -> int:
        if self.pad_id is None:
            if self.local is not None:
                self.pad_id = self.local.module.pad_id
            else:
                self.pad_id = self.group.foreach_env_runner(
                    lambda r: r.module.pad_id, local_env_runner=False
                )[0]
        return self.pad_id
