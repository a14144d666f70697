"""The learner actor group (actors/learner.py): 2 gloo ranks with ZeRO-2 on a local Ray against the
one-rank learner of the driver (learner/rank.py) on the same global batch; checkpoints moved
between 2 ranks and 1 in both directions; a rank killed mid-update.

Component tier with a tiny policy, but every group start imports DeepSpeed in two Ray workers:
one group serves the module (tens of seconds in all on 2 shared cores)."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")
ray = pytest.importorskip("ray")

from policies import end_biased  # noqa: E402

from learner.rank import LearnerRank  # noqa: E402
from rig.config import load_config  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")

OVERRIDES = [
    "learner.zero_stage=2", "learner.device=cpu", "learner.lr=1e-3", "learner.warmup_steps=2",
    "learner.timeout_s=120", "ppo.epochs=2", "ppo.minibatch_size=12", "ppo.sync_check_rows=4",
    "policy.max_reasoning_tokens=3",
]  # fmt: skip
ATOL = 2e-5  # fp32, gloo: the two runs differ in summation order only


def config(ranks: int):
    return load_config(None, [*OVERRIDES, f"learner.num_ranks={ranks}"])


def experience(seed: int, rows: int = 24, imagined: int = 6):
    """``rows`` rows of a tiny policy's own act outputs (an end-biased one, so the rows' reasoning
    and thus their token counts differ, as the shards' do), the last ``imagined`` marked as
    imagined rows of weight 0.5. Advantages and returns are random, not GAE: the learner only
    needs them to be numbers."""
    from envs.crafter_env import crafter_codec
    from rl.experience import Experience
    from rl.imagine import frame_codes
    from rl.policy import RigPolicy

    torch.manual_seed(seed)
    actor = end_biased(RigPolicy.from_preset("tiny", crafter_codec(), seed=seed + 7).eval())
    gen = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (rows, actor.image_size, actor.image_size, 3),
                           dtype=torch.uint8, generator=gen)  # fmt: skip
    with torch.no_grad():
        act = actor.act(frames, "collect wood", 3, generator=gen)
        codes = frame_codes(actor, frames.roll(1, 0))
    is_imagined = torch.arange(rows) >= rows - imagined
    return Experience(
        act=act, advantages=torch.randn(rows, generator=gen), returns=torch.randn(rows, generator=gen),
        weights=torch.where(is_imagined, 0.5, 1.0), imagined=is_imagined,
        next_codes=codes.where(~is_imagined[:, None], 0), rewards=torch.randn(rows, generator=gen),
        continues=(torch.rand(rows, generator=gen) > 0.1).float(),
        versions=torch.ones(rows, dtype=torch.int64),
    )  # fmt: skip


def weights_of(learner) -> dict[str, torch.Tensor]:
    from actors.weights import unpack_state

    return {k: v.clone() for k, v in unpack_state(learner.published_state_dict()).items()}


def assert_close(a: dict, b: dict, atol: float = ATOL) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= atol, f"weights differ by up to {worst:.2e}"


@pytest.fixture(scope="module")
def local_ray():
    from actors.local import init_ray

    started = not ray.is_initialized()
    if started:
        init_ray(num_cpus=4)  # two groups of 2 ranks at once (2 cores, oversubscribed)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def group(local_ray):
    from actors.learner import LearnerGroup

    group = LearnerGroup(config(2))
    yield group
    group.stop()


@pytest.fixture(scope="module")
def batches():
    return experience(0), experience(1)


@pytest.fixture(scope="module")
def trained(group, batches, tmp_path_factory):
    """One update of the 2-rank group and of a 1-rank learner on the same batch, each then
    checkpointed, then a second update of each: the weights and metrics of both, and the folders."""
    one = LearnerRank(config(1))
    root = tmp_path_factory.mktemp("ckpts")
    out = {"one": {}, "two": {}}
    for name, learner in (("one", one), ("two", group)):
        gen = torch.Generator().manual_seed(3)
        first = learner.update(batches[0], gen, version=1)
        learner.save_checkpoint(root / name, "engine", {"iteration": 1})
        out["generator_at_save"] = gen.get_state()
        second = learner.update(batches[1], gen, version=2)
        out[name] = {"metrics": (first, second), "weights": weights_of(learner),
                     "generator": gen.get_state(), "dir": root / name}  # fmt: skip
    out["initial"] = weights_of(LearnerRank(config(1)))
    return out


def test_two_zero2_ranks_match_one_rank_on_the_same_global_batch(trained):
    one, two = trained["one"], trained["two"]
    for a, b in zip(one["metrics"], two["metrics"], strict=True):
        assert a["learner/optimizer_steps"] == b["learner/optimizer_steps"] == 4.0
        for key in ("loss/total", "loss/policy", "loss/value", "loss/next_frame"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
        assert b["learner/grad_norm"] == pytest.approx(a["learner/grad_norm"], rel=1e-4)
        assert b["sync/logp_rows_checked"] == a["sync/logp_rows_checked"]
    assert one["metrics"][0]["sync/logp_rows_checked"] == 4.0  # rows of version 1, then none
    assert_close(one["weights"], two["weights"])
    assert torch.equal(one["generator"], two["generator"])  # the next update draws alike
    # ... and the update did something: the weights moved well beyond the tolerance
    moved = max(float((trained["initial"][k] - one["weights"][k]).abs().max()) for k in one["weights"])
    assert moved > 100 * ATOL
    # the value head's running statistics (buffers) are the global batch's on every rank
    key = "value_head.norm.mean"
    torch.testing.assert_close(two["weights"][key], one["weights"][key], atol=1e-5, rtol=0)


def test_the_shard_means_alone_would_not_match(batches):
    """Why the terms are rescaled: the mean of two shards' means is not the batch's mean when
    the shards hold different numbers of units, here the token reduction's weighted tokens with
    a choice (this batch's shards differ; with ``reduction: sequence`` a unit is a row)."""
    from learner.ppo import DataParallel, minibatch_terms
    from rl.policy import RigPolicy

    exp = batches[0]
    cfg = config(1).ppo.model_copy(update={"reduction": "token"})
    from envs.crafter_env import crafter_codec

    policy = RigPolicy.from_preset("tiny", crafter_codec(), seed=0).eval()
    with torch.no_grad():
        whole, _ = minibatch_terms(policy, None, exp, cfg)
        halves = [minibatch_terms(policy, None, DataParallel(r, 2).shard(exp), cfg)[0] for r in (0, 1)]
    naive = (halves[0]["entropy"] + halves[1]["entropy"]) / 2
    assert abs(float(naive - whole["entropy"])) > 1e-4


def test_a_two_rank_checkpoint_resumes_on_one_rank_and_the_reverse(group, trained, batches):
    """Each checkpoint (taken after the first update) is loaded by the other rank count and
    makes the same second update as the run that saved it."""
    from learner.engine import FULL_STATE

    one, two = trained["one"], trained["two"]
    assert len(list((two["dir"] / "engine").glob("*zero_pp_rank_*optim_states.pt"))) == 2
    assert (two["dir"] / "engine" / FULL_STATE).is_file()

    resumed = LearnerRank(config(1))
    assert resumed.load_checkpoint(two["dir"], "engine") == {"iteration": 1}
    gen = torch.Generator().manual_seed(0)
    gen.set_state(trained["generator_at_save"])  # restored from rng.json in a real resume
    resumed.update(batches[1], gen, version=2)
    assert_close(weights_of(resumed), two["weights"])
    assert resumed.engine.global_steps == 8

    assert group.load_checkpoint(one["dir"], "engine") == {"iteration": 1}
    gen.set_state(trained["generator_at_save"])
    group.update(batches[1], gen, version=2)
    assert_close(weights_of(group), one["weights"])


def test_deepspeeds_zero_to_fp32_reads_a_two_rank_checkpoint(trained):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from learner.engine import FULL_STATE

    ckpt = trained["two"]["dir"]
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="engine")
    saved = torch.load(ckpt / "engine" / FULL_STATE, weights_only=True)["fp32"]
    assert state.keys() >= saved.keys() and len(saved) > 10
    for key, value in saved.items():
        torch.testing.assert_close(state[key], value, atol=0, rtol=0, msg=key)


