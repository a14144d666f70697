"""The learner's batch (rl/experience.py) and one PPO update (learner/ppo.py).

Maths tier: chunked GAE against a per-chunk Python loop. Component tier: a PPO update of the tiny
policy on real + imagined rows through the plain-torch engine."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rl.experience import Experience, imagined_experience, real_experience  # noqa: E402


class _Act:
    """Only what real_experience reads from an ActOutput: values."""

    def __init__(self, values):
        self.values = torch.tensor(values, dtype=torch.float32)



def _engine(policy, lr: float, **settings):
    """A plain-torch learner of the tests' usual settings (fp32, ZeRO 0, no warmup) on CPU."""
    from learner.engine import LearnerConfig, PlainTorchEngine

    return PlainTorchEngine(policy, LearnerConfig(
        zero_stage=0, precision="fp32", lr=lr, weight_decay=0.0, betas=(0.9, 0.95),
        grad_accum_steps=1, grad_clip=1.0, warmup_steps=0, device="cpu", **settings,
    ))  # fmt: skip

def slow_gae(rewards, values, next_value, terminated, gamma, lam):
    """One chunk, Python loop: the chunk's last step bootstraps from next_value unless
    terminated there."""
    T = len(rewards)
    adv = [0.0] * T
    running = 0.0
    for t in reversed(range(T)):
        if t == T - 1:
            nv = 0.0 if terminated else next_value
            running = rewards[t] + gamma * nv - values[t]
        else:
            running = rewards[t] + gamma * values[t + 1] - values[t] + gamma * lam * running
        adv[t] = running
    return adv


def test_real_experience_matches_a_per_chunk_loop():
    rng = np.random.default_rng(0)
    lengths = [5, 2, 7, 1]
    n = sum(lengths)
    chunks = np.repeat(np.arange(4), lengths)
    rewards = rng.normal(size=n).astype(np.float32)
    values = rng.normal(size=n).astype(np.float32)
    terminated = np.zeros(n, bool)
    truncated = np.zeros(n, bool)
    ends = np.cumsum(lengths) - 1
    terminated[ends[0]] = True  # chunk 0 died, chunk 1 hit the time limit, 2 and 3 were cut
    truncated[ends[1]] = True
    bootstrap = torch.tensor([99.0, 0.5, -0.3, 2.0])  # chunk 0's is ignored (terminated)
    exp = real_experience(
        _Act(values), rewards, terminated, truncated, chunks, bootstrap,
        torch.zeros(n, 4, dtype=torch.int64), np.zeros(n, np.int64), gamma=0.9, lam=0.8,
    )  # fmt: skip
    expected = []
    for c, (start, length) in enumerate(zip(np.cumsum([0, *lengths[:-1]]), lengths, strict=True)):
        sl = slice(start, start + length)
        expected += slow_gae(rewards[sl], values[sl], float(bootstrap[c]),
                             bool(terminated[sl][-1]), 0.9, 0.8)  # fmt: skip
    torch.testing.assert_close(exp.advantages, torch.tensor(expected), atol=1e-5, rtol=0)
    torch.testing.assert_close(exp.returns, exp.advantages + torch.tensor(values))
    assert exp.continues.tolist() == [0.0 if t else 1.0 for t in terminated]
    assert not exp.imagined.any() and (exp.weights == 1).all()
    with pytest.raises(ValueError, match="chunk by chunk"):
        real_experience(_Act(values), rewards, terminated, truncated, chunks[::-1].copy(),
                        bootstrap, torch.zeros(n, 4), np.zeros(n), 0.9, 0.8)  # fmt: skip


def test_imagined_experience_uses_lambda_returns():
    from rl.returns import lambda_returns

    S, H = 3, 4
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(S * H, generator=g), torch.randn(S * H, generator=g)
    continues, bootstrap = torch.rand(S * H, generator=g), torch.randn(S, generator=g)
    exp = imagined_experience(_Act(values.tolist()), rewards, continues, bootstrap, H, 7, 0.5,
                              0.95, 0.9, codes_per_frame=16)  # fmt: skip
    ref = lambda_returns(rewards.view(S, H).T, values.view(S, H).T, continues.view(S, H).T,
                         bootstrap, 0.95, 0.9)  # fmt: skip
    torch.testing.assert_close(exp.returns, ref.T.reshape(-1))
    torch.testing.assert_close(exp.advantages, exp.returns - values)
    assert exp.imagined.all() and (exp.versions == 7).all()
    assert exp.next_codes.shape == (S * H, 16)
    # weight x P(the row's state was reached): 1 at the real start, then c_0, c_0 c_1, ...
    for s in range(S):
        reached = 1.0
        for h in range(H):
            assert exp.weights[s * H + h].item() == pytest.approx(0.5 * reached, rel=1e-6)
            reached *= continues[s * H + h].item()
    with pytest.raises(ValueError, match="whole number of horizons"):
        imagined_experience(_Act([0.0] * 5), torch.zeros(5), torch.ones(5), torch.zeros(2), 2,
                            0, 1.0, 0.9, 0.9, 16)  # fmt: skip


