"""The learner actor group: one Ray actor per DeepSpeed rank, in one placement group.

OpenRLHF's layout (its ``RayActorGroup`` of ``DistributedTorchRayActor``s): a placement group
reserves one bundle per rank (``learner.num_cpus_per_rank`` CPUs, ``learner.num_gpus_per_rank``
GPUs), packed onto as few nodes as fit; rank 0's actor starts first and reports its node's address
and a free port, the rendezvous the others are then started with (``MASTER_ADDR``,
``MASTER_PORT``, ``WORLD_SIZE``, ``RANK`` through :class:`~learner.engine.World`); each builds a
:class:`~learner.rank.LearnerRank` and DeepSpeed joins them in one process group (gloo on CPU,
NCCL on GPUs). Ray gives each GPU actor its own ``CUDA_VISIBLE_DEVICES``, so every rank's local
rank is 0. The actor is a thin wrapper: everything it does is ``LearnerRank``'s, which runs
in-process in a test (STYLE.md 2).

Every call goes to all ranks at once (each method of ``LearnerRank`` is a collective), and the
driver waits for them with ``ray.wait``, answer by answer: a rank that died (its process killed,
its node lost) fails its call at once and the run stops with :class:`LearnerGroupError` naming
it, without waiting for the others, which are then ended. The survivors would otherwise sit in a
collective until ``learner.timeout_s`` (their process group's timeout), which is also how long
the driver waits for any one call before calling the group hung. Why stop rather than recover:
a process group has a fixed size and cannot take a new rank in, and the update in flight is
lost with the rank; the recovery is ``rig train --resume``, from the last checkpoint, on any
number of ranks (checkpoints do not depend on it: ``learner.engine.DeepSpeedEngine``).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import ray
import torch

from actors.weights import pack_state
from rig.config import Config
from rig.errors import UserError


class LearnerGroupError(UserError):
    """A learner rank died or stopped answering; the run stops (resume from a checkpoint)."""


@ray.remote(max_restarts=0, max_task_retries=0)
class LearnerActor:
    """One rank: :class:`~learner.rank.LearnerRank` behind Ray (see the module docstring)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.learner = None

    def rendezvous(self) -> tuple[str, int]:
        """This node's address and a port free on it now, for the process group (rank 0).
        (A port picked free can be taken before it is bound: the same window as OpenRLHF's.)"""
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def pid(self) -> int:
        return os.getpid()

    def setup(self, config: Config, world_size: int, addr: str, port: int) -> int:
        from learner.engine import World
        from learner.rank import LearnerRank

        world = World(rank=self.rank, world_size=world_size, local_rank=0, master_addr=addr,
                      master_port=port, timeout_s=config.learner.timeout_s)  # fmt: skip
        self.learner = LearnerRank(config, world)
        return self.learner.engine.num_trainable

    def update(self, exp, generator_state: torch.Tensor, version: int, kl_coeff: float = 0.0,
               actor_frozen: bool = False):  # fmt: skip
        generator = torch.Generator().manual_seed(0)
        generator.set_state(generator_state)
        metrics = self.learner.update(exp, generator, version, kl_coeff, actor_frozen)
        return metrics, generator.get_state()

    def published_state(self) -> dict[str, Any] | None:
        state = self.learner.published_state_dict()
        return None if state is None else pack_state(state)

    def save_checkpoint(self, directory: str, tag: str, client_state: dict) -> str:
        return str(self.learner.save_checkpoint(directory, tag, client_state))

    def load_checkpoint(self, directory: str, tag: str) -> dict:
        return self.learner.load_checkpoint(directory, tag)