@pytest.mark.slow
def test_two_zero2_ranks_without_world_terms_match_one_rank(local_ray, batches):
    """No next-frame codes (no world-model term trains: rl.losses.world_model_trains): the world
    heads get no gradient on any rank, ZeRO-2 neither waits for nor reduces them, and two ranks
    make one rank's update, with the world heads where they started."""
    import dataclasses

    from actors.learner import LearnerGroup

    bare = dataclasses.replace(batches[0], next_codes=None)
    one, group = LearnerRank(config(1)), LearnerGroup(config(2))
    start = weights_of(one)
    try:
        for learner in (one, group):
            learner.update(bare, torch.Generator().manual_seed(3), version=1)
        assert_close(weights_of(one), weights_of(group))
        after = weights_of(group)
        world = [k for k in after if k.startswith("world.")]
        assert world and all(torch.equal(after[k], start[k]) for k in world)
        assert not torch.equal(after["value_head.out.weight"], start["value_head.out.weight"])
    finally:
        group.stop()


@pytest.mark.parametrize("stage", [1, 3])
def test_two_ranks_match_one_rank_at_zero_1_and_3(local_ray, batches, stage):
    """ZeRO-1 (optimiser state sharded) and ZeRO-3 (weights too: every forward gathers them, the
    published weights are gathered to rank 0) make the same update as one rank."""
    from actors.learner import LearnerGroup

    stage_of = [f"learner.zero_stage={stage}"]
    one = LearnerRank(load_config(None, [*OVERRIDES, "learner.num_ranks=1", *stage_of]))
    group = LearnerGroup(load_config(None, [*OVERRIDES, "learner.num_ranks=2", *stage_of]))
    try:
        for learner in (one, group):
            learner.update(batches[0], torch.Generator().manual_seed(3), version=1)
        assert_close(weights_of(one), weights_of(group))
    finally:
        group.stop()