def test_ppo_update_on_real_and_imagined_rows(tiny_policy):
    """One update through the plain engine: finite losses of every name, weights change, and
    the reference policy (a frozen copy) does not."""
    import copy

    from learner.ppo import PPOConfig, ppo_update
    from rl.imagine import frame_codes
    from rl.losses import LOSS_NAMES

    policy = copy.deepcopy(tiny_policy)
    reference = copy.deepcopy(tiny_policy).requires_grad_(False)
    policy.model.model.vqmodel.requires_grad_(False)
    frames = np.random.default_rng(1).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    gen = torch.Generator().manual_seed(0)
    act = policy.act(frames, "collect wood", 3, 1.0, gen)
    real = real_experience(
        act, np.array([0.0, 1.0, 0.0, 0.1], np.float32), np.array([0, 0, 0, 1], bool),
        np.zeros(4, bool), np.array([0, 0, 1, 1]), torch.tensor([0.2, 0.0]),
        frame_codes(policy, np.roll(frames, 1, axis=0)), np.zeros(4, np.int64), 0.99, 0.95,
    )  # fmt: skip
    img_act = policy.act(frames[:2], "collect wood", 3, 1.0, gen)
    img = imagined_experience(img_act, torch.tensor([0.0, 0.5]), torch.tensor([0.9, 0.8]),
                              torch.tensor([0.1]), 2, 0, 0.5, 0.99, 0.95,
                              policy.image_tokens)  # fmt: skip
    exp = Experience.concat([real, img], policy.ids.pad)
    assert len(exp) == 6 and exp.imagined.sum() == 2

    cfg = PPOConfig(
        gamma=0.99, lam=0.95, clip_eps=0.2, value_clip=None, epochs=2, minibatch_size=3,
        reasoning_weight=0.5, reduction="sequence", kl_estimator="k3",
        normalize_advantages=True, max_policy_lag=1, sync_check_rows=64,
        loss_scales={n: 1.0 for n in LOSS_NAMES},
    )  # fmt: skip
    engine = _engine(policy, 1e-3)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    metrics = ppo_update(engine, policy, reference, exp, cfg, torch.Generator().manual_seed(0), 0)
    for name in LOSS_NAMES:
        assert np.isfinite(metrics[f"loss/{name}"]), name
    assert metrics["learner/optimizer_steps"] == 4  # 2 epochs x ceil(6 / 3)
    assert "policy/clip_frac_imagined" in metrics and "next_frame/accuracy" in metrics
    after = policy.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())  # no nan from masked entropies
    assert not torch.equal(before["value_head.out.weight"], after["value_head.out.weight"])
    assert not torch.equal(before["world.reward.2.weight"], after["world.reward.2.weight"])
    vq = [k for k in after if ".vqmodel." in k]
    assert vq and all(torch.equal(before[k], after[k]) for k in vq)  # the tokenizer stays fixed
    ref_state = reference.state_dict()
    assert all(torch.equal(ref_state[k], tiny_policy.state_dict()[k]) for k in ref_state)


def _four_real_rows(policy, frames: np.ndarray, generator) -> Experience:
    """Real experience of 4 rows: ``policy`` acting on ``frames``, two chunks of two steps."""
    from rl.imagine import frame_codes

    act = policy.act(frames, "eat", 2, 1.0, generator)
    return real_experience(
        act, np.array([0.0, 1.0, 0.0, 0.5], np.float32), np.zeros(4, bool), np.zeros(4, bool),
        np.array([0, 0, 1, 1]), torch.tensor([0.1, -0.1]),
        frame_codes(policy, np.roll(frames, 1, axis=0)), np.zeros(4, np.int64), 0.99, 0.95,
    )  # fmt: skip


def _four_row_config():
    """Two epochs of one 4-row minibatch, every loss term on."""
    from learner.ppo import PPOConfig
    from rl.losses import LOSS_NAMES

    return PPOConfig(
        gamma=0.99, lam=0.95, clip_eps=0.2, value_clip=None, epochs=2, minibatch_size=4,
        reasoning_weight=0.5, reduction="sequence", kl_estimator="k3",
        normalize_advantages=True, max_policy_lag=1, sync_check_rows=64,
        loss_scales={n: 1.0 for n in LOSS_NAMES},
    )  # fmt: skip


def test_policy_update_is_the_same_under_zero_0_1_2(tiny_policy):
    """Two PPO steps of the tiny policy through DeepSpeed with ZeRO 0, 1 and 2 (CPU, gloo): the
    second step's loss (which depends on the first update) and the weights agree."""
    import copy

    pytest.importorskip("deepspeed")
    from learner.engine import DeepSpeedEngine, LearnerConfig
    from learner.ppo import ppo_update

    frames = np.random.default_rng(2).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    exp = _four_real_rows(tiny_policy, frames, torch.Generator().manual_seed(2))
    cfg = _four_row_config()
    results = []
    for stage in (0, 1, 2):
        policy = copy.deepcopy(tiny_policy)
        policy.model.model.vqmodel.requires_grad_(False)
        engine = DeepSpeedEngine(policy, LearnerConfig(
            zero_stage=stage, precision="fp32", lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95),
            grad_accum_steps=1, grad_clip=1.0, warmup_steps=0, device="cpu",
        ))  # fmt: skip
        metrics = ppo_update(engine, policy, None, exp, cfg, torch.Generator().manual_seed(0),
                             0)  # fmt: skip
        results.append((metrics["loss/total"], engine.published_state_dict()))
    (loss0, state0), *others = results
    assert all(torch.isfinite(v).all() for v in state0.values())
    for loss, state in others:
        assert loss == pytest.approx(loss0, rel=1e-4, abs=1e-5)
        for key in ("value_head.out.weight", "model.lm_head.weight", "world.cont.2.bias"):
            torch.testing.assert_close(state[key], state0[key], atol=1e-5, rtol=1e-4)
    assert not torch.equal(state0["value_head.out.weight"], tiny_policy.value_head.out.weight)


