"""Imagination (rl/imagine.py): sampling the next frame's VQ codes after the action, the
teacher-forced recomputation of their log-probs, frame <-> code round trips and the world heads.
Component tier: tiny preset, 64 px frames, Crafter codec."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from rl.imagine import (  # noqa: E402
    WorldHeads,
    code_log_probs,
    decode_codes,
    frame_codes,
    next_frame_logits,
    teacher_forced,
)
from rl.losses import continue_loss, next_frame_loss, reward_loss  # noqa: E402

TASK = "collect wood for a table"


@pytest.fixture(scope="module")
def policy(tiny_policy):
    return tiny_policy


@pytest.fixture(scope="module")
def heads(policy):
    assert isinstance(policy.world, WorldHeads)
    return policy.world


def frames(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, 64, 64, 3), dtype=np.uint8)


def act(policy, batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return policy.act(frames(batch, seed), TASK, 6, 1.0, gen)


@pytest.fixture(scope="module")
def rollout(policy, heads):
    out = act(policy, 4)
    img = policy.imagine(out, temperature=1.0, generator=torch.Generator().manual_seed(3))
    return out, img


def test_imagine_shapes_and_ranges(policy, rollout):
    out, img = rollout
    G, V = policy.image_tokens, policy.model.config.vq_config.num_embeddings
    assert img.codes.shape == (4, G) and img.codes.dtype == torch.int64
    assert int(img.codes.min()) >= 0 and int(img.codes.max()) < V
    assert img.log_probs.shape == (4, G) and img.log_probs.dtype == torch.float32
    assert torch.isfinite(img.log_probs).all() and (img.log_probs <= 0).all()
    assert img.frames.shape == (4, 64, 64, 3) and img.frames.dtype == torch.uint8
    for name in ("reward", "continue_prob", "reward_pred", "continue_logit"):
        x = getattr(img, name)
        assert x.shape == (4,) and torch.isfinite(x).all(), name
    assert ((img.continue_prob >= 0) & (img.continue_prob <= 1)).all()
    # rows had different reasoning lengths, so the imagined frame starts at different positions
    assert len({int(m.sum()) for m in out.attention_mask}) > 1


def test_imagine_is_reproducible_with_a_generator(policy, heads, rollout):
    out, img = rollout
    again = policy.imagine(out, 1.0, torch.Generator().manual_seed(3))
    assert torch.equal(again.codes, img.codes) and torch.equal(again.frames, img.frames)


def test_teacher_forced_reproduces_imagine_log_probs(policy, heads, rollout):
    out, img = rollout
    with torch.no_grad():
        logits, h_last = teacher_forced(policy, out, img.codes)
        assert logits.shape == (
            4,
            policy.image_tokens,
            policy.model.config.vq_config.num_embeddings,
        )
        logp = code_log_probs(logits, img.codes, img.temperature)
        torch.testing.assert_close(logp, img.log_probs, atol=1e-4, rtol=0)
        reward_pred, cont_logit = heads(h_last)
    torch.testing.assert_close(reward_pred, img.reward_pred, atol=1e-4, rtol=0)
    torch.testing.assert_close(cont_logit, img.continue_logit, atol=1e-4, rtol=0)


def test_act_imagine_on_one_cache_equals_act_then_imagine(policy, heads):
    """``act_imagine`` continues act's KV cache instead of prefilling the act sequence again: the
    same actions, sequences, codes, frames and heads as ``act`` then ``imagine`` with one
    generator (the same draws in the same order), and teacher forcing reproduces its codes'
    log-probs, on rows whose reasoning ended at different lengths."""
    x = frames(4, seed=2)
    gen_a, gen_b = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    out = policy.act(x, TASK, 6, 1.0, gen_a)
    img = policy.imagine(out, 0.5, gen_a)
    out2, img2 = policy.act_imagine(x, TASK, 6, 1.0, gen_b, imagine_temperature=0.5)
    assert len({int(m.sum()) for m in out.attention_mask}) > 1
    assert torch.equal(out.tokens, out2.tokens) and torch.equal(out.actions, out2.actions)
    assert torch.equal(out.prompt_ids, out2.prompt_ids)
    assert torch.equal(img.codes, img2.codes) and torch.equal(img.frames, img2.frames)
    assert img2.temperature == 0.5
    for name in ("log_probs", "reward_pred", "continue_logit"):
        torch.testing.assert_close(getattr(img2, name), getattr(img, name), atol=1e-4, rtol=0)
    with torch.no_grad():
        logp = code_log_probs(next_frame_logits(policy, out2, img2.codes), img2.codes, 0.5)
    torch.testing.assert_close(logp, img2.log_probs, atol=1e-4, rtol=0)
    assert torch.equal(gen_a.get_state(), gen_b.get_state())  # no draw more or less
    with pytest.raises(ValueError, match="temperature must be positive"):
        policy.act_imagine(x, TASK, imagine_temperature=0.0)


def test_teacher_forced_at_another_temperature(policy, heads):
    out = act(policy, 2, seed=5)
    img = policy.imagine(out, 0.7, torch.Generator().manual_seed(9))
    with torch.no_grad():
        logp = code_log_probs(next_frame_logits(policy, out, img.codes), img.codes, 0.7)
    torch.testing.assert_close(logp, img.log_probs, atol=1e-4, rtol=0)


def test_frame_codes_round_trip(policy):
    real = frames(3, seed=7)
    codes = frame_codes(policy, real)
    G, V = policy.image_tokens, policy.model.config.vq_config.num_embeddings
    assert codes.shape == (3, G) and codes.dtype == torch.int64
    assert int(codes.min()) >= 0 and int(codes.max()) < V
    assert torch.equal(frame_codes(policy, real), codes)  # deterministic
    recon = decode_codes(policy, codes)
    assert recon.shape == (3, 64, 64, 3) and recon.dtype == torch.uint8
    # Decoding is a function of the codes: frames with the same codes decode identically.
    assert torch.equal(decode_codes(policy, codes), recon)
    recodes = frame_codes(policy, recon)
    assert recodes.shape == codes.shape and int(recodes.max()) < V
    # the channels-last decode is the VQ's own decode to float rounding (at most 1 level)
    with torch.no_grad():
        y = policy.model.model.vqmodel.decode(codes)
    slow = ((y.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1)
    assert float((recon.float() - slow).abs().max()) <= 1.0
    with pytest.raises(ValueError, match=r"codes must be \(B, 16\)"):
        decode_codes(policy, codes[:, :5])


def test_next_frame_loss_backpropagates_into_generation_head(policy, rollout):
    out, _ = rollout
    target = frame_codes(policy, frames(4, seed=11))
    policy.zero_grad(set_to_none=True)
    logits = next_frame_logits(policy, out, target)
    loss, metrics = next_frame_loss(logits, target)
    assert torch.isfinite(loss) and 0 <= float(metrics["next_frame/accuracy"]) <= 1
    loss.backward()
    head = policy.model.model.generation_head
    grads = [p.grad for p in head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    emb = policy.model.model.generation_embeddings.weight.grad
    assert emb is not None and torch.isfinite(emb).all()
    policy.zero_grad(set_to_none=True)


def test_world_heads_train_on_reward_and_continue(policy, heads, rollout):
    out, _ = rollout
    target = frame_codes(policy, frames(4, seed=12))
    _, h_last = teacher_forced(policy, out, target)
    reward_pred, cont_logit = heads(h_last)
    assert reward_pred.shape == (4,) and cont_logit.shape == (4,)
    r_loss, _ = reward_loss(reward_pred, torch.tensor([0.0, 1.0, -0.1, 0.0]))
    c_loss, _ = continue_loss(cont_logit, torch.tensor([1.0, 1.0, 0.0, 1.0]))
    heads.zero_grad(set_to_none=True)
    (r_loss + c_loss).backward()
    for p in heads.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    heads.zero_grad(set_to_none=True)
    policy.zero_grad(set_to_none=True)


def test_imagine_rejects_bad_temperature(policy, heads, rollout):
    out, _ = rollout
    with pytest.raises(ValueError, match="temperature"):
        policy.imagine(out, 0.0)
    with pytest.raises(ValueError, match="next_codes"):
        next_frame_logits(policy, out, torch.zeros(4, 3, dtype=torch.long))
