"""rl.constrained: every decoded action is in the codec, the masked distribution is the one
sampled, and the learner's recomputed log-probs equal the sampler's."""

from __future__ import annotations

import math

import pytest
import torch

from envs.crafter_env import crafter_codec
from envs.minerl import MineRLCodec
from rl import tokenizer as T
from rl.constrained import ActionTrie, build_action_trie, sample_actions

CODECS = {"crafter": crafter_codec, "minerl": MineRLCodec}


@pytest.fixture(scope="module")
def tok():
    return T.build_tokenizer()


@pytest.fixture(scope="module", params=sorted(CODECS))
def codec_trie(request, tok):
    codec = CODECS[request.param]()
    return codec, build_action_trie(tok, codec.vocab)


def _decoded(tok, sample) -> list[str]:
    """Each row's action text: its valid tokens without the closing END."""
    end = T.segment_ids(tok).end
    texts = []
    for row, valid in zip(sample.tokens, sample.valid, strict=True):
        ids = row[valid].tolist()
        assert ids[-1] == end and end not in ids[:-1]
        texts.append(tok.decode(ids[:-1]))
    return texts


def test_paths_are_the_tokens_the_model_writes_after_the_marker(tok, codec_trie):
    codec, trie = codec_trie
    ids = T.segment_ids(tok)
    assert len(trie) == len(codec)
    for index, text in enumerate(codec.vocab):
        path = list(trie.sequence(index))
        alone = tok(text, add_special_tokens=False)["input_ids"]
        assert path == [*alone, ids.end]
        context = f"{T.REASONING}I act.{T.END}{T.ACTION}{text}{T.END}{T.IMAGINE}"
        seq = tok(context, add_special_tokens=False)["input_ids"]
        start = seq.index(ids.action) + 1
        assert seq[start : start + len(path)] == path


def test_random_logits_always_give_valid_actions(tok, codec_trie):
    codec, trie = codec_trie
    batch, vocab = 2000, len(tok)
    gen = torch.Generator().manual_seed(0)

    def logits_fn(prefix):
        return 4.0 * torch.randn(batch, vocab, generator=gen)  # (B, V)

    sample = sample_actions(logits_fn, trie, batch, generator=gen)
    assert sample.tokens.shape == sample.log_probs.shape == sample.valid.shape
    assert sample.tokens.shape[1] <= trie.max_len
    assert _decoded(tok, sample) == [codec.encode(a) for a in sample.actions.tolist()]
    assert torch.isfinite(sample.log_probs).all() and (sample.log_probs <= 0).all()
    if len(codec) == 17:
        assert set(sample.actions.tolist()) == set(range(17))  # every Crafter action reachable


def test_mask_wins_against_logits_that_favour_invalid_tokens(tok, codec_trie):
    codec, trie = codec_trie
    ids = T.segment_ids(tok)
    batch = 500
    ordinary = tok(" the", add_special_tokens=False)["input_ids"][0]
    gen = torch.Generator().manual_seed(1)

    def logits_fn(prefix):
        logits = torch.randn(batch, len(tok), generator=gen)
        logits[:, [ids.bos, ids.action, ids.imagine, ordinary]] = 1e4
        if prefix.shape[1] == 0:
            logits[:, ids.end] = 1e4  # the empty action is not in the vocabulary either
        return logits

    sample = sample_actions(logits_fn, trie, batch, generator=gen)
    assert _decoded(tok, sample) == [codec.encode(a) for a in sample.actions.tolist()]
    assert torch.isfinite(sample.log_probs).all()


# -- a trie small enough to check by hand -----------------------------------------------------
# Token 1 is END. Actions: 0 = [5], 1 = [5, 6], 2 = [7, 8]. Token 9 is never allowed.
#   root allows {5, 7}; after 5: {END, 6}; after 7: {8}; after 5 6 and after 7 8: {END}.
# Logits (same at every step): 0 everywhere, log 3 on token 6, 50 on token 9 (masked away):
#   P(5) = P(7) = 1/2; after 5: P(6) = 3/4, P(END) = 1/4; every other choice is forced.
#   P(action 0) = 1/8, P(action 1) = 3/8, P(action 2) = 1/2.
HAND_SEQUENCES = [[5, 1], [5, 6, 1], [7, 8, 1]]
HAND_P = [1 / 8, 3 / 8, 1 / 2]


def _hand_logits(batch: int) -> torch.Tensor:
    logits = torch.zeros(batch, 10)
    logits[:, 6] = math.log(3)
    logits[:, 9] = 50.0
    return logits  # (B, V=10)