def test_an_update_on_imagined_rows_alone_leaves_the_world_model_as_it_is(tiny_policy):
    """``imagination.updates``: after an update on real rows (the optimiser now has momentum),
    one on imagined rows alone has no world-model term. DeepSpeed (ZeRO 0) gives the parameters
    the loss did not reach zero gradients, on which AdamW would move them by momentum: the
    world heads and the generation head must stay bit for bit, the value and action heads move."""
    import copy

    pytest.importorskip("deepspeed")
    from learner.engine import DeepSpeedEngine, LearnerConfig
    from learner.ppo import WORLD_MODEL_ONLY, ppo_update

    policy = copy.deepcopy(tiny_policy)
    policy.model.model.vqmodel.requires_grad_(False)
    engine = DeepSpeedEngine(policy, LearnerConfig(
        zero_stage=0, precision="fp32", lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95),
        grad_accum_steps=1, grad_clip=1.0, warmup_steps=0, device="cpu",
    ))  # fmt: skip
    frames = np.random.default_rng(3).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    gen = torch.Generator().manual_seed(3)
    real, cfg = _four_real_rows(policy, frames, gen), _four_row_config()
    ppo_update(engine, policy, None, real, cfg, torch.Generator().manual_seed(0), 0)
    img_act = policy.act(frames, "eat", 2, 1.0, gen)
    imagined = imagined_experience(img_act, torch.tensor([0.0, 0.5, 0.1, 0.2]),
                                   torch.tensor([0.9, 0.8, 0.9, 0.9]), torch.tensor([0.1, 0.2]),
                                   2, 1, 0.5, 0.99, 0.95, policy.image_tokens)  # fmt: skip
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    ppo_update(engine, policy, None, imagined, cfg, torch.Generator().manual_seed(0), 1)
    after = policy.state_dict()
    world = [k for k in after if k.startswith(WORLD_MODEL_ONLY)]
    assert any(k.startswith("world.") for k in world) and any("generation_head" in k for k in world)
    assert all(torch.equal(before[k], after[k]) for k in world)
    assert not torch.equal(before["value_head.out.weight"], after["value_head.out.weight"])
    assert not torch.equal(before["action_head.weight"], after["action_head.weight"])
    assert all(p.requires_grad for k, p in policy.named_parameters() if k.startswith(WORLD_MODEL_ONLY))
    # and an update with real rows trains them again
    rested = policy.world.reward[2].weight.detach().clone()
    ppo_update(engine, policy, None, real, cfg, torch.Generator().manual_seed(0), 2)
    assert not torch.equal(rested, policy.world.reward[2].weight)


class _SliceableAct(_Act):
    def __getitem__(self, rows):
        return _SliceableAct(self.values[rows].tolist())


def _rows(n: int) -> Experience:
    act = _SliceableAct([0.0] * n)
    return Experience(act=act, advantages=torch.arange(n, dtype=torch.float32),
                      returns=torch.zeros(n), weights=torch.ones(n),
                      imagined=torch.zeros(n, dtype=torch.bool),
                      next_codes=torch.zeros(n, 1, dtype=torch.int64), rewards=torch.zeros(n),
                      continues=torch.ones(n), versions=torch.zeros(n, dtype=torch.int64))


@pytest.mark.parametrize(("n", "size", "multiple_of", "sizes"), [
    (72, 32, 1, [36, 36]),  # not 32 + 32 + 8: no straggler gets an optimiser step of its own
    (64, 32, 1, [32, 32]),
    (10, 4, 2, [5, 5]),  # round(2.5) = 2 minibatches, already a whole accumulation cycle
    (12, 4, 2, [3, 3, 3, 3]),  # 3 rounded up to 4: every epoch ends on a boundary
    (3, 1, 4, [1, 1, 1, 1]),  # fewer rows than micro-steps: rows repeat
    (5, 100, 1, [5]),
])  # fmt: skip
def test_minibatches_are_near_equal_whole_accumulation_cycles(n, size, multiple_of, sizes):
    parts = list(_rows(n).minibatches(size, torch.Generator().manual_seed(0), multiple_of))
    assert [len(p) for p in parts] == sizes
    seen = torch.cat([p.advantages for p in parts]).long()
    assert set(seen.tolist()) == set(range(n))  # every row is used each pass


