"""actors/collective.py: the bucketed, versioned weight broadcast to the inference actors
(``rollout.weight_sync: collective``).

Component tier without Ray: the bucket plan covers every element once within the cap, and a
sender with two receivers (threads of this process, gloo over loopback) gives the receivers
bit-identical weights of every dtype, bucket smaller than one tensor or larger than all, with the
version; layouts that differ are refused naming the tensor. With Ray: the driver's broadcast to
an inference actor tags and computes its rows, a layout mismatch is one line, and a killed actor
makes the next sync fail naming it instead of hanging. Config: bad values are one-line errors."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from policies import assert_evaluate_reproduces

from actors.collective import (
    ActorBroadcast,
    WeightReceiver,
    WeightSender,
    WeightSyncError,
    check_layout,
    layout_of,
    plan,
)
from rig.config import load_config
from rig.errors import ConfigError


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "i64": torch.randint(-(2**40), 2**40, (2, 3), generator=g),
        "f32_b": torch.randn(11, generator=g),
        "f16": torch.randn(2, 2, generator=g).half(),
        "mask": torch.rand(5, generator=g) > 0.5,
        "scalar": torch.randn((), generator=g),
        "strided": torch.randn(4, 6, generator=g)[:, ::2],  # not contiguous on the sender
    }


def test_buckets_cover_every_element_once_within_the_cap():
    layout = layout_of(_state(0))
    for cap in (8, 24, 1 << 30):
        seen = {name: np.zeros(int(np.prod(shape)), int) for name, shape, _ in layout}
        for bucket in plan(layout, cap):
            assert bucket.numel * bucket.dtype.itemsize <= max(cap, bucket.dtype.itemsize)
            filled = np.zeros(bucket.numel, int)
            for i, start, at, n in bucket.pieces:
                name, _, dtype = layout[i]
                assert getattr(torch, dtype) == bucket.dtype
                seen[name][start : start + n] += 1
                filled[at : at + n] += 1
            assert (filled == 1).all()
        assert all((counts == 1).all() for counts in seen.values()), cap
    assert len(plan(layout, 1 << 30)) == 5  # one bucket per dtype (5 here) when all fits


def _broadcast(sent: list[dict], bucket_bytes: int, receivers: int = 2):
    """``sent`` states broadcast as versions 1, 2, ... to ``receivers`` threads, each holding
    zeros of the same layout; their tensors and the versions they recorded."""
    layout = layout_of(sent[0])
    sender = WeightSender.serve("127.0.0.1", receivers + 1, layout, bucket_bytes, timeout_s=30)
    targets = [{k: torch.zeros_like(v).contiguous() for k, v in sent[0].items()}
               for _ in range(receivers)]  # fmt: skip
    versions: list[list[int]] = [[] for _ in range(receivers)]
    errors: list[BaseException] = []

    def receive(r: int) -> None:
        try:
            receiver = WeightReceiver("127.0.0.1", sender.port, r + 1, receivers + 1, layout,
                                      bucket_bytes, targets[r], timeout_s=30)  # fmt: skip
            versions[r] += [receiver.receive() for _ in sent]
        except BaseException as err:  # noqa: BLE001 (reported by the test below)
            errors.append(err)

    threads = [threading.Thread(target=receive, args=(r,)) for r in range(receivers)]
    for t in threads:
        t.start()
    sender.connect()
    for v, state in enumerate(sent, start=1):
        sender.send(state, v)
    for t in threads:
        t.join(60)
    assert not errors, errors
    return targets, versions


@pytest.mark.parametrize(
    "bucket_bytes", [24, 1 << 30], ids=["smaller-than-a-tensor", "bigger-than-all"]
)
def test_receivers_get_bit_identical_weights_and_the_version(bucket_bytes):
    first, second = _state(1), _state(2)
    targets, versions = _broadcast([first, second], bucket_bytes)
    assert versions == [[1, 2], [1, 2]]
    for target in targets:  # the second version, bit for bit, in the receivers' own tensors
        for name, tensor in second.items():
            assert target[name].dtype == tensor.dtype, name
            assert torch.equal(_bytes(target[name]), _bytes(tensor)), name


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_a_floating_point_receiver_of_another_width_casts_as_load_state_dict_does():
    sent = {"w": torch.randn(6).to(torch.bfloat16)}
    layout = layout_of(sent)
    check_layout(layout, {"w": torch.zeros(6)})  # a bf16 learner, fp32 actors: accepted
    sender = WeightSender.serve("127.0.0.1", 2, layout, 1 << 20, timeout_s=30)
    target = {"w": torch.zeros(6)}
    box = []
    thread = threading.Thread(target=lambda: box.append(WeightReceiver(
        "127.0.0.1", sender.port, 1, 2, layout, 1 << 20, target, timeout_s=30).receive()))  # fmt: skip
    thread.start()
    sender.connect()
    sender.send(sent, 9)
    thread.join(60)
    assert box == [9] and torch.equal(target["w"], sent["w"].float())


@pytest.mark.parametrize(
    ("theirs", "message"),
    [
        ({"a": torch.zeros(2, 3), "b": torch.zeros(4, 1)}, r"mismatch at 'b': sender \[4\] float32, receiver \[4, 1\]"),
        ({"a": torch.zeros(2, 3)}, "the receiver has no tensor 'b'"),
        ({"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1)}, "the sender has no tensor 'c'"),
        ({"a": torch.zeros(2, 3, dtype=torch.int64), "b": torch.zeros(4)}, r"mismatch at 'a'.*int64"),
    ],
    ids=["shape", "missing", "extra", "dtype"],
)  # fmt: skip
def test_a_layout_mismatch_names_the_first_differing_tensor(theirs, message):
    ours = layout_of({"a": torch.zeros(2, 3), "b": torch.zeros(4)})
    with pytest.raises(WeightSyncError, match=message) as info:
        check_layout(ours, theirs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rollout.weight_sync=nccl"], "rollout.weight_sync: Input should be 'object_store' or 'collective'"),
        (["rollout.weight_sync=collective"], "set rollout.num_inference_actors >= 1 or rollout.weight_sync=object_store"),
        (["rollout.weight_sync_bucket_mb=0"], "rollout.weight_sync_bucket_mb"),
    ],
)  # fmt: skip
def test_bad_weight_sync_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_collective_with_inference_actors_is_accepted():
    config = load_config(None, ["rollout.weight_sync=collective", "rollout.num_inference_actors=1"])
    assert (
        config.rollout.weight_sync == "collective" and config.rollout.weight_sync_bucket_mb == 256
    )


def test_rollout_workers_refuse_collective_without_inference_actors():
    from actors.rollout import RolloutWorkers

    with pytest.raises(ValueError, match="needs rollout.num_inference_actors >= 1"):
        RolloutWorkers(num_env_runners=0, weight_sync="collective")
    with pytest.raises(ValueError, match="object_store or collective, got 'nccl'"):
        RolloutWorkers(num_env_runners=0, weight_sync="nccl")


# -- through Ray: the driver and an inference actor ----------------------------------------------

ACT = {"task": "collect wood", "max_reasoning_tokens": 2, "temperature": 0.7}


@pytest.fixture(scope="module")
def actor():
    import ray

    from actors.inference import start_inference_actors
    from actors.rollout import preset_policy
    from envs.crafter_env import crafter_codec

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    (handle,) = start_inference_actors(
        1, 1, 0.02, preset_policy("tiny", 0), crafter_codec(), ACT, 0
    )
    yield handle
    ray.shutdown()


def _frames(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


def test_the_broadcast_weights_act_and_tag_the_rows(actor):
    import ray

    from envs.crafter_env import crafter_codec
    from rl.policy import RigPolicy

    policy = RigPolicy.from_preset("tiny", crafter_codec(), seed=1).eval()  # not the factory's
    broadcast = ActorBroadcast([actor], bucket_mb=1, timeout_s=30)  # many buckets
    for version in (3, 4):
        broadcast.sync(policy.state_dict(), version)
    assert broadcast.backend == "gloo" and len(broadcast.sender.buckets) > 5
    out, version = ray.get(actor.act.remote(_frames(3), None))
    assert version == 4
    assert_evaluate_reproduces(policy, out, values=True)


def test_a_layout_mismatch_through_ray_is_one_line(actor):
    from envs.crafter_env import crafter_codec
    from rl.policy import RigPolicy

    state = RigPolicy.from_preset("tiny", crafter_codec(), seed=0).state_dict()
    name = next(iter(state))
    state[name + ".renamed"] = state.pop(name)
    with pytest.raises(WeightSyncError, match="the receiver has no tensor") as info:
        ActorBroadcast([actor], bucket_mb=1, timeout_s=30).sync(state, 5)
    assert "\n" not in str(info.value)


def _joins_badly(how: str):
    """A Ray actor with an inference actor's weight-sync surface that accepts the layout, then
    dies (or raises) in ``join_weight_sync``, before it has joined the group. Defined in a
    function so that Ray ships the class by value (workers cannot import this test module)."""
    import ray

    class JoinsBadly:
        def check_weight_layout(self, layout: list) -> None:
            return None

        def join_weight_sync(self, *args) -> None:
            if how == "dies":
                import os

                os._exit(1)
            raise OSError("no route to the driver")

    return ray.remote(num_cpus=0, max_restarts=0)(JoinsBadly).remote()


@pytest.mark.timeout(120, method="thread")  # the group's own wait (timeout_s) is 600 s: this must not wait it
@pytest.mark.parametrize("how, message", [
    ("dies", r"inference actor 0 of 1 is gone \(.*\) in the weight-sync group's set-up"),
    ("raises", r"inference actor 0 of 1 failed in the weight-sync group's set-up \(OSError: "
               r"no route to the driver\)"),
])  # fmt: skip
def test_an_actor_lost_before_it_joins_fails_the_set_up_at_once(actor, how, message):
    from envs.crafter_env import crafter_codec
    from rl.policy import RigPolicy

    bad = _joins_badly(how)
    state = RigPolicy.from_preset("tiny", crafter_codec(), seed=3).state_dict()
    with pytest.raises(RuntimeError, match=message) as info:
        ActorBroadcast([bad], bucket_mb=1, timeout_s=600).sync(state, 1)
    assert "\n" not in str(info.value)


def test_a_dead_receiver_fails_the_sync_naming_it_not_hanging(actor):
    """Runs last in this module: it kills the fixture's actor after a good sync."""
    import ray

    from envs.crafter_env import crafter_codec
    from rl.policy import RigPolicy

    state = RigPolicy.from_preset("tiny", crafter_codec(), seed=2).state_dict()
    broadcast = ActorBroadcast([actor], bucket_mb=1, timeout_s=30)
    broadcast.sync(state, 6)
    ray.kill(actor)
    with pytest.raises(RuntimeError, match=r"inference actor 0 of 1 is gone \(.*\) in the sync "
                                           r"of weights version 7") as info:  # fmt: skip
        broadcast.sync(state, 7)
    assert "\n" not in str(info.value)
