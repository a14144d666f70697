"""The frame head (rl.heads.FrameHead, ``policy.frame_head``): offsets of the next frame's code
logits read from the decision state and the action. Every path that scores codes adds the same
offsets (the KV-cached sampler of ``act_imagine``, ``imagine`` and the lookahead of ``act``;
``evaluate``'s teacher forcing; the SFT scorer), with the state of the step's real frame and the
action the frame follows; the head is saved with the heads and a checkpoint without one gets a
fresh, zero one. Component tier: tiny preset, Crafter codec."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from envs.crafter_env import crafter_codec  # noqa: E402
from rl.imagine import code_log_probs, code_logits, decode_codes, teacher_forced  # noqa: E402
from rl.policy import HEADS_FILE, RigPolicy  # noqa: E402

TASK = "collect wood for a table"
WIDTH = 32


@pytest.fixture(scope="module")
def policy():
    from policies import end_biased, state_readouts

    p = state_readouts(end_biased(RigPolicy.from_preset("tiny", crafter_codec(), seed=2,
                                                        frame_head=WIDTH).eval()))  # fmt: skip
    with torch.no_grad():  # a trained-looking head: O(1) offsets that depend on state and action
        p.frame_head.out.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(4))
        p.frame_head.outcome_out.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(6))
        p.value_head.norm.var.fill_(1e-3)  # standardised columns of order 1
    return p


def frames(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, 64, 64, 3), dtype=np.uint8)


def planted(policy, actions: torch.Tensor) -> torch.Tensor:
    """(B, G) the codes :func:`huge_offsets` makes certain after ``actions`` (B,)."""
    G, V = policy.image_tokens, policy.model.config.vq_config.num_embeddings
    return (actions.long()[:, None] * 37 + 5 * torch.arange(G)) % V


def huge_offsets(policy, seen: list[torch.Tensor]):
    """A stand-in for ``frame_offsets`` that makes :func:`planted` certain and records the
    states it was given."""

    def offsets(state: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        seen.append(state.detach().clone())
        V = policy.model.config.vq_config.num_embeddings
        return 1e4 * torch.nn.functional.one_hot(planted(policy, actions.cpu()), V).float()

    return offsets


def test_sampler_teacher_forcing_and_evaluate_score_codes_alike(policy):
    x = frames(4, seed=1)
    out, img = policy.act_imagine(x, TASK, 6, 1.0, torch.Generator().manual_seed(5),
                                  imagine_temperature=0.7)  # fmt: skip
    assert len({int(m.sum()) for m in out.attention_mask}) > 1  # rows of several lengths
    with torch.no_grad():
        evaluated = policy.evaluate(out, img.codes)["next_frame_logits"]
        forced, _ = teacher_forced(policy, out, img.codes)
        hidden, _, start = policy.forward_sequence(out, img.codes)
        alone = code_logits(policy, hidden[:, start : start + policy.image_tokens])
    for logits in (evaluated, forced):
        torch.testing.assert_close(code_log_probs(logits, img.codes, 0.7), img.log_probs,
                                   atol=1e-4, rtol=0)  # fmt: skip
    # the head matters: without its offsets the sampled codes score otherwise
    assert float((code_log_probs(alone, img.codes, 0.7) - img.log_probs).abs().max()) > 0.1
    # imagine() on the act output reads the same state from its longer prefill
    again = policy.imagine(out, 0.7, torch.Generator().manual_seed(11))
    with torch.no_grad():
        logp = code_log_probs(policy.evaluate(out, again.codes)["next_frame_logits"],
                              again.codes, 0.7)  # fmt: skip
    torch.testing.assert_close(logp, again.log_probs, atol=1e-4, rtol=0)


def test_every_sampler_reads_the_real_frames_state_and_the_frames_action(policy, monkeypatch):
    x = frames(3, seed=2)
    seen: list[torch.Tensor] = []
    monkeypatch.setattr(policy, "frame_offsets", huge_offsets(policy, seen))
    out, img = policy.act_imagine(x, TASK, 6, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(img.codes, planted(policy, out.actions))
    assert torch.equal(policy.imagine(out, 1.0).codes, planted(policy, out.actions))
    torch.testing.assert_close(seen[1], seen[0], atol=1e-4, rtol=1e-4)  # the same state
    look = policy.act(x, TASK, 6, 1.0, torch.Generator().manual_seed(1), lookahead=2)
    for i in range(2):  # each proposal's frame follows that proposal's action
        expected = decode_codes(policy, planted(policy, look.lookahead_actions[:, i]))
        assert torch.equal(look.imagined_frames[:, i], expected)
    for state in seen[2:]:  # from the real frame, as the action head reads it
        torch.testing.assert_close(state, seen[0], atol=1e-4, rtol=1e-4)


def test_sft_scores_each_frame_after_its_own_action(policy, monkeypatch):
    from supervised.sft import IMAGE, Decision, Example, build_batch, token_log_probs

    G, empty = policy.image_tokens, torch.zeros(0, 64, 64, 3, dtype=torch.uint8)
    text = policy.tok("go", add_special_tokens=False)["input_ids"]
    x = torch.as_tensor(frames(2, seed=3))

    def example(b: int, proposals: list[int], final: int, wrong: int | None = None) -> Example:
        decisions = [Decision([(text, True)], a, planted(policy, torch.tensor([a]))[0])
                     for a in proposals]  # fmt: skip
        if wrong is not None:  # proposal ``wrong`` carries another action's frame
            decisions[wrong].codes = planted(policy, torch.tensor([proposals[wrong] + 1]))[0]
        target = planted(policy, torch.tensor([final]))[0]
        return Example(x[b], empty, [], [], decisions, Decision([(text, True)], final, target))

    monkeypatch.setattr(policy, "frame_offsets", huge_offsets(policy, []))
    with torch.no_grad():
        right = build_batch(policy, [example(0, [1, 4], 2), example(1, [3, 0], 5)], TASK, 4)
        scored = token_log_probs(policy, right)[IMAGE][0]
        assert scored.shape == (2 * 3 * G,) and float(scored.min()) > -1e-3
        wrong = build_batch(policy, [example(0, [1, 4], 2, wrong=1), example(1, [3, 0], 5)],
                            TASK, 4)  # fmt: skip
        scored = token_log_probs(policy, wrong)[IMAGE][0].view(2, 3, G)
    assert float(scored[0, 1].max()) < -100 and float(scored[:, 2].min()) > -1e-3


def test_reward_and_continue_add_the_outcome_read_out_on_every_path(policy):
    """``imagine``/``act_imagine`` (so the gate and the review) and the learner's ``evaluate``
    give one reward and continue per transition, the outcome offsets of the real frame's state
    and the row's action added to the world heads' reading after the last code."""
    x = frames(4, seed=7)
    out, img = policy.act_imagine(x, TASK, 6, 1.0, torch.Generator().manual_seed(2),
                                  imagine_temperature=0.7)  # fmt: skip
    with torch.no_grad():
        res = policy.evaluate(out, img.codes)
        again = policy.imagine(out, 0.7, torch.Generator().manual_seed(9))
        _, h_last = teacher_forced(policy, out, img.codes)
        alone_r, alone_c = policy.world(h_last)
        state = policy.decision_state(policy.forward_sequence(out)[0], out)
        other = policy.frame_head.outcome(state, (out.actions + 1) % len(policy.codec.vocab))[0]
        reward_off, continue_off = policy.frame_head.outcome(state, out.actions)
    torch.testing.assert_close(res["reward_pred"], img.reward_pred, atol=1e-4, rtol=0)
    torch.testing.assert_close(res["continue_logit"], img.continue_logit, atol=1e-4, rtol=0)
    torch.testing.assert_close(img.reward_pred, alone_r + reward_off, atol=1e-4, rtol=0)
    torch.testing.assert_close(img.continue_logit, alone_c + continue_off, atol=1e-4, rtol=0)
    assert float(reward_off.abs().min()) > 1e-3 and float(continue_off.abs().min()) > 1e-3
    assert float((other - reward_off).abs().max()) > 0.1  # it reads the action
    # imagine() on the act output reads the same state (its own codes: another draw)
    with torch.no_grad():
        res = policy.evaluate(out, again.codes)
    torch.testing.assert_close(res["reward_pred"], again.reward_pred, atol=1e-4, rtol=0)


def test_the_frame_head_is_saved_and_a_checkpoint_without_one_gets_a_fresh_one(policy, tmp_path):
    from rl.model import CheckpointError

    path = policy.save(tmp_path / "ckpt")
    loaded = RigPolicy.load(path, crafter_codec())
    assert loaded.frame_head is not None and loaded.frame_head.out.in_features == WIDTH
    torch.testing.assert_close(loaded.frame_head.out.weight, policy.frame_head.out.weight)
    with pytest.raises(CheckpointError, match="set policy.frame_head=32"):
        RigPolicy.load(path, crafter_codec(), frame_head=16)
    plain = RigPolicy.from_preset("tiny", crafter_codec(), seed=2)
    assert plain.frame_head is None and plain.frame_offsets(torch.zeros(1, 1), None) is None
    old = plain.save(tmp_path / "old")
    assert not any(k.startswith("frame_head.") for k in plain.state_dict())
    fresh = RigPolicy.load(old, crafter_codec(), frame_head=8)
    assert fresh.frame_head.out.in_features == 8 and not bool(fresh.frame_head.out.weight.any())
    assert RigPolicy.load(old, crafter_codec()).frame_head is None
    # saved before the outcome read-out: the frame head loads, its outcome layer starts at 0
    from safetensors.torch import load_file, save_file

    heads = load_file(str(path / HEADS_FILE))
    save_file({k: v for k, v in heads.items() if "outcome_out" not in k}, str(path / HEADS_FILE),
              metadata={"sees": "frames"})  # fmt: skip
    before = RigPolicy.load(path, crafter_codec())
    torch.testing.assert_close(before.frame_head.out.weight, policy.frame_head.out.weight)
    assert not bool(before.frame_head.outcome_out.weight.any())
    assert (old / HEADS_FILE).is_file()
    with pytest.raises(ValueError, match="frame_head must be >= 0"):
        RigPolicy.from_preset("tiny", crafter_codec(), frame_head=-1)


def test_a_fresh_frame_head_leaves_the_generation_heads_codes_alone():
    fresh = RigPolicy.from_preset("tiny", crafter_codec(), seed=0, frame_head=16).eval()
    plain = RigPolicy.from_preset("tiny", crafter_codec(), seed=0).eval()
    x = frames(2, seed=4)
    a = fresh.act_imagine(x, TASK, 2, 1.0, torch.Generator().manual_seed(0))[1]
    b = plain.act_imagine(x, TASK, 2, 1.0, torch.Generator().manual_seed(0))[1]
    assert torch.equal(a.codes, b.codes)
    torch.testing.assert_close(a.log_probs, b.log_probs)
