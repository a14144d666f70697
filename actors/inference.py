"""Central batched inference for the env runners (the SEED RL layout, Espeholt et al. 2020).

With ``rollout.num_inference_actors: 0`` (the default) every env runner holds the policy and
calls ``policy.act`` on its own sub-envs (``actors.module.RigRLModule``). With ``n > 0`` the
runners hold no policy: each sends its vector step's frames to one of ``n`` inference actors
(runner ``i`` to actor ``(i - 1) % n``), which acts on the requests of all its runners in one
forward and sends each its rows back::

    runner 1: frames (8, H, W, 3) --\\                               /--> ActOutput rows 0-7
    runner 2: frames (8, H, W, 3) ---+-> InferenceActor: one act (B=16) --> ActOutput rows 8-15
                                    (waits for all its runners, or inference_wait_ms)

so Minecraft instances stay CPU processes and the policy runs where the accelerator is, at the
batch of all its runners' envs, with one copy of the weights per inference actor instead of one
per runner. The batching window: a call waits until every runner assigned to the actor has a
request in (the lockstep of synchronous runners), or ``wait_s`` after the first one arrived,
whichever is first, so a slow or restarting runner delays the others by at most ``wait_s``.

Weights go to the inference actors (``RolloutWorkers.sync_weights``), not to the runners,
through the object store or, with ``rollout.weight_sync: collective``, by a broadcast from the
driver into the policy's parameters in place (``actors/collective.py``); and every answer
carries the weights version that computed it: the rows are tagged with that version
(``ACTED_VERSION``), not the runner's own, so a sync between two steps of a sample is visible to
the learner row by row and the sync-health alarm (``learner/ppo.py``) checks the weights that
really acted.

``BatchedPolicy`` is the plain class (one process, testable without Ray); ``InferenceActor``
is its Ray actor, asynchronous so requests queue while a forward runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from rig.errors import UserError
from rl.policy import ActOutput, History, RigPolicy

#: The per-step column of the weights version that acted (replaces RLlib's runner version).
ACTED_VERSION = "rig_acted_version"


class BatchedPolicy:
    """The policy of one inference actor: ``act`` on several requests' frames in one forward.

    ``policy_factory(codec)`` builds the policy (as in every runner today), ``act_kwargs`` go to
    ``policy.act`` untouched; ``seed`` seeds its sampling generator."""

    def __init__(
        self, policy_factory: Callable, codec: Any, act_kwargs: dict[str, Any], seed: int = 0,
        device: str = "cpu", num_threads: int | None = None,
    ):  # fmt: skip
        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.policy: RigPolicy = policy_factory(codec).eval().to(device)
        self.act_kwargs = dict(act_kwargs)
        self.generator = torch.Generator(self.policy.device).manual_seed(seed)
        self.version = 0  # the factory's weights
        self.receiver = None  # actors.collective.WeightReceiver (weight_sync: collective)
        self.batches = 0  # forwards run
        self.rows = 0  # rows acted on

    def meta(self) -> dict[str, int]:
        """What a runner needs without a policy: the pad id and the trie's longest action."""
        return {"pad_id": int(self.policy.ids.pad), "max_action_len": int(self.policy.trie.max_len)}

    def set_weights(self, state: dict[str, Any], version: int) -> None:
        """Load ``state`` (packed by ``actors.weights.pack_state`` or not) as ``version``."""
        from actors.weights import unpack_state

        self.policy.load_state_dict(unpack_state(state))
        self.version = int(version)

    # -- rollout.weight_sync: collective (actors/collective.py) --------------------------------

    def check_weight_layout(self, layout: list) -> str | None:
        """Refuse the sender's ``layout`` unless it is this policy's (WeightSyncError); the
        physical GPU the policy is on (None on the CPU), from which the driver picks nccl."""
        from actors.collective import check_layout, gpu_id

        check_layout(layout, self.policy.state_dict())
        return gpu_id(self.policy.device)

    def join_weight_sync(self, host: str, port: int, rank: int, world_size: int, layout: list,
                         bucket_bytes: int, backend: str, timeout_s: float,
                         own_host: str | None = None) -> None:  # fmt: skip
        """Join the driver's broadcast group as ``rank`` (blocks until every rank has)."""
        from actors.collective import WeightReceiver

        self.receiver = WeightReceiver(host, port, rank, world_size, layout, bucket_bytes,
                                       self.policy.state_dict(), backend, timeout_s, own_host)  # fmt: skip

    def receive_weights(self) -> int:
        """The driver's next broadcast, copied into the policy in place; its version acts."""
        self.version = self.receiver.receive()
        return self.version

    @torch.no_grad()
    def act(
        self, frames: Sequence[np.ndarray], histories: Sequence[History | None]
    ) -> tuple[list[ActOutput], int]:
        """One ``policy.act`` on the requests' frames stacked ((B_i, H, W, 3) uint8 each, and
        their histories, all None or all given); each request's rows back, and the version."""
        sizes = [len(f) for f in frames]
        stacked = torch.as_tensor(np.concatenate([np.asarray(f) for f in frames]))
        history = None
        if any(h is not None for h in histories):
            if any(h is None for h in histories):
                raise ValueError("either every request has a history or none has")
            history = History(
                frames=torch.cat([h.frames for h in histories]),
                actions=torch.cat([h.actions for h in histories]),
                mask=torch.cat([h.mask for h in histories]),
            )
        out = self.policy.act(stacked, generator=self.generator, history=history,
                              **self.act_kwargs).to("cpu")  # fmt: skip
        self.batches += 1
        self.rows += len(stacked)
        bounds = np.cumsum([0, *sizes])
        return [out[int(a):int(b)] for a, b in zip(bounds[:-1], bounds[1:], strict=True)], \
            self.version  # fmt: skip

    def stats(self) -> dict[str, float]:
        """Forwards run and the mean rows per forward (the batch the accelerator saw)."""
        return {"batches": float(self.batches),
                "rows_per_batch": self.rows / self.batches if self.batches else 0.0}  # fmt: skip


