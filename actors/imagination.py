"""Imagined rollouts: the policy rolls forward in its own world model (Dyna-style), on Ray actors.

From S start frames, :class:`Imaginer` runs ``RigPolicy.act_imagine`` H times: reasoning + action
on the current frame, then the next frame, its reward and continue probability, on the same KV
cache, then acts once more on the last imagined frame to read its value (the value head
reads the ``<action>`` hidden state after reasoning, so a bootstrap value needs a whole act).
Per start s, on ``rl.returns.lambda_returns``'s indexing (row t = the transition out of s_t)::

    h (row s*H + h)   0             1             ...   H-1               (extra act)
    act.frames        s_0 (real)    s_1           ...   s_{H-1}           s_H
    act.values        V(s_0)        V(s_1)        ...   V(s_{H-1})        bootstrap[s] = V(s_H)
    act.actions       a_0           a_1           ...   a_{H-1}
    imagine           s_0 --a_0--> s_1            ...   s_{H-1} --a_{H-1}--> s_H
    rewards[h]        r_0           r_1           ...   r_{H-1}           (reward of s_h -> s_{h+1})
    continues[h]      c_0           c_1           ...   c_{H-1}           (P(s_{h+1} not terminal))
    imagined_frames   [s, 0] = s_1  [s, 1] = s_2  ...   [s, H-1] = s_H

so ``lambda_returns(rewards.view(S, H).T, act.values.view(S, H).T, continues.view(S, H).T,
bootstrap, gamma, lam)`` needs no shift. Imagination does not stop at a predicted terminal: the
continues discount what follows it. ``act`` rows are ordinary ``ActOutput`` rows (their frames
are imagined for h >= 1), so ``RigPolicy.evaluate`` recomputes their log-probs and PPO can train
on them.

``ImaginationWorkers`` splits the S starts over ``ImaginationActor`` actors (one ``Imaginer``
each) and concatenates their batches; with ``num_actors == 0`` it runs one ``Imaginer``
in-process (debug mode without Ray).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from torch import Tensor

from actors.weights import publish, unpack_state
from rl.policy import ActOutput, RigPolicy

ACT_KEYS = ("max_reasoning_tokens", "temperature", "lookahead")  # what act_kwargs may set


@dataclass
class ImaginedBatch:
    """S imagined rollouts of H steps each, start by start (row n = s * H + h); see the module
    doc for the timeline."""

    act: ActOutput  # S*H rows; act.frames (S*H, H_img, W, 3) uint8 are s_h (h = 0: the real start)
    rewards: Tensor  # (S*H,) float32 predicted reward of s_h --a_h--> s_{h+1}
    continues: Tensor  # (S*H,) float32 predicted P(s_{h+1} not terminal)
    bootstrap: Tensor  # (S,) float32 V(s_H), from one extra act on the last imagined frames
    imagined_frames: Tensor  # (S, H, H_img, W, 3) uint8 s_1 .. s_H, for logging
    version: int  # weights version that imagined
    horizon: int  # H

    def __len__(self) -> int:
        return len(self.rewards)

    @property
    def starts(self) -> int:
        """S, the number of start states."""
        return len(self.bootstrap)

    @staticmethod
    def concat(batches: Sequence[ImaginedBatch], pad_id: int) -> ImaginedBatch:
        """Batches of several actors as one, starts in order. All must share H and the version."""
        if not batches:
            raise ValueError("concat needs at least one batch")
        if len({b.horizon for b in batches}) != 1 or len({b.version for b in batches}) != 1:
            raise ValueError("concat needs batches of one horizon and one weights version")
        return ImaginedBatch(
            act=ActOutput.collate([b.act for b in batches], pad_id),
            rewards=torch.cat([b.rewards for b in batches]),
            continues=torch.cat([b.continues for b in batches]),
            bootstrap=torch.cat([b.bootstrap for b in batches]),
            imagined_frames=torch.cat([b.imagined_frames for b in batches]),
            version=batches[0].version,
            horizon=batches[0].horizon,
        )


class Imaginer:
    """One policy imagining rollouts in-process (the Ray actor is a thin wrapper around it).

    Args:
        policy_factory: builds the policy; must pickle for Ray (``functools.partial`` of
            ``RigPolicy.from_preset`` or a module-level function).
        act_kwargs: ``act``'s settings: ``max_reasoning_tokens``, ``temperature``, ``lookahead``.
        seed: seeds the one generator every call draws from, so a seed and a call sequence give
            the same rollouts.
        imagine_temperature: the frame sampler's temperature (default: ``act``'s temperature).
        device: where the policy runs (``cuda`` in an actor that reserved a GPU).
    """

    def __init__(
        self,
        policy_factory: Callable[[], RigPolicy],
        act_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
        imagine_temperature: float | None = None,
        device: str = "cpu",
    ):
        self.act_kwargs = dict(act_kwargs or {})
        unknown = sorted(set(self.act_kwargs) - set(ACT_KEYS))
        if unknown:
            raise ValueError(f"act_kwargs: unknown keys {unknown} (allowed: {list(ACT_KEYS)})")
        self.imagine_temperature = float(
            self.act_kwargs.get("temperature", 1.0)
            if imagine_temperature is None
            else imagine_temperature
        )
        self.policy = policy_factory().eval().to(device)
        self.generator = torch.Generator(device=self.policy.device).manual_seed(seed)
        self.version = 0  # 0: the factory's weights

    def pad_id(self) -> int:
        return self.policy.ids.pad

    def set_weights(self, state_dict: dict[str, Tensor], version: int) -> None:
        """Load ``state_dict`` (the learner's ``policy.state_dict()``, packed by
        ``actors.weights.pack_state`` or not) as weights ``version``."""
        self.policy.load_state_dict(unpack_state(state_dict))
        self.version = int(version)

    @torch.no_grad()
    def rollout(
        self, frames: np.ndarray | Tensor, tasks: str | Sequence[str], horizon: int
    ) -> ImaginedBatch:
        """Imagine ``horizon`` steps from each start frame (S, H, W, 3) uint8; ``tasks``: one str
        for every start or one per start. Returns the batch on the CPU."""
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        frames = torch.as_tensor(np.asarray(frames)) if not isinstance(frames, Tensor) else frames
        size = self.policy.image_size
        shape = tuple(frames.shape)
        if (
            len(shape) != 4
            or shape[0] < 1
            or shape[1:] != (size, size, 3)
            or frames.dtype != torch.uint8
        ):
            raise ValueError(
                f"frames must be (S >= 1, {size}, {size}, 3) uint8, got {shape} {frames.dtype}"
            )
        S, H = frames.shape[0], horizon
        policy, gen = self.policy, self.generator

        # Roll forward: act on s_h, imagine s_{h+1} (and r_h, c_h) after its action.
        outs, rewards, continues, imagined = [], [], [], []
        current = frames.to(policy.device)
        for _ in range(H):
            out, img = policy.act_imagine(current, tasks, generator=gen, **self.act_kwargs,
                                          imagine_temperature=self.imagine_temperature)  # fmt: skip
            outs.append(out.to("cpu"))
            rewards.append(img.reward.float().cpu())
            continues.append(img.continue_prob.float().cpu())
            imagined.append(img.frames.cpu())
            current = img.frames
        bootstrap = policy.state_values(current, tasks)  # V(s_H): the state alone

        # Step-major (H, S) -> start-major rows n = s * H + h.
        act = ActOutput.collate(outs, policy.ids.pad)  # rows h * S + s
        order = torch.arange(H * S).view(H, S).T.reshape(-1)  # (S*H,) row h * S + s at s * H + h
        return ImaginedBatch(
            act=act[order],
            rewards=torch.stack(rewards, 1).reshape(S * H),  # (S, H) -> (S*H,)
            continues=torch.stack(continues, 1).reshape(S * H),
            bootstrap=bootstrap.float().cpu(),
            imagined_frames=torch.stack(imagined, 1),  # (S, H, H_img, W, 3)
            version=self.version,
            horizon=H,
        )


ImaginationActor = ray.remote(num_cpus=1)(Imaginer)
"""The Ray actor: an ``Imaginer`` in its own process (``ImaginationActor.options(num_cpus=..)``)."""


class ImaginationWorkers:
    """A group of ``ImaginationActor`` actors; ``num_actors == 0``: one in-process ``Imaginer``.

    Actor i draws from seed ``seed + i``, so one actor reproduces the in-process ``Imaginer``
    of the same seed. ``actor_options`` go to ``ImaginationActor.options`` (e.g. ``num_cpus``,
    ``num_gpus``; with ``num_gpus`` the actors' policies run on the GPU);
    ``imagine_temperature`` to every ``Imaginer``."""

    def __init__(
        self,
        num_actors: int,
        policy_factory: Callable[[], RigPolicy],
        act_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
        actor_options: dict[str, Any] | None = None,
        imagine_temperature: float | None = None,
    ):
        if num_actors < 0:
            raise ValueError(f"num_actors must be >= 0, got {num_actors}")
        self.version = 0
        if num_actors == 0:
            self.local: Imaginer | None = Imaginer(policy_factory, act_kwargs, seed,
                                                   imagine_temperature)  # fmt: skip
            self.actors: list[Any] = []
            self.pad_id = self.local.pad_id()
        else:
            self.local = None
            options = dict(actor_options or {})
            device = "cuda" if options.get("num_gpus") else "cpu"
            cls = ImaginationActor.options(**options)
            self.actors = [
                cls.remote(policy_factory, act_kwargs, seed + i, imagine_temperature, device)
                for i in range(num_actors)
            ]
            self.pad_id = ray.get(self.actors[0].pad_id.remote())

    def sync_weights(self, state: dict[str, Tensor] | Any, version: int) -> None:
        """Give every actor ``state`` (a ``RigPolicy.state_dict()``, or an ``ObjectRef`` of one)
        as weights ``version``: one ``ray.put`` (none for a reference), every actor gets the
        reference."""
        if self.local is not None:
            if isinstance(state, ray.ObjectRef):
                state = ray.get(state)
            self.local.set_weights(state, version)
        else:
            ref = state if isinstance(state, ray.ObjectRef) else publish(state)
            ray.get([a.set_weights.remote(ref, version) for a in self.actors])
        self.version = int(version)

    def rollout(
        self, frames: np.ndarray | Tensor, tasks: str | Sequence[str], horizon: int
    ) -> ImaginedBatch:
        """``Imaginer.rollout`` with the S starts split into contiguous parts, one per actor."""
        if self.local is not None:
            return self.local.rollout(frames, tasks, horizon)
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        S = len(frames)
        if not isinstance(tasks, str) and len(tasks) != S:
            raise ValueError(f"got {len(tasks)} tasks for {S} start frames")
        bounds = np.linspace(0, S, min(len(self.actors), S) + 1).round().astype(int)
        refs = [
            actor.rollout.remote(
                frames[lo:hi], tasks if isinstance(tasks, str) else list(tasks[lo:hi]), horizon
            )
            for actor, lo, hi in zip(self.actors, bounds[:-1], bounds[1:], strict=False)
        ]
        return ImaginedBatch.concat(ray.get(refs), self.pad_id)

    def stop(self) -> None:
        """End the actors."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


__all__ = ["ImaginationActor", "ImaginationWorkers", "ImaginedBatch", "Imaginer"]
