"""The learner's batch: real and imagined env steps with their advantages, in one typed form.

Two kinds of data reach the learner and leave here as the same :class:`Experience` rows:

* REAL steps, from the env runners (``actors.rollout.RolloutBatch``): N steps cut into C chunks
  (contiguous steps of one episode; a chunk ends where its episode ended or where sampling
  stopped). Advantages by GAE (``rl.returns.gae``)::

      chunk c, steps t = 0 .. T_c - 1 (row n = start_c + t)
      act.frames[n] = s_t --a_t--> rewards[n] = r_t, terminated[n]/truncated[n] after a_t
      next_values[t] = values[n + 1]            inside the chunk
                     = bootstrap[c] = V(s_T)    at its last step (s_T = last_frames[c]; ignored
                                                when the episode terminated there)
      next-frame target of row n: frames[n + 1] inside the chunk, last_frames[c] at its end

  Chunks are laid out time-major (T_max, C) for ``gae``; padding steps are marked truncated
  with zero reward and value, so they contribute A = 0 and cut the trace.

* IMAGINED steps, from the imagination actors (``actors.imagination.ImaginedBatch``): S start
  states x horizon H, with predicted rewards and continues. Advantages are lambda-returns
  (``rl.returns.lambda_returns``, DreamerV3) minus the values. Imagined rows carry no next-frame,
  reward or continue targets (the world model is trained on real data only) and a loss weight:
  ``imagination.weight`` times the predicted probability that the rollout reached the row's
  state, ``c_0 ... c_{h-1}`` (DreamerV3's cumulative continue; 1 at the real start ``h = 0``).

Everything here is torch on the CPU; the learner moves minibatches to its device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from rl.policy import ActOutput
from rl.returns import gae, lambda_returns


@dataclass
class Experience:
    """N learner rows (env steps, real or imagined). G = VQ codes per frame."""

    act: ActOutput  # N rows: the sequences the policy wrote, and old log-probs / values
    advantages: Tensor  # (N,) float32
    returns: Tensor  # (N,) float32 value targets
    weights: Tensor  # (N,) float32 loss weight of the row (1 real; imagination.weight imagined)
    imagined: Tensor  # (N,) bool
    # (N, G) int64 VQ codes of the real next frame (0 on imagined rows); None when no loss
    # reads them (the world model does not train: ``world_model_trains``)
    next_codes: Tensor | None
    rewards: Tensor  # (N,) float32 the real reward (reward head target; 0 on imagined rows)
    continues: Tensor  # (N,) float32 1 - terminated (continue head target)
    versions: Tensor  # (N,) int64 weights version that acted
    # (N,) float32 the row's weight in the value term; None: ``weights`` (imagined rows may
    # weigh less there: ``imagination.value_weight``, so the critic keeps to real returns)
    value_weights: Tensor | None = None
    # (N, T, D) the trunk's hidden states over each row's sequence (``RigPolicy.forward_sequence``
    # with ``next_codes``), on the learner's device: set by the learner for one update when the
    # trunk is frozen (``learner.freeze``), so every epoch reads them instead of recomputing.
    trunk: Tensor | None = None
    # (N, L) float32 log-probs of the sampled tokens under the learner's weights at the start of
    # the update (decoupled PPO's proximal policy, ``ppo.decoupled``): set by the learner.
    prox_log_probs: Tensor | None = None
    # the raw advantages' std of the real rows this batch of imagined rows was dreamt beside
    # (``imagination.updates``: an update on imagined rows alone scales them as the update on
    # real + imagined rows did, ``learner.ppo.normalize``); None: the batch's own real rows'
    real_advantage_std: float | None = None

    def __len__(self) -> int:
        return len(self.advantages)

    @property
    def value_weights_or_weights(self) -> Tensor:
        """(N,) each row's weight in the value term."""
        return self.weights if self.value_weights is None else self.value_weights

    def rows(self, index: Tensor) -> Experience:
        def pick(x):  # the trunk's states live on the learner's device, the rest on the CPU
            if x is None or isinstance(x, float):  # per batch, not per row
                return x
            return x[index.to(x.device)] if isinstance(x, Tensor) else x[index]

        return Experience(**{f.name: pick(getattr(self, f.name)) for f in fields(Experience)})

    @staticmethod
    def concat(parts: Sequence[Experience], pad_id: int) -> Experience:
        parts = [p for p in parts if len(p)]
        out = {"act": ActOutput.collate([p.act for p in parts], pad_id)}
        for f in fields(Experience):
            if f.name == "value_weights":  # None on a part means its ``weights``
                if any(p.value_weights is not None for p in parts):
                    out[f.name] = torch.cat([p.value_weights_or_weights for p in parts])
            elif f.name not in ("act", "trunk", "prox_log_probs", "real_advantage_std"):
                # (those are set per update, after the concat)
                out[f.name] = _cat_or_none(f.name, [getattr(p, f.name) for p in parts])
        return Experience(**out)

    def num_minibatches(self, size: int, multiple_of: int = 1) -> int:
        """How many minibatches :meth:`minibatches` makes of these rows."""
        m = max(1, round(len(self) / size))
        return -(-m // multiple_of) * multiple_of

    def minibatches(
        self, size: int, generator: torch.Generator, multiple_of: int = 1
    ) -> Iterator[Experience]:
        """One shuffled pass in near-equal minibatches of about ``size`` rows: N rows make
        ``m = max(1, round(N / size))`` minibatches (rounded up to a multiple of
        ``multiple_of``, the gradient accumulation steps) whose sizes differ by one at most,
        so no straggler of a few rows gets an optimiser step of its own (72 rows at size 32:
        36 + 36, not 32 + 32 + 8). With fewer rows than minibatches, rows repeat."""
        n, m = len(self), self.num_minibatches(size, multiple_of)
        order = torch.randperm(n, generator=generator)
        if n < m:
            order = order.repeat(-(-m // n))[:m]
        for part in torch.tensor_split(order, m):
            yield self.rows(part)


def _cat_or_none(name: str, got: list[Tensor | None]) -> Tensor | None:
    """``torch.cat(got)``; None when every part is None (an optional field such as
    ``next_codes``), an error when only some are: the rows would not line up."""
    missing = sum(x is None for x in got)
    if got and missing == len(got):
        return None
    if missing:
        raise ValueError(f"cannot concat experience with and without {name}")
    return torch.cat(got)


def real_experience(
    act: ActOutput,
    rewards: np.ndarray,
    terminated: np.ndarray,
    truncated: np.ndarray,
    chunks: np.ndarray,
    bootstrap: Tensor,
    next_codes: Tensor | None,
    versions: np.ndarray,
    gamma: float,
    lam: float,
) -> Experience:
    """Experience from N real steps in C chunks (the module docstring's layout).

    ``bootstrap`` (C,) is V(s_T) of each chunk's last observation; ``next_codes`` (N, G) the VQ
    codes of each row's real next frame, or None when no loss reads them."""
    n = len(rewards)
    chunks_t = torch.as_tensor(chunks, dtype=torch.int64)
    if n == 0:
        raise ValueError("real_experience needs at least one step")
    if bool((chunks_t[1:] < chunks_t[:-1]).any()):
        raise ValueError("rows must be stored chunk by chunk (chunk ids non-decreasing)")
    values = act.values.detach().float().cpu()
    C = int(chunks_t.max()) + 1
    starts = torch.searchsorted(chunks_t, torch.arange(C))  # (C,) first row of each chunk
    t = torch.arange(n) - starts[chunks_t]  # (N,) step within its chunk
    T = int(t.max()) + 1

    def grid(x: Tensor, fill: float | bool) -> Tensor:  # (N,) -> (T, C) time-major
        out = torch.full((T, C), fill, dtype=x.dtype)
        out[t, chunks_t] = x
        return out

    last = torch.ones(n, dtype=torch.bool)
    last[:-1] = chunks_t[1:] != chunks_t[:-1]  # (N,) last row of its chunk
    next_values = torch.zeros(n)
    next_values[~last] = values[1:][~last[:-1]]
    next_values[last] = bootstrap.float().cpu()[chunks_t[last]]
    term = torch.as_tensor(terminated, dtype=torch.bool)
    adv, ret = gae(
        grid(torch.as_tensor(rewards, dtype=torch.float32), 0.0),
        grid(values, 0.0),
        grid(next_values, 0.0),
        grid(term, False),
        grid(torch.as_tensor(truncated, dtype=torch.bool), True),
        gamma,
        lam,
    )
    return Experience(
        act=act,
        advantages=adv[t, chunks_t],
        returns=ret[t, chunks_t],
        weights=torch.ones(n),
        imagined=torch.zeros(n, dtype=torch.bool),
        next_codes=None if next_codes is None else next_codes.long().cpu(),
        rewards=torch.as_tensor(rewards, dtype=torch.float32),
        continues=(~term).float(),
        versions=torch.as_tensor(versions, dtype=torch.int64),
    )


def imagined_experience(
    act: ActOutput,
    rewards: Tensor,
    continues: Tensor,
    bootstrap: Tensor,
    horizon: int,
    version: int,
    weight: float,
    gamma: float,
    lam: float,
    codes_per_frame: int,
    value_weight: float = 1.0,
) -> Experience:
    """Experience from S imagined rollouts of ``horizon`` steps, stored start by start (row
    ``s * H + h``). Lambda-returns over (H, S); advantage = return - value. Each row's loss
    weight is ``weight`` x P(reached); in the value term also x ``value_weight``."""
    n = len(rewards)
    if n % horizon:
        raise ValueError(f"{n} imagined rows is not a whole number of horizons of {horizon}")
    S = n // horizon
    values = act.values.detach().float().cpu()

    def grid(x: Tensor) -> Tensor:  # (S * H,) start by start -> (H, S) time-major
        return x.float().cpu().view(S, horizon).T

    ret = lambda_returns(
        grid(rewards), grid(values), grid(continues), bootstrap.float().cpu(), gamma, lam
    ).T.reshape(-1)  # (S * H,) back to row order
    # P(s_h reached) = c_0 ... c_{h-1}: a rollout past a predicted end weighs what it may be worth
    alive = torch.cumprod(grid(continues), 0)  # (H, S) P(still going after step h)
    reached = torch.cat([torch.ones(1, S), alive[:-1]])  # (H, S)
    weights = float(weight) * reached.T.reshape(-1)
    return Experience(
        act=act,
        advantages=ret - values,
        returns=ret,
        weights=weights,
        value_weights=None if value_weight == 1.0 else float(value_weight) * weights,
        imagined=torch.ones(n, dtype=torch.bool),
        next_codes=torch.zeros(n, codes_per_frame, dtype=torch.int64),
        rewards=torch.zeros(n),
        continues=torch.ones(n),
        versions=torch.full((n,), int(version), dtype=torch.int64),
    )


__all__ = ["Experience", "imagined_experience", "real_experience"]
