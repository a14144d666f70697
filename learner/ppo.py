"""One PPO update of the RIG policy on real + imagined experience, through an optimiser engine.

Per minibatch, one teacher-forced forward of the policy (``RigPolicy.evaluate`` with the real
next frames' VQ codes appended) gives everything the losses need::

    policy      clipped PPO over reasoning + action tokens (rl.losses.policy_loss); imagined rows
                form a second term scaled by their weight (imagination.weight), real rows the first
    value       0.5 MSE to GAE / lambda returns (imagined rows weighted alike)
    entropy     minus the mean entropy of the sampled tokens (real rows)
    kl          KL to the frozen reference policy (the initial checkpoint), k1/k2/k3 (real rows)
    next_frame  cross-entropy of the generation head against the real next frame's VQ codes
    reward      symlog MSE of the reward head against the real reward
    continue    BCE of the continue head against 1 - terminated

combined by name with ``loss_scales`` (rl.losses.combine: a missing or unknown name is an error).
The frozen reference is evaluated under ``torch.no_grad`` on the same rows.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from learner.engine import GRAD_NORM, OPTIMIZER_STEP
from rig.config import PPOConfig
from rl import losses
from rl.experience import Experience
from rl.policy import RigPolicy


def minibatch_loss(
    policy: RigPolicy,
    reference: RigPolicy | None,
    mb: Experience,
    cfg: PPOConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The combined loss of one minibatch (already on the policy's device) and its metrics."""
    res = policy.evaluate(mb.act, next_codes=mb.next_codes)
    act = mb.act
    real, imagined = ~mb.imagined, mb.imagined
    terms: dict[str, torch.Tensor] = {}
    metrics: dict[str, torch.Tensor] = {}

    # policy and value: one term per kind of data, the imagined one scaled by its weight
    zero = torch.zeros((), device=mb.advantages.device)
    terms["policy"], terms["value"] = zero, zero
    for rows, suffix in ((real, ""), (imagined, "_imagined")):
        if not bool(rows.any()):
            continue
        weight = mb.weights[rows].mean()
        pg, m = losses.policy_loss(
            res["log_probs"][rows], act.log_probs[rows], mb.advantages[rows],
            act.token_mask[rows], act.reasoning_mask[rows],
            cfg.clip_eps, cfg.reasoning_weight, cfg.reduction,
        )  # fmt: skip
        v, mv = losses.value_loss(res["values"][rows], act.values[rows], mb.returns[rows],
                                  cfg.value_clip)  # fmt: skip
        terms["policy"] = terms["policy"] + weight * pg
        terms["value"] = terms["value"] + weight * v
        metrics.update({k + suffix: x for k, x in {**m, **mv}.items()})

    # the rest learns from real rows only: the world model must fit the real env
    terms.update(entropy=zero, kl=zero, next_frame=zero, reward=zero)
    terms["continue"] = zero
    if bool(real.any()):
        rows = real.nonzero().squeeze(1)
        terms["entropy"], m = losses.entropy_bonus(res["entropies"][rows], act.token_mask[rows])
        metrics.update(m)
        if reference is not None:
            with torch.no_grad():
                ref = reference.evaluate(act[rows])["log_probs"]
            terms["kl"], m = losses.kl_penalty(
                res["log_probs"][rows], ref, act.token_mask[rows], cfg.kl_estimator
            )
            metrics.update(m)
        terms["next_frame"], m = losses.next_frame_loss(
            res["next_frame_logits"][rows], mb.next_codes[rows]
        )
        metrics.update(m)
        terms["reward"], m = losses.reward_loss(res["reward_pred"][rows], mb.rewards[rows])
        metrics.update(m)
        terms["continue"], m = losses.continue_loss(res["continue_logit"][rows], mb.continues[rows])
        metrics.update(m)

    total, m = losses.combine(terms, cfg.loss_scales)
    metrics.update(m)
    return total, metrics


def normalize(exp: Experience) -> Experience:
    """Advantages standardised over the batch (mean 0, std 1), each kind of data on its own."""
    adv = exp.advantages.clone()
    for rows in (~exp.imagined, exp.imagined):
        if int(rows.sum()) > 1:
            a = adv[rows]
            adv[rows] = (a - a.mean()) / (a.std() + 1e-8)
    exp.advantages = adv
    return exp


def ppo_update(
    engine: Any,
    policy: RigPolicy,
    reference: RigPolicy | None,
    exp: Experience,
    cfg: PPOConfig,
    generator: torch.Generator,
) -> dict[str, float]:
    """``cfg.epochs`` passes of shuffled minibatches; one ``engine.backward_step`` each (the
    engine accumulates and clips as configured). Returns metrics averaged over minibatches, plus
    ``learner/optimizer_steps`` and ``learner/grad_norm`` (last)."""
    if cfg.normalize_advantages:
        exp = normalize(exp)
    dev = policy.device
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    steps, grad_norm = 0, float("nan")
    policy.train()
    for _ in range(cfg.epochs):
        for mb in exp.minibatches(cfg.minibatch_size, generator):
            mb = _to(mb, dev)
            loss, metrics = minibatch_loss(policy, reference, mb, cfg)
            stats = engine.backward_step(loss)
            if stats[OPTIMIZER_STEP]:
                steps += 1
                if stats[GRAD_NORM] is not None:
                    grad_norm = float(stats[GRAD_NORM])
            for k, v in metrics.items():
                value = float(v)
                if value == value:  # skip nan (e.g. explained variance of constant returns)
                    sums[k] += value
                    counts[k] += 1
    policy.eval()
    out = {k: sums[k] / counts[k] for k in sums}
    out["learner/optimizer_steps"] = float(steps)
    out["learner/grad_norm"] = grad_norm
    return out


def _to(exp: Experience, device: torch.device) -> Experience:
    fields = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(exp).items()}
    fields["act"] = exp.act.to(device)
    return Experience(**fields)


__all__ = ["PPOConfig", "minibatch_loss", "normalize", "ppo_update"]