def test_value_head_fits_known_returns_through_ppo_update(tiny_policy):
    """The alignment check: through the real ppo_update path (act -> real_experience -> update),
    on 8 fixed frames whose episodes end at once with known rewards, the value fits its own
    row's return (explained variance near 1) within a few hundred optimiser steps. Targets
    that do not belong to their inputs (an off-by-one in rows or chunks) keep it near 0."""
    import copy

    from learner.ppo import PPOConfig, ppo_update
    from rl.imagine import frame_codes
    from rl.losses import LOSS_NAMES

    policy = copy.deepcopy(tiny_policy)
    policy.model.model.vqmodel.requires_grad_(False)
    n = 8
    frames = np.random.default_rng(5).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
    rewards = np.linspace(-1, 1, n).astype(np.float32)
    np.random.default_rng(6).shuffle(rewards)
    scales = {name: 0.0 for name in LOSS_NAMES}
    scales["value"] = 1.0
    cfg = PPOConfig(
        gamma=0.99, lam=0.95, clip_eps=0.2, value_clip=None, epochs=1, minibatch_size=n,
        reasoning_weight=0.5, reduction="sequence", kl_estimator="k3",
        normalize_advantages=True, max_policy_lag=0, sync_check_rows=0, loss_scales=scales,
    )  # fmt: skip
    engine = _engine(policy, 1e-3)
    gen = torch.Generator().manual_seed(0)
    codes = frame_codes(policy, frames)
    for _ in range(300):
        with torch.no_grad():
            act = policy.act(frames, "collect wood", 0, 1.0, gen)
        exp = real_experience(act, rewards, np.ones(n, bool), np.zeros(n, bool), np.arange(n),
                              torch.zeros(n), codes, np.zeros(n, np.int64), 0.99, 0.95)  # fmt: skip
        torch.testing.assert_close(exp.returns, torch.as_tensor(rewards), atol=1e-4, rtol=0)  # 1 step
        metrics = ppo_update(engine, policy, None, exp, cfg, gen, 0)
        if metrics["value/explained_variance"] > 0.95:
            break
    assert metrics["value/explained_variance"] > 0.95, metrics["value/explained_variance"]
    for key in ("advantage/mean", "advantage/std", "returns/std", "grad_norm/value"):
        assert np.isfinite(metrics[key]), key
    assert "grad_norm/policy" not in metrics  # a term at scale 0 costs no extra backward


# -- ppo.target_kl's early stop (learner/ppo.py _kl_stop) -----------------------------------------


@pytest.mark.parametrize("target_kl", [None, 1e-4, 1e3])
def test_target_kl_stops_the_update_before_the_step_that_would_pass_it(tiny_policy, target_kl):
    """Minibatch 1 starts at the behaviour policy (approx KL ~0) and always steps; with a
    tiny target the next minibatch is over 1.5x it and nothing more moves: one step, and the
    weights are those of a one-epoch update stopped alike. No target, or a huge one: every step."""
    import copy

    from learner.ppo import ppo_update
    from rl.heads import frozen_statistics

    def update(cfg):
        policy = copy.deepcopy(tiny_policy)
        policy.model.model.vqmodel.requires_grad_(False)
        engine = _engine(policy, 1e-2)
        exp = _acted(tiny_policy, [0] * 8)
        with frozen_statistics(policy):  # the fixture's are unfit: the first forward resets them
            metrics = ppo_update(engine, policy, None, exp, cfg, torch.Generator().manual_seed(0),
                                 0)  # fmt: skip
        return metrics, policy

    cfg = _ppo(0).model_copy(update=dict(epochs=3, target_kl=target_kl))  # 3 epochs x 2 minibatches
    metrics, policy = update(cfg)
    stops = target_kl == 1e-4
    assert metrics["learner/optimizer_steps"] == (1 if stops else 6)
    assert metrics["learner/kl_stopped"] == float(stops)
    if stops:  # nothing moved after the stop: the same weights as a one-epoch update stopped alike
        _, one = update(cfg.model_copy(update=dict(epochs=1)))
        ref = dict(one.named_parameters())
        for name, p in policy.named_parameters():
            torch.testing.assert_close(p, ref[name], msg=name)


def test_target_kl_ranks_stop_together_on_their_mean():
    """With several ranks the decision is on the ranks' mean approx KL, so one rank over the
    line and one under it still agree (a rank that broke alone would hang the next all-reduce)."""
    from learner.ppo import _kl_stop

    class TwoRanks:  # the other rank's approx KL is `other`
        world_size = 2

        def __init__(self, other):
            self.other = other

        def all_sum(self, t):
            return t + self.other

    cfg = _ppo(0).model_copy(update=dict(target_kl=0.01))  # stops above 0.015
    mine = {"policy/approx_kl": torch.tensor(0.02)}
    assert _kl_stop(mine, cfg, None)
    assert not _kl_stop(mine, cfg, TwoRanks(0.0))  # mean 0.01
    assert _kl_stop(mine, cfg, TwoRanks(0.012))  # mean 0.016
    assert not _kl_stop({}, cfg, None)  # no real rows here: nothing to measure, no stop
    assert not _kl_stop(mine, cfg.model_copy(update=dict(target_kl=None)), None)


# -- ppo.freeze_actor_iterations (learner/ppo.py frozen_actor) -------------------------------------


