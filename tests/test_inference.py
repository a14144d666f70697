"""actors/inference.py: central batched inference for the env runners (SEED RL's layout).

Component tier without Ray: the batched forward gives each request the rows a direct ``act``
gives, and the async actor batches concurrent requests into one forward (all clients in, or the
wait timer), passing errors to every waiter. With Ray: 2 env runners and 1 inference actor
sample the same data shapes as runners acting themselves, in batches of both runners' envs, and
weights synced to the actor tag and compute the rows (the PPO invariant through the actor)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from policies import assert_evaluate_reproduces

import envs
from actors.inference import BatchedPolicy, InferenceActor, client_of
from actors.rollout import RolloutWorkers, preset_policy
from rl.policy import RigPolicy

ACT = {"task": "collect wood", "max_reasoning_tokens": 3, "temperature": 0.7}


def _frames(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def codec():
    return envs.get_codec(envs.make())


def test_one_forward_gives_each_request_the_rows_of_a_direct_act(codec):
    server = BatchedPolicy(preset_policy(), codec, ACT, seed=3)
    a, b = _frames(3, 0), _frames(5, 1)
    (out_a, out_b), version = server.act([a, b], [None, None])
    assert version == 0 and len(out_a.actions) == 3 and len(out_b.actions) == 5
    direct = RigPolicy.from_preset("tiny", codec, seed=0).eval()
    ref = direct.act(torch.as_tensor(np.concatenate([a, b])), generator=torch.Generator()
                     .manual_seed(3), **ACT)  # fmt: skip
    torch.testing.assert_close(out_a.tokens, ref.tokens[:3])
    torch.testing.assert_close(out_b.log_probs, ref.log_probs[3:])
    assert server.stats() == {"batches": 1.0, "rows_per_batch": 8.0}
    assert server.meta()["pad_id"] == direct.ids.pad


class _Echo:
    """Stands in for BatchedPolicy: records each forward's request sizes; fails on demand."""

    def __init__(self, fail=False):
        self.calls, self.fail = [], fail

    def act(self, frames, histories):
        if self.fail:
            raise RuntimeError("out of memory")
        self.calls.append([len(f) for f in frames])
        return [f"rows of {len(f)}" for f in frames], 4


def _actor(clients: int, wait_s: float, server) -> InferenceActor:
    actor = InferenceActor.__new__(InferenceActor)  # the batching alone, without a policy
    actor.server, actor.clients, actor.wait_s = server, clients, wait_s
    actor._pending, actor._window = [], 0
    return actor


def test_requests_of_all_clients_run_as_one_batch():
    actor = _actor(2, 10.0, _Echo())  # a timer that never fires within the test

    async def both():
        return await asyncio.gather(actor.act(_frames(2, 0), None), actor.act(_frames(3, 1), None))

    assert asyncio.run(both()) == [("rows of 2", 4), ("rows of 3", 4)]
    assert actor.server.calls == [[2, 3]]


def test_the_wait_timer_flushes_a_partial_batch_and_stale_timers_flush_nothing():
    actor = _actor(3, 0.05, _Echo())  # 3 clients, only 2 send

    async def two_then_one():
        first = await asyncio.gather(actor.act(_frames(1, 0), None), actor.act(_frames(2, 1), None))
        second = await actor.act(_frames(4, 2), None)
        return first, second

    first, second = asyncio.run(two_then_one())
    assert first == [("rows of 1", 4), ("rows of 2", 4)] and second == ("rows of 4", 4)
    assert actor.server.calls == [[1, 2], [4]]


def test_a_failing_forward_reaches_every_waiting_runner():
    actor = _actor(2, 10.0, _Echo(fail=True))

    async def both():
        return await asyncio.gather(actor.act(_frames(1, 0), None), actor.act(_frames(1, 1), None),
                                    return_exceptions=True)  # fmt: skip

    results = asyncio.run(both())
    assert all(isinstance(r, RuntimeError) and "out of memory" in str(r) for r in results)


def test_runners_are_dealt_round_robin():
    assert [client_of(i, 2) for i in (1, 2, 3, 4, 5)] == [0, 1, 0, 1, 0]


def test_an_in_process_runner_cannot_use_inference_actors():
    with pytest.raises(ValueError, match="num_env_runners >= 1"):
        RolloutWorkers(num_env_runners=0, num_inference_actors=1, act_kwargs=ACT)


# -- through Ray -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def central():
    import ray

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    workers = RolloutWorkers(
        num_env_runners=2, num_envs_per_env_runner=2, rollout_fragment_length=3,
        env_kwargs={"area": [16, 16]}, act_kwargs=ACT, num_inference_actors=1,
        num_cpus_per_env_runner=1, num_cpus_per_inference_actor=1, inference_wait_s=1.0,
    )  # fmt: skip
    yield workers
    workers.stop()
    ray.shutdown()


def test_runners_sample_through_one_inference_actor_in_batches_of_both(central):
    batch = central.sample()
    assert len(batch) == 2 * 2 * 3 and (batch.versions == 0).all()
    assert np.bincount(batch.chunks).tolist() == [3] * 4
    # both runners' 2 envs per forward (the 1 s window is never what ends a batch here)
    assert central.inference_stats()["rollout/inference_rows_per_batch"] == 4.0


def test_synced_weights_act_and_tag_the_rows(central, codec):
    policy = RigPolicy.from_preset("tiny", codec, seed=1)  # not the factory's weights
    central.sync_weights(policy.state_dict(), version=5)
    batch = central.sample()
    assert (batch.versions == 5).all()
    assert_evaluate_reproduces(policy.eval(), batch.act, values=True)


def test_an_inference_actor_no_node_can_hold_is_a_clear_error_not_a_wait(central):
    """A GPU asked of a CPU-only cluster (configs/cluster.yaml's 0.5 GPU, say): Ray would keep
    the actor pending forever; the start names the setting instead, at once."""
    from actors.inference import InferencePlacementError, start_inference_actors

    with pytest.raises(InferencePlacementError,
                       match=r"no Ray node can hold an inference actor of \{'CPU': 1, 'GPU': 0.5\}.*"
                             r"rollout.num_gpus_per_inference_actor=0"):  # fmt: skip
        start_inference_actors(1, 2, 0.02, preset_policy("tiny", 0), None, ACT, 0, num_gpus=0.5)
    with pytest.raises(InferencePlacementError, match="lower rollout.num_cpus_per_inference_actor"):
        start_inference_actors(1, 2, 0.02, preset_policy("tiny", 0), None, ACT, 0, num_cpus=64)


def test_a_killed_inference_actor_stops_sampling_with_a_clear_message(central):
    """Runs last in this module: it kills the fixture's actor. The runners' calls fail; the
    sample names the dead inference actor instead of hanging or blaming the runners."""
    import ray

    ray.kill(central.inference[0])
    with pytest.raises(RuntimeError, match="inference actor 0 of 1 is gone"):
        central.sample()
