"""Losses against hand-computed cases, slow Python references and torch's own functions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rl.losses import (
    LOSS_NAMES,
    adapt_kl_coeff,
    combine,
    continue_loss,
    entropy_bonus,
    kl_penalty,
    next_frame_loss,
    policy_loss,
    reward_loss,
    symexp,
    symlog,
    value_loss,
)

# ----------------------------------------------------------------------------- policy

# Two samples, L = 3, clip_eps = 0.2, reasoning_weight = 0.5, old log-probs 0 so that
# log-probs are the log ratios:
#   sample 0: [reasoning, action, pad], ratios 1.21, 1.1, (pad: nan), advantage +1
#   sample 1: [reasoning, reasoning, action], ratios 0.81, 1.0, 0.95, advantage -2
HAND_RATIOS = [[1.21, 1.1, float("nan")], [0.81, 1.0, 0.95]]
HAND_TOKENS = [[1, 1, 0], [1, 1, 1]]
HAND_REASONING = [[1, 0, 0], [1, 1, 0]]
HAND_ADV = [1.0, -2.0]


def _hand_inputs():
    logprobs = torch.tensor(HAND_RATIOS, dtype=torch.float64).log().requires_grad_()
    return dict(
        logprobs=logprobs,
        old_logprobs=torch.zeros(2, 3, dtype=torch.float64),
        advantages=torch.tensor(HAND_ADV, dtype=torch.float64),
        token_mask=torch.tensor(HAND_TOKENS, dtype=torch.bool),
        reasoning_mask=torch.tensor(HAND_REASONING, dtype=torch.bool),
    )


def test_policy_loss_sequence_hand_computed():
    loss, m = policy_loss(
        **_hand_inputs(), clip_eps=0.2, reasoning_weight=0.5, reduction="sequence"
    )
    # sample 0: log r = 0.5 * ln 1.21 + ln 1.1 = ln 1.21 -> r = 1.21, clipped to 1.2;
    #           min(1.21 * 1, 1.2 * 1) = 1.2
    # sample 1: log r = 0.5 * ln 0.81 + ln 1.0 + ln 0.95 = ln(0.9 * 0.95) -> r = 0.855 (inside);
    #           min(0.855 * -2, 0.855 * -2) = -1.71
    # loss = -(1.2 - 1.71) / 2 = 0.255
    assert loss.item() == pytest.approx(0.255)
    assert m["policy/clip_frac"].item() == pytest.approx(0.5)  # |1.21 - 1| > 0.2, |0.855 - 1| < 0.2
    # approx KL = mean((r - 1) - ln r) = ((0.21 - ln 1.21) + (-0.145 - ln 0.855)) / 2
    #           = ((0.21 - 0.1906204) + (-0.145 + 0.1566538)) / 2
    #           = (0.0193796 + 0.0116538) / 2 = 0.0155167
    assert m["policy/approx_kl"].item() == pytest.approx(0.0155167, abs=1e-7)
    assert m["policy/ratio_mean"].item() == pytest.approx((1.21 + 0.855) / 2)
    assert m["policy/ratio_max"].item() == pytest.approx(1.21)


def test_policy_loss_token_hand_computed():
    loss, m = policy_loss(**_hand_inputs(), clip_eps=0.2, reasoning_weight=0.5, reduction="token")
    # per token min(r * A, clip(r) * A), weight:
    #   sample 0: reasoning 1.21 -> min(1.21, 1.2) = 1.2 (clipped), w 0.5;  action 1.1 -> 1.1, w 1
    #   sample 1: reasoning 0.81 -> -1.62, w 0.5;  reasoning 1.0 -> -2, w 0.5;
    #             action 0.95 -> -1.9, w 1
    # sum(w * s) = 0.6 + 1.1 - 0.81 - 1.0 - 1.9 = -2.01;  sum(w) = 3.5;  loss = 2.01 / 3.5
    assert loss.item() == pytest.approx(2.01 / 3.5)
    assert m["policy/clip_frac"].item() == pytest.approx(1 / 5)  # 1.21 of five counted tokens
    assert m["policy/ratio_mean"].item() == pytest.approx((1.21 + 1.1 + 0.81 + 1.0 + 0.95) / 5)


def policy_reference(lp, old, adv, tokens, reasoning, eps, rw, reduction):
    """Python loops over samples and tokens."""
    B, L = len(lp), len(lp[0])

    def surrogate(ratio, a):
        return min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)

    if reduction == "sequence":
        per_sample = []
        for b in range(B):
            if not any(tokens[b]):
                continue
            log_ratio = sum(
                (rw if reasoning[b][i] else 1.0) * (lp[b][i] - old[b][i])
                for i in range(L)
                if tokens[b][i]
            )
            per_sample.append(surrogate(math.exp(log_ratio), adv[b]))
        return -sum(per_sample) / max(len(per_sample), 1)
    total, weight = 0.0, 0.0
    for b in range(B):
        for i in range(L):
            if tokens[b][i]:
                w = rw if reasoning[b][i] else 1.0
                total += w * surrogate(math.exp(lp[b][i] - old[b][i]), adv[b])
                weight += w
    return -total / weight if weight else 0.0


def _random_rows(seed, B, L, spread, empty):
    """Log-probs, old log-probs (N(0, spread)), advantages, ~70% counted tokens (none in row
    ``empty``: a sample with nothing generated does not count), about half of them reasoning."""
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(B, L, generator=g, dtype=torch.float64) * spread
    old = torch.randn(B, L, generator=g, dtype=torch.float64) * spread
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    tokens = torch.rand(B, L, generator=g) < 0.7
    tokens[empty] = False
    reasoning = tokens & (torch.rand(B, L, generator=g) < 0.5)
    return lp, old, adv, tokens, reasoning


@pytest.mark.parametrize("reduction", ["sequence", "token"])
@pytest.mark.parametrize("reasoning_weight", [0.0, 0.5, 1.0])
def test_policy_loss_matches_loop_reference(reduction, reasoning_weight):
    lp, old, adv, tokens, reasoning = _random_rows(1, 5, 7, 0.1, empty=3)
    loss, _ = policy_loss(lp, old, adv, tokens, reasoning, 0.1, reasoning_weight, reduction)
    expected = policy_reference(
        lp.tolist(), old.tolist(), adv.tolist(), tokens.tolist(), reasoning.tolist(),
        0.1, reasoning_weight, reduction,
    )  # fmt: skip
    assert loss.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("reduction", ["sequence", "token"])
def test_reasoning_weight_scales_the_reasoning_tokens(reduction):
    inputs = _hand_inputs()
    base = policy_loss(**inputs, clip_eps=0.2, reasoning_weight=0.5, reduction=reduction)[0]
    # Changing reasoning_weight changes the loss...
    heavier = policy_loss(**inputs, clip_eps=0.2, reasoning_weight=1.0, reduction=reduction)[0]
    assert heavier.item() != pytest.approx(base.item())
    # ...and with weight 0 the reasoning tokens' log-probs no longer matter at all.
    moved = dict(inputs, logprobs=inputs["logprobs"].detach() + 0.3 * inputs["reasoning_mask"])
    zero_a = policy_loss(**inputs, clip_eps=0.2, reasoning_weight=0.0, reduction=reduction)[0]
    zero_b = policy_loss(**moved, clip_eps=0.2, reasoning_weight=0.0, reduction=reduction)[0]
    assert zero_a.item() == pytest.approx(zero_b.item(), rel=1e-12)


@pytest.mark.parametrize("reduction", ["sequence", "token"])
def test_masked_tokens_change_nothing(reduction):
    inputs = _hand_inputs()
    loss_a, m_a = policy_loss(**inputs, clip_eps=0.2, reasoning_weight=0.5, reduction=reduction)
    loss_a.backward()
    grad_a = inputs["logprobs"].grad.clone()
    # Overwrite the uncounted (pad) position with garbage, including -inf in the old log-probs.
    lp = inputs["logprobs"].detach().clone()
    lp[0, 2] = 123.0
    lp.requires_grad_()
    old = inputs["old_logprobs"].clone()
    old[0, 2] = float("-inf")
    loss_b, m_b = policy_loss(
        **dict(inputs, logprobs=lp, old_logprobs=old),
        clip_eps=0.2, reasoning_weight=0.5, reduction=reduction,
    )  # fmt: skip
    loss_b.backward()
    assert loss_b.item() == loss_a.item()
    assert {k: v.item() for k, v in m_b.items()} == {k: v.item() for k, v in m_a.items()}
    torch.testing.assert_close(lp.grad, grad_a)
    assert lp.grad[0, 2].item() == 0.0
    assert torch.isfinite(lp.grad).all()


def test_clipping_is_pessimistic():
    # One action token. A > 0 and r = 1.5 > 1 + eps: clipped, no gradient pushing r further up.
    # A < 0 and r = 1.5: the unclipped r * A is the smaller one, so the gradient remains.
    for adv, expect_grad in ((1.0, False), (-1.0, True)):
        lp = torch.tensor([[math.log(1.5)]], requires_grad=True)
        loss, m = policy_loss(
            lp, torch.zeros(1, 1), torch.tensor([adv]), torch.ones(1, 1, dtype=torch.bool),
            torch.zeros(1, 1, dtype=torch.bool), clip_eps=0.2, reasoning_weight=0.5,
        )  # fmt: skip
        loss.backward()
        assert m["policy/clip_frac"].item() == 1.0
        assert (lp.grad.abs().item() > 0) == expect_grad
        assert loss.item() == pytest.approx(-min(1.5 * adv, 1.2 * adv))


def decoupled_reference(lp, prox, old, adv, tokens, reasoning, eps, rw, reduction, cap):
    """Decoupled PPO by loops: min(pi_prox / pi_old, cap) x the PPO surrogate against prox."""
    B, L = len(lp), len(lp[0])

    def surrogate(log_r, log_w, a):
        r = math.exp(log_r)
        return min(math.exp(log_w), cap) * min(r * a, min(max(r, 1 - eps), 1 + eps) * a)

    def w(b, i):
        return rw if reasoning[b][i] else 1.0

    if reduction == "sequence":
        per_sample = []
        for b in range(B):
            idx = [i for i in range(L) if tokens[b][i]]
            if idx:
                log_r = sum(w(b, i) * (lp[b][i] - prox[b][i]) for i in idx)
                log_w = sum(w(b, i) * (prox[b][i] - old[b][i]) for i in idx)
                per_sample.append(surrogate(log_r, log_w, adv[b]))
        return -sum(per_sample) / max(len(per_sample), 1)
    total = sum(w(b, i) * surrogate(lp[b][i] - prox[b][i], prox[b][i] - old[b][i], adv[b])
                for b in range(B) for i in range(L) if tokens[b][i])  # fmt: skip
    weight = sum(w(b, i) for b in range(B) for i in range(L) if tokens[b][i])
    return -total / weight if weight else 0.0


@pytest.mark.parametrize("reduction", ["sequence", "token"])
@pytest.mark.parametrize("cap", [1.05, 1.3])
def test_decoupled_policy_loss_matches_loop_reference(reduction, cap):
    g = torch.Generator().manual_seed(2)
    B, L = 6, 5
    lp, prox, old = (torch.randn(B, L, generator=g, dtype=torch.float64) * 0.2 for _ in range(3))
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    tokens = torch.rand(B, L, generator=g) < 0.7
    tokens[2] = False
    reasoning = tokens & (torch.rand(B, L, generator=g) < 0.5)
    loss, m = policy_loss(lp, old, adv, tokens, reasoning, 0.2, 0.5, reduction,
                          prox_logprobs=prox, behaviour_cap=cap)  # fmt: skip
    expected = decoupled_reference(
        lp.tolist(), prox.tolist(), old.tolist(), adv.tolist(), tokens.tolist(),
        reasoning.tolist(), 0.2, 0.5, reduction, cap,
    )  # fmt: skip
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert 0 < m["policy/behaviour_capped_frac"].item() < 1  # the cap bites on some units here
    assert m["policy/behaviour_weight_max"].item() > cap


@pytest.mark.parametrize("reduction", ["sequence", "token"])
def test_decoupled_loss_on_the_behaviour_policy_is_plain_ppo(reduction):
    """prox = old (rows acted by the learner's own weights): weight 1, the plain loss and its
    gradient, bit for bit."""
    inputs = _hand_inputs()
    plain, _ = policy_loss(**inputs, reduction=reduction)
    (grad_plain,) = torch.autograd.grad(plain, inputs["logprobs"])
    decoupled, m = policy_loss(**inputs, reduction=reduction, prox_logprobs=inputs["old_logprobs"])
    (grad_decoupled,) = torch.autograd.grad(decoupled, inputs["logprobs"])
    assert decoupled.item() == plain.item()
    assert torch.equal(grad_decoupled, grad_plain)
    assert m["policy/behaviour_weight_mean"].item() == 1.0
    assert m["policy/behaviour_capped_frac"].item() == 0.0


def kl_reference(lp, old, tokens, reasoning, rw, reduction):
    """The behaviour-KL penalty by loops: k3 = r - 1 - log r of the surrogate's own ratio,
    averaged over samples (sequence) or weighted over tokens (token)."""
    B, L = len(lp), len(lp[0])

    def k3(log_r):
        return math.exp(log_r) - 1.0 - log_r

    def w(b, i):
        return rw if reasoning[b][i] else 1.0

    if reduction == "sequence":
        per_sample = [k3(sum(w(b, i) * (lp[b][i] - old[b][i]) for i in range(L) if tokens[b][i]))
                      for b in range(B) if any(tokens[b])]  # fmt: skip
        return sum(per_sample) / max(len(per_sample), 1)
    total = sum(w(b, i) * k3(lp[b][i] - old[b][i])
                for b in range(B) for i in range(L) if tokens[b][i])  # fmt: skip
    weight = sum(w(b, i) for b in range(B) for i in range(L) if tokens[b][i])
    return total / weight if weight else 0.0


@pytest.mark.parametrize("reduction", ["sequence", "token"])
@pytest.mark.parametrize("reasoning_weight", [0.5, 1.0])
def test_behaviour_kl_penalty_matches_loop_reference(reduction, reasoning_weight):
    """kl_coeff adds kl_coeff x k3(old || new) to the plain loss, reduced as the surrogate."""
    lp, old, adv, tokens, reasoning = _random_rows(3, 5, 6, 0.3, empty=1)
    args = (lp, old, adv, tokens, reasoning, 0.2, reasoning_weight, reduction)
    plain, m0 = policy_loss(*args)
    loss, m = policy_loss(*args, kl_coeff=0.7)
    kl = kl_reference(lp.tolist(), old.tolist(), tokens.tolist(), reasoning.tolist(),
                      reasoning_weight, reduction)  # fmt: skip
    assert kl > 0.01  # the ratios are far enough from 1 for the penalty to matter
    assert loss.item() == pytest.approx(plain.item() + 0.7 * kl, rel=1e-12)
    assert m["policy/kl_penalty"].item() == pytest.approx(0.7 * kl, rel=1e-12)
    assert "policy/kl_penalty" not in m0
    with pytest.raises(ValueError, match="kl_coeff must be >= 0"):
        policy_loss(*args, kl_coeff=-0.1)


def test_behaviour_kl_penalty_gradient_is_the_kl_gradient_in_expectation():
    """On actions drawn from the behaviour policy (enumerated: a 4-way categorical, one
    token per sample, advantages 0 so only the penalty has a gradient), the expected gradient
    of the penalty is that of the exact KL(old || new), RLlib's loss term."""
    theta = torch.tensor([0.3, -0.2, 1.0, 0.1], requires_grad=True)
    old = torch.log_softmax(torch.tensor([0.0, 0.5, -0.5, 0.2], dtype=torch.float32), -1)
    logp = torch.log_softmax(theta, -1)
    expectation = 0.0
    for i in range(4):  # sample i, drawn with probability old[i]
        loss, _ = policy_loss(logp[i].reshape(1, 1), old[i].reshape(1, 1), torch.zeros(1),
                              torch.ones(1, 1, dtype=torch.bool),
                              torch.zeros(1, 1, dtype=torch.bool), kl_coeff=1.0)  # fmt: skip
        expectation = expectation + old[i].exp() * loss
    (got,) = torch.autograd.grad(expectation, theta)
    exact = (old.exp() * (old - torch.log_softmax(theta, -1))).sum()
    (want,) = torch.autograd.grad(exact, theta)
    torch.testing.assert_close(got, want)


def test_adapt_kl_coeff_follows_rllibs_rule():
    assert adapt_kl_coeff(0.2, 0.05, 0.01) == pytest.approx(0.3)  # > 2 x target: x1.5
    assert adapt_kl_coeff(0.2, 0.004, 0.01) == pytest.approx(0.1)  # < target / 2: x0.5
    assert adapt_kl_coeff(0.2, 0.01, 0.01) == 0.2  # in between: kept
    assert adapt_kl_coeff(0.2, 0.02, 0.01) == 0.2 and adapt_kl_coeff(0.2, 0.005, 0.01) == 0.2
    assert adapt_kl_coeff(0.2, float("nan"), 0.01) == 0.2
    with pytest.raises(ValueError, match="target must be > 0"):
        adapt_kl_coeff(0.2, 0.01, 0.0)


def test_policy_loss_rejects_bad_inputs():
    inputs = _hand_inputs()
    with pytest.raises(ValueError, match=r"advantages has shape \(3,\) but logprobs has shape"):
        policy_loss(**dict(inputs, advantages=torch.zeros(3)))
    with pytest.raises(ValueError, match=r"token_mask has shape \(2, 4\) but logprobs"):
        policy_loss(**dict(inputs, token_mask=torch.ones(2, 4, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"logprobs must be \(B, L\), got shape \(6,\)"):
        policy_loss(**dict(inputs, logprobs=torch.zeros(6)))
    with pytest.raises(ValueError, match="reasoning_mask marks tokens that token_mask"):
        policy_loss(**dict(inputs, reasoning_mask=torch.ones(2, 3, dtype=torch.bool)))
    with pytest.raises(ValueError, match="reduction must be one of"):
        policy_loss(**inputs, reduction="tokens")
    with pytest.raises(ValueError, match=r"prox_logprobs has shape \(2, 2\) but logprobs"):
        policy_loss(**inputs, prox_logprobs=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="behaviour_cap must be > 0"):
        policy_loss(**inputs, prox_logprobs=inputs["old_logprobs"], behaviour_cap=0.0)


# ----------------------------------------------------------------------------- value, entropy


def test_value_loss_clipped_hand_computed():
    values = torch.tensor([1.0, 2.0], requires_grad=True)
    old, returns = torch.tensor([0.0, 2.0]), torch.tensor([2.0, 0.0])
    # unclipped: (1 - 2)^2 = 1, (2 - 0)^2 = 4                    -> 0.5 * mean = 1.25
    # clipped (eps 0.5): v0 -> 0 + clamp(1) = 0.5, (0.5 - 2)^2 = 2.25; v1 -> 2, 4
    # max: 2.25, 4                                               -> 0.5 * mean = 1.5625
    assert value_loss(values, old, returns)[0].item() == pytest.approx(1.25)
    loss, m = value_loss(values, old, returns, clip_eps=0.5)
    assert loss.item() == pytest.approx(1.5625)
    assert m["value/clip_frac"].item() == pytest.approx(0.5)
    loss.backward()
    # Sample 0 is held by the clip (no gradient); sample 1: d/dv 0.5 * mean = (v - R) / 2 = 1.
    assert values.grad.tolist() == pytest.approx([0.0, 1.0])


def test_value_loss_explained_variance_and_errors():
    values, returns = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 3.0, 2.0])
    _, m = value_loss(values, None, returns)
    # 1 - Var[R - v] / Var[R] = 1 - Var[0, 1, -1] / Var[1, 3, 2] = 1 - (2/3) / (2/3) = 0
    assert m["value/explained_variance"].item() == pytest.approx(0.0)
    assert value_loss(returns, None, returns)[1]["value/explained_variance"].item() == 1.0
    with pytest.raises(ValueError, match="needs old_values"):
        value_loss(values, None, returns, clip_eps=0.2)
    with pytest.raises(ValueError, match=r"returns has shape \(2,\) but values has shape \(3,\)"):
        value_loss(values, None, returns[:2])


def test_entropy_bonus_sign_and_mask():
    entropies = torch.tensor([[1.0, 2.0, 100.0], [3.0, float("nan"), 4.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    loss, m = entropy_bonus(entropies, mask)
    assert m["entropy/mean"].item() == pytest.approx(2.5)  # (1 + 2 + 3 + 4) / 4
    assert loss.item() == pytest.approx(-2.5)  # minimising the loss raises entropy
    loss.backward()
    assert entropies.grad.tolist() == [[-0.25, -0.25, 0.0], [-0.25, 0.0, -0.25]]


def test_entropy_bonus_is_weighted_as_the_policys_log_pi():
    """reduction "sequence": per row sum_l w_l H_l (reasoning at reasoning_weight), mean over
    rows with a counted token, against a loop; so an action's entropy gets the same gradient
    beside 4 reasoning tokens as alone. "token": sum(w H) / sum(w) over the batch."""
    torch.manual_seed(0)
    B, L = 4, 6
    entropies = torch.rand(B, L) * 3
    mask = torch.rand(B, L) > 0.3
    mask[2] = False  # a row with nothing counted does not count
    reasoning = mask & (torch.arange(L) < 4)
    loss, m = entropy_bonus(entropies, mask, reasoning, 0.5, "sequence")
    rows = []
    for b in range(B):
        if mask[b].any():
            rows.append(sum((0.5 if reasoning[b, j] else 1.0) * float(entropies[b, j])
                            for j in range(L) if mask[b, j]))  # fmt: skip
    assert loss.item() == pytest.approx(-sum(rows) / len(rows), rel=1e-6)
    assert m["entropy/mean"].item() == pytest.approx(float(entropies[mask].mean()), rel=1e-6)
    w = torch.where(reasoning, 0.5, 1.0) * mask
    token, _ = entropy_bonus(entropies, mask, reasoning, 0.5, "token")
    assert token.item() == pytest.approx(-float((w * entropies).sum() / w.sum()), rel=1e-6)

    # the action token's gradient with and without reasoning tokens beside it
    grads = []
    for n_reasoning in (0, 4):
        h = torch.ones(2, 5, requires_grad=True)
        counted = torch.zeros(2, 5, dtype=torch.bool)
        counted[:, : n_reasoning + 1] = True  # reasoning tokens, then the action's one choice
        why = counted & (torch.arange(5) < n_reasoning)
        entropy_bonus(h, counted, why, 0.5, "sequence")[0].backward()
        grads.append(h.grad[:, n_reasoning].tolist())
    assert grads[0] == grads[1] == [-0.5, -0.5]
    with pytest.raises(ValueError, match="reduction must be"):
        entropy_bonus(entropies, mask, reasoning, 0.5, "mean")


def test_entropy_bonus_gradient_is_the_whole_distributions_with_logprobs():
    """A two-level trie (Crafter's ``make`` is such a choice): the root picks a leaf or a node
    with three leaves. With the sampled tokens' log-probs, the expected gradient of the bonus
    over every path, weighted by its probability, is the exact gradient of the entropy of the
    distribution over the four actions (autograd on the closed form, the slow reference);
    the path sum alone misses how the root's choice moves the entropy below it."""
    torch.manual_seed(0)
    root_logits = torch.randn(2, requires_grad=True)
    child_logits = torch.randn(3, requires_grad=True)

    def dists():
        return torch.log_softmax(root_logits, 0), torch.log_softmax(child_logits, 0)

    def entropy(lp):
        return -(lp.exp() * lp).sum()

    root, child = dists()
    p_actions = torch.cat([root[:1].exp(), root[1].exp() * child.exp()])  # the four leaves
    exact = -(p_actions * p_actions.log()).sum()
    exact_grad = torch.autograd.grad(exact, (root_logits, child_logits))

    def expected_grad(with_logprobs: bool):
        total = [torch.zeros(2), torch.zeros(3)]
        paths = [(0, None)] + [(1, c) for c in range(3)]
        for first, second in paths:
            root, child = dists()
            h = torch.stack([entropy(root), entropy(child)])[None]  # (1, 2)
            lp = torch.stack([root[first], child[second or 0]])[None]
            mask = torch.tensor([[True, second is not None]])
            args = (lp, lp.detach()) if with_logprobs else (None, None)
            loss, _ = entropy_bonus(h, mask, None, 1.0, "sequence", *args)
            grads = torch.autograd.grad(-loss, (root_logits, child_logits))
            weight = float((root[first] + (0.0 if second is None else child[second])).detach().exp())
            total = [t + weight * g for t, g in zip(total, grads, strict=True)]
        return total

    for got, want in zip(expected_grad(True), exact_grad, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    path_only = expected_grad(False)
    assert not torch.allclose(path_only[0], exact_grad[0], atol=1e-3)  # the root's part is off
    # the value is unchanged: the added term is 0 at the behaviour policy
    h = torch.rand(3, 4)
    mask = torch.rand(3, 4) > 0.3
    lp = -torch.rand(3, 4)
    plain = entropy_bonus(h, mask, None, 1.0, "token")[0]
    assert entropy_bonus(h, mask, None, 1.0, "token", lp, lp)[0].item() == pytest.approx(
        plain.item())
    with pytest.raises(ValueError, match="together"):
        entropy_bonus(h, mask, None, 1.0, "token", lp)
    # masked positions may hold -inf / nan log-probs: no effect, finite gradients
    lp_bad = lp.masked_fill(~mask, float("-inf")).requires_grad_()
    old_bad = lp.masked_fill(~mask, float("nan"))
    loss = entropy_bonus(h, mask, None, 1.0, "sequence", lp_bad, old_bad)[0]
    assert loss.item() == pytest.approx(entropy_bonus(h, mask, None, 1.0, "sequence")[0].item())
    loss.backward()
    assert torch.isfinite(lp_bad.grad).all() and (lp_bad.grad[~mask] == 0).all()


# ----------------------------------------------------------------------------- KL


def test_kl_estimators_match_formulas():
    g = torch.Generator().manual_seed(2)
    lp, ref = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    mask = torch.rand(4, 6, generator=g) < 0.6
    log_r = (lp - ref)[mask]
    formulas = {
        "k1": log_r,
        "k2": log_r**2 / 2,
        "k3": torch.exp(-log_r) - 1 + log_r,
    }
    for name, values in formulas.items():
        loss, m = kl_penalty(lp, ref, mask, estimator=name)
        assert loss.item() == pytest.approx(values.mean().item(), rel=1e-6)
        assert m["kl/mean"].item() == loss.item()
    assert kl_penalty(lp, ref, mask, "k1")[0].item() < 0  # k1 can go negative on a sample...
    assert (torch.exp(-log_r) - 1 + log_r).min() >= 0  # ...k3 never does, token by token


def test_kl_k3_nonnegative_and_clamped():
    log_r = torch.tensor([[-1000.0, -50.0, -1.0, 0.0, 1.0, 50.0, 1000.0]])
    lp = log_r.clone().requires_grad_()
    mask = torch.ones_like(log_r, dtype=torch.bool)
    loss, m = kl_penalty(lp, torch.zeros_like(log_r), mask, "k3", clamp=10.0)
    assert torch.isfinite(loss)
    clamped = log_r.clamp(-10, 10)
    assert loss.item() == pytest.approx((torch.exp(-clamped) - 1 + clamped).mean().item())
    assert m["kl/clamp_frac"].item() == pytest.approx(4 / 7)
    loss.backward()
    assert lp.grad[0, [0, 1, 5, 6]].tolist() == [0.0] * 4  # nothing flows beyond the clamp
    assert torch.isfinite(lp.grad).all()
    # Every token's k3 is >= 0, whatever the sign of log r.
    for i in range(log_r.shape[1]):
        single = torch.zeros_like(mask)
        single[0, i] = True
        assert kl_penalty(log_r, torch.zeros_like(log_r), single, "k3")[0].item() >= 0


def test_kl_gradients_in_expectation():
    # Enumerate a 4-way categorical instead of sampling: E_pi[grad k(x)] with pi detached.
    theta = torch.tensor([0.3, -0.2, 1.0, 0.1], requires_grad=True)
    ref_logp = torch.log_softmax(torch.tensor([0.0, 0.5, -0.5, 0.2]), -1)

    def expected_grad(estimator):
        logp = torch.log_softmax(theta, -1)[None]  # (1, 4): one "token" per outcome
        per_outcome = [
            kl_penalty(logp, ref_logp[None], _one_hot(i), estimator)[0] for i in range(4)
        ]
        probs = logp.exp().detach()[0]
        expectation = sum(p * k for p, k in zip(probs, per_outcome, strict=True))
        return torch.autograd.grad(expectation, theta)[0]

    def grad_of(fn):
        return torch.autograd.grad(fn(torch.log_softmax(theta, -1)), theta)[0]

    forward_kl = grad_of(lambda logp: (logp.exp() * (logp - ref_logp)).sum())
    reverse_kl = grad_of(lambda logp: (ref_logp.exp() * (ref_logp - logp)).sum())
    torch.testing.assert_close(expected_grad("k1"), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(expected_grad("k2"), forward_kl)
    torch.testing.assert_close(expected_grad("k3"), reverse_kl)


def _one_hot(i):
    mask = torch.zeros(1, 4, dtype=torch.bool)
    mask[0, i] = True
    return mask


def test_kl_rejects_bad_inputs():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="estimator must be one of"):
        kl_penalty(x, x, x.bool(), "k4")
    with pytest.raises(ValueError, match=r"ref_logprobs has shape \(3, 2\) but logprobs"):
        kl_penalty(x, x.T, x.bool())


# ----------------------------------------------------------------------------- imagination


def test_next_frame_loss_matches_torch_cross_entropy():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 11, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    loss, _ = next_frame_loss(logits, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1)))
    # With a mask: the same as ignore_index at the masked positions, whatever they held.
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    ignored = torch.where(mask, targets, -100)
    loss_m, _ = next_frame_loss(logits, ignored, mask)
    expected = F.cross_entropy(logits.reshape(-1, 11), ignored.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss_m, expected)
    loss_m.backward()
    assert logits.grad[0, 2].abs().sum().item() == 0.0
    assert torch.isfinite(logits.grad).all()


def test_next_frame_accuracy():
    # Three tokens over a vocabulary of 4; the argmax is right for tokens 0 and 2.
    logits = torch.tensor([[[0.0, 5.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0]]])
    targets = torch.tensor([[1, 2, 3]])
    assert next_frame_loss(logits, targets)[1]["next_frame/accuracy"].item() == pytest.approx(2 / 3)
    only_wrong = torch.tensor([[0, 1, 0]], dtype=torch.bool)
    assert next_frame_loss(logits, targets, only_wrong)[1]["next_frame/accuracy"].item() == 0.0
    half = next_frame_loss(logits.bfloat16(), targets)[0]
    assert half.dtype == torch.float32  # half-precision logits are upcast for the softmax


def test_next_frame_rejects_bad_inputs():
    logits = torch.zeros(2, 3, 4)
    with pytest.raises(
        ValueError, match=r"target_tokens has shape \(2, 4\) but logits has shape \(2, 3, 4\)"
    ):
        next_frame_loss(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        next_frame_loss(logits, torch.full((2, 3), 4))
    with pytest.raises(ValueError, match="integer token ids"):
        next_frame_loss(logits, torch.zeros(2, 3))


def test_reward_loss_is_mse_in_symlog_space():
    x = torch.tensor([-100.0, -1.0, 0.0, 0.5, 1e4])
    torch.testing.assert_close(symexp(symlog(x)), x)
    pred = torch.tensor([0.0, 1.0], requires_grad=True)
    target = torch.tensor([math.e - 1, 0.0])  # symlog: 1, 0
    loss, m = reward_loss(pred, target)
    assert loss.item() == pytest.approx((1.0 + 1.0) / 2)  # ((0 - 1)^2 + (1 - 0)^2) / 2
    # |symexp(0) - (e - 1)| = e - 1;  |symexp(1) - 0| = e - 1
    assert m["reward/abs_error"].item() == pytest.approx(math.e - 1)
    loss.backward()
    assert pred.grad.tolist() == pytest.approx([-1.0, 1.0])  # 2 * (pred - symlog(t)) / 2


def test_continue_loss_is_bce_with_logits():
    logits = torch.tensor([0.0, 2.0, -3.0], requires_grad=True)
    target = torch.tensor([1.0, 1.0, 1.0])
    loss, m = continue_loss(logits, target)
    expected = (math.log(2) + math.log1p(math.exp(-2)) + math.log1p(math.exp(3))) / 3
    assert loss.item() == pytest.approx(expected)
    assert m["continue/accuracy"].item() == pytest.approx(1 / 3)  # only logit 2 says "continue"
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        continue_loss(logits, target * 2)


# ----------------------------------------------------------------------------- combine


def test_loss_names():
    assert LOSS_NAMES == ("policy", "value", "entropy", "kl", "next_frame", "reward", "continue")


def test_combine_sums_by_name():
    terms = {
        "policy": torch.tensor(2.0),
        "value": torch.tensor(3.0),
        "kl": torch.tensor(float("nan")),
    }
    total, m = combine(terms, {"policy": 1.0, "value": 0.5, "kl": 0.0})
    assert total.item() == pytest.approx(3.5)  # 1 * 2 + 0.5 * 3; the scale-0 nan is left out
    assert m["loss/value"].item() == 3.0  # reported unscaled
    assert math.isnan(m["loss/kl"].item())
    assert m["loss/total"].item() == pytest.approx(3.5)


def test_combine_names_must_match_exactly():
    terms = {"policy": torch.tensor(1.0), "value": torch.tensor(1.0)}
    with pytest.raises(ValueError, match=r"no scale for \['value'\].*unknown \['valeu'\]"):
        combine(terms, {"policy": 1.0, "valeu": 1.0})
    with pytest.raises(ValueError, match=r"no scale for \['value'\]"):
        combine(terms, {"policy": 1.0})  # a scale of 0 would be fine, a missing name is not
    with pytest.raises(ValueError, match=r"unknown \['kl'\]"):
        combine(terms, {"policy": 1.0, "value": 1.0, "kl": 0.0})
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        combine(terms, {"policy": 1.0, "value": -1.0})
    with pytest.raises(ValueError, match=r"terms\['value'\] must be a 0-d"):
        combine({"policy": torch.tensor(1.0), "value": torch.ones(2)}, {"policy": 1, "value": 1})


def test_all_losses_combine_and_backpropagate():
    torch.manual_seed(4)
    B, L, N, V = 3, 6, 4, 9
    logprobs = torch.randn(B, L, requires_grad=True)
    values = torch.randn(B, requires_grad=True)
    entropies = torch.rand(B, L, requires_grad=True)
    frame_logits = torch.randn(B, N, V, requires_grad=True)
    reward_pred = torch.randn(B, requires_grad=True)
    continue_logits = torch.randn(B, requires_grad=True)
    tokens = torch.ones(B, L, dtype=torch.bool)
    reasoning = tokens.clone()
    reasoning[:, -2:] = False  # the last two tokens are the action

    parts = {
        "policy": policy_loss(
            logprobs, logprobs.detach() + 0.05, torch.randn(B), tokens, reasoning
        ),
        "value": value_loss(values, values.detach(), torch.randn(B), clip_eps=0.2),
        "entropy": entropy_bonus(entropies, tokens),
        "kl": kl_penalty(logprobs, torch.randn(B, L), tokens),
        "next_frame": next_frame_loss(frame_logits, torch.randint(0, V, (B, N))),
        "reward": reward_loss(reward_pred, torch.randn(B)),
        "continue": continue_loss(continue_logits, torch.ones(B)),
    }
    assert tuple(parts) == LOSS_NAMES
    total, metrics = combine({k: v[0] for k, v in parts.items()}, dict.fromkeys(LOSS_NAMES, 1.0))
    total.backward()
    for leaf in (logprobs, values, entropies, frame_logits, reward_pred, continue_logits):
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all()
        assert leaf.grad.abs().sum() > 0
    merged = {k: v for _, m in parts.values() for k, v in m.items()} | metrics
    assert all(torch.isfinite(torch.as_tensor(v)) for v in merged.values())
    assert all(not torch.as_tensor(v).requires_grad for v in merged.values())


def test_value_loss_weights_each_error():
    values = torch.tensor([1.0, 2.0, 0.0], requires_grad=True)
    returns, weights = torch.tensor([2.0, 0.0, 5.0]), torch.tensor([2.0, 0.5, 0.0])
    # 0.5 * mean(w * (v - R)^2) = 0.5 * (2 * 1 + 0.5 * 4 + 0 * 25) / 3
    loss, _ = value_loss(values, None, returns, weights=weights)
    assert loss.item() == pytest.approx(0.5 * 4.0 / 3)
    loss.backward()
    assert values.grad.tolist() == pytest.approx([2 * -1 / 3, 0.5 * 2 / 3, 0.0])
    with pytest.raises(ValueError, match="weights has shape"):
        value_loss(values, None, returns, weights=weights[:2])
