"""Every loss of the RIG policy as a pure function: named tensors in, ``(loss, metrics)`` out.

The learner computes each term here and adds them with ``combine`` by name, with weights from the
config's ``loss_scales`` (DreamerV3's habit): the set of names must match exactly, so a typo in a
config fails on the first step instead of silently training without a term.

    policy      clipped PPO over the generated reasoning + action tokens (RL4VLM weighting)
    value       0.5 * MSE of the critic, optionally PPO2-clipped
    entropy     -entropy of the generated tokens (a loss: positive scale = bonus)
    kl          KL to the frozen supervised (RIG) policy, per token (VPT's KL instead of entropy)
    next_frame  cross-entropy of imagined VQ tokens against the real next frame
    reward      MSE in symlog space of the predicted reward (imagination)
    continue    BCE of the predicted continue flag (imagination)

Conventions shared by all of them:

* Shapes are checked on entry; a mismatch raises ValueError naming the argument and both shapes.
* Masks are bool (or 0/1). Masked-out positions never influence a loss, its gradient, or a metric,
  whatever they hold (nan and -inf included): they are selected away with ``torch.where``,
  never multiplied by zero.
* Targets and behaviour-policy quantities (old log-probs, advantages, returns, reference
  log-probs, token ids) are detached inside; only the first argument carries gradient (and
  ``entropy_bonus``'s ``logprobs``, for its score-function term).
* A masked mean over zero positions is 0, not nan.
* Metrics are detached 0-d tensors keyed ``"<loss name>/<metric>"`` so that the dicts of all
  terms can be merged; call ``float()`` on them only when logging (one sync, not one per metric).
* Signs live in the losses, so every scale in ``loss_scales`` is >= 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rl.shapes import require_matching, require_same_shape, require_tensor

LOSS_NAMES = ("policy", "value", "entropy", "kl", "next_frame", "reward", "continue")
WORLD_LOSSES = ("next_frame", "reward", "continue")  # the world model's terms
POLICY_REDUCTIONS = ("sequence", "token")
KL_ESTIMATORS = ("k1", "k2", "k3")

Metrics = dict[str, Tensor]


def world_model_trains(loss_scales: dict[str, float], imagining: bool) -> bool:
    """Whether an update needs the real next frames' VQ codes: some world-model term
    (``WORLD_LOSSES``) has a weight, or imagination runs (its gate reads the next-frame
    accuracy). When not, the driver skips the VQ encoding of every next frame and the learner
    the ``<Imagine:>`` + codes columns of each row's forward: they would cost as much as a third
    of a small policy's iteration for terms weighted 0 (docs/benchmarks.md, session 39)."""
    return imagining or any(loss_scales[k] > 0 for k in WORLD_LOSSES)


# ----------------------------------------------------------------------------- checks and helpers


