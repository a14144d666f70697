"""One PPO update of the RIG policy on real + imagined experience, through an optimiser engine.

Per minibatch, one teacher-forced forward of the policy (``RigPolicy.evaluate`` with the real
next frames' VQ codes appended) gives everything the losses need::

    policy      clipped PPO over reasoning + action tokens (rl.losses.policy_loss); imagined rows
                form a second term scaled by their weight (imagination.weight), real rows the first,
                with RLlib's adaptive KL penalty to the behaviour policy (ppo.behaviour_kl_coeff)
    value       0.5 MSE to GAE / lambda returns (imagined rows weighted alike)
    entropy     minus the policy's entropy, per decision as its log pi (real rows)
    kl          KL to the frozen reference policy (the initial checkpoint), k1/k2/k3 (real rows)
    next_frame  cross-entropy of the generation head against the real next frame's VQ codes
    reward      symlog MSE of the reward head against the real reward
    continue    BCE of the continue head against 1 - terminated

combined by name with ``loss_scales`` (rl.losses.combine: a missing or unknown name is an error).
The frozen reference is evaluated under ``torch.no_grad`` on the same rows. Before the first
optimiser step, ``sync_health`` re-scores a sample of the rows that acted with the learner's
current weights: the sync-health alarm (``sync/logp_abs_diff_mean`` / ``_max``).

Data parallel (``DataParallel``, several learner ranks): every rank holds the whole batch and
the same generator state, so all draw the same minibatches; each takes its share of every
minibatch (real and imagined rows dealt out alike) and DeepSpeed averages the gradients over the
ranks. Every term is a mean with its own denominator (rows, rows with a choice, tokens with a
choice), so the mean of the ranks' means is not the global batch's mean when shards differ in
those counts: each rank's term is scaled by ``world_size * local count / global count`` (one
all-reduce of the counts per minibatch), which makes DeepSpeed's average exactly the one-rank
gradient. The value head's running statistics are summed over ranks too (``rl.heads``), so the
update is the one a single rank makes on the same global batch, up to float summation order.

Decoupled PPO (``ppo.decoupled``, for rows acted by older weights: ``ppo.max_policy_lag``):
before the first minibatch every row is re-scored with the weights the update starts from
(``proximal_log_probs``), and ``rl.losses.policy_loss`` clips against those and weights each row
by pi_prox / pi_behaviour, truncated at ``ppo.behaviour_cap``.

A frozen trunk (``learner.freeze: [model]``: only the heads train) gives every row the same
hidden states in every epoch, so they are computed once per update, without gradients
(``RigPolicy.trunk_states`` into ``Experience.trunk``, on the learner's device), and each
minibatch runs only the heads and the LM's output layer on them: the same losses and gradients,
without ``epochs - 1`` of every ``epochs`` trunk forwards. (With several ranks each computes
them for the whole batch, which every rank holds.) The same holds for an update that lies wholly
inside ``learner.warmup_delay_steps`` (LP-FT's first phase: the trunk at lr 0): its gradient
could move nothing, so it is not computed, and it does not count in the global clip's norm
either (only the LM head's, tied to the input embeddings, still is); the trunk's AdamW moments
start when it starts to move.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from learner.engine import GRAD_NORM, OPTIMIZER_STEP
from rig.config import PPOConfig
from rl import losses
from rl.experience import Experience
from rl.heads import RunningStandardize, frozen_statistics
from rl.policy import RigPolicy

GRAD_NORM_ROWS = 16

WORLD_MODEL_ONLY = ("world.", "frame_head.", "model.model.generation_head.")
"""Parameters that only the world-model terms train (they read the trunk and feed nothing back
into the policy): an update without real rows (``imagination.updates``) has no such term, and
they rest through it (:func:`_resting`)."""
"""Rows of one minibatch per update on which each term's gradient norm is measured (one
forward and one backward per term on them: about a tenth of an update of 128-row minibatches)."""


@dataclass(frozen=True)
class DataParallel:
    """This rank's place among ``world_size`` data-parallel learner ranks (module docstring).
    The collectives run on the default ``torch.distributed`` group the engine created."""

    rank: int
    world_size: int

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks, in place (and returned)."""
        torch.distributed.all_reduce(tensor)
        return tensor

    def shard(self, mb: Experience) -> Experience:
        """This rank's rows of minibatch ``mb``: its real rows dealt out round-robin, then its
        imagined rows, so every rank gets as many of each kind as the others (one at most more)."""
        order = torch.cat([(~mb.imagined).nonzero().squeeze(1), mb.imagined.nonzero().squeeze(1)])
        if len(order) < self.world_size:
            raise ValueError(
                f"a minibatch of {len(order)} rows cannot be split over {self.world_size} "
                f"learner ranks; raise ppo.minibatch_size or lower learner.num_ranks"
            )
        return mb.rows(order[self.rank :: self.world_size])

    def install(self, policy: torch.nn.Module) -> None:
        """Running statistics of ``policy`` over the global batch (``rl.heads``)."""
        for module in policy.modules():
            if isinstance(module, RunningStandardize):
                module.all_sum = self.all_sum


