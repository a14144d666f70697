"""Imagined rollouts (actors/imagination.py): the policy rolling forward in its own world model,
in-process and on a Ray actor. Component tier: tiny preset, 64 px frames, 2 reasoning tokens."""

from __future__ import annotations

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("ray")

from actors.imagination import ImaginationWorkers, ImaginedBatch, Imaginer  # noqa: E402
from envs.crafter_env import crafter_codec  # noqa: E402
from rl.policy import RigPolicy  # noqa: E402
from rl.returns import lambda_returns  # noqa: E402

ACT = {"max_reasoning_tokens": 2, "temperature": 1.0}
S, H = 3, 2
TASKS = ["collect wood", "place a table", "collect wood"]
FACTORY = functools.partial(RigPolicy.from_preset, "tiny", crafter_codec(), seed=0)


def start_frames(n: int = S, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two threads on two shared cores oversubscribe badly (20x slower here); Ray actors get
    OMP_NUM_THREADS=num_cpus=1 anyway, so in-process and actor numbers match too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def policy():
    """A tiny policy whose world heads predict something (they start constant: reward 0)."""
    policy = FACTORY().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in (policy.world.reward[-1], policy.world.cont[-1]):
            layer.weight.normal_(0.0, 0.5, generator=gen)
    return policy


def imaginer(policy, seed=0, act=ACT) -> Imaginer:
    return Imaginer(lambda: policy, act, seed=seed)


@pytest.fixture(scope="module")
def batch(policy) -> ImaginedBatch:
    return imaginer(policy).rollout(start_frames(), TASKS, H)


def assert_same(a: ImaginedBatch, b: ImaginedBatch) -> None:
    assert torch.equal(a.act.tokens, b.act.tokens) and torch.equal(a.act.frames, b.act.frames)
    assert torch.equal(a.imagined_frames, b.imagined_frames)
    for name in ("rewards", "continues", "bootstrap"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.act.log_probs, b.act.log_probs, atol=1e-5, rtol=1e-5)


# -- the batch ---------------------------------------------------------------------------------


def test_fields_shapes_and_dtypes(batch):
    assert len(batch) == S * H and batch.starts == S and batch.horizon == H and batch.version == 0
    assert batch.act.frames.shape == (S * H, 64, 64, 3) and batch.act.frames.dtype == torch.uint8
    assert batch.act.actions.shape == (S * H,) and len(batch.act.action_texts) == S * H
    assert batch.act.values.shape == (S * H,)
    for name in ("rewards", "continues"):
        assert getattr(batch, name).shape == (S * H,), name
        assert getattr(batch, name).dtype == torch.float32, name
    assert batch.bootstrap.shape == (S,) and batch.bootstrap.dtype == torch.float32
    assert batch.imagined_frames.shape == (S, H, 64, 64, 3)
    assert batch.imagined_frames.dtype == torch.uint8
    assert all(t.device.type == "cpu" for t in (batch.act.tokens, batch.rewards, batch.bootstrap))


def test_frames_chain_start_by_start(batch):
    frames = batch.act.frames.view(S, H, 64, 64, 3)  # row n = s * H + h
    np.testing.assert_array_equal(frames[:, 0].numpy(), start_frames())  # h = 0: the real start
    # act at step h + 1 sees exactly the frame imagined at step h
    assert torch.equal(frames[:, 1:], batch.imagined_frames[:, :-1])
    assert not torch.equal(frames[:, 1], frames[:, 0])  # imagined, not copied
    # and each row's prompt shows that frame
    assert torch.equal(batch.act.images(), batch.act.frames)


def test_rewards_and_continues_are_predictions(batch):
    assert torch.isfinite(batch.rewards).all() and torch.isfinite(batch.bootstrap).all()
    assert ((batch.continues > 0) & (batch.continues < 1)).all()
    assert batch.rewards.unique().numel() > 1  # the heads were randomised: rows differ


def test_rows_match_a_step_by_step_reference(policy, batch):
    """The obvious loop over steps with the same generator, reordered by hand."""
    gen = torch.Generator().manual_seed(0)
    frames = torch.as_tensor(start_frames())
    for h in range(H):
        out = policy.act(frames, TASKS, generator=gen, **ACT)
        img = policy.imagine(out, temperature=1.0, generator=gen)
        for s in range(S):
            n = s * H + h
            assert batch.act.action_texts[n] == out.action_texts[s]
            assert torch.equal(batch.act.frames[n], out.frames[s])
            torch.testing.assert_close(batch.rewards[n], img.reward[s])
            torch.testing.assert_close(batch.continues[n], img.continue_prob[s])
            torch.testing.assert_close(batch.act.values[n], out.values[s])
        frames = img.frames
    last = policy.act(frames, TASKS, generator=gen, **ACT)
    assert torch.equal(batch.imagined_frames[:, -1], frames)
    torch.testing.assert_close(batch.bootstrap, last.values)


def test_bootstrap_is_the_value_of_the_last_imagined_frame(policy):
    """With no reasoning the value is a function of the frame: V(s_H) recomputed directly."""
    b = imaginer(policy, seed=5, act={"max_reasoning_tokens": 0}).rollout(start_frames(2), "x", 2)
    again = policy.act(b.imagined_frames[:, -1], "x", max_reasoning_tokens=0)
    torch.testing.assert_close(b.bootstrap, again.values, atol=1e-5, rtol=1e-5)


def test_actions_valid_and_evaluate_reproduces_act(policy, batch):
    vocab = policy.codec.vocab
    assert ((batch.act.actions >= 0) & (batch.act.actions < len(vocab))).all()
    assert batch.act.action_texts == [vocab[int(a)] for a in batch.act.actions]
    with torch.no_grad():
        ev = policy.evaluate(batch.act)
    mask = batch.act.token_mask
    assert mask.any()
    torch.testing.assert_close(ev["log_probs"][mask], batch.act.log_probs[mask], atol=1e-4, rtol=0)
    torch.testing.assert_close(ev["values"], batch.act.values, atol=1e-4, rtol=0)


def test_lambda_returns_on_imagined_batch(batch):
    gamma, lam = 0.9, 0.95
    rewards, values, cont = (x.view(S, H).T for x in (batch.rewards, batch.act.values,
                                                      batch.continues))  # fmt: skip
    returns = lambda_returns(rewards, values, cont, batch.bootstrap, gamma, lam)
    assert returns.shape == (H, S) and torch.isfinite(returns).all()
    # the last row bootstraps from V(s_H) through the continue of s_{H-1} -> s_H
    torch.testing.assert_close(returns[-1], rewards[-1] + gamma * cont[-1] * batch.bootstrap)


# -- reproducibility and weights ---------------------------------------------------------------


def test_same_seed_same_rollouts_and_calls_advance(policy, batch):
    again = imaginer(policy, seed=0)
    assert_same(again.rollout(start_frames(), TASKS, H), batch)
    second = again.rollout(start_frames(), TASKS, H)  # the generator moved on
    assert not torch.equal(second.imagined_frames, batch.imagined_frames)
    other = imaginer(policy, seed=1).rollout(start_frames(), TASKS, H)
    assert not torch.equal(other.imagined_frames, batch.imagined_frames)


def test_set_weights_changes_outputs_and_version(policy, batch):
    original = {k: v.clone() for k, v in policy.state_dict().items()}
    gen = torch.Generator().manual_seed(2)
    noisy = {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
             for k, v in original.items()}  # fmt: skip
    im = imaginer(policy, seed=0)
    try:
        im.set_weights(noisy, 7)
        changed = im.rollout(start_frames(), TASKS, H)
    finally:
        policy.load_state_dict(original)
    assert im.version == 7 and changed.version == 7
    assert not torch.allclose(changed.act.values, batch.act.values)
    assert not torch.equal(changed.imagined_frames, batch.imagined_frames)


def test_concat_keeps_starts_in_order(policy, batch):
    a = imaginer(policy, seed=0).rollout(start_frames(1), "x", H)
    both = ImaginedBatch.concat([a, batch], policy.ids.pad)
    assert both.starts == S + 1 and len(both) == (S + 1) * H
    assert torch.equal(both.act.frames[H:], batch.act.frames)
    assert torch.equal(both.imagined_frames[1:], batch.imagined_frames)
    assert torch.equal(both.rewards[:H], a.rewards) and torch.equal(
        both.bootstrap[1:], batch.bootstrap
    )
    with pytest.raises(ValueError, match="horizon"):
        ImaginedBatch.concat([a, imaginer(policy).rollout(start_frames(1), "x", 1)], 0)


def test_bad_inputs_fail_in_one_line(policy):
    im = imaginer(policy)
    with pytest.raises(ValueError, match="horizon must be >= 1"):
        im.rollout(start_frames(), "x", 0)
    with pytest.raises(ValueError, match=r"frames must be \(S >= 1, 64, 64, 3\) uint8"):
        im.rollout(start_frames()[:, :32], "x", 1)
    with pytest.raises(ValueError, match="uint8"):
        im.rollout(start_frames().astype(np.float32), "x", 1)
    with pytest.raises(ValueError, match="unknown keys"):
        Imaginer(lambda: policy, {"max_reasoning_token": 2})


# -- worker groups -----------------------------------------------------------------------------


def test_workers_without_ray_run_in_process(policy, batch):
    workers = ImaginationWorkers(0, lambda: policy, ACT, seed=0)
    assert workers.actors == [] and workers.local is not None
    assert_same(workers.rollout(start_frames(), TASKS, H), batch)
    original = {k: v.clone() for k, v in policy.state_dict().items()}
    workers.sync_weights(original, 3)
    assert workers.version == 3 and workers.rollout(start_frames(1), "x", 1).version == 3
    workers.stop()


def test_workers_sample_frames_at_their_own_temperature(policy):
    """imagination.temperature: the frames' sampler temperature, apart from act's."""
    cold = ImaginationWorkers(0, lambda: policy, ACT, seed=0, imagine_temperature=0.25)
    assert cold.local.imagine_temperature == 0.25
    reference = imaginer(policy)
    reference.imagine_temperature = 0.25
    assert_same(cold.rollout(start_frames(), TASKS, H), reference.rollout(start_frames(), TASKS, H))
    assert ImaginationWorkers(0, lambda: policy, ACT, seed=0).local.imagine_temperature == (
        ACT.get("temperature", 1.0))


@pytest.fixture(scope="module")
def ray_session():
    import ray

    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as e:  # a sandbox without shared memory, ports, ...
        pytest.skip(f"Ray cannot start here: {type(e).__name__}: {e}")
    yield ray
    ray.shutdown()


def test_one_ray_actor_matches_in_process(ray_session, policy, batch):
    """The actor builds its own policy from the factory; synced to the test's weights and with
    the same seed it imagines the same rollouts."""
    workers = ImaginationWorkers(1, FACTORY, ACT, seed=0)
    try:
        workers.sync_weights(policy.state_dict(), 1)
        remote = workers.rollout(start_frames(), TASKS, H)
    finally:
        workers.stop()
    assert remote.version == 1 and remote.starts == S and remote.horizon == H
    assert remote.act.frames.shape == batch.act.frames.shape
    assert_same(remote, batch)
