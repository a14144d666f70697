"""Review by value: act after weighing n imagined outcomes (``rig eval --review value``).

RIG's lookahead writes proposals, their imagined frames and a ``<review>`` into the sequence and
then samples the final action (``RigPolicy.act(lookahead=n)``): the imagined frames can change
the decision only through the LM's logits at the action tokens. A policy trained by RL at
lookahead 0 never learnt to read them there (its action head reads the real frame's columns),
and on Catch that lookahead scored no better than none (docs/benchmarks.md, "Lookahead").

Here the review is done by the world model and the critic, which RL did train::

    for each of n candidates a_i ~ pi(. | s)          (one batched act over n copies of a row)
        s'_i, r_i, c_i  = the imagined next frame, reward and continue after a_i
        q_i = r_i + gamma * c_i * V(s'_i)              (the critic on the imagined frame)
    act a_j, j = argmax_i q_i

This is best-of-n with the world model as the verifier: n = 1 is the policy itself, and more
candidates buy a better decision with compute at test time, the shape of RIG's test-time scaling.

``depth`` d > 1 looks further before judging: from each candidate's imagined frame the policy
goes on acting in its own world model for d - 1 more steps, and

    q_i = r_0 + gamma c_0 (r_1 + gamma c_1 (... + gamma c_{d-1} V(s_d)))

(the imagined rollout's discounted predicted rewards, each step weighted by the predicted
continues before it, then the critic). Where the critic of an imagined frame is the weak part
(a state one move from lost looks like one one move from safe), the reward head at the end of
the imagined episode decides instead; the price is d imagined steps per candidate.
Candidates are sampled (not every action enumerated), so it works for any action space; on a
small one they repeat. It is a test-time procedure: the action taken is not a sample of the
recorded distribution, so RL keeps acting with ``act`` (``policy.lookahead``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from rl.imagine import ImagineOutput
from rl.policy import ActOutput, History, RigPolicy
from rl.returns import lambda_returns


@dataclass
class Review:
    """One reviewed step of B rows with n candidates each."""

    actions: Tensor  # (B,) int64 the chosen candidates' actions
    chosen: Tensor  # (B,) int64 index of the chosen candidate in 0..n-1
    candidates: Tensor  # (B, n) int64 every candidate's action
    q: Tensor  # (B, n) float32 each candidate's imagined return (module docstring)
    act: ActOutput  # the chosen candidates' act rows (B rows)
    imagined: ImagineOutput  # the chosen candidates' imagined next frames (B rows)


def _repeat(x: Tensor, n: int) -> Tensor:
    return x.repeat_interleave(n, 0)


@torch.no_grad()
def review_by_value(
    policy: RigPolicy,
    frames: np.ndarray | Tensor,
    task: str | Sequence[str],
    candidates: int,
    max_reasoning_tokens: int = 32,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    history: History | None = None,
    gamma: float = 0.99,
    imagine_temperature: float | None = None,
    depth: int = 1,
) -> Review:
    """Sample ``candidates`` actions per frame (B, H, W, 3), imagine each one's next frame, and
    choose the one with the highest ``r + gamma * c * V(imagined frame)``, or with ``depth``
    > 1 the highest return of a ``depth``-step imagined rollout (module docstring).
    ``imagine_temperature``: the code sampler's (default ``temperature``)."""
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    frames_t = frames if isinstance(frames, Tensor) else torch.as_tensor(np.asarray(frames))
    B, n = frames_t.shape[0], candidates
    history = History.empty(B, 0, policy.image_size) if history is None else history
    copies = History(_repeat(history.frames, n), _repeat(history.actions, n),
                     _repeat(history.mask, n))  # fmt: skip
    tasks = task if isinstance(task, str) else [t for t in task for _ in range(n)]
    out, img = policy.act_imagine(_repeat(frames_t, n), tasks, max_reasoning_tokens, temperature,
                                  generator, history=copies,
                                  imagine_temperature=imagine_temperature)  # fmt: skip
    dreams, last = [img], out
    for _ in range(depth - 1):  # the policy goes on in its own world model
        last, dream = policy.act_imagine(dreams[-1].frames, tasks, max_reasoning_tokens,
                                         temperature, generator, history=History.after(last),
                                         imagine_temperature=imagine_temperature)  # fmt: skip
        dreams.append(dream)
    values = policy.state_values(dreams[-1].frames, tasks, History.after(last))  # V(s_d)
    rewards = torch.stack([d.reward.float() for d in dreams])  # (d, B * n) time-major
    continues = torch.stack([d.continue_prob.float() for d in dreams])
    # lambda 1: r_0 + gamma c_0 (r_1 + ... + gamma c_{d-1} V(s_d)); the values are unused
    q = lambda_returns(rewards, torch.zeros_like(rewards), continues, values.float(), gamma,
                       1.0)[0].view(B, n)  # fmt: skip
    chosen = q.argmax(1)
    rows = torch.arange(B, device=chosen.device) * n + chosen
    picked = ImagineOutput(**{k: (v[rows] if isinstance(v, Tensor) else v)
                              for k, v in vars(img).items()})  # fmt: skip
    return Review(actions=out.actions[rows], chosen=chosen, candidates=out.actions.view(B, n),
                  q=q, act=out[rows], imagined=picked)  # fmt: skip


__all__ = ["Review", "review_by_value"]