def test_a_killed_rank_stops_the_group_with_a_clear_message_not_a_hang(local_ray, batches):
    """Rank 1's process is killed 1 s into an update. The driver does not wait for rank 0 (which
    sits in a collective with the dead rank): the call fails within seconds naming rank 1. The
    update makes 100 epochs (200 optimiser steps, tens of seconds even on a fast machine) so the
    kill always lands inside it; with 2 epochs a fast CI machine had finished it before 1 s."""
    from actors.learner import LearnerGroup, LearnerGroupError

    group = LearnerGroup(load_config(None, [*OVERRIDES, "learner.num_ranks=2", "ppo.epochs=100"]))
    try:
        victim = group.pids()[1]
        threading.Timer(1.0, os.kill, (victim, signal.SIGKILL)).start()
        start = time.monotonic()
        with pytest.raises(LearnerGroupError, match=r"learner rank 1 of 2 died during update") as err:
            group.update(batches[0], torch.Generator().manual_seed(0), version=1)
        assert "rig train --resume" in str(err.value)
        assert time.monotonic() - start < 60
        assert group.actors == []  # the survivors were ended, none is left in a collective
    finally:
        group.stop()


def test_more_ranks_than_minibatch_rows_is_one_line_naming_both_keys():
    from rig.errors import ConfigError
    from rig.train import check_learner

    with pytest.raises(ConfigError, match=r"learner.num_ranks=16 needs ppo.minibatch_size >= 16"):
        check_learner(load_config(None, ["learner.num_ranks=16", "ppo.minibatch_size=8"]))
    check_learner(load_config(None, ["learner.num_ranks=8", "ppo.minibatch_size=8"]))
    np.testing.assert_equal(load_config(None, []).learner.num_ranks, 1)  # today's learner by default


@pytest.mark.slow
def test_rig_train_on_two_ranks_checkpoints_exports_and_resumes_on_one(local_ray, in_tmp, capsys):
    """The whole loop with learner.num_ranks=2 (ZeRO-2, gloo): it trains and checkpoints; the
    checkpoint has DeepSpeed's layout (two optimiser partitions) and DeepSpeed's zero_to_fp32
    reads the weights `rig export` writes; the run then resumes on one rank, in the driver."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from test_train import DEBUG, FAST, mlflow_run, only_run, run_cli
    from test_train_reliability import _assert_matches_export, _exported_weights

    code, _, err = run_cli(capsys, "train", "--config", DEBUG, *FAST, "train.iterations=2",
                           "train.export_at_end=false", "learner.num_ranks=2",
                           "learner.zero_stage=2", "learner.device=cpu")  # fmt: skip
    assert code == 0, err
    run = only_run(in_tmp)
    ckpt = run / "checkpoints" / "iter_000002"
    assert len(list((ckpt / "engine").glob("*zero_pp_rank_*_optim_states.pt"))) == 2
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="engine")
    _assert_matches_export(state, _exported_weights(run, in_tmp / "hf", capsys))

    code, _, err = run_cli(capsys, "train", "--resume", str(run), "train.iterations=3",
                           "train.export_at_end=false", "learner.num_ranks=1")  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in (run / "checkpoints").glob("iter_*"))[-1] == "iter_000003"
    _, mlrun = mlflow_run(run)
    assert mlrun.data.metrics["learner/optimizer_steps"] >= 1


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_kl_reference_is_the_learners_start_in_its_dtype_and_device(precision):
    """Suspect 6 of "the RL loop must learn": the frozen KL reference is copied before DeepSpeed
    moves and casts the learner, then brought to the learner's device and dtype, so its
    log-probs equal the learner's at step 0 (in bf16 too). Without a KL weight there is none."""
    rank = LearnerRank(load_config(None, [*OVERRIDES, f"learner.precision={precision}",
                                          "ppo.loss_scales.kl=0.1"]))  # fmt: skip
    like = next(rank.policy.parameters())
    assert like.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    ref = dict(rank.reference.named_parameters())
    for name, p in rank.policy.named_parameters():
        assert ref[name].dtype == p.dtype and ref[name].device == p.device, name
        assert torch.equal(ref[name], p.detach()), name
        assert not ref[name].requires_grad
    assert LearnerRank(load_config(None, [*OVERRIDES, "ppo.loss_scales.kl=0"])).reference is None
