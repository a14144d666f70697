"""The RIG policy (rl/policy.py): batched KV-cached acting, and the learner's teacher-forced
recomputation of the same log-probs. Component tier: tiny preset, 64 px frames, Crafter codec."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from rl.policy import ActOutput  # noqa: E402

TASK = "collect wood for a table"


@pytest.fixture(scope="module")
def policy(tiny_policy):
    return tiny_policy


def frames(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, 64, 64, 3), dtype=np.uint8)


def act(policy, batch, seed=0, max_reasoning_tokens=6, temperature=1.0) -> ActOutput:
    gen = torch.Generator().manual_seed(seed)
    return policy.act(frames(batch, seed), TASK, max_reasoning_tokens, temperature, gen)


def test_act_shapes_actions_and_masks(policy):
    out = act(policy, 4)
    ids, codec = policy.ids, policy.codec
    B, L = out.tokens.shape
    assert B == 4 and out.prompt_length == out.prompt_ids.shape[1]
    assert out.prompt_ids.shape == (4, 2 + len(policy.tok(TASK)["input_ids"]) + 3 + 16 + 1)
    for name in ("attention_mask", "log_probs", "reasoning_mask", "action_mask"):
        assert getattr(out, name).shape == (4, L), name
    assert out.actions.shape == (4,) and out.values.shape == (4,)
    assert out.log_probs.dtype == torch.float32 and torch.isfinite(out.values).all()

    for i in range(4):
        action = int(out.actions[i])
        assert 0 <= action < len(codec) and codec.decode(out.action_texts[i]) == action
        row = out.tokens[i]
        # action tokens: exactly the trie path of the action, <end> last, right after <action>
        a_cols = out.action_mask[i].nonzero().squeeze(1)
        assert row[a_cols].tolist() == list(policy.trie.sequence(action))
        assert row[a_cols[-1]] == ids.end and row[a_cols[0] - 1] == ids.action
        assert policy.tok.decode(row[a_cols[:-1]]) == out.action_texts[i]
        # reasoning: a prefix of columns, closed by <end> (sampled, or forced at the cap)
        r_cols = out.reasoning_mask[i].nonzero().squeeze(1)
        assert r_cols.tolist() == list(range(len(r_cols)))
        if len(r_cols) and row[r_cols[-1]] == ids.end:
            assert out.log_probs[i, r_cols[-1]] < 0
        else:
            assert len(r_cols) == 6 and row[6] == ids.end and out.log_probs[i, 6] == 0
        # sampled tokens have log-prob < 0 only there; everything sampled is attended
        sampled = out.token_mask[i]
        assert (out.log_probs[i][~sampled] == 0).all() and (out.log_probs[i][sampled] <= 0).all()
        assert (out.attention_mask[i] | ~sampled).all()
        assert (row[~out.attention_mask[i]] == ids.pad).all()
        assert not (out.reasoning_mask[i] & out.action_mask[i]).any()


def test_evaluate_recomputes_act_log_probs(policy):
    out = act(policy, 4, seed=1)
    lengths = out.reasoning_mask.sum(1)
    assert len(set(lengths.tolist())) > 1, f"rows should differ in reasoning length: {lengths}"
    assert out.reasoning_mask.any() and out.action_mask.any()

    res = policy.evaluate(out)
    assert res["log_probs"].shape == out.tokens.shape == res["entropies"].shape
    for mask in (out.reasoning_mask, out.action_mask):
        torch.testing.assert_close(res["log_probs"][mask], out.log_probs[mask], atol=1e-4, rtol=0)
    assert (res["log_probs"][~out.token_mask] == 0).all()
    torch.testing.assert_close(res["values"], out.values, atol=1e-4, rtol=0)
    ent = res["entropies"]
    assert (ent[out.reasoning_mask] > 0).all() and (ent[~out.token_mask] == 0).all()
    assert (ent[out.action_mask] >= 0).all()  # 0 where the trie allows one token (a forced <end>)
    # an action entropy is at most log(number of allowed tokens at that node) <= log(len(codec))
    assert (ent[out.action_mask] <= np.log(len(policy.codec)) + 1e-5).all()

    # gradients reach the LM and the value head
    (res["log_probs"].sum() + res["values"].sum()).backward()
    assert policy.value_head[0].weight.grad is not None
    assert policy.model.lm_head.weight.grad.abs().sum() > 0
    policy.zero_grad(set_to_none=True)

    # rows of two act calls of different lengths, right-padded together, still agree
    other = act(policy, 2, seed=5, max_reasoning_tokens=2)
    both = ActOutput.collate([out, other], pad_id=policy.ids.pad)
    with torch.no_grad():
        res = policy.evaluate(both)
    mask = both.token_mask
    torch.testing.assert_close(res["log_probs"][mask], both.log_probs[mask], atol=1e-4, rtol=0)
    torch.testing.assert_close(res["values"], both.values, atol=1e-4, rtol=0)


def test_kv_cache_matches_full_forward(policy):
    prompt = policy.prompt_ids(TASK, 2)  # (2, P) ends "... <image> x 16 <end> <reasoning>"
    pixels = policy.pixel_values(frames(2, seed=3))
    P = prompt.shape[1]
    attn = torch.ones_like(prompt, dtype=torch.bool)
    pos = torch.arange(P).expand(2, -1)
    with torch.no_grad():
        full, _ = policy.hidden(prompt, attn, pos, pixels)
        h, cache = policy.hidden(prompt[:, :-2], attn[:, :-2], pos[:, :-2], pixels, use_cache=True)
        for t in (P - 2, P - 1):
            h, cache = policy.hidden(prompt[:, t : t + 1], attn[:, : t + 1], pos[:, t : t + 1],
                                     past_key_values=cache, use_cache=True)  # fmt: skip
    cached, reference = policy.logits(h[:, -1]), policy.logits(full[:, -1])
    torch.testing.assert_close(cached, reference, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(reference[0], reference[1])  # the frames do reach the logits


def test_thousand_sampled_actions_are_valid(policy):
    actions = torch.cat([act(policy, 128, seed=s, max_reasoning_tokens=1).actions
                         for s in range(8)])  # fmt: skip
    assert actions.numel() >= 1000
    assert ((actions >= 0) & (actions < len(policy.codec))).all()
    assert len(actions.unique()) > len(policy.codec) // 2  # the sampler explores the vocabulary


def test_bad_frames_are_rejected(policy):
    with pytest.raises(ValueError, match="64x64"):
        policy.act(np.zeros((1, 32, 32, 3), np.uint8), TASK, 2)
    with pytest.raises(ValueError, match="uint8"):
        policy.act(np.zeros((1, 64, 64, 3), np.float32), TASK, 2)


def test_plays_a_whole_crafter_episode(policy):
    """Whole loop in miniature: the tiny policy drives two real Crafter envs to the time limit."""
    from envs.vector import EpisodeTracker, make_vector

    venv = make_vector("rig/Crafter-v0", num_envs=2, length=12)
    tracker = EpisodeTracker(2)
    obs, _ = venv.reset(seed=0)
    gen = torch.Generator().manual_seed(0)
    taken = []
    for _ in range(12):
        out = policy.act(obs, TASK, max_reasoning_tokens=4, temperature=1.0, generator=gen)
        assert all(
            policy.codec.vocab[int(a)] == t
            for a, t in zip(out.actions, out.action_texts, strict=True)
        )
        obs, rewards, terminated, truncated, infos = venv.step(out.actions.numpy())
        tracker.step(rewards, terminated, truncated, infos)
        taken.extend(out.action_texts)
    venv.close()
    assert len(tracker.finished) == 2
    assert all(e["length"] == 12 and (e["truncated"] or e["terminated"]) for e in tracker.finished)
    assert len(set(taken)) > 1, "a sampling policy should not repeat one action 24 times"