def test_hand_checked_trie_masks_and_steps():
    trie = ActionTrie(HAND_SEQUENCES, eos_id=1)
    nodes = trie.root(2)
    assert trie.allowed_mask(nodes, 10)[0].nonzero().flatten().tolist() == [5, 7]
    nodes = trie.advance(nodes, torch.tensor([5, 7]))
    mask = trie.allowed_mask(nodes, 10)
    assert mask[0].nonzero().flatten().tolist() == [1, 6]
    assert mask[1].nonzero().flatten().tolist() == [8]
    nodes = trie.advance(nodes, torch.tensor([1, 8]))
    assert trie.is_done(nodes).tolist() == [True, False]
    assert trie.action_index(nodes).tolist() == [0, -1]
    nodes = trie.advance(nodes, torch.tensor([1, 1]))  # a finished row stays at its leaf
    assert trie.action_index(nodes).tolist() == [0, 2]
    with pytest.raises(ValueError, match="token 9 is not allowed"):
        trie.advance(trie.root(1), torch.tensor([9]))
    with pytest.raises(ValueError, match="too small"):
        trie.allowed_mask(nodes, 8)  # token 8 needs 9 logits


def test_sampled_distribution_matches_the_masked_logits():
    trie = ActionTrie(HAND_SEQUENCES, eos_id=1)
    batch = 20000
    gen = torch.Generator().manual_seed(2)
    sample = sample_actions(lambda prefix: _hand_logits(batch), trie, batch, generator=gen)
    counts = torch.bincount(sample.actions, minlength=3).tolist()
    for count, p in zip(counts, HAND_P, strict=True):
        assert abs(count - batch * p) < 4.5 * math.sqrt(batch * p * (1 - p)), (counts, HAND_P)
    # Each row's summed log-prob is exactly log P(its action).
    expected = torch.log(torch.tensor(HAND_P))[sample.actions]
    torch.testing.assert_close(sample.log_probs.sum(1), expected)
    greedy = sample_actions(lambda prefix: _hand_logits(4), trie, 4, greedy=True)
    assert greedy.actions.tolist() == [1] * 4  # 5 (tie with 7, lower id) then 6 (3:1 over END)


def test_duplicate_or_malformed_paths_are_refused(tok):
    with pytest.raises(ValueError, match="actions 0 and 1 have the same token sequence"):
        ActionTrie([[4, 1], [4, 1]], eos_id=1)
    with pytest.raises(ValueError, match="must end with the end-of-action id"):
        ActionTrie([[4, 1, 2]], eos_id=1)
    with pytest.raises(ValueError, match="must end with the end-of-action id"):
        ActionTrie([[1, 4, 1]], eos_id=1)
    with pytest.raises(ValueError, match=r"'noop' \(0\) and 'noop' \(2\) share"):
        build_action_trie(tok, ["noop", "do", "noop"])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_learner_recomputes_the_samplers_log_probs(tok, temperature):
    codec = MineRLCodec()
    trie = build_action_trie(tok, codec.vocab)
    batch, vocab = 256, len(tok) + 5  # a model's logits may be wider than the tokenizer
    gen = torch.Generator().manual_seed(3)
    seen = []

    def logits_fn(prefix):
        seen.append(3.0 * torch.randn(batch, vocab, generator=gen))
        return seen[-1]

    sample = sample_actions(logits_fn, trie, batch, temperature=temperature, generator=gen)
    logits = torch.stack(seen, dim=1).requires_grad_()  # (B, L, V)
    again = trie.masked_log_probs(logits, sample.tokens, sample.valid, temperature=temperature)
    torch.testing.assert_close(again, sample.log_probs, rtol=0, atol=1e-6)
    assert (again[~sample.valid] == 0).all()

    # Gradients are finite and never reach a token the mask forbade.
    again.sum().backward()
    assert torch.isfinite(logits.grad).all()
    nodes = trie.path_nodes(sample.tokens, sample.valid)  # (B, L)
    allowed = trie.allowed_mask(nodes.flatten(), vocab).view_as(logits)
    assert (logits.grad[~allowed] == 0).all()


@pytest.mark.gpu
def test_sampling_on_cuda_matches_the_codec(tok):
    codec = MineRLCodec()
    trie = build_action_trie(tok, codec.vocab)
    gen = torch.Generator(device="cuda").manual_seed(0)
    batch = 1024

    def logits_fn(prefix):
        return torch.randn(batch, len(tok), generator=gen, device="cuda")

    sample = sample_actions(logits_fn, trie, batch, generator=gen, device="cuda")
    assert sample.tokens.device.type == "cuda"
    assert _decoded(tok, sample) == [codec.encode(a) for a in sample.actions.tolist()]
    logits = torch.randn(batch, 3, len(tok), device="cuda")
    assert trie.masked_log_probs(logits, sample.tokens[:, :3], sample.valid[:, :3]).is_cuda


def test_num_choices_counts_the_allowed_tokens():
    """Paths a b END, a c END, d END: the root allows {a, d}, node a {b, c}, node d {END}."""
    a, b, c, d, end = 10, 11, 12, 13, 2
    trie = ActionTrie([[a, b, end], [a, c, end], [d, end]], eos_id=end)
    root = trie.root(1)
    after_a = trie.advance(root, torch.tensor([a]))
    after_d = trie.advance(root, torch.tensor([d]))
    leaf = trie.advance(trie.advance(after_a, torch.tensor([b])), torch.tensor([end]))
    assert trie.num_choices(torch.cat([root, after_a, after_d, leaf])).tolist() == [2, 2, 1, 1]
