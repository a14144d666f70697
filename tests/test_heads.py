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


@pytest.mark.parametrize("head", ["value", "action"])
def test_a_hidden_layer_starts_at_zero_and_learns_only_its_output_first(head):
    """With ``inner`` the head is Linear+ReLU then the zero-initialised output: the output is
    0 at the start, the first gradient reaches the output layer only (the hidden layer's is
    0 through the zero weights), and one Adam step later the hidden layer moves too."""
    from rl.constrained import ActionTrie
    from rl.heads import ActionHead

    torch.manual_seed(0)
    D, W, n = 12, 5, 32
    z = torch.randn(n, D)
    if head == "value":
        module = ValueHead(D, inner=W).train()
        out_weight = module.out.weight

        def forward():
            return module.read(z)
    else:
        trie = ActionTrie([[1, 9], [2, 9], [3, 9]], eos_id=9)
        module = ActionHead(*trie.choice_edges(), hidden=D, inner=W)
        out_weight = module.weight
        nodes = torch.zeros(n, dtype=torch.long)

        def forward():
            return module(z, nodes, 10)[:, [1, 2, 3]]

    assert out_weight.shape[-1] == W and module.inner[0].weight.shape == (W, D)
    assert torch.equal(forward(), torch.zeros_like(forward()))
    target = torch.randn_like(forward())
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    for step in range(2):
        opt.zero_grad()
        ((forward() - target) ** 2).mean().backward()
        inner_grad = module.inner[0].weight.grad.abs().sum()
        assert (float(inner_grad) == 0.0) == (step == 0)
        assert float(out_weight.grad.abs().sum()) > 0
        opt.step()


def test_a_head_width_must_not_be_negative():
    with pytest.raises(ValueError, match="hidden width"):
        ValueHead(4, inner=-1)


def test_momentum_must_be_a_fraction():
    with pytest.raises(ValueError, match="momentum"):
        RunningStandardize(3, momentum=0.0)


def test_choice_edges_number_only_the_tokens_a_node_chooses_between():
    """Root chooses 1 or 4; after 1, 2 or 3; everything else is forced (a lone continuation,
    or END at a leaf): only those four slots are edges, numbered node by node."""
    from rl.constrained import ActionTrie

    trie = ActionTrie([[1, 2, 9], [1, 3, 9], [4, 9]], eos_id=9)
    tokens, edges = trie.choice_edges()
    assert tokens.shape == edges.shape == (trie.num_nodes, 2)
    found = {(int(n), int(tokens[n, k])): int(edges[n, k])
             for n in range(trie.num_nodes) for k in range(2) if edges[n, k] >= 0}  # fmt: skip
    after_1 = int(trie.advance(trie.root(1), torch.tensor([1]))[0])
    assert found == {(0, 1): 0, (0, 4): 1, (after_1, 2): 2, (after_1, 3): 3}


def test_action_head_adds_each_choice_score_at_its_token_and_nothing_else():
    """Against a loop over rows and children; zero-initialised, so a checkpoint's policy is
    unchanged until RL moves it."""
    from rl.constrained import ActionTrie
    from rl.heads import ActionHead

    trie = ActionTrie([[1, 2, 9], [1, 3, 9], [4, 9], [5, 9]], eos_id=9)
    tokens, edges = trie.choice_edges()
    head = ActionHead(tokens, edges, hidden=6)
    z = torch.randn(5, 6)
    after = [int(trie.advance(trie.root(1), torch.tensor([t]))[0]) for t in (1, 4)]
    nodes = torch.tensor([0, 0, after[0], after[1], 0])  # row 3: after 4, END is forced
    assert torch.equal(head(z, nodes, 12), torch.zeros(5, 12))
    with torch.no_grad():
        head.weight.normal_()
    out = head(z, nodes, 12)
    want = torch.zeros(5, 12)
    for row, node in enumerate(nodes.tolist()):
        for k in range(int(trie.num_choices(torch.tensor([node]))[0])):
            e = int(edges[node, k])
            if e >= 0:
                want[row, int(tokens[node, k])] = head.weight[e] @ z[row]
    torch.testing.assert_close(out, want)
    assert torch.equal(out[3], torch.zeros(12))  # a forced token gets no score
    logp = trie.log_softmax(out, nodes)
    assert float(logp[3, 9]) == 0.0
    torch.testing.assert_close(logp[0, [1, 4, 5]].exp().sum(), torch.tensor(1.0))