class InferenceActor:
    """``BatchedPolicy`` behind a Ray async actor that batches concurrent ``act`` calls (module
    docstring): ``clients`` runners send to it; a batch runs once all have a request in, or
    ``wait_s`` after its first request. The forward runs on the event loop itself, so weights
    (``set_weights``) never change in the middle of one."""

    def __init__(self, clients: int, wait_s: float, *args: Any, **kwargs: Any):
        if clients < 1:
            raise ValueError(f"an inference actor needs >= 1 client, got {clients}")
        self.server = BatchedPolicy(*args, **kwargs)
        self.clients, self.wait_s = int(clients), float(wait_s)
        self._pending: list[tuple[np.ndarray, History | None, asyncio.Future]] = []
        self._window = 0  # the current batching window, so a stale timer flushes nothing

    def meta(self) -> dict[str, int]:
        return self.server.meta()

    def set_weights(self, state: dict[str, Any], version: int) -> int:
        self.server.set_weights(state, version)
        return version

    def stats(self) -> dict[str, float]:
        return self.server.stats()

    def check_weight_layout(self, layout: list) -> str | None:
        return self.server.check_weight_layout(layout)

    # Both block the event loop on purpose (as a forward does): no forward runs while the
    # weights are being replaced.
    async def join_weight_sync(self, *args: Any) -> None:
        import ray

        self.server.join_weight_sync(*args, own_host=ray.util.get_node_ip_address())

    async def receive_weights(self) -> int:
        return self.server.receive_weights()

    async def act(self, frames: np.ndarray, history: History | None) -> tuple[ActOutput, int]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((frames, history, future))
        if len(self._pending) >= self.clients:
            self._run()
        elif len(self._pending) == 1:
            loop.call_later(self.wait_s, self._run, self._window)
        return await future

    def _run(self, window: int | None = None) -> None:
        if window is not None and window != self._window:
            return  # that window was already flushed when its last client came in
        pending, self._pending = self._pending, []
        self._window += 1
        if not pending:
            return
        try:
            outs, version = self.server.act([p[0] for p in pending], [p[1] for p in pending])
        except Exception as exc:  # every waiting runner sees the error, none hangs
            for *_, future in pending:
                future.set_exception(exc)
            return
        for (*_, future), out in zip(pending, outs, strict=True):
            future.set_result((out, version))


def start_inference_actors(
    num_actors: int, num_runners: int, wait_s: float, policy_factory: Callable, codec: Any,
    act_kwargs: dict[str, Any], seed: int, num_cpus: float = 1, num_gpus: float = 0,
) -> list[Any]:  # fmt: skip
    """``num_actors`` Ray ``InferenceActor`` handles; actor ``j`` serves runners ``i`` with
    ``(i - 1) % num_actors == j`` (``client_of``), each seeded ``seed + 1000 + j``."""
    import ray

    if num_actors < 1 or num_runners < num_actors:
        raise ValueError(f"{num_actors} inference actors for {num_runners} env runners: need "
                         f"1 <= rollout.num_inference_actors <= rollout.num_env_runners")  # fmt: skip
    _check_room(num_cpus, num_gpus)
    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)(InferenceActor)
    device = "cuda" if num_gpus else "cpu"
    threads = max(1, int(num_cpus)) if num_cpus else None
    actors = []
    for j in range(num_actors):
        clients = sum(1 for i in range(1, num_runners + 1) if client_of(i, num_actors) == j)
        actors.append(remote.remote(clients, wait_s, policy_factory, codec, act_kwargs,
                                    seed + 1000 + j, device, threads))  # fmt: skip
    ray.get([a.meta.remote() for a in actors])  # built (and failing here, not mid-sample)
    return actors


class InferencePlacementError(UserError):
    """No node of the cluster can ever hold an inference actor of the asked resources."""


def _check_room(num_cpus: float, num_gpus: float) -> None:
    """Fail at once, naming the settings, where no alive node offers an inference actor's CPUs
    and GPUs: Ray would otherwise keep the actor pending and the run would wait forever (a
    fixed cluster does not grow; the docker-compose one is fixed)."""
    import ray

    need = {k: v for k, v in (("CPU", num_cpus), ("GPU", num_gpus)) if v > 0}
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if not need or any(all(r.get(k, 0) >= v for k, v in need.items()) for r in nodes):
        return
    most = {k: max((r.get(k, 0) for r in nodes), default=0) for k in need}
    fix = ("set rollout.num_gpus_per_inference_actor=0 to act on CPUs, or add a node with GPUs"
           if "GPU" in need and most["GPU"] < num_gpus else
           "lower rollout.num_cpus_per_inference_actor, or add a larger node")  # fmt: skip
    raise InferencePlacementError(
        f"no Ray node can hold an inference actor of {need} (the largest offers "
        f"{ {k: float(v) for k, v in most.items()} }); {fix}"
    )


def client_of(runner_index: int, num_actors: int) -> int:
    """The inference actor that env runner ``runner_index`` (RLlib's, from 1) sends to."""
    return (runner_index - 1) % num_actors


__all__ = ["ACTED_VERSION", "BatchedPolicy", "InferenceActor", "InferencePlacementError", "client_of",
           "start_inference_actors"]  # fmt: skip