def _as_mask(name: str, mask: Tensor) -> Tensor:
    """A bool or 0/1 tensor as bool; other values are an error rather than truthy."""
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name} must be bool or 0/1, got values outside {{0, 1}}")
        mask = mask != 0
    return mask.detach()


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` where ``mask``; 0 when nothing is selected. Unselected values may be nan."""
    selected = torch.where(mask, x, torch.zeros_like(x))
    return selected.sum() / mask.sum().clamp_min(1)


# ----------------------------------------------------------------------------- policy


def token_weights(counted: Tensor, reasoning: Tensor, reasoning_weight: float) -> Tensor:
    """(B, L) float32 weight of each token in log pi: ``reasoning_weight`` on the counted
    reasoning tokens, 1 on the other counted ones, 0 elsewhere (both masks bool)."""
    return torch.where(reasoning, reasoning_weight, 1.0) * counted


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    token_mask: Tensor,
    reasoning_mask: Tensor,
    clip_eps: float = 0.2,
    reasoning_weight: float = 0.5,
    reduction: str = "sequence",
    prox_logprobs: Tensor | None = None,
    behaviour_cap: float = 2.0,
    kl_coeff: float = 0.0,
) -> tuple[Tensor, Metrics]:
    """Clipped PPO surrogate (Schulman et al. 2017, eq. 7) over the tokens the policy generated.

    Shapes::

        logprobs        (B, L) float  log p(token) under the current policy (carries gradient)
        old_logprobs    (B, L) float  the same under the policy that sampled them (detached)
        advantages      (B,)   float  one per sample, i.e. per env step (detached; normalise
                                      them before calling if you want normalised advantages)
        token_mask      (B, L) bool   generated tokens that count: reasoning + action
        reasoning_mask  (B, L) bool   the reasoning tokens among them (must be a subset)

    A sample's log-probability is weighted as in RL4VLM (Zhai et al. 2024):
    ``log pi = reasoning_weight * sum log p(reasoning tokens) + sum log p(action tokens)``,
    i.e. token weight w = reasoning_weight on reasoning tokens, 1 on action tokens, 0 elsewhere.

    ``reduction`` picks where the ratio is formed and clipped:

    * ``"sequence"`` (RL4VLM): one ratio per sample, ``exp(sum_l w_l * (logp_l - old_logp_l))``,
      clipped per sample, loss = mean over samples that have counted tokens. Faithful to the
      sequence-level log pi the action was actually chosen by, and reasoning_weight scales the
      reasoning's absolute share. Trade-off: the exponent is a sum over all tokens, so the ratio
      grows with sequence length; long reasoning makes the ratio leave [1-eps, 1+eps] quickly and
      the whole sample then stops giving gradient (watch ``policy/clip_frac``).
    * ``"token"`` (PPO for LLMs, e.g. OpenRLHF / DAPO's token-level mean): a ratio per token,
      clipped per token, loss = ``sum(w * surrogate) / sum(w)`` over all counted tokens of the
      batch. Ratios stay near 1 and one drifting token does not silence its whole sample, so it is
      more stable; but it optimises a per-token surrogate rather than the sequence's likelihood
      ratio, longer samples weigh more in the batch mean, and since the weights are normalised,
      reasoning_weight only sets reasoning tokens' weight RELATIVE to action tokens.

    ``prox_logprobs`` (B, L) turns it into decoupled PPO (Hilton et al. 2022, "Batch
    size-invariance for policy optimization"; AReaL's asynchronous PPO) for rows acted by an
    older policy than the learner's: the ratio is formed and clipped against the *proximal*
    policy (the learner's weights at the start of the update, ``prox_logprobs``) instead of the
    behaviour policy that sampled the tokens (``old_logprobs``), and each unit's surrogate is
    weighted by the importance weight ``pi_prox / pi_behaviour`` (the same token weights and
    reduction), truncated at ``behaviour_cap`` and detached::

        sequence:  -mean_b  min(w_b, cap) * min(r_b A_b, clip(r_b) A_b),
                   r_b = exp(sum_l w_l (logp - prox)),  w_b = exp(sum_l w_l (prox - old))

    so the trust region is around the policy the update starts from however stale the rows are,
    and the behaviour policy's mismatch is corrected rather than clipped away. Rows acted by the
    learner's own weights have prox = old: weight 1, the plain PPO loss. Extra metrics:
    ``policy/behaviour_weight_mean``, ``policy/behaviour_weight_max`` (before the cap) and
    ``policy/behaviour_capped_frac``.

    ``kl_coeff`` > 0 adds RLlib PPO's KL penalty (``kl_coeff * KL(old || new)``, the coefficient
    adapted between updates by :func:`adapt_kl_coeff`) to the loss: Schulman's k3 of the same
    ratio, ``r - 1 - log r`` (>= 0, unbiased for KL(old || new) on tokens sampled by the old
    policy, and so is its gradient, ``(r - 1) grad log r``), reduced as the surrogate is (over
    samples, or the weighted token mean), so it scales with it under several learner ranks. The
    ratio is the one the surrogate clips: against the proximal policy when decoupled. Metric:
    ``policy/kl_penalty`` (the unscaled mean it adds, times ``kl_coeff``).

    Metrics (over samples for "sequence", over counted tokens for "token"): ``policy/clip_frac``
    (share of ratios outside [1-eps, 1+eps]), ``policy/approx_kl`` (mean of
    ``(ratio - 1) - log ratio``, Schulman's k3 estimator of KL(old || new)), ``policy/ratio_mean``,
    ``policy/ratio_max``. Ratios are not clamped before exp: an overflowing ratio is a real
    problem (e.g. old log-probs from a different inference engine) and shows in ``ratio_max``.
    """
    layout = "(B, L)"
    require_matching(
        layout, 2, logprobs=logprobs, old_logprobs=old_logprobs,
        token_mask=token_mask, reasoning_mask=reasoning_mask,
    )  # fmt: skip
    require_tensor("advantages", advantages, 1, "(B,)")
    if advantages.shape[0] != logprobs.shape[0]:
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)} but logprobs has shape "
            f"{tuple(logprobs.shape)}; advantages must be (B,) = ({logprobs.shape[0]},)"
        )
    if reduction not in POLICY_REDUCTIONS:
        raise ValueError(f"reduction must be one of {POLICY_REDUCTIONS}, got {reduction!r}")
    if clip_eps <= 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    if reasoning_weight < 0:
        raise ValueError(f"reasoning_weight must be >= 0, got {reasoning_weight}")
    if not kl_coeff >= 0:
        raise ValueError(f"kl_coeff must be >= 0, got {kl_coeff}")
    if prox_logprobs is not None:
        require_same_shape(layout, "logprobs", logprobs, prox_logprobs=prox_logprobs)
        if not behaviour_cap > 0:
            raise ValueError(f"behaviour_cap must be > 0, got {behaviour_cap}")
    counted = _as_mask("token_mask", token_mask)
    reasoning = _as_mask("reasoning_mask", reasoning_mask)
    if bool((reasoning & ~counted).any()):
        raise ValueError("reasoning_mask marks tokens that token_mask does not count")

    weights = token_weights(counted, reasoning, reasoning_weight).to(logprobs.dtype)  # (B, L)
    anchor = old_logprobs if prox_logprobs is None else prox_logprobs  # where the ratio is formed
    diff = torch.where(counted, logprobs - anchor.detach(), 0.0)  # (B, L) log ratio per token
    behaviour = None  # (B, L) log pi_prox - log pi_behaviour per token, decoupled only
    if prox_logprobs is not None:
        behaviour = torch.where(counted, (prox_logprobs - old_logprobs).detach(), 0.0)
    adv = advantages.detach().to(logprobs.dtype)  # (B,)

    if reduction == "sequence":
        log_ratio = (weights * diff).sum(dim=-1)  # (B,) weighted sequence log ratio
        units = counted.any(dim=-1)  # (B,) samples with something to learn from
        surrogate = _clipped_surrogate(log_ratio, adv, clip_eps)  # (B,)
        if behaviour is not None:
            log_w = (weights * behaviour).sum(dim=-1)  # (B,)
            surrogate = log_w.exp().clamp(max=behaviour_cap) * surrogate
        loss = -_masked_mean(surrogate, units)
        if kl_coeff > 0:
            penalty = _masked_mean(_k3(log_ratio), units)
    else:
        log_ratio = diff  # (B, L)
        units = counted
        surrogate = _clipped_surrogate(log_ratio, adv[:, None], clip_eps)  # (B, L)
        if behaviour is not None:
            log_w = behaviour  # (B, L)
            surrogate = log_w.exp().clamp(max=behaviour_cap) * surrogate
        total_weight = weights.sum()
        denominator = torch.where(total_weight > 0, total_weight, 1.0)
        loss = -(weights * surrogate).sum() / denominator
        if kl_coeff > 0:
            penalty = (weights * _k3(log_ratio)).sum() / denominator

    metrics = _ratio_metrics(log_ratio.detach(), units, clip_eps)
    if kl_coeff > 0:
        loss = loss + kl_coeff * penalty
        metrics["policy/kl_penalty"] = (kl_coeff * penalty).detach()
    if behaviour is not None:
        w = log_w.exp()
        counted_w = torch.where(units, w, 1.0).flatten()
        metrics["policy/behaviour_weight_mean"] = _masked_mean(w, units)
        metrics["policy/behaviour_weight_max"] = torch.cat([counted_w, w.new_ones(1)]).max()
        metrics["policy/behaviour_capped_frac"] = _masked_mean((w > behaviour_cap).to(w.dtype),
                                                               units)  # fmt: skip
    return loss, metrics


def _clipped_surrogate(log_ratio: Tensor, adv: Tensor, clip_eps: float) -> Tensor:
    """min(r * A, clip(r, 1 - eps, 1 + eps) * A), elementwise (PPO's pessimistic bound)."""
    ratio = log_ratio.exp()
    return torch.minimum(ratio * adv, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv)


def _k3(log_ratio: Tensor) -> Tensor:
    """Schulman's k3 estimator of KL(old || new) from log r = log new - log old (elementwise)."""
    return log_ratio.exp() - 1.0 - log_ratio


def adapt_kl_coeff(coeff: float, kl: float, target: float) -> float:
    """The next update's KL-penalty coefficient after one whose mean approx KL was ``kl``
    (RLlib PPO's rule, the peer's): x1.5 above twice ``target``, x0.5 below half of it, else
    kept; a non-finite ``kl`` keeps it (the update's finiteness check reports that)."""
    if not target > 0:
        raise ValueError(f"target must be > 0, got {target}")
    if kl != kl or kl in (float("inf"), float("-inf")):
        return coeff
    if kl > 2.0 * target:
        return coeff * 1.5
    if kl < 0.5 * target:
        return coeff * 0.5
    return coeff


def _ratio_metrics(log_ratio: Tensor, units: Tensor, clip_eps: float) -> Metrics:
    ratio = log_ratio.exp()
    outside = ((ratio - 1.0).abs() > clip_eps).to(ratio.dtype)
    counted_ratios = torch.where(units, ratio, 1.0).flatten()  # 1 stands in for the uncounted
    return {
        "policy/clip_frac": _masked_mean(outside, units),
        "policy/approx_kl": _masked_mean((ratio - 1.0) - log_ratio, units),
        "policy/ratio_mean": _masked_mean(ratio, units),
        "policy/ratio_max": torch.cat([counted_ratios, ratio.new_ones(1)]).max(),
    }


# ----------------------------------------------------------------------------- value, entropy, KL


def value_loss(
    values: Tensor,
    old_values: Tensor | None,
    returns: Tensor,
    clip_eps: float | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """0.5 * mean squared error of the critic, optionally clipped as in PPO2 / CleanRL;
    ``weights`` (the shape of ``values``), if given, weigh each element's error in the mean.

    ``values``, ``old_values``, ``returns``: the same shape, usually ``(B,)``. With ``clip_eps``
    the new value may not move more than eps from the value at collection time without losing
    gradient, and the loss is the max (pessimistic) of the clipped and unclipped errors::

        v_clip = old + clamp(v - old, -eps, eps)
        loss   = 0.5 * mean(max((v - R)^2, (v_clip - R)^2))

    Clipping ties eps to the scale of the returns, which is why it is off by default
    (``old_values`` may then be None). Metrics: ``value/clip_frac`` (share where the clipped error
    is the larger one, i.e. the clip binds), ``value/explained_variance``
    (1 - Var[R - v] / Var[R]; nan when the returns do not vary).
    """
    require_tensor("values", values, None, "a tensor")
    require_tensor("returns", returns, None, "a tensor")
    require_same_shape("the same shape", "values", values, returns=returns)
    if clip_eps is not None:
        if clip_eps <= 0:
            raise ValueError(f"clip_eps must be > 0 or None, got {clip_eps}")
        if old_values is None:
            raise ValueError("value clipping (clip_eps set) needs old_values, got None")
    if old_values is not None:
        require_tensor("old_values", old_values, None, "a tensor")
        require_same_shape("the same shape", "values", values, old_values=old_values)

    target = returns.detach()
    unclipped = (values - target).square()
    if clip_eps is None:
        error = unclipped
        clip_frac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        old = old_values.detach()
        clipped = (old + (values - old).clamp(-clip_eps, clip_eps) - target).square()
        error = torch.maximum(unclipped, clipped)
        clip_frac = (clipped > unclipped).to(values.dtype).mean()
    if weights is not None:
        require_same_shape("the same shape", "values", values, weights=weights)
        error = error * weights.detach()
    loss = 0.5 * error.mean()

    v = values.detach()
    var_returns = target.var(unbiased=False)
    explained = 1.0 - (target - v).var(unbiased=False) / var_returns
    explained = torch.where(var_returns > 0, explained, torch.full_like(explained, float("nan")))
    return loss, {"value/clip_frac": clip_frac, "value/explained_variance": explained}


def entropy_bonus(
    entropies: Tensor,
    token_mask: Tensor,
    reasoning_mask: Tensor | None = None,
    reasoning_weight: float = 1.0,
    reduction: str = "token",
    logprobs: Tensor | None = None,
    old_logprobs: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """Minus the policy's entropy, weighted as :func:`policy_loss` weights log pi.

    ``entropies`` ``(B, L)``: entropy of the policy's next-token distribution at each position;
    ``token_mask`` ``(B, L)`` bool, the counted tokens; ``reasoning_mask`` ``(B, L)`` bool, the
    reasoning tokens among them (None: none), weighted ``reasoning_weight``, the others 1:

    * ``"sequence"``: per sample ``sum_l w_l H_l`` (by the chain rule, the entropy of the
      sample's tokens along the sampled path: of the action's choice where it spans several
      trie tokens), mean over the samples with a counted token. So the action's entropy is
      weighted the same with any number of reasoning tokens beside it. (A mean over tokens
      would give an action of one choice token beside 4 reasoning tokens a fifth of the weight
      it has without reasoning: the bonus's share would shrink with the reasoning's length.)
    * ``"token"``: ``sum(w * H) / sum(w)`` over the counted tokens of the batch.

    The loss is minus that: with a positive scale, minimising it RAISES entropy (a bonus).
    ``entropy/mean`` reports the plain mean entropy per counted token (>= 0), whatever the
    weighting.

    ``logprobs`` (with grad) and ``old_logprobs`` (the behaviour policy's), both ``(B, L)``, of
    the sampled tokens: the gradient becomes that of the entropy of the whole distribution over
    sequences (over every action of a trie, not only the sampled path's choices). The sum of
    entropies along a sampled path estimates that entropy (chain rule), but its gradient misses
    how an earlier choice moves the entropy of what follows it: ``d/dθ sum_x p(x) H(rest | x)``.
    Its score-function estimate is added, ``ratio_l * sum_{l' > l} w_l' H_l'`` at each counted
    token (the later entropies detached; ``ratio_l = exp(logprobs - old_logprobs)``, 1 in value
    at the behaviour policy, as PPO's surrogate), with value 0: the loss's value is unchanged.
    Without it, a trie choice that opens many actions (Crafter's ``make`` opens six) gets no
    credit for them: the flat softmax over actions a peer uses sees their entropy, the path
    sum does not.
    """
    require_tensor("entropies", entropies, 2, "(B, L)")
    require_tensor("token_mask", token_mask, 2, "(B, L)")
    require_same_shape("(B, L)", "entropies", entropies, token_mask=token_mask)
    if reduction not in ("sequence", "token"):
        raise ValueError(f"reduction must be 'sequence' or 'token', got {reduction!r}")
    mask = _as_mask("token_mask", token_mask)
    if reasoning_mask is None:
        reasoning_mask = torch.zeros_like(mask)
    require_same_shape("(B, L)", "entropies", entropies, reasoning_mask=reasoning_mask)
    w = token_weights(mask, _as_mask("reasoning_mask", reasoning_mask), reasoning_weight)
    weighted = torch.where(mask, entropies, torch.zeros_like(entropies)) * w
    if (logprobs is None) != (old_logprobs is None):
        raise ValueError("give logprobs and old_logprobs together, or neither")
    if logprobs is not None:
        require_same_shape("(B, L)", "entropies", entropies, logprobs=logprobs,
                           old_logprobs=old_logprobs)  # fmt: skip
        own = weighted.detach()
        later = own.flip(1).cumsum(1).flip(1) - own  # (B, L) entropy after each token
        log_ratio = torch.where(mask, logprobs - old_logprobs.detach(), torch.zeros_like(logprobs))
        ratio = log_ratio.exp()
        # value 0, gradient ratio_l * d log pi_l * (entropy after l): added to each token's own
        weighted = weighted + torch.where(mask, (ratio - ratio.detach()) * later, 0.0)
    if reduction == "sequence":
        rows = mask.any(1)
        bonus = weighted.sum(1)[rows].sum() / rows.sum().clamp_min(1)
    else:
        bonus = weighted.sum() / w.sum().clamp_min(1e-12)  # 0 when nothing counts
    return -bonus, {"entropy/mean": _masked_mean(entropies, mask).detach()}


def kl_penalty(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    token_mask: Tensor,
    estimator: str = "k3",
    clamp: float | None = 10.0,
) -> tuple[Tensor, Metrics]:
    """Per-token KL of the policy to the frozen reference, estimated from sampled tokens.

    ``logprobs``, ``ref_logprobs``, ``token_mask``: ``(B, L)``. With log r = logprobs -
    ref_logprobs (r = pi / pi_ref), clamped to [-clamp, clamp] (None: no clamp) so exp cannot
    overflow, the estimators are OpenRLHF's (after Schulman's "Approximating KL divergence")::

        k1 = log r                      unbiased for KL(pi || ref), can be negative, high variance
        k2 = (log r)^2 / 2              biased, >= 0, low variance
        k3 = exp(-log r) - 1 + log r    unbiased for KL(pi || ref), >= 0, low variance

    The loss is their mean over counted tokens. As a LOSS (differentiated through log pi at tokens
    sampled from pi) they differ more than as estimates: k1's gradient is zero in expectation,
    k2's is the gradient of KL(pi || ref), k3's is the gradient of KL(ref || pi) (mode-covering).
    Beyond the clamp the gradient is zero. Metrics: ``kl/mean`` (the estimate),
    ``kl/clamp_frac`` (share of counted tokens whose log r was clamped).
    """
    layout = "(B, L)"
    require_tensor("logprobs", logprobs, 2, layout)
    require_tensor("ref_logprobs", ref_logprobs, 2, layout)
    require_tensor("token_mask", token_mask, 2, layout)
    require_same_shape(
        layout, "logprobs", logprobs, ref_logprobs=ref_logprobs, token_mask=token_mask
    )
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    if clamp is not None and clamp <= 0:
        raise ValueError(f"clamp must be > 0 or None, got {clamp}")
    counted = _as_mask("token_mask", token_mask)

    log_r = torch.where(counted, logprobs - ref_logprobs.detach(), 0.0)  # (B, L)
    clamped = torch.zeros_like(counted)
    if clamp is not None:
        clamped = counted & (log_r.detach().abs() > clamp)
        log_r = log_r.clamp(-clamp, clamp)
    if estimator == "k1":
        k = log_r
    elif estimator == "k2":
        k = 0.5 * log_r.square()
    else:
        k = (-log_r).exp() - 1.0 + log_r
    loss = _masked_mean(k, counted)
    return loss, {
        "kl/mean": loss.detach(),
        "kl/clamp_frac": _masked_mean(clamped.to(k.dtype), counted),
    }


# ----------------------------------------------------------------------------- imagination


def next_frame_loss(
    logits: Tensor, target_tokens: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Metrics]:
    """Cross-entropy of the generation head against the REAL next frame's VQ token ids.

    ``logits`` ``(B, N, V)`` (N image tokens per frame, V codebook size), ``target_tokens``
    ``(B, N)`` integer ids in [0, V), ``mask`` ``(B, N)`` bool or None (all count). Targets at
    masked positions may hold anything (e.g. -100). Half-precision logits are upcast to float32
    for the softmax, as language-model losses usually do.

    Metrics: ``next_frame/accuracy`` (argmax == target over counted tokens). It is the gate for
    imagined data (Dyna with warmup: use imagination only once the world model is good enough),
    so it is computed exactly like the loss, over the same tokens.
    """
    require_tensor("logits", logits, 3, "(B, N, V)")
    require_tensor("target_tokens", target_tokens, 2, "(B, N)")
    if target_tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"target_tokens has shape {tuple(target_tokens.shape)} but logits has shape "
            f"{tuple(logits.shape)}; target_tokens must be (B, N) = {tuple(logits.shape[:2])}"
        )
    if target_tokens.dtype.is_floating_point or target_tokens.dtype == torch.bool:
        raise ValueError(f"target_tokens must be integer token ids, got {target_tokens.dtype}")
    if mask is None:
        counted = torch.ones_like(target_tokens, dtype=torch.bool)
    else:
        require_tensor("mask", mask, 2, "(B, N)")
        require_same_shape("(B, N)", "target_tokens", target_tokens, mask=mask)
        counted = _as_mask("mask", mask)
    vocab = logits.shape[-1]
    targets = torch.where(counted, target_tokens.detach(), 0).long()  # (B, N)
    if bool(((targets < 0) | (targets >= vocab)).any()):
        raise ValueError(f"target_tokens holds ids outside [0, {vocab}) at counted positions")

    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    ce = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), reduction="none")
    loss = _masked_mean(ce.view_as(targets), counted)
    correct = (logits.detach().argmax(dim=-1) == targets).to(ce.dtype)  # (B, N)
    return loss, {"next_frame/accuracy": _masked_mean(correct, counted)}


def symlog(x: Tensor) -> Tensor:
    """sign(x) * ln(1 + |x|): compresses large magnitudes, identity-like near 0 (DreamerV3)."""
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x: Tensor) -> Tensor:
    """Inverse of ``symlog``: decodes a reward head's output to a reward."""
    return torch.sign(x) * torch.expm1(x.abs())


def reward_loss(pred: Tensor, target: Tensor) -> tuple[Tensor, Metrics]:
    """Mean squared error in symlog space: ``mean((pred - symlog(target))^2)``.

    ``pred`` is the reward head's raw output, read as symlog(reward) (decode with ``symexp``);
    ``target`` the real reward; any shape, the same for both. Why symlog MSE rather than
    DreamerV3's two-hot over 255 bins: Crafter rewards are small (+1 per unlock, +-0.1 per health
    point) and MineRL's shaped rewards are bounded, so squashing the rare large value is enough and
    a scalar head stays a scalar head; the loss is still robust to a reward scale we do not know in
    advance. Metrics: ``reward/abs_error`` (mean |symexp(pred) - target| in reward units).
    """
    require_tensor("pred", pred, None, "a tensor")
    require_tensor("target", target, None, "a tensor")
    require_same_shape("the same shape", "pred", pred, target=target)
    target = target.detach().to(pred.dtype)
    loss = (pred - symlog(target)).square().mean()
    return loss, {"reward/abs_error": (symexp(pred.detach()) - target).abs().mean()}


def continue_loss(logits: Tensor, target: Tensor) -> tuple[Tensor, Metrics]:
    """Binary cross-entropy with logits of the continue head: target 1 = the episode goes on.

    ``logits`` and ``target`` (in [0, 1]: 0/1 flags, or soft labels) have the same shape. For
    Crafter the target is ``1 - terminated``; truncation is not an end of the world and keeps 1.
    Metrics: ``continue/accuracy`` (p > 0.5 agrees with target > 0.5), ``continue/prob_mean``.
    """
    require_tensor("logits", logits, None, "a tensor")
    require_tensor("target", target, None, "a tensor")
    require_same_shape("the same shape", "logits", logits, target=target)
    target = target.detach().to(logits.dtype)
    if bool(((target < 0) | (target > 1)).any()):
        raise ValueError("continue target must lie in [0, 1]")
    loss = F.binary_cross_entropy_with_logits(logits, target)
    agree = ((logits.detach() > 0) == (target > 0.5)).to(logits.dtype)
    return loss, {
        "continue/accuracy": agree.mean(),
        "continue/prob_mean": torch.sigmoid(logits.detach()).mean(),
    }


# ----------------------------------------------------------------------------- combining


def combine(terms: dict[str, Tensor], loss_scales: dict[str, float]) -> tuple[Tensor, Metrics]:
    """Weighted sum of named scalar losses; the names of ``terms`` and ``loss_scales`` must match.

    A name in one dict but not the other raises ValueError listing both sets: a typo in a config
    (``polcy: 1.0``) must fail on the first step, not train without the policy loss. A scale of 0
    is allowed (and still needs its name); such a term is reported but left out of the sum, so a
    nan in a switched-off term cannot poison the total (0 * nan = nan) and costs no backward.
    Scales must be finite and >= 0 (signs are in the losses: see ``entropy_bonus``).

    Metrics: ``loss/<name>`` for each unscaled term and ``loss/total``.
    """
    if set(terms) != set(loss_scales):
        missing = sorted(set(terms) - set(loss_scales))
        unknown = sorted(set(loss_scales) - set(terms))
        raise ValueError(
            f"loss terms and loss_scales must name the same losses: no scale for {missing}, "
            f"scale for unknown {unknown}; terms = {sorted(terms)}, "
            f"loss_scales = {sorted(loss_scales)}"
        )
    total: Tensor | None = None
    metrics: Metrics = {}
    for name, term in terms.items():
        require_tensor(f"terms[{name!r}]", term, 0, "a 0-d (scalar) tensor")
        scale = float(loss_scales[name])
        if not (scale >= 0 and scale != float("inf")):
            raise ValueError(f"loss_scales[{name!r}] must be finite and >= 0, got {scale}")
        metrics[f"loss/{name}"] = term.detach()
        if scale > 0:
            total = scale * term if total is None else total + scale * term
    if total is None:
        some = next(iter(terms.values()), None)
        total = torch.zeros(()) if some is None else torch.zeros_like(some)
    metrics["loss/total"] = total.detach()
    return total, metrics