def minibatch_loss(
    policy: RigPolicy,
    reference: RigPolicy | None,
    mb: Experience,
    cfg: PPOConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The combined loss of one minibatch (already on the policy's device) and its metrics."""
    terms, metrics = minibatch_terms(policy, reference, mb, cfg)
    total, m = losses.combine(terms, cfg.loss_scales)
    return total, {**metrics, **m}


def minibatch_terms(
    policy: RigPolicy,
    reference: RigPolicy | None,
    mb: Experience,
    cfg: PPOConfig,
    dp: DataParallel | None = None,
    kl_coeff: float = 0.0,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every loss term of one minibatch, unscaled, by name (``rl.losses.LOSS_NAMES``), and
    the metrics. Policy, entropy and KL average over the tokens that had a choice
    (``evaluate``'s ``choice_mask``): a token the trie forces has log-prob 0 under any policy.
    The entropy is weighted and reduced as the policy's log pi (``rl.losses.entropy_bonus``):
    per decision with ``reduction: sequence``, so reasoning does not dilute the action's; its
    gradient is that of the whole action distribution's entropy (every leaf of the trie), not
    only of the sampled path's choices.

    With ``dp``, ``mb`` is this rank's shard and each term is scaled to its share of the
    global minibatch's mean (module docstring); ``loss/*`` averaged over ranks then read as
    one rank's, the other metrics are this shard's. ``kl_coeff``: the weight of the KL penalty
    to the behaviour policy inside the policy term (``ppo.behaviour_kl_coeff``, adapted by the
    driver; ``rl.losses.policy_loss``), on real rows only, as the entropy."""
    res = policy.evaluate(mb.act, next_codes=mb.next_codes, hidden=mb.trunk)
    act = mb.act
    scored = res["choice_mask"]  # (B, L) reasoning tokens and action tokens with a choice
    real, imagined = ~mb.imagined, mb.imagined
    share = _Shares(dp, mb, scored, cfg)
    terms: dict[str, torch.Tensor] = {}
    metrics: dict[str, torch.Tensor] = {}

    # policy and value: one term per kind of data, the imagined one scaled by its weight
    zero = torch.zeros((), device=mb.advantages.device)
    terms["policy"], terms["value"] = zero, zero
    for rows, suffix in ((real, ""), (imagined, "_imagined")):
        if not bool(rows.any()):
            continue
        weight = mb.weights[rows].mean()
        adv, per_row = mb.advantages[rows], None
        if suffix:  # imagined rows weigh what their state is likely to be reached (experience.py)
            per_row = mb.weights[rows] / weight.clamp_min(1e-12)  # mean 1
            adv = adv * per_row  # the clipped objective is linear in a row's advantage
        prox = None if mb.prox_log_probs is None else mb.prox_log_probs[rows]
        pg, m = losses.policy_loss(
            res["log_probs"][rows], act.log_probs[rows], adv,
            scored[rows], act.reasoning_mask[rows],
            cfg.clip_eps, cfg.reasoning_weight, cfg.reduction, prox, cfg.behaviour_cap,
            kl_coeff if suffix == "" else 0.0,
        )  # fmt: skip
        v_weights = mb.value_weights_or_weights[rows]  # the value term's (value_weight)
        v_weight = v_weights.mean()
        v_per_row = v_weights / v_weight.clamp_min(1e-12) if suffix else None
        v, mv = losses.value_loss(res["values"][rows], act.values[rows], mb.returns[rows],
                                  cfg.value_clip, v_per_row)  # fmt: skip
        terms["policy"] = terms["policy"] + weight * share("policy" + suffix, pg)
        terms["value"] = terms["value"] + v_weight * share("rows" + suffix, v)
        metrics.update({k + suffix: x for k, x in {**m, **mv}.items()})

    # the rest learns from real rows only: the world model must fit the real env
    terms.update(entropy=zero, kl=zero, next_frame=zero, reward=zero)
    terms["continue"] = zero
    if bool(real.any()):
        rows = real.nonzero().squeeze(1)
        terms["entropy"], m = losses.entropy_bonus(
            res["entropies"][rows], scored[rows], act.reasoning_mask[rows],
            cfg.reasoning_weight, cfg.reduction, res["log_probs"][rows], act.log_probs[rows],
        )  # fmt: skip
        terms["entropy"] = share("policy", terms["entropy"])  # weighted as the policy's units
        metrics.update(m)
        action = (act.action_mask & scored)[rows]  # the action's own tokens, without reasoning
        decision = res["entropies"][rows].where(action, 0.0).sum(1)  # (B,) per decision
        metrics["policy/action_entropy"] = decision.mean().detach()
        if reference is not None and cfg.loss_scales["kl"] > 0:
            with torch.no_grad():
                ref = reference.evaluate(act[rows])["log_probs"]
            terms["kl"], m = losses.kl_penalty(
                res["log_probs"][rows], ref, scored[rows], cfg.kl_estimator
            )
            terms["kl"] = share("tokens", terms["kl"])
            metrics.update(m)
        if mb.next_codes is not None:  # None: no world-model term trains (world_model_trains)
            terms["next_frame"], m = losses.next_frame_loss(
                res["next_frame_logits"][rows], mb.next_codes[rows]
            )
            terms["next_frame"] = share("rows", terms["next_frame"])
            metrics.update(m)
            terms["reward"], m = losses.reward_loss(res["reward_pred"][rows], mb.rewards[rows])
            terms["reward"] = share("rows", terms["reward"])
            metrics.update(m)
            terms["continue"], m = losses.continue_loss(res["continue_logit"][rows],
                                                        mb.continues[rows])  # fmt: skip
            terms["continue"] = share("rows", terms["continue"])
            metrics.update(m)
    if dp is not None:
        # Every rank's loss reaches every output, even a shard without real rows: ZeRO reduces
        # gradients in buckets filled as parameters' gradients arrive, so the ranks' backward
        # passes must touch the same parameters. (0 x a finite sum: the values do not change.)
        anchor = 0.0 * sum(res[k].float().sum() for k in _ANCHORED if k in res)
        anchor = anchor + 0.0 * res["log_probs"].where(scored, 0.0).sum()
        terms = {k: t + anchor for k, t in terms.items()}
    return terms, metrics


_ANCHORED = ("values", "next_frame_logits", "reward_pred", "continue_logit")


class _Shares:
    """Each mean's denominator on this shard and over the global minibatch; ``share(name,
    term)`` scales this shard's mean to its part of the global one (1 rank: the term itself).

    ``rows``/``rows_imagined``: rows of each kind (value, next-frame, reward, continue);
    ``policy``/``policy_imagined``: the policy loss's units (rows with a choice, or weighted
    tokens with ``reduction: token``); ``tokens``: real tokens with a choice (KL)."""

    def __init__(self, dp: DataParallel | None, mb: Experience, scored: torch.Tensor,
                 cfg: PPOConfig) -> None:  # fmt: skip
        self.dp = dp
        if dp is None:  # one rank: every term is its own global mean, nothing to count
            return
        real, imagined = ~mb.imagined, mb.imagined
        if cfg.reduction == "sequence":
            units = scored.any(1).float()  # (B,) rows with something to learn from
        else:
            w = losses.token_weights(scored, mb.act.reasoning_mask, cfg.reasoning_weight)
            units = w.sum(1)  # (B,) the token reduction's weight per row
        counts = [real.sum(), imagined.sum(), units[real].sum(), units[imagined].sum(),
                  scored[real].sum()]  # fmt: skip
        self.local = torch.stack([c.double() for c in counts]).cpu()
        self.total = dp.all_sum(self.local.clone())

    _INDEX = {"rows": 0, "rows_imagined": 1, "policy": 2, "policy_imagined": 3, "tokens": 4}

    def __call__(self, name: str, term: torch.Tensor) -> torch.Tensor:
        if self.dp is None:
            return term
        i = self._INDEX[name]
        if self.local[i] == 0:  # a mean over nothing (0 or nan): no part of the global one
            return term.new_zeros(())
        return term * float(self.dp.world_size * self.local[i] / self.total[i])


def term_grad_norms(
    terms: dict[str, torch.Tensor], scales: dict[str, float], params: list[torch.Tensor]
) -> dict[str, float]:
    """``grad_norm/<term>``: the L2 norm of each scaled term's gradient over ``params``, on its
    own, before clipping: shows which term the one global clip is spent on. One extra backward
    per term (graph retained), so ``ppo_update`` measures it on ``GRAD_NORM_ROWS`` rows once."""
    out = {}
    for name, term in terms.items():
        if not term.requires_grad or scales[name] == 0:
            continue
        grads = torch.autograd.grad(scales[name] * term, params, retain_graph=True,
                                    allow_unused=True)  # fmt: skip
        norms = [g.norm() for g in grads if g is not None]
        out[f"grad_norm/{name}"] = float(torch.linalg.vector_norm(torch.stack(norms))) if norms \
            else 0.0
    return out


def advantage_stats(exp: Experience) -> dict[str, float]:
    """Mean and std of the raw advantages and of the returns (real rows; imagined rows under
    ``_imagined``), before any normalisation: the scale the value head must fit and the policy
    gradient starts from; and the imagined rows' mean loss weight."""
    out: dict[str, float] = {}
    for rows, suffix in ((~exp.imagined, ""), (exp.imagined, "_imagined")):
        if int(rows.sum()) < 2:
            continue
        adv, ret = exp.advantages[rows], exp.returns[rows]
        out.update({f"advantage/mean{suffix}": float(adv.mean()),
                    f"advantage/std{suffix}": float(adv.std()),
                    f"returns/mean{suffix}": float(ret.mean()),
                    f"returns/std{suffix}": float(ret.std())})  # fmt: skip
    if bool(exp.imagined.any()):
        out["imagination/row_weight_mean"] = float(exp.weights[exp.imagined].mean())
    return out


def normalize(exp: Experience) -> Experience:
    """Advantages standardised over the batch, each kind of data on its own: real rows to mean 0,
    std 1; imagined rows to mean 0, divided by the larger of their own std and the real rows'.
    A world model that predicts nearly the same return everywhere gives imagined advantages of
    tiny spread; divided by that spread alone, its noise would reach the real rows' weight.
    A batch of imagined rows alone (``imagination.updates``) takes the real rows' std from
    ``exp.real_advantage_std``, the real rows it was dreamt beside, so its rows are scaled as
    they were in the update on real + imagined rows."""
    adv = exp.advantages.clone()
    real, imagined = ~exp.imagined, exp.imagined
    real_std = None
    if int(real.sum()) > 1:
        a = adv[real]
        real_std = a.std()
        adv[real] = (a - a.mean()) / (real_std + 1e-8)
    elif exp.real_advantage_std is not None:
        real_std = torch.tensor(float(exp.real_advantage_std))
    if int(imagined.sum()) > 1:
        a = adv[imagined]
        scale = a.std() if real_std is None else torch.maximum(a.std(), real_std)
        adv[imagined] = (a - a.mean()) / (scale + 1e-8)
    exp.advantages = adv
    return exp


def sync_health(
    policy: RigPolicy, exp: Experience, version: int, rows: int, chunk: int
) -> dict[str, float]:
    """The sync-health alarm: ``sync/logp_abs_diff_mean`` and ``sync/logp_abs_diff_max``, the
    mean and max over sampled tokens that had a choice (``evaluate``'s ``choice_mask``) of
    |log-prob recorded at act time - log-prob under the learner's weights|, on up to ``rows``
    rows that acted with weights ``version`` (the learner's current ones: older rows differ by
    design), and ``sync/logp_rows_checked``. Actors on the learner's weights give float noise
    (fp32 on Catch: mean 8e-8, max 2.4e-7); stale, half-loaded or differently cast weights give
    far more. No rows checked (none of this version): only the count. ``rows`` 0: nothing.

    The rows are drawn by a generator of their own (seeded by ``version``) and scored ``chunk``
    at a time in eval mode (as actors act), without gradients and with frozen statistics, so the
    update that follows is the same bit for bit with the check on or off."""
    if rows == 0:
        return {}
    eligible = (exp.versions == version).nonzero().squeeze(1)  # (E,) row indices
    draw = torch.randperm(len(eligible), generator=torch.Generator().manual_seed(version))
    picked = eligible[draw[:rows]]
    out = {"sync/logp_rows_checked": float(len(picked))}
    if not len(picked):
        return out
    diffs = []
    policy.eval()
    with torch.no_grad(), frozen_statistics(policy):
        for part in picked.split(chunk):
            act = exp.act[part].to(policy.device)
            res = policy.evaluate(act)
            diff = (res["log_probs"] - act.log_probs).abs()  # (b, L)
            diffs.append(diff[res["choice_mask"]].float().cpu())
    if (d := torch.cat(diffs)).numel():
        out["sync/logp_abs_diff_mean"] = float(d.mean())
        out["sync/logp_abs_diff_max"] = float(d.max())
    return out


def proximal_log_probs(policy: RigPolicy, exp: Experience, chunk: int) -> torch.Tensor:
    """(N, L) float32 log-probs of every row's sampled tokens under ``policy`` as it is (decoupled
    PPO's proximal policy: the weights the update starts from), ``chunk`` rows at a time, in
    eval mode without gradients and with frozen statistics, as actors score (on ``exp.trunk``
    when the update holds a frozen trunk's states); on the CPU, as the rest of ``exp``."""
    out = []
    policy.eval()
    with torch.no_grad(), frozen_statistics(policy):
        for part in torch.arange(len(exp)).split(chunk):
            act = exp.act[part].to(policy.device)
            if exp.trunk is None:
                res = policy.evaluate(act)
            else:
                codes = None if exp.next_codes is None else exp.next_codes[part]
                res = policy.evaluate(act, codes, hidden=exp.trunk[part.to(exp.trunk.device)])
            out.append(res["log_probs"].float().cpu())
    return torch.cat(out)


def _rests_the_world_model(update: Callable[..., dict[str, float]]) -> Callable[..., dict[str, float]]:
    """An update without real rows (``imagination.updates``) has no world-model term: the
    parameters only those terms train (:data:`WORLD_MODEL_ONLY`) rest through it, at ZeRO 0
    (:func:`_resting`)."""

    @functools.wraps(update)
    def wrapper(engine: Any, policy: RigPolicy, reference: RigPolicy | None, exp: Experience,
                *args: Any, **kwargs: Any) -> dict[str, float]:  # fmt: skip
        rest = getattr(engine.config, "zero_stage", 0) == 0 and not bool((~exp.imagined).any())
        with _resting(policy, WORLD_MODEL_ONLY if rest else ()):
            return update(engine, policy, reference, exp, *args, **kwargs)

    return wrapper


@_rests_the_world_model
def ppo_update(
    engine: Any,
    policy: RigPolicy,
    reference: RigPolicy | None,
    exp: Experience,
    cfg: PPOConfig,
    generator: torch.Generator,
    version: int,
    dp: DataParallel | None = None,
    trunk_once: bool | None = None,
    kl_coeff: float = 0.0,
    actor_frozen: bool = False,
) -> dict[str, float]:
    """``cfg.epochs`` passes of shuffled minibatches; one ``engine.backward_step`` each (the
    engine accumulates and clips as configured). Each epoch splits the batch into
    near-equal minibatches, a whole number of accumulation cycles, so every optimiser step sees
    as many rows as the others and no partial accumulation outlives the update (the weights
    are published right after it). ``version`` is the weights version the policy holds now.
    Returns metrics averaged over minibatches, plus ``learner/optimizer_steps``,
    ``learner/grad_norm`` (last), the raw advantage statistics (``advantage_stats``), the
    sync-health alarm on ``cfg.sync_check_rows`` rows of this version before the first step
    (``sync_health``) and, where the engine keeps whole gradients (ZeRO 0), each term's
    gradient norm on ``GRAD_NORM_ROWS`` rows of the first minibatch (``term_grad_norms``).
    With ``dp`` this is one rank of several: it trains on its share of every minibatch (see
    the module docstring) and its metrics are to be averaged with the other ranks'.
    ``trunk_once`` (None: ``policy.trunk_frozen``, or the whole update inside the engine's
    ``warmup_delay_steps``) computes the trunk's states once for the update (module
    docstring); False recomputes them in every minibatch (benchmarks, tests). ``kl_coeff``:
    this update's weight of the KL penalty to the behaviour policy (``minibatch_terms``).
    ``actor_frozen`` (``ppo.freeze_actor_iterations``): the policy, entropy and KL terms are
    weighted 0 and the KL stop is off: the value and world-model terms train (the action head
    gets no gradient; a trunk that is not frozen still moves with the world-model terms).
    An update without real rows (``imagination.updates``) leaves the parameters only the
    world-model terms train (:data:`WORLD_MODEL_ONLY`) as they are, at ZeRO 0 (:func:`_resting`)."""
    if actor_frozen:
        cfg = frozen_actor(cfg)
        kl_coeff = 0.0
    sync = sync_health(policy, exp, version, cfg.sync_check_rows, cfg.minibatch_size)
    raw = advantage_stats(exp)
    if cfg.normalize_advantages:
        exp = normalize(exp)
    dev = policy.device
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    steps, grad_norm = 0, float("nan")
    accum = int(getattr(engine.config, "grad_accum_steps", 1))
    measure = getattr(engine.config, "zero_stage", 0) == 0
    params = [p for p in policy.parameters() if p.requires_grad]
    term_norms: dict[str, float] | None = None if measure else {}
    policy.train()
    if trunk_once is None:
        trunk_once = policy.trunk_frozen or _trunk_waits(engine, exp, cfg, accum)
    if trunk_once:  # same states every epoch
        exp = dataclasses.replace(exp, trunk=policy.trunk_states(exp.act, exp.next_codes,
                                                                 cfg.minibatch_size))  # fmt: skip
    if cfg.decoupled:
        exp = dataclasses.replace(exp, prox_log_probs=proximal_log_probs(policy, exp,
                                                                         cfg.minibatch_size))
        policy.train()
    micro, stopped = 0, False
    for _ in range(cfg.epochs):
        for mb in exp.minibatches(cfg.minibatch_size, generator, multiple_of=accum):
            mb = _to(mb if dp is None else dp.shard(mb), dev)
            if term_norms is None:  # once per update, on a few rows of the first minibatch
                few = mb.rows(torch.arange(min(GRAD_NORM_ROWS, len(mb)), device=dev))
                with frozen_statistics(policy):  # a diagnostic, not data for the value head
                    terms, _ = minibatch_terms(policy, reference, few, cfg, kl_coeff=kl_coeff)
                term_norms = term_grad_norms(terms, cfg.loss_scales, params)
                del terms
            terms, metrics = minibatch_terms(policy, reference, mb, cfg, dp, kl_coeff)
            if micro % accum == 0 and _kl_stop(metrics, cfg, dp):
                stopped = True  # before this step (a cycle's first micro-batch: none pending)
                break
            micro += 1
            loss, m = losses.combine(terms, cfg.loss_scales)
            metrics.update(m)
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
        if stopped:
            break
    policy.eval()
    out = {k: sums[k] / counts[k] for k in sums}
    out.update(raw)
    out.update(sync)
    out.update(term_norms or {})
    out["learner/optimizer_steps"] = float(steps)
    out["learner/kl_stopped"] = float(stopped)
    out["learner/grad_norm"] = grad_norm
    return out


@contextmanager
def _resting(policy: RigPolicy, prefixes: tuple[str, ...]) -> Iterator[None]:
    """The trainable parameters named ``prefixes...`` take no gradient (``requires_grad``
    off) inside, so the optimiser steps past them.

    Why: an update without a term for them must leave them alone, but AdamW moves a parameter
    whose gradient is zero by its momentum, and DeepSpeed (ZeRO 0) gives every trainable
    parameter the autograd graph did not reach a zero gradient (for its all-reduce); torch's
    AdamW skips a parameter without one. Under ZeRO 1-3 the optimiser steps the flat partition
    of every parameter, so this is done at ZeRO 0 only (see the caller)."""
    idle = [p for name, p in policy.named_parameters()
            if p.requires_grad and name.startswith(prefixes)]  # fmt: skip
    for p in idle:
        p.requires_grad_(False)
        p.grad = None
    try:
        yield
    finally:
        for p in idle:
            p.requires_grad_(True)


def frozen_actor(cfg: PPOConfig) -> PPOConfig:
    """``cfg`` with the actor's terms (policy, entropy, KL to the reference) weighted 0 and no
    KL stop: an update that fits the critic and the world heads."""
    scales = {**cfg.loss_scales, **{name: 0.0 for name in ACTOR_TERMS}}
    return cfg.model_copy(update={"loss_scales": scales, "target_kl": None})


ACTOR_TERMS = ("policy", "entropy", "kl")
"""The loss terms that move the policy (``ppo.freeze_actor_iterations`` turns them off)."""


def _kl_stop(metrics: dict[str, torch.Tensor], cfg: PPOConfig, dp: DataParallel | None) -> bool:
    """``ppo.target_kl``'s early stop (Spinning Up's PPO, SB3): whether this minibatch's approx
    KL to the behaviour policy (real rows, k3) exceeds 1.5 x the target. With several ranks the
    ranks' values are averaged first, so all stop at the same minibatch."""
    if cfg.target_kl is None:
        return False
    kl = metrics.get("policy/approx_kl")  # absent: no real row in this minibatch
    kl = torch.zeros(1, dtype=torch.float64) if kl is None else \
        kl.detach().double().cpu().reshape(1)  # fmt: skip
    if dp is not None:  # on the CPU, as _Shares' counts
        kl = dp.all_sum(kl) / dp.world_size
    return bool(kl.item() > 1.5 * cfg.target_kl)


def _trunk_waits(engine: Any, exp: Experience, cfg: PPOConfig, accum: int) -> bool:
    """Whether the whole update falls in the engine's ``warmup_delay_steps``: its trunk is at
    lr 0 for every optimizer step of it, as good as frozen (``_Engine.trunk_waits``)."""
    waits = getattr(engine, "trunk_waits", None)
    if waits is None:
        return False
    steps = cfg.epochs * exp.num_minibatches(cfg.minibatch_size, accum) // accum
    return bool(waits(steps))


def _to(exp: Experience, device: torch.device) -> Experience:
    fields = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(exp).items()}
    fields["act"] = exp.act.to(device)
    return Experience(**fields)


__all__ = [
    "DataParallel", "PPOConfig", "advantage_stats", "minibatch_loss", "minibatch_terms", "normalize",
    "ppo_update", "proximal_log_probs",
    "sync_health", "term_grad_norms",
]  # fmt: skip
