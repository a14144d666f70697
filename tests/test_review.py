"""Review by value (rl/review.py): n sampled candidates, each one's imagined next frame, and the
one whose ``r + gamma * c * V(imagined)`` is highest is taken; ``rig eval --review value``.
Component tier: tiny preset, Crafter codec."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from rl.policy import History  # noqa: E402
from rl.review import review_by_value  # noqa: E402

TASK = "collect wood for a table"


def frames(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, 64, 64, 3), dtype=np.uint8)


def test_the_review_takes_the_candidate_whose_dream_is_worth_most(tiny_policy):
    policy, B, n = tiny_policy, 3, 4
    x = frames(B, seed=1)
    history = History.empty(B, 1, 64)
    history.push(frames(B, seed=2), np.array([1, 2, 3]))
    review = review_by_value(policy, x, TASK, n, 4, 1.0, torch.Generator().manual_seed(0),
                             history=history, gamma=0.9, imagine_temperature=0.5)  # fmt: skip
    assert review.candidates.shape == (B, n) and review.q.shape == (B, n)
    assert torch.equal(review.chosen, review.q.argmax(1))
    assert torch.equal(review.actions, review.candidates[torch.arange(B), review.chosen])
    assert torch.equal(review.act.actions, review.actions) and review.imagined.temperature == 0.5
    # q of the chosen candidates, recomputed from their own rows: r + gamma * c * V(dream)
    img = review.imagined
    value = policy.state_values(img.frames, TASK, History.after(review.act))
    q = img.reward + 0.9 * img.continue_prob * value
    torch.testing.assert_close(q, review.q.max(1).values, atol=1e-4, rtol=1e-4)
    assert torch.equal(review.act.history_actions[:, -1], torch.tensor([1, 2, 3]))


def test_the_critic_on_the_dream_decides(tiny_policy, monkeypatch):
    """A critic that values only what follows one action makes every row that proposed it take
    it; the candidates are the policy's own samples (act_imagine's draws)."""
    policy, B, n = tiny_policy, 6, 8
    x = frames(B, seed=3)
    history = History.empty(B, 1, 64)
    copies = History(history.frames.repeat_interleave(n, 0),
                     history.actions.repeat_interleave(n, 0),
                     history.mask.repeat_interleave(n, 0))  # fmt: skip
    rep = torch.as_tensor(x).repeat_interleave(n, 0)
    out, _ = policy.act_imagine(rep, TASK, 4, 1.0, torch.Generator().manual_seed(7), history=copies)
    proposals = out.actions.view(B, n)
    # an action some rows proposed and some did not
    target = next(int(a) for a in proposals.unique()
                  if 0 < int((proposals == a).any(1).sum()) < B)  # fmt: skip

    def critic(frames_, task, history_):
        return (history_.actions[:, -1] == target).float() * 10.0

    monkeypatch.setattr(policy, "state_values", critic)
    review = review_by_value(policy, x, TASK, n, 4, 1.0, torch.Generator().manual_seed(7),
                             history=history)  # fmt: skip
    assert torch.equal(review.candidates, proposals)
    proposed = (proposals == target).any(1)
    assert bool((review.actions[proposed] == target).all())
    assert not bool((review.actions[~proposed] == target).any())


def test_a_deeper_review_sums_the_imagined_rollouts_discounted_return(tiny_policy):
    """depth 3: each candidate's q is r_0 + g c_0 (r_1 + g c_1 (r_2 + g c_2 V(s_3))) of the
    policy acting on in its own dreams, recomputed here step by step with the same draws."""
    policy, B, n, g = tiny_policy, 2, 3, 0.9
    x = frames(B, seed=5)
    review = review_by_value(policy, x, TASK, n, 4, 1.0, torch.Generator().manual_seed(3),
                             gamma=g, imagine_temperature=0.5, depth=3)  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    rep = torch.as_tensor(x).repeat_interleave(n, 0)
    out, img = policy.act_imagine(rep, TASK, 4, 1.0, gen, imagine_temperature=0.5)
    steps = [img]
    for _ in range(2):
        out, img = policy.act_imagine(img.frames, TASK, 4, 1.0, gen, history=History.after(out),
                                      imagine_temperature=0.5)  # fmt: skip
        steps.append(img)
    q = policy.state_values(img.frames, TASK, History.after(out))
    for step in reversed(steps):
        q = step.reward + g * step.continue_prob * q
    torch.testing.assert_close(review.q, q.view(B, n), atol=1e-4, rtol=1e-4)
    assert torch.equal(review.chosen, review.q.argmax(1))
    shallow = review_by_value(policy, x, TASK, n, 4, 1.0, torch.Generator().manual_seed(3),
                              gamma=g, imagine_temperature=0.5)  # fmt: skip
    assert torch.equal(shallow.candidates, review.candidates)  # the same first draws
    assert float((shallow.q - review.q).abs().max()) > 1e-3  # but judged further on


def test_one_candidate_is_the_policy_itself_and_bad_settings_are_refused(tiny_policy):
    x = frames(2, seed=4)
    review = review_by_value(tiny_policy, x, TASK, 1, 4, 1.0, torch.Generator().manual_seed(2))
    out, _ = tiny_policy.act_imagine(x, TASK, 4, 1.0, torch.Generator().manual_seed(2))
    assert torch.equal(review.actions, out.actions) and bool((review.chosen == 0).all())
    with pytest.raises(ValueError, match="candidates must be >= 1"):
        review_by_value(tiny_policy, x, TASK, 0)
    with pytest.raises(ValueError, match="gamma must be in"):
        review_by_value(tiny_policy, x, TASK, 2, gamma=1.5)
    with pytest.raises(ValueError, match="depth must be >= 1"):
        review_by_value(tiny_policy, x, TASK, 2, depth=0)


def test_eval_with_review_by_value_plays_and_reports(tiny_policy):
    from supervised.evaluate import EvalSettings, evaluate_policy

    settings = EvalSettings(episodes=2, num_envs=2, lookahead=2, review="value",
                            max_reasoning_tokens=0, task=TASK, max_steps=3)  # fmt: skip
    result = evaluate_policy(tiny_policy, "rig/Crafter-v0", 64, {}, settings)
    assert result.steps == 6 and result.psnr["frames"] == 6  # the chosen dreams, every step
    assert result.settings["review"] == "value"
    with pytest.raises(ValueError, match="review must be one of"):
        evaluate_policy(tiny_policy, "rig/Crafter-v0", 64, {}, EvalSettings(review="vote"))
