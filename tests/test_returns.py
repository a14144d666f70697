"""Advantage estimation against slow, obvious references and hand-worked examples.

The references do not reuse the recursions under test: GAE is checked against its definition as
a discounted sum of TD errors that stops at the episode's end (Schulman et al. 2016, eq. 16), and
lambda-returns against the truncated lambda-return as a weighted average of n-step returns
(Sutton & Barto, 2nd ed., section 12.3, with per-step discounts gamma * c_t).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rl.returns import gae, lambda_returns

# ----------------------------------------------------------------------------- references


def gae_reference(r, v, nv, term, trunc, gamma, lam):
    """A_t = sum_k (gamma * lam)^k * delta_{t+k}, summed until the episode ends or the data does."""
    T, B = len(r), len(r[0])
    adv = [[0.0] * B for _ in range(T)]
    for b in range(B):
        for t in range(T):
            total = 0.0
            for k, s in enumerate(range(t, T)):
                boot = 0.0 if term[s][b] else nv[s][b]
                delta = r[s][b] + gamma * boot - v[s][b]
                total += (gamma * lam) ** k * delta
                if term[s][b] or trunc[s][b]:
                    break
            adv[t][b] = total
    return adv


def lambda_reference(r, v, c, boot, gamma, lam):
    """(1 - lam) * sum_n lam^(n-1) G^(n) + lam^(N-1) G^(N): the truncated lambda-return."""
    H, B = len(r), len(r[0])
    out = [[0.0] * B for _ in range(H)]
    for b in range(B):

        def value(t, b=b):
            return v[t][b] if t < H else boot[b]

        def n_step(t, n, b=b):
            total, discount = 0.0, 1.0
            for k in range(n):
                total += discount * r[t + k][b]
                discount *= gamma * c[t + k][b]
            return total + discount * value(t + n)

        for t in range(H):
            N = H - t
            weighted = sum((1 - lam) * lam ** (n - 1) * n_step(t, n) for n in range(1, N))
            out[t][b] = weighted + lam ** (N - 1) * n_step(t, N)
    return out


def _t(rows):
    return torch.tensor(rows, dtype=torch.float64)


# ----------------------------------------------------------------------------- GAE


def test_gae_hand_worked_bootstraps_on_truncation_only():
    # Three envs, T = 3, gamma = 0.9, lam = 0.5 (so gamma * lam = 0.45). Each env's episode
    # ends after t = 1 differently: col 0 truncated, col 1 terminated, col 2 does not end.
    # V(s0) = 0.5, V(s1) = 1, V(s2) = 2; after the end, next_values[1] = V(final_obs) = 4 for the
    # ended envs (col 2 continues, so it is V(s2) = 2); next_values[2] = 10 after the rollout.
    rewards = _t([[1, 1, 1], [2, 2, 2], [3, 3, 3]])
    values = _t([[0.5, 0.5, 0.5], [1, 1, 1], [2, 2, 2]])
    next_values = _t([[1, 1, 1], [4, 4, 2], [10, 10, 10]])
    terminated = torch.tensor([[0, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)
    truncated = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    adv, ret = gae(rewards, values, next_values, terminated, truncated, gamma=0.9, lam=0.5)
    # t=2, all cols:  delta2 = 3 + 0.9 * 10 - 2 = 10                    A2 = 10
    # col 0 truncated: delta1 = 2 + 0.9 * 4 - 1 = 4.6 (bootstrapped)   A1 = 4.6 (trace cut)
    #                  delta0 = 1 + 0.9 * 1 - 0.5 = 1.4               A0 = 1.4 + 0.45 * 4.6 = 3.47
    # col 1 terminated: delta1 = 2 + 0 - 1 = 1 (the 4 is ignored)     A1 = 1 (trace cut)
    #                                                                  A0 = 1.4 + 0.45 * 1 = 1.85
    # col 2 continues: delta1 = 2 + 0.9 * 2 - 1 = 2.8                 A1 = 2.8 + 0.45 * 10 = 7.3
    #                                                                  A0 = 1.4 + 0.45 * 7.3 = 4.685
    expected = [[3.47, 1.85, 4.685], [4.6, 1.0, 7.3], [10.0, 10.0, 10.0]]
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(ret.numpy(), np.array(expected) + values.numpy(), rtol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    T=st.integers(1, 12),
    B=st.integers(1, 5),
    p_end=st.sampled_from([0.0, 0.2, 0.5]),
    gamma=st.floats(0.0, 1.0),
    lam=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_gae_matches_per_env_loop(T, B, p_end, gamma, lam, seed):
    rng = np.random.default_rng(seed)
    r, v, nv = (rng.normal(size=(T, B)) for _ in range(3))
    term = rng.random((T, B)) < p_end
    trunc = rng.random((T, B)) < p_end  # both at once is allowed: termination wins
    adv, ret = gae(_t(r), _t(v), _t(nv), torch.tensor(term), torch.tensor(trunc), gamma, lam)
    expected = gae_reference(r.tolist(), v.tolist(), nv.tolist(), term, trunc, gamma, lam)
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ret.numpy(), np.array(expected) + v, rtol=1e-10, atol=1e-10)


def test_gae_does_not_leak_across_episode_boundaries():
    g = torch.Generator().manual_seed(0)
    r, v, nv = (torch.randn(6, 2, generator=g) for _ in range(3))
    term = torch.zeros(6, 2, dtype=torch.bool)
    trunc = torch.zeros(6, 2, dtype=torch.bool)
    term[2, 0] = True  # env 0 dies after step 2
    trunc[2, 1] = True  # env 1 is cut after step 2
    before, _ = gae(r, v, nv, term, trunc, 0.99, 0.95)
    # The next episodes (rows 3..5) change completely: the ended episodes must not notice.
    r2, v2, nv2 = r.clone(), v.clone(), nv.clone()
    r2[3:] += 100.0
    v2[3:] -= 50.0
    nv2[3:] *= -7.0
    after, _ = gae(r2, v2, nv2, term, trunc, 0.99, 0.95)
    torch.testing.assert_close(after[:3], before[:3])
    assert not torch.allclose(after[3:], before[3:])


def test_gae_ignores_next_value_after_termination_even_nan():
    r, v = torch.ones(2, 1), torch.zeros(2, 1)
    nv = torch.tensor([[float("nan")], [0.0]])
    term = torch.tensor([[True], [False]])
    adv, _ = gae(r, v, nv, term, torch.zeros(2, 1, dtype=torch.bool), 0.9, 0.9)
    assert adv.tolist() == [[1.0], [1.0]]


def test_gae_accepts_float_flags_and_rejects_non_binary():
    r, v, nv = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    term = torch.tensor([[0, 1, 0]] * 4, dtype=torch.float32)
    trunc = torch.zeros(4, 3)
    by_bool, _ = gae(r, v, nv, term.bool(), trunc.bool(), 0.9, 0.9)
    by_float, _ = gae(r, v, nv, term, trunc, 0.9, 0.9)
    torch.testing.assert_close(by_float, by_bool)
    with pytest.raises(ValueError, match="terminated must be bool or 0/1"):
        gae(r, v, nv, term * 0.5, trunc, 0.9, 0.9)


def test_gae_detaches_and_keeps_dtype():
    r = torch.randn(3, 2, requires_grad=True)
    v = torch.randn(3, 2, requires_grad=True)
    flags = torch.zeros(3, 2, dtype=torch.bool)
    adv, ret = gae(r, v, v.detach() * 2, flags, flags, 0.99, 0.95)
    assert not adv.requires_grad and not ret.requires_grad
    assert adv.dtype == torch.float32
    adv64, _ = gae(r.double(), v.double(), v.double(), flags, flags, 0.99, 0.95)
    assert adv64.dtype == torch.float64
    with pytest.raises(ValueError, match="values must be float32 or float64, got torch.bfloat16"):
        gae(r, v.bfloat16(), v, flags, flags, 0.99, 0.95)


def test_gae_shape_errors_name_argument_and_shapes():
    x = torch.zeros(5, 3)
    flags = torch.zeros(5, 3, dtype=torch.bool)
    with pytest.raises(
        ValueError, match=r"next_values has shape \(5, 2\) but rewards has shape \(5, 3\)"
    ):
        gae(x, x, torch.zeros(5, 2), flags, flags, 0.9, 0.9)
    with pytest.raises(ValueError, match=r"truncated has shape \(3, 5\)"):
        gae(x, x, x, flags, flags.T, 0.9, 0.9)
    with pytest.raises(ValueError, match=r"values must be \(T, B\) time-major, got shape \(5,\)"):
        gae(x, torch.zeros(5), x, flags, flags, 0.9, 0.9)
    with pytest.raises(ValueError, match="lam must be in"):
        gae(x, x, x, flags, flags, 0.9, 1.5)


# ----------------------------------------------------------------------------- lambda-returns


@settings(max_examples=40, deadline=None)
@given(
    H=st.integers(1, 10),
    B=st.integers(1, 4),
    gamma=st.floats(0.0, 1.0),
    lam=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_lambda_returns_match_n_step_definition(H, B, gamma, lam, seed):
    rng = np.random.default_rng(seed)
    r, v = rng.normal(size=(H, B)), rng.normal(size=(H, B))
    c = rng.random((H, B))  # soft continue probabilities
    boot = rng.normal(size=B)
    out = lambda_returns(_t(r), _t(v), _t(c), _t(boot), gamma, lam)
    expected = lambda_reference(r.tolist(), v.tolist(), c.tolist(), boot.tolist(), gamma, lam)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-10, atol=1e-10)


def test_lambda_returns_lam_one_is_discounted_monte_carlo():
    # Rewards 1, 2, 3, continues 1, 0.5, 1, bootstrap 10, gamma 0.9; values must not matter.
    r, c = _t([[1], [2], [3]]), _t([[1], [0.5], [1]])
    out = lambda_returns(r, _t([[99], [99], [99]]), c, _t([10]), gamma=0.9, lam=1.0)
    # R2 = 3 + 0.9 * 1 * 10 = 12;  R1 = 2 + 0.9 * 0.5 * 12 = 7.4;  R0 = 1 + 0.9 * 1 * 7.4 = 7.66
    assert out[:, 0].tolist() == pytest.approx([7.66, 7.4, 12.0])


def test_lambda_returns_lam_zero_is_one_step_td():
    r, v, c = _t([[1], [2], [3]]), _t([[5], [6], [7]]), _t([[1], [0.5], [0]])
    out = lambda_returns(r, v, c, _t([10]), gamma=0.9, lam=0.0)
    # R_t = r_t + 0.9 * c_t * V(s_{t+1}): 1 + 0.9 * 6 = 6.4;  2 + 0.45 * 7 = 5.15;  3 + 0 = 3
    assert out[:, 0].tolist() == pytest.approx([6.4, 5.15, 3.0])


def test_lambda_returns_continue_on_row_t_does_not_discount_reward_t():
    # c_1 = 0: s_2 is terminal, so R_1 = r_1 exactly, and nothing after (r_2, bootstrap) counts.
    r, v, c = _t([[1], [2], [3]]), _t([[0], [0], [0]]), _t([[1], [0], [1]])
    out = lambda_returns(r, v, c, _t([1000]), gamma=1.0, lam=1.0)
    assert out[:, 0].tolist() == pytest.approx([3.0, 2.0, 1003.0])


def test_lambda_returns_detach_and_shape_errors():
    r = torch.randn(4, 3, requires_grad=True)
    assert not lambda_returns(r, r, torch.ones(4, 3), torch.zeros(3), 0.99, 0.95).requires_grad
    with pytest.raises(
        ValueError, match=r"bootstrap has shape \(4,\) but rewards has shape \(4, 3\)"
    ):
        lambda_returns(r, r, torch.ones(4, 3), torch.zeros(4), 0.99, 0.95)
    with pytest.raises(ValueError, match=r"continues has shape \(3, 4\) but rewards"):
        lambda_returns(r, r, torch.ones(3, 4), torch.zeros(3), 0.99, 0.95)
    with pytest.raises(ValueError, match=r"bootstrap must be \(B,\), got shape \(1, 3\)"):
        lambda_returns(r, r, torch.ones(4, 3), torch.zeros(1, 3), 0.99, 0.95)
