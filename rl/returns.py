"""Advantage estimation for real and imagined rollouts, as pure torch functions.

Two estimators, because the two kinds of data end differently:

* ``gae`` is for REAL trajectories from vector envs with SAME_STEP autoreset (envs/vector.py).
  A rollout of T steps holds pieces of several episodes per env; an episode ends either by
  termination (death: the future is worth nothing, no bootstrap) or by truncation (time limit,
  crashed instance: the future is unknown, bootstrap from the value of the final observation).
  Mixing these up is the classic silent bug: treating truncation as termination teaches the
  critic that time limits are deaths, and letting the recursion run over an episode boundary
  credits one episode's actions with the next episode's rewards.
* ``lambda_returns`` is for IMAGINED rollouts of horizon H from the world model (DreamerV3,
  Hafner et al. 2023, the critic's target). Nothing is reset inside an imagined rollout;
  episode ends are soft: a predicted continue probability discounts everything after it.

Both are targets, not things to differentiate through: they detach their inputs, so calling
them on live model outputs is safe (calling them under ``torch.no_grad()`` also works). They
compute in the floating dtype of their inputs (float32 or float64; mixed inputs promote, as torch
does) and keep the inputs' device. Half precision is refused: a T-step recursion in bfloat16
loses the small advantages PPO cares about.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rl.shapes import require_matching, require_same_shape, require_tensor

_FLOATS = (torch.float32, torch.float64)


# ----------------------------------------------------------------------------- checks


def _require_float(name: str, x: Tensor) -> None:
    if x.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float32 or float64, got {x.dtype}; cast it first")


def _require_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _as_flag(name: str, x: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool or 0/1 tensor as 0./1. in ``dtype``; anything else is an error, not a truthiness."""
    if x.dtype != torch.bool and not bool(((x == 0) | (x == 1)).all()):
        raise ValueError(f"{name} must be bool or 0/1, got values outside {{0, 1}}")
    return x.detach().to(dtype)


# ----------------------------------------------------------------------------- real rollouts