@pytest.mark.parametrize("frozen", [False, True])
def test_a_frozen_actor_update_fits_the_critic_and_leaves_the_action_head(tiny_policy, frozen):
    """OpenRLHF's freezing_actor_steps: inside ``ppo.freeze_actor_iterations`` the policy,
    entropy and KL terms are off, so the action head gets no gradient (bit for bit unchanged)
    while the value head learns, and ``target_kl`` stops nothing (no KL to measure). Outside,
    the same update moves the action head."""
    import copy

    from learner.ppo import ppo_update
    from rl.heads import frozen_statistics
    from rl.imagine import frame_codes

    policy = copy.deepcopy(tiny_policy)
    policy.model.model.vqmodel.requires_grad_(False)
    engine = _engine(policy, 1e-2)
    n = 8
    frames = np.random.default_rng(4).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        act = policy.act(frames, "collect wood", 0, 1.0, torch.Generator().manual_seed(4))
    rewards = np.linspace(-1, 1, n).astype(np.float32)
    exp = real_experience(act, rewards, np.ones(n, bool), np.zeros(n, bool), np.arange(n),
                          torch.zeros(n), frame_codes(policy, frames), np.zeros(n, np.int64),
                          0.99, 0.95)  # fmt: skip
    before = {k: v.detach().clone() for k, v in policy.named_parameters()}
    cfg = _ppo(0).model_copy(update=dict(epochs=3, target_kl=1e-4))  # would stop after 1 step
    with frozen_statistics(policy):
        metrics = ppo_update(engine, policy, None, exp, cfg, torch.Generator().manual_seed(0), 0,
                             actor_frozen=frozen)  # fmt: skip
    moved = {k for k, v in policy.named_parameters() if not torch.equal(v, before[k])}
    action = {k for k in before if k.startswith("action_head.")}
    assert action and any(k.startswith("value_head.") for k in moved)
    if frozen:
        assert not moved & action, sorted(moved & action)
        assert metrics["learner/optimizer_steps"] == 6 and metrics["learner/kl_stopped"] == 0.0
    else:
        assert action <= moved


# -- the sync-health alarm (learner/ppo.py sync_health) --------------------------------------------


def _acted(policy, versions, seed=3) -> Experience:
    """Real rows the policy itself acted (3 reasoning tokens each), one chunk per row, acting
    with the weights versions ``versions``."""
    from rl.imagine import frame_codes

    n = len(versions)
    frames = np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        act = policy.act(frames, "collect wood", 3, 1.0, torch.Generator().manual_seed(seed))
    return real_experience(
        act, np.zeros(n, np.float32), np.ones(n, bool), np.zeros(n, bool), np.arange(n),
        torch.zeros(n), frame_codes(policy, frames), np.asarray(versions, np.int64), 0.99, 0.95,
    )  # fmt: skip


def _ppo(rows: int):
    from learner.ppo import PPOConfig
    from rl.losses import LOSS_NAMES

    return PPOConfig(
        gamma=0.99, lam=0.95, clip_eps=0.2, value_clip=None, epochs=1, minibatch_size=4,
        reasoning_weight=0.5, reduction="sequence", kl_estimator="k3",
        normalize_advantages=True, max_policy_lag=0, sync_check_rows=rows,
        loss_scales={n: 1.0 for n in LOSS_NAMES},
    )  # fmt: skip


def test_sync_health_is_near_zero_on_the_weights_that_acted(tiny_policy):
    """Rows acted by the learner's own weights: |act - evaluate| is float noise; only rows of the
    learner's version count (version 2's differ by design), at most ``rows`` of them."""
    from learner.ppo import sync_health

    exp = _acted(tiny_policy, [3, 3, 2, 3, 3, 2])
    m = sync_health(tiny_policy, exp, 3, 64, 3)
    assert m["sync/logp_rows_checked"] == 4
    assert m["sync/logp_abs_diff_mean"] < 1e-4 and m["sync/logp_abs_diff_max"] < 1e-3, m
    assert sync_health(tiny_policy, exp, 3, 2, 3)["sync/logp_rows_checked"] == 2
    assert sync_health(tiny_policy, exp, 7, 64, 3) == {"sync/logp_rows_checked": 0.0}


def test_sync_health_shows_actors_on_other_weights(tiny_policy):
    """The alarm fires: log-probs recorded 0.5 off on every sampled token read 0.5, and a learner
    whose weights moved since the actors acted reads far above float noise."""
    import copy

    from learner.ppo import sync_health

    exp = _acted(tiny_policy, [1] * 4)
    shifted = copy.copy(exp)
    shifted.act = copy.copy(exp.act)
    shifted.act.log_probs = exp.act.log_probs - 0.5 * exp.act.token_mask
    m = sync_health(tiny_policy, shifted, 1, 64, 4)
    assert m["sync/logp_abs_diff_mean"] == pytest.approx(0.5, abs=1e-4)
    assert m["sync/logp_abs_diff_max"] == pytest.approx(0.5, abs=1e-3)

    moved = copy.deepcopy(tiny_policy)
    with torch.no_grad():
        moved.model.lm_head.weight.add_(0.05 * torch.randn_like(moved.model.lm_head.weight))
    m = sync_health(moved, exp, 1, 64, 4)
    assert m["sync/logp_abs_diff_mean"] > 1e-2 and m["sync/logp_abs_diff_max"] > 0.1, m


def test_sync_check_changes_no_bit_of_the_update(tiny_policy):
    """ppo_update with the check on (every row) and off (0: no sync/* metric at all) from the
    same weights and generator state: the same weights, losses and generator state after."""
    import copy

    from learner.ppo import ppo_update

    exp = _acted(tiny_policy, [5] * 6)
    runs = []
    for rows in (64, 0):
        policy = copy.deepcopy(tiny_policy)
        policy.model.model.vqmodel.requires_grad_(False)
        engine = _engine(policy, 1e-3)
        gen = torch.Generator().manual_seed(0)
        metrics = ppo_update(engine, policy, None, copy.copy(exp), _ppo(rows), gen, 5)
        runs.append((metrics, policy.state_dict(), gen.get_state()))
    (on, state_on, gen_on), (off, state_off, gen_off) = runs
    assert on["sync/logp_rows_checked"] == 6 and on["sync/logp_abs_diff_mean"] < 1e-4
    assert not any(k.startswith("sync/") for k in off)
    assert {k: v for k, v in on.items() if not k.startswith("sync/")} == off
    assert all(torch.equal(state_on[k], state_off[k]) for k in state_on)
    assert torch.equal(gen_on, gen_off)