class LearnerGroup:
    """``learner.num_ranks`` :class:`LearnerActor` ranks training one policy data parallel.

    The driver's side of the learner when it has several ranks; :meth:`update`,
    :meth:`published_state_dict`, :meth:`save_checkpoint` and :meth:`load_checkpoint` mirror
    :class:`~learner.rank.LearnerRank`'s. Needs Ray initialised."""

    def __init__(self, config: Config) -> None:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cfg = config.learner
        if config.policy.init_from:  # absolute: the actors' working directory is not the driver's
            init = str(Path(config.policy.init_from).resolve())
            config = config.model_copy(update={"policy": config.policy.model_copy(
                update={"init_from": init})})  # fmt: skip
        self.config, self.num_ranks, self.timeout_s = config, cfg.num_ranks, cfg.timeout_s
        bundle = {"CPU": cfg.num_cpus_per_rank, "GPU": cfg.num_gpus_per_rank}
        bundle = {k: v for k, v in bundle.items() if v > 0}
        self._pg = placement_group([dict(bundle) for _ in range(self.num_ranks)], strategy="PACK")
        self.actors: list = []
        ready, _ = ray.wait([self._pg.ready()], timeout=self.timeout_s)
        if not ready:
            self.stop()
            raise LearnerGroupError(
                f"the cluster has no room for {self.num_ranks} learner ranks of {bundle} "
                f"(waited learner.timeout_s={self.timeout_s:g} s); lower learner.num_ranks or "
                f"learner.num_cpus_per_rank / num_gpus_per_rank, or add nodes"
            )
        self.actors = [
            LearnerActor.options(
                num_cpus=cfg.num_cpus_per_rank, num_gpus=cfg.num_gpus_per_rank,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self._pg, placement_group_bundle_index=rank),
            ).remote(rank)
            for rank in range(self.num_ranks)
        ]  # fmt: skip
        try:
            addr, port = self._all("rendezvous", [self.actors[0].rendezvous.remote()])[0]
            self.num_trainable = self._call("setup", config, self.num_ranks, addr, port)[0]
        except BaseException:
            self.stop()
            raise

    # -- the learner's API -------------------------------------------------------------------

    def update(self, exp, generator: torch.Generator, version: int,
               kl_coeff: float = 0.0, actor_frozen: bool = False) -> dict[str, float]:  # fmt: skip
        """One PPO update on every rank; the ranks' metrics averaged (``loss/*`` then equal one
        rank's on the global batch); ``generator`` advances as it would on one rank."""
        exp_ref = ray.put(exp)
        answers = self._call("update", exp_ref, generator.get_state(), version, kl_coeff,
                             actor_frozen)  # fmt: skip
        generator.set_state(answers[0][1])
        return _average([metrics for metrics, _ in answers])

    def published_state_dict(self) -> dict[str, Any]:
        """Rank 0's full weights (gathered under ZeRO-3), packed (``actors.weights``)."""
        return self._call("published_state")[0]

    def save_checkpoint(self, directory: str | Path, tag: str, client_state: dict) -> Path:
        # absolute: the actors' working directory is not the driver's
        self._call("save_checkpoint", str(Path(directory).resolve()), tag, client_state)
        return Path(directory) / tag

    def load_checkpoint(self, directory: str | Path, tag: str) -> dict:
        return self._call("load_checkpoint", str(Path(directory).resolve()), tag)[0]

    def pids(self) -> list[int]:
        return self._call("pid")

    def stop(self) -> None:
        """End every rank and free the placement group (again: nothing)."""
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None

    # -- calls and failures ------------------------------------------------------------------

    def _call(self, method: str, *args: Any) -> list[Any]:
        """``method(*args)`` on every rank; their answers in rank order."""
        return self._all(method, [getattr(a, method).remote(*args) for a in self.actors])

    def _all(self, what: str, refs: list) -> list[Any]:
        """Wait for ``refs`` (one per rank, in rank order) answer by answer: the first rank that
        fails stops the group at once; none may take more than ``timeout_s`` in all."""
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        answers: dict[int, Any] = {}
        pending = list(refs)
        deadline = time.monotonic() + self.timeout_s
        while pending:
            done, pending = ray.wait(pending, num_returns=1,
                                     timeout=max(0.0, deadline - time.monotonic()))  # fmt: skip
            if not done:
                ranks = sorted(rank_of[ref] for ref in pending)
                self.stop()
                raise LearnerGroupError(
                    f"learner rank(s) {ranks} did not finish {what} within learner.timeout_s="
                    f"{self.timeout_s:g} s (hung in a collective, or their node is lost); the "
                    f"run stopped: rig train --resume RUN resumes from its last checkpoint"
                )
            ref = done[0]
            try:
                answers[rank_of[ref]] = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                self.stop()
                raise LearnerGroupError(
                    f"learner rank {rank_of[ref]} of {self.num_ranks} died during {what} "
                    f"({type(err).__name__}); a process group cannot take a new rank in, so the "
                    f"run stopped: rig train --resume RUN resumes from its last checkpoint, on "
                    f"any learner.num_ranks"
                ) from err
            except ray.exceptions.RayTaskError as err:
                self.stop()  # the others would wait for it in their next collective
                cause = err.cause if isinstance(err.cause, BaseException) else err
                cause.add_note(f"(raised on learner rank {rank_of[ref]} of {self.num_ranks} "
                               f"during {what})")  # fmt: skip
                raise cause from None
        return [answers[rank] for rank in range(len(refs))]


def _average(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over the ranks that report it (a shard may lack e.g. imagined rows)."""
    keys = dict.fromkeys(k for metrics in per_rank for k in metrics)
    return {k: sum(m[k] for m in per_rank if k in m) / sum(k in m for m in per_rank) for k in keys}


__all__ = ["LearnerActor", "LearnerGroup", "LearnerGroupError"]