def gae(
    rewards: Tensor,
    values: Tensor,
    next_values: Tensor,
    terminated: Tensor,
    truncated: Tensor,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over a vector rollout.

    All inputs are time-major ``(T, B)``: row t is vector step t, column b is env b.

        rewards[t]      reward received for the action taken at step t
        values[t]       V(s_t), the critic on the observation the action was chosen from
        next_values[t]  V(s_{t+1}) of the SAME episode: on truncation, the value of
                        ``info["final_obs"]``; at the last row, the value of the observation
                        after the rollout; on termination it is ignored (may even be nan)
        terminated[t]   bool/0-1: s_{t+1} is terminal (death): no bootstrap, trace cut
        truncated[t]    bool/0-1: the episode was cut after step t (time limit, crash):
                        bootstrap from next_values[t], trace cut

    Timeline for one env (SAME_STEP autoreset: after an end at t, row t+1 is the first step of the
    next episode, so the trace must not run from t+1 back into t)::

        t             0        1        2      |  3        4      |  5     (T = 6)
        obs           s0       s1       s2     |  u0       u1     |  w0
        reward        r0       r1       r2     |  r3       r4     |  r5
        terminated    0        0        0      |  0        1      |  0
        truncated     0        0        1      |  0        0      |  0
        next_values   V(s1)    V(s2)    V(s3)  |  V(u1)    unused |  V(w1)

        s3 = info["final_obs"] of the truncated episode (bootstrapped); after u1 the episode
        dies, so no value is used at t=4; w1 is the observation after the rollout.

        delta_t = r_t + gamma * (1 - terminated_t) * next_values_t - values_t
        A_t     = delta_t + gamma * lam * (1 - (terminated_t or truncated_t)) * A_{t+1}
        A_T     = 0   (the tail beyond the rollout is already in next_values[T-1])

    Returns ``(advantages, returns)``, both ``(T, B)``, with ``returns = advantages + values``
    (the critic's regression target).
    """
    layout = "(T, B) time-major"
    require_matching(
        layout, 2, rewards=rewards, values=values, next_values=next_values,
        terminated=terminated, truncated=truncated,
    )  # fmt: skip
    for name, x in (("rewards", rewards), ("values", values), ("next_values", next_values)):
        _require_float(name, x)
    _require_unit("gamma", gamma)
    _require_unit("lam", lam)

    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), next_values.dtype)
    r, v, nv = (x.detach().to(dtype) for x in (rewards, values, next_values))
    term = _as_flag("terminated", terminated, dtype)
    trunc = _as_flag("truncated", truncated, dtype)

    # where, not a product: a value left as nan/inf after a termination must not leak in.
    bootstrapped = torch.where(term.bool(), torch.zeros_like(nv), nv)  # (T, B)
    not_done = (1.0 - term) * (1.0 - trunc)  # (T, B) 1 where the trace continues into t+1
    deltas = r + gamma * bootstrapped - v  # (T, B)

    advantages = torch.empty_like(deltas)
    running = torch.zeros_like(deltas[0])  # (B,) A_{t+1}
    for t in reversed(range(deltas.shape[0])):
        running = deltas[t] + gamma * lam * not_done[t] * running
        advantages[t] = running
    return advantages, advantages + v


# ----------------------------------------------------------------------------- imagined rollouts


def lambda_returns(
    rewards: Tensor,
    values: Tensor,
    continues: Tensor,
    bootstrap: Tensor,
    gamma: float,
    lam: float,
) -> Tensor:
    """TD(lambda) returns of an imagined rollout (DreamerV3's lambda-return).

    ``rewards``, ``values``, ``continues`` are time-major ``(H, B)``; ``bootstrap`` is ``(B,)``.
    Index t is the transition out of imagined state s_t, and everything on that row belongs to it::

        t              0          1          ...   H-1            H
        state          s_0        s_1        ...   s_{H-1}        s_H
        values[t]      V(s_0)     V(s_1)     ...   V(s_{H-1})     bootstrap = V(s_H)
        action         a_0        a_1        ...   a_{H-1}
                      (a_t leads to the imagined s_{t+1}; r_t and c_t are predicted for it)
        rewards[t]     r_0 = reward of s_0 --a_0--> s_1
        continues[t]   c_0 = P(s_1 is not terminal), predicted at s_1

    so the continue on row t multiplies everything AFTER reward r_t (the value and return of
    s_{t+1}), never r_t itself::

        R_H = bootstrap
        R_t = r_t + gamma * c_t * ((1 - lam) * V_{t+1} + lam * R_{t+1}),   V_H = bootstrap

    A world model that predicts (reward, continue) from the successor state (DreamerV3 indexes
    those at t+1) feeds its predictions for s_1..s_H as rows 0..H-1: no other shift is needed.
    ``continues`` may be probabilities or 0/1. ``values[0]`` does not enter the returns (only
    V(s_1)..V(s_H) do); it is taken so that ``returns - values`` is the advantage at every row.
    Special cases: lam = 1 gives the discounted Monte-Carlo return bootstrapped at H; lam = 0 gives
    one-step TD targets r_t + gamma * c_t * V_{t+1}.

    Returns ``(H, B)``.
    """
    layout = "(H, B) time-major"
    require_tensor("rewards", rewards, 2, layout)
    require_tensor("values", values, 2, layout)
    require_tensor("continues", continues, 2, layout)
    require_same_shape(layout, "rewards", rewards, values=values, continues=continues)
    require_tensor("bootstrap", bootstrap, 1, "(B,)")
    if bootstrap.shape[0] != rewards.shape[1]:
        raise ValueError(
            f"bootstrap has shape {tuple(bootstrap.shape)} but rewards has shape "
            f"{tuple(rewards.shape)}; bootstrap must be (B,) = ({rewards.shape[1]},)"
        )
    for name, x in (("rewards", rewards), ("values", values), ("continues", continues),
                    ("bootstrap", bootstrap)):  # fmt: skip
        _require_float(name, x)
    _require_unit("gamma", gamma)
    _require_unit("lam", lam)

    dtype = torch.promote_types(rewards.dtype, values.dtype)
    dtype = torch.promote_types(torch.promote_types(dtype, continues.dtype), bootstrap.dtype)
    r, v, c, boot = (x.detach().to(dtype) for x in (rewards, values, continues, bootstrap))

    next_values = torch.cat([v[1:], boot[None]], dim=0)  # (H, B) V(s_{t+1})
    returns = torch.empty_like(r)
    running = boot  # (B,) R_{t+1}, starting at R_H = bootstrap
    for t in reversed(range(r.shape[0])):
        running = r[t] + gamma * c[t] * ((1.0 - lam) * next_values[t] + lam * running)
        returns[t] = running
    return returns