GENERATION_HEAD_TRAINS = [
    "model.model.vision_model", "model.model.aligner", "model.model.language_model",
    "model.model.generation_embeddings", "model.model.generation_aligner",
]  # fmt: skip


@pytest.mark.parametrize("freeze", [["model"], GENERATION_HEAD_TRAINS], ids=["all", "gen-head"])
def test_a_frozen_trunk_is_run_once_per_update_with_the_same_result(
    tiny_policy, monkeypatch, freeze
):
    """learner.freeze [model], or all of it but the generation head (which reads the trunk's
    states and feeds nothing back into them): ppo_update computes the trunk's states once
    (Experience.trunk) and every epoch's minibatches read them; the weights, losses and
    generator state after are those of recomputing the trunk in every minibatch (float rounding
    apart), with fewer trunk forwards (2 chunks of 4 rows, against 2 epochs x 2 minibatches +
    the gradient-norm rows)."""
    import copy

    from policies import state_readouts

    from learner.ppo import ppo_update
    from rl.policy import RigPolicy

    exp = _acted(state_readouts(copy.deepcopy(tiny_policy)), [5] * 6)
    exp.advantages = torch.linspace(-1.0, 1.0, 6)  # something for the policy term to follow
    forwards = []
    real_forward = RigPolicy.forward_sequence
    monkeypatch.setattr(RigPolicy, "forward_sequence",
                        lambda self, *a, **k: forwards.append(1) or real_forward(self, *a, **k))
    runs = []
    for cached in (True, False):
        policy = state_readouts(copy.deepcopy(tiny_policy))
        policy.model.model.vqmodel.requires_grad_(False)
        engine = _engine(policy, 1e-3, freeze=freeze)
        assert policy.trunk_frozen
        gen = torch.Generator().manual_seed(0)
        forwards.clear()
        cfg = _ppo(0).model_copy(update={"epochs": 2})
        metrics = ppo_update(engine, policy, None, copy.copy(exp), cfg, gen, 5,
                             trunk_once=None if cached else False)
        runs.append((metrics, policy.state_dict(), gen.get_state(), len(forwards)))
    (on, state_on, gen_on, n_on), (off, state_off, gen_off, n_off) = runs
    assert (n_on, n_off) == (2, 5)
    assert on.keys() == off.keys()
    for k in on:
        assert on[k] == pytest.approx(off[k], rel=1e-4, abs=1e-6), k
    start = state_readouts(copy.deepcopy(tiny_policy)).state_dict()
    moved = [k for k in state_on if not torch.equal(state_on[k], start[k])]
    heads = ("value_head.", "action_head.", "world.")
    readers = ("model.model.generation_head.", "model.lm_head.")  # the fixture's head is untied
    assert moved and all(k.startswith(heads + readers) for k in moved)
    assert any(k.startswith("model.model.generation_head.") for k in moved) == (freeze != ["model"])
    for k in state_on:
        torch.testing.assert_close(state_on[k], state_off[k], atol=1e-6, rtol=1e-5)
    assert torch.equal(gen_on, gen_off)


def test_without_world_terms_an_update_skips_the_codes_and_moves_the_same_heads(tiny_policy):
    """Every world-model term weighted 0 and no imagination (rl.losses.world_model_trains): the
    driver passes no next-frame codes (``next_codes`` None), the trunk runs without the
    ``<Imagine:>`` + codes columns, no world head moves and no world metric is reported, and
    the policy and value heads end where an update given the codes (weighted 0) puts them."""
    import copy

    from policies import state_readouts

    from learner.ppo import ppo_update
    from rl.losses import LOSS_NAMES, WORLD_LOSSES, world_model_trains

    scales = {n: 0.0 if n in WORLD_LOSSES else 1.0 for n in LOSS_NAMES}
    assert not world_model_trains(scales, imagining=False)
    assert world_model_trains(scales, imagining=True)
    assert world_model_trains({**scales, "continue": 0.1}, imagining=False)
    exp = _acted(state_readouts(copy.deepcopy(tiny_policy)), [5] * 6)
    exp.advantages = torch.linspace(-1.0, 1.0, 6)
    runs = []
    for codes in (exp.next_codes, None):
        policy = state_readouts(copy.deepcopy(tiny_policy))
        engine = _engine(policy, 1e-3, freeze=["model"])
        cfg = _ppo(0).model_copy(update={"epochs": 2, "loss_scales": scales})
        rows = dataclasses.replace(exp, next_codes=codes)
        metrics = ppo_update(engine, policy, None, rows, cfg, torch.Generator().manual_seed(0), 5)
        runs.append((metrics, policy.state_dict()))
    (with_codes, state_with), (without, state_without) = runs
    assert "next_frame/accuracy" in with_codes and "next_frame/accuracy" not in without
    assert without["loss/next_frame"] == without["loss/reward"] == 0.0
    start = state_readouts(copy.deepcopy(tiny_policy)).state_dict()
    moved = [k for k in state_without if not torch.equal(state_without[k], start[k])]
    assert moved and all(k.startswith(("value_head.", "action_head.")) for k in moved)
    for k in moved:  # the same heads' update, float rounding apart (a shorter trunk forward)
        torch.testing.assert_close(state_without[k], state_with[k], atol=1e-6, rtol=1e-5)
    assert without["loss/policy"] == pytest.approx(with_codes["loss/policy"], rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="with and without next_codes"):
        Experience.concat([exp, dataclasses.replace(exp, next_codes=None)], 0)


