"""One learner rank: the policy, its frozen reference and the DeepSpeed engine, built from a run's
config, with the four things the driver asks of a learner.

``rig train`` with ``learner.num_ranks: 1`` holds one :class:`LearnerRank` in its own process
(the in-driver learner: no Ray, no rendezvous, a process group of one in memory). With N > 1 each
of N Ray actors (``actors/learner.py``, OpenRLHF's layout) holds one, built with its
:class:`~learner.engine.World`; they train data parallel (``learner.ppo.DataParallel``)::

    update(exp, generator, version, kl_coeff)  ppo_update on this rank's share of every minibatch
    published_state_dict()           full weights (gathered under ZeRO-3) on rank 0, None elsewhere
    save_checkpoint(dir, tag, meta)  DeepSpeed's layout + the rank-independent full state
    load_checkpoint(dir, tag)        from as many ranks as now, or from any other number

Every method is a collective once there are several ranks: the driver calls it on all of them.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import torch

from learner.engine import DeepSpeedEngine, World
from learner.ppo import DataParallel
from rig.config import Config
from rig.errors import UserError
from rl.heads import fitted_statistics, freeze_statistics


def build_policy(config: Config, codec):
    """The run's policy: ``policy.init_from``'s checkpoint or the preset at ``run.seed``, with
    ``policy.vq``'s trained tokenizer if given, frozen (the next-frame targets stay fixed). The
    runners and actors get its weights, tokenizer included, with the first publish."""
    from rl.policy import RigPolicy

    p = config.policy
    if p.init_from:
        policy = RigPolicy.load(p.init_from, codec, **p.heads())
    else:
        policy = RigPolicy.from_preset(p.preset, codec, config.run.seed, **p.heads())
    if policy.image_size != config.env.size:
        raise UserError(
            f"the policy sees {policy.image_size}px frames but env.size is "
            f"{config.env.size}; set env.size={policy.image_size}"
        )
    if config.policy.vq:
        from supervised.vq import load_vq_into

        load_vq_into(policy, config.policy.vq)
    policy.model.model.vqmodel.requires_grad_(False)
    return policy


def statistics_frozen(config: Config, policy) -> bool:
    """``learner.freeze_statistics``, its null resolved: frozen when the run starts from a
    checkpoint (``policy.init_from``) whose head statistics are fitted."""
    frozen = config.learner.freeze_statistics
    if frozen is None:
        frozen = bool(config.policy.init_from) and fitted_statistics(policy)
    return frozen


def run_codec(config: Config):
    import envs

    return envs.get_codec(envs.make(config.env.id, config.env.size, **config.env.kwargs))


class LearnerRank:
    """The learner of one process; see the module docstring. ``world`` None: the only rank,
    in the driver (today's learner, unchanged); else this rank's place in the group."""

    def __init__(self, config: Config, world: World | None = None) -> None:
        self.config, self.world = config, world
        if world is not None:  # an actor's own process: seed it as the driver seeds its own
            random.seed(config.run.seed)
            np.random.seed(config.run.seed)
            torch.manual_seed(config.run.seed)
        self.codec = run_codec(config)
        policy = build_policy(config, self.codec)
        if statistics_frozen(config, policy):
            freeze_statistics(policy)
        # The frozen reference (the initial weights) for the KL term, if it has a weight: a copy
        # kept on the learner's device and in its dtype, so its log-probs are comparable from
        # step 0 (DeepSpeed moves and casts the learner's module, not a copy made before).
        initial = copy.deepcopy(policy) if config.ppo.loss_scales["kl"] > 0 else None
        self.engine = DeepSpeedEngine(policy, config.learner, world)
        self.policy = self.engine.module
        self.reference = None
        if initial is not None:
            like = next(self.policy.parameters())
            self.reference = initial.to(like.device, like.dtype).eval().requires_grad_(False)
        self.dp = None
        if world is not None and world.world_size > 1:
            self.dp = DataParallel(world.rank, world.world_size)
            self.dp.install(self.policy)

    @property
    def rank(self) -> int:
        return 0 if self.world is None else self.world.rank

    def update(self, exp, generator: torch.Generator, version: int,
               kl_coeff: float = 0.0, actor_frozen: bool = False) -> dict[str, float]:  # fmt: skip
        """One PPO update (``learner.ppo.ppo_update``, looked up at call time so tests can wrap
        it); ``generator`` draws the minibatches and must be in the same state on every rank;
        ``kl_coeff`` is the driver's current ``ppo.behaviour_kl_coeff``; ``actor_frozen``: an
        update inside ``ppo.freeze_actor_iterations`` (the critic only)."""
        from learner import ppo

        return ppo.ppo_update(self.engine, self.policy, self.reference, exp, self.config.ppo,
                              generator, version, self.dp, kl_coeff=kl_coeff,
                              actor_frozen=actor_frozen)  # fmt: skip

    def published_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full CPU state dict on rank 0 (None on the others); every rank must call it."""
        state = self.engine.published_state_dict()
        return state if self.rank == 0 else None

    def save_checkpoint(self, directory: str | Path, tag: str, client_state: dict) -> Path:
        return self.engine.save_checkpoint(directory, tag, client_state)

    def load_checkpoint(self, directory: str | Path, tag: str) -> dict:
        return self.engine.load_checkpoint(directory, tag)


__all__ = ["LearnerRank", "build_policy", "run_codec"]
