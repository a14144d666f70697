"""rl.heads: the standardised value read-out, against a slow reference."""

import pytest
import torch

from rl.heads import RunningStandardize, ValueHead, frozen_statistics


def test_running_statistics_match_a_python_reference():
    """Cumulative average over the first 1/momentum batches, then an exponential one; only
    training forwards with grad update them; the output uses the updated statistics."""
    torch.manual_seed(0)
    norm = RunningStandardize(3, momentum=0.25).train()
    mean, var = torch.zeros(3), torch.ones(3)
    for count in range(8):
        x = torch.randn(16, 3) * (count + 1) + count
        out = norm(x)
        w = max(0.25, 1.0 / (count + 1))
        mean = mean + w * (x.mean(0) - mean)
        var = var + w * (x.var(0, unbiased=False) - var)
        torch.testing.assert_close(norm.mean, mean)
        torch.testing.assert_close(norm.var, var)
        torch.testing.assert_close(out, (x - mean) / torch.sqrt(var + norm.eps))
    before = (norm.mean.clone(), norm.var.clone())
    with torch.no_grad():
        norm(torch.randn(4, 3))  # acting: no update
    with frozen_statistics(norm):
        norm(torch.randn(4, 3))  # diagnostics: no update
    assert not norm.frozen
    norm.eval()
    norm(torch.randn(4, 3))
    assert torch.equal(norm.mean, before[0]) and torch.equal(norm.var, before[1])


def test_value_head_starts_at_zero_and_reads_a_small_signal_at_once():
    """The case that kept the critic at EV 0: a state that is one shared vector plus a small
    frame-dependent part (3% of it). Standardised, a linear head fits the target in tens of
    Adam steps; the old MLP on the raw state does not move off 0 in the same steps."""
    torch.manual_seed(0)
    D, n = 64, 256
    shared = torch.randn(D) * 4
    signal = torch.randn(n, 2)
    mix = torch.randn(2, D)
    states = shared + 0.03 * (signal @ mix) + 0.003 * torch.randn(n, D)
    target = signal[:, 0] - 0.5 * signal[:, 1]

    def fit(head: torch.nn.Module) -> float:
        opt = torch.optim.Adam(head.parameters(), lr=1e-3)
        for _ in range(60):
            loss = ((head(states).reshape(n) - target) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return 1 - float(((head.eval()(states).reshape(n) - target) ** 2).mean() / target.var())

    head = ValueHead(D).train()
    with torch.no_grad():
        assert torch.equal(head(states), torch.zeros(n))
    mlp = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.Tanh(), torch.nn.Linear(D, 1))
    assert fit(head.train()) > 0.9
    assert fit(mlp) < 0.5


def test_momentum_must_be_a_fraction():
    with pytest.raises(ValueError, match="momentum"):
        RunningStandardize(3, momentum=0.0)