def test_an_update_inside_the_trunk_delay_runs_the_trunk_once(tiny_policy, monkeypatch):
    """learner.warmup_delay_steps (LP-FT's first phase, the trunk trainable but at lr 0): an
    update whose every optimizer step lies inside the delay computes the trunk's states once, as
    a frozen trunk does, and moves no trunk weight; one that reaches past it recomputes them per
    minibatch, and the update after the delay moves the trunk."""
    import copy

    from policies import state_readouts

    from learner.ppo import ppo_update
    from rl.policy import RigPolicy

    exp = _acted(state_readouts(copy.deepcopy(tiny_policy)), [5] * 6)
    exp.advantages = torch.linspace(-1.0, 1.0, 6)
    forwards = []
    real_forward = RigPolicy.forward_sequence
    monkeypatch.setattr(RigPolicy, "forward_sequence",
                        lambda self, *a, **k: forwards.append(1) or real_forward(self, *a, **k))
    cfg = _ppo(0).model_copy(update={"epochs": 2})  # 2 epochs x 2 minibatches: 4 steps
    start = state_readouts(copy.deepcopy(tiny_policy)).state_dict()

    def trunk_moved(policy):
        return [k for k, v in policy.state_dict().items()
                if k.startswith("model.") and not torch.equal(v, start[k])]  # fmt: skip

    for delay, cached in ((4, True), (3, False)):
        policy = state_readouts(copy.deepcopy(tiny_policy))
        policy.model.model.vqmodel.requires_grad_(False)
        engine = _engine(policy, 1e-3, warmup_delay_steps=delay,
                         warmup_skip=["value_head", "action_head", "world"])  # fmt: skip
        assert not policy.trunk_frozen
        forwards.clear()
        ppo_update(engine, policy, None, copy.copy(exp), cfg, torch.Generator().manual_seed(0), 5)
        assert len(forwards) == (2 if cached else 5), delay
        assert (trunk_moved(policy) == []) if cached else trunk_moved(policy)
        if cached:  # the delay is over: the next update trains the trunk
            forwards.clear()
            ppo_update(engine, policy, None, copy.copy(exp), cfg, torch.Generator().manual_seed(1),
                       5)  # fmt: skip
            assert len(forwards) == 5 and trunk_moved(policy)


@pytest.mark.parametrize("frozen", [False, True])
def test_decoupled_update_on_the_learners_own_rows_is_plain_ppo(tiny_policy, frozen):
    """ppo.decoupled on rows the learner's current weights acted: the proximal log-probs are the
    recorded ones (float noise; from the frozen trunk's states too), the importance weight 1,
    and the update that of plain PPO (float rounding apart)."""
    import copy

    from policies import state_readouts

    from learner.ppo import ppo_update, proximal_log_probs

    exp = _acted(state_readouts(copy.deepcopy(tiny_policy)), [5] * 6)
    exp.advantages = torch.linspace(-1.0, 1.0, 6)
    runs = []
    for decoupled in (False, True):
        policy = state_readouts(copy.deepcopy(tiny_policy))
        engine = _engine(policy, 1e-3, freeze=["model"] if frozen else [])
        if decoupled:
            trunk = policy.trunk_states(exp.act, exp.next_codes) if frozen else None
            prox = proximal_log_probs(policy, dataclasses.replace(exp, trunk=trunk), 4)
            mask = exp.act.token_mask
            torch.testing.assert_close(prox[mask], exp.act.log_probs[mask], atol=1e-4, rtol=0)
        cfg = _ppo(0).model_copy(update={"decoupled": decoupled})
        metrics = ppo_update(engine, policy, None, copy.copy(exp), cfg,
                             torch.Generator().manual_seed(0), 5)  # fmt: skip
        runs.append((metrics, policy.state_dict()))
    (plain, state_plain), (dec, state_dec) = runs
    assert "policy/behaviour_weight_mean" not in plain
    assert dec["policy/behaviour_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    for k in state_plain:
        torch.testing.assert_close(state_dec[k], state_plain[k], atol=1e-5, rtol=1e-4)


def test_imagined_rows_weigh_each_by_its_own_weight(tiny_policy):
    """The imagined policy and value terms are the mean over rows of weight x the row's own term
    (a slow reference: each row alone at weight 1), so a rollout's rows past a predicted end
    count for what they may be worth and a row of weight 0 for nothing."""
    from learner.ppo import minibatch_terms

    frames = np.random.default_rng(2).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    act = tiny_policy.act(frames, "collect wood", 3, 1.0, torch.Generator().manual_seed(0))
    weights = torch.tensor([0.5, 0.2, 0.0])
    exp = Experience(
        act=act, advantages=torch.tensor([1.0, -2.0, 3.0]), returns=torch.tensor([0.5, 1.0, -1.0]),
        weights=weights, imagined=torch.ones(3, dtype=torch.bool), next_codes=None,
        rewards=torch.zeros(3), continues=torch.ones(3), versions=torch.zeros(3, dtype=torch.int64),
    )  # fmt: skip
    cfg = _ppo(0)
    with torch.no_grad():
        terms, _ = minibatch_terms(tiny_policy, None, exp, cfg)
        alone = [minibatch_terms(tiny_policy, None, dataclasses.replace(
            exp.rows(torch.tensor([i])), weights=torch.ones(1)), cfg)[0] for i in range(3)]  # fmt: skip
    for name in ("policy", "value"):
        slow = sum(float(weights[i]) * float(alone[i][name]) for i in range(3)) / 3
        assert float(terms[name]) == pytest.approx(slow, rel=1e-5, abs=1e-7), name
        assert float(alone[2][name]) != 0.0  # the weight-0 row has a term of its own to drop


def test_imagined_value_weights_move_only_the_value_term(tiny_policy):
    """``imagination.value_weight``: the imagined rows' value term is the mean of
    value_weight x weight x the row's own term, the policy term keeps ``weight`` alone; 0 drops
    the imagined rows from the value term (the critic learns from real returns only)."""
    from learner.ppo import minibatch_terms

    frames = np.random.default_rng(2).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    act = tiny_policy.act(frames, "collect wood", 3, 1.0, torch.Generator().manual_seed(0))
    continues = torch.tensor([0.9, 0.5, 0.8])
    cfg = _ppo(0)
    out = {}
    for value_weight in (1.0, 0.25, 0.0):
        exp = imagined_experience(act, torch.tensor([0.1, -0.2, 0.3]), continues,
                                  torch.zeros(1), 3, 0, 0.5, 0.9, 0.9, 16, value_weight)  # fmt: skip
        exp.next_codes = None
        assert (exp.value_weights is None) == (value_weight == 1.0)
        torch.testing.assert_close(exp.value_weights_or_weights, value_weight * exp.weights)
        with torch.no_grad():
            out[value_weight] = minibatch_terms(tiny_policy, None, exp, cfg)[0]
    assert float(out[1.0]["value"]) > 0  # something to scale
    for w in (0.25, 0.0):
        assert float(out[w]["policy"]) == pytest.approx(float(out[1.0]["policy"]), rel=1e-6)
        assert float(out[w]["value"]) == pytest.approx(w * float(out[1.0]["value"]), rel=1e-5,
                                                       abs=1e-9)  # fmt: skip
    # a batch of real rows (no value_weights) and imagined ones concatenates to one column
    real = dataclasses.replace(exp, imagined=torch.zeros(3, dtype=torch.bool), value_weights=None,
                               weights=torch.ones(3))  # fmt: skip
    both = Experience.concat([real, exp], tiny_policy.ids.pad)
    torch.testing.assert_close(both.value_weights, torch.cat([torch.ones(3), exp.value_weights]))
    assert Experience.concat([real, real], tiny_policy.ids.pad).value_weights is None


def test_imagined_advantages_are_not_blown_up_by_a_tiny_spread():
    """Per-kind standardisation divides imagined advantages by the larger of their own std and
    the real rows': a world model predicting nearly one return everywhere stays near 0."""
    from learner.ppo import normalize

    real_adv = torch.tensor([1.0, -1.0, 2.0, -2.0])
    tiny = torch.tensor([1e-4, -1e-4, 2e-4, 0.0])
    exp = Experience(
        act=None, advantages=torch.cat([real_adv, tiny]), returns=torch.zeros(8),
        weights=torch.ones(8), imagined=torch.tensor([False] * 4 + [True] * 4), next_codes=None,
        rewards=torch.zeros(8), continues=torch.ones(8), versions=torch.zeros(8, dtype=torch.int64),
    )  # fmt: skip
    adv = normalize(exp).advantages
    torch.testing.assert_close(adv[:4], (real_adv - real_adv.mean()) / real_adv.std(),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    assert adv[4:].abs().max() < 1e-3  # not standardised to unit spread
    wide = 10.0 * real_adv  # a spread wider than the real rows': its own std
    exp.advantages, exp.imagined = torch.cat([real_adv, wide]), exp.imagined
    adv = normalize(exp).advantages
    torch.testing.assert_close(adv[4:], (wide - wide.mean()) / wide.std(), rtol=1e-5, atol=1e-6)
    # imagined rows alone (imagination.updates) take the real rows' spread they were dreamt beside
    alone = exp.rows(torch.arange(4, 8))
    alone.advantages = tiny.clone()
    assert alone.real_advantage_std is None and normalize(alone).advantages.abs().max() > 0.5
    alone.advantages, alone.real_advantage_std = tiny.clone(), float(real_adv.std())
    again = alone.rows(torch.arange(4))  # a minibatch keeps it
    assert again.real_advantage_std == alone.real_advantage_std
    assert normalize(alone).advantages.abs().max() < 1e-3
    alone.advantages = wide.clone()  # wider than the real rows': its own std, as beside them
    torch.testing.assert_close(normalize(alone).advantages, (wide - wide.mean()) / wide.std(),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
