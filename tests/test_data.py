"""The supervised stage's data pipeline: dataset format, collect, S2-S4 stages, their CLI.

Component tier: tiny Crafter episodes (a few dozen steps), tiny models, a few seconds each."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from rig.cli import main
from supervised import DatasetWriter, ShardError, open_dataset
from supervised.collect import collect
from supervised.dataset import DatasetError
from supervised.stages import WAIT, imagine, reason, review, review_segments

CRAFTER = dict(env_id="rig/Crafter-v0", size=64)


def _episode(k: int, length: int) -> dict:
    return {
        "frames": np.full((length + 1, 8, 8, 3), 0, np.uint8) + np.arange(length + 1, dtype=np.uint8)[:, None, None, None] + 10 * k,
        "action": np.arange(length, dtype=np.int16),
        "action_text": np.array([f"a{t}" for t in range(length)]),
        "reward": np.ones(length, np.float32),
        "episode_id": k,
        "world_seed": 100 + k,
    }  # fmt: skip


@pytest.fixture(scope="module")
def crafter_data(tmp_path_factory):
    """Two scripted Crafter episodes of 24 steps, in 2 shards."""
    path = tmp_path_factory.mktemp("data") / "s1"
    collect(
        path, **CRAFTER, env_kwargs={"length": 24}, agent="scripted", episodes=2, shard_steps=20
    )
    return path


# -- the format -----------------------------------------------------------------------------------


def test_round_trip_frames_steps_and_card(tmp_path):
    with DatasetWriter(tmp_path / "d", env_id="x", agent="a", shard_steps=5) as writer:
        for k, length in enumerate((3, 4, 6)):
            writer.add_episode(_episode(k, length))
    reader = open_dataset(tmp_path / "d")
    assert (reader.num_episodes, reader.num_steps, reader.num_frames) == (3, 13, 16)
    assert reader.card["shards"] == 2 and reader.card["env_id"] == "x"
    frames = reader.frames()
    assert frames.shape == (16, 8, 8, 3) and frames.dtype == np.uint8
    assert list(frames[:, 0, 0, 0]) == [0, 1, 2, 3, 10, 11, 12, 13, 14, 20, 21, 22, 23, 24, 25, 26]
    subset = reader.frames(max_frames=5, seed=3)
    assert subset.shape == (5, 8, 8, 3) and np.array_equal(subset, reader.frames(5, seed=3))
    steps = list(reader.steps())
    assert len(steps) == 13 and [s["index"] for s in steps] == list(range(13))
    for s in steps:  # every step has its real next frame, the final one included
        assert s["next_frame"][0, 0, 0] == s["frame"][0, 0, 0] + 1
        assert np.array_equal(reader.frames_at([reader.frame_index(s["index"])])[0], s["frame"])
    eps = list(reader.episodes())
    assert [e["episode_id"] for e in eps] == [0, 1, 2] and eps[2]["world_seed"] == 102
    assert eps[1]["summary"]["return"] == 4.0 and str(eps[1]["action_text"][2]) == "a2"
    assert "| episodes | 3 |" in (tmp_path / "d" / "README.md").read_text()


def test_writer_resumes_refuses_and_cleans_leftovers(tmp_path):
    path = tmp_path / "d"
    with DatasetWriter(path, env_id="x", agent="a", shard_steps=1) as writer:
        writer.add_episode(_episode(0, 3))
    (path / "shards" / "shard-000009.npz").write_bytes(b"half written, not in the index")
    (path / "shards" / ".shard-000010.npz.tmp").write_bytes(b"tmp")
    with DatasetWriter(path, env_id="x", agent="a", shard_steps=1) as writer:
        assert writer.episode_ids == {0}
        with pytest.raises(ValueError, match="already"):
            writer.add_episode(_episode(0, 3))
        writer.add_episode(_episode(1, 2))
    assert sorted(p.name for p in (path / "shards").iterdir()) == [
        "shard-000000.npz",
        "shard-000001.npz",
    ]
    assert open_dataset(path).episode_ids == [0, 1]
    with pytest.raises(DatasetError, match="agent='a', not 'b'"):
        DatasetWriter(path, env_id="x", agent="b")
    with pytest.raises(DatasetError, match="already holds a dataset"):
        DatasetWriter(path, env_id="x", agent="a", resume=False)


def test_corrupted_or_truncated_shard_is_one_clear_error(tmp_path, capsys):
    path = tmp_path / "d"
    with DatasetWriter(path, env_id="x", agent="a", shard_steps=1) as writer:
        writer.add_episode(_episode(0, 3))
    shard = path / "shards" / "shard-000000.npz"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=f"{shard}.*corrupted"):
        open_dataset(path).frames()
    shard.write_bytes(bytes(data[:100]))
    with pytest.raises(ShardError, match=f"{shard}.*truncated"):
        list(open_dataset(path).episodes())
    assert main(["data", "check", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(shard) in err[0] and err[0].startswith("error:")
    with pytest.raises(DatasetError, match="not a dataset folder"):
        open_dataset(tmp_path / "nothing")


# -- collect --------------------------------------------------------------------------------------


def test_collect_resumes_after_interruption_exactly(tmp_path):
    class Interrupted(Exception):
        pass

    def stop(shards: int) -> None:
        if shards == 2:
            raise Interrupted

    # a small world: crafter's world generation dominates the time of 10-step episodes
    kwargs = {"length": 10, "area": [24, 24]}
    args = dict(**CRAFTER, env_kwargs=kwargs, agent="scripted", shard_steps=10)
    with pytest.raises(Interrupted):
        collect(tmp_path / "a", episodes=4, after_shard=stop, **args)
    assert open_dataset(tmp_path / "a").num_episodes == 2  # two shards of one episode each
    card = collect(tmp_path / "a", episodes=4, **args)
    assert (card["episodes"], card["steps"], card["shards"]) == (4, 40, 4)
    reader = open_dataset(tmp_path / "a")
    assert sorted(reader.episode_ids) == [0, 1, 2, 3]
    clean = {e["episode_id"]: e for e in open_dataset(
        collect(tmp_path / "b", episodes=4, **args) and tmp_path / "b").episodes()}  # fmt: skip
    for ep in reader.episodes():  # the resumed episodes are the ones an uninterrupted run plays
        assert np.array_equal(ep["action"], clean[ep["episode_id"]]["action"])
        assert np.array_equal(ep["frames"], clean[ep["episode_id"]]["frames"])


def test_collect_killed_mid_way_then_rerun(tmp_path):
    """SIGKILL a real `rig collect` once a shard is on disk; the rerun completes the count."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "k"
    argv = [sys.executable, "-m", "rig.cli", "collect", "--out", str(out), "--episodes", "12",
            "--shard-steps", "10", "env.kwargs={length: 10, area: [24, 24]}"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        index = out / "index.json"
        if index.exists() and len(json.loads(index.read_text())["shards"]) >= 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = open_dataset(out).num_episodes
    assert 2 <= killed_at < 12  # killed mid-way, with whole shards on disk
    assert main(argv[3:]) == 0
    reader = open_dataset(out)
    assert (reader.num_episodes, reader.num_steps) == (12, 120)
    assert sorted(reader.episode_ids) == list(range(12))  # no duplicates
    reader.verify()


def test_collected_crafter_steps_carry_what_later_stages_need(crafter_data):
    reader = open_dataset(crafter_data)
    card = reader.card
    assert card["episodes"] == 2 and card["steps"] == 48 and card["agent"] == "scripted"
    assert 0 <= card["score"] <= 100 and len(card["stats"]["success_rates"]) == 22
    step = next(reader.steps())
    assert step["frame"].shape == (64, 64, 3) and step["local_view"].shape == (9, 7)
    assert step["inventory"].shape == (16,) and step["achievements"].shape == (22,)
    assert str(step["action_text"]) in card["info"]["semantic_ids"] or step["goal"]
    ep = next(reader.episodes())
    assert ep["truncated"][-1] and not ep["truncated"][:-1].any()  # length 24 truncates


def test_cli_collect_two_workers_and_refuses_another_agent(tmp_path, capsys):
    out = tmp_path / "s1"
    argv = ["collect", "--out", str(out), "--episodes", "2", "--workers", "2",
            "--shard-steps", "8", "env.kwargs.length=8"]  # fmt: skip
    assert main(argv) == 0
    line = capsys.readouterr().out
    assert "2 episodes, 16 steps" in line and "Crafter score" in line
    before = (out / "index.json").read_bytes()
    assert main([*argv[:-1], "--agent", "random", "env.kwargs.length=8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "agent='scripted', not 'random'" in err[0]
    assert (out / "index.json").read_bytes() == before
    assert main(["collect", "--out", str(tmp_path / "x"), "--agent", "nope"]) == 2


def test_collect_with_a_class_agent_and_a_policy_checkpoint(tmp_path, monkeypatch):
    (tmp_path / "my_agents.py").write_text(textwrap.dedent("""
        class Lefty:
            goal = "go left"
            def __init__(self, num_actions, seed=0):
                self.n = num_actions
            def reset(self):
                pass
            def act(self, obs, info):
                return 1
    """))  # fmt: skip
    monkeypatch.syspath_prepend(str(tmp_path))
    collect(
        tmp_path / "c", **CRAFTER, env_kwargs={"length": 4}, agent="my_agents:Lefty", episodes=1
    )
    ep = next(open_dataset(tmp_path / "c").episodes())
    assert list(ep["action_text"]) == ["move_left"] * 4 and ep["goal"][0] == "go left"

    from envs.crafter_env import crafter_codec
    from rl.policy import RigPolicy

    RigPolicy.from_preset("tiny", crafter_codec(), seed=0).save(tmp_path / "ckpt")
    collect(tmp_path / "p", **CRAFTER, env_kwargs={"length": 2}, agent=str(tmp_path / "ckpt"),
            episodes=1, policy_kwargs={"max_reasoning_tokens": 4})  # fmt: skip
    ep = next(open_dataset(tmp_path / "p").episodes())
    assert ep["length"] == 2 and ep["goal"].dtype.kind == "U"


# -- stages ---------------------------------------------------------------------------------------


def test_reason_writes_short_grounded_reasoning_and_leaves_the_input(crafter_data, tmp_path):
    index = (crafter_data / "index.json").read_bytes()
    card = reason(crafter_data, tmp_path / "s2")
    assert card["stages"] == ["collect", "reason"] and card["steps"] == 48
    steps = list(open_dataset(tmp_path / "s2").steps())
    words = [len(str(s["reasoning"]).split()) for s in steps]
    assert min(words) >= 5 and max(words) <= 40
    assert len({str(s["reasoning"]) for s in steps}) > 10  # varied, not one template line
    do = [s for s in steps if str(s["action_text"]) == "do"]
    assert all("hit the" in str(s["reasoning"]) for s in do)
    assert (crafter_data / "index.json").read_bytes() == index
    assert reason(crafter_data, tmp_path / "s2")["episodes"] == 2  # rerun: nothing added
    with pytest.raises(DatasetError, match="input dataset"):
        reason(crafter_data, crafter_data)


def test_review_masks_the_wrong_reasoning(crafter_data, tmp_path):
    reason(crafter_data, tmp_path / "s2")
    card = review(tmp_path / "s2", tmp_path / "s3", policy="random", horizon=6, every=4)
    assert card["stage"] == "review"
    steps = list(open_dataset(tmp_path / "s3").steps())
    kept = [s for s in steps if s["review"]]
    assert kept and all(s["t"] % 4 == 0 for s in kept)
    for s in kept:
        (wrong, wrong_loss), (right, right_loss) = review_segments(s)
        assert not wrong_loss and right_loss  # the wrong part is context only
        assert right.startswith(WAIT) and wrong and s["review_action"] != ""
        worse = s["review_policy_return"] < s["review_expert_return"]
        assert worse or s["review_action"] != s["review_right_action"]
    plain = next(s for s in steps if not s["review"])
    assert review_segments(plain) == [(str(plain["reasoning"]), True)]


def test_imagine_chains_index_the_real_future_frames(crafter_data, tmp_path):
    imagine(crafter_data, tmp_path / "s4", lookahead=3)
    reader = open_dataset(tmp_path / "s4")
    steps = list(reader.steps())
    by_index = {s["index"]: s for s in steps}
    for s in steps:
        assert np.array_equal(reader.frames_at([s["next_frame_index"]])[0], s["next_frame"])
        n = int(s["chain_len"])
        assert n == min(3, 24 - s["t"])
        assert (s["chain_frames"][n:] == -1).all() and (s["chain_steps"][n:] == -1).all()
        for i in range(n):
            future = by_index[int(s["chain_steps"][i])]
            assert future["episode_id"] == s["episode_id"] and future["t"] == s["t"] + i
            frame = reader.frames_at([s["chain_frames"][i]])[0]
            assert np.array_equal(frame, future["next_frame"])


def test_hf_reasoner_on_a_tiny_random_model(crafter_data, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from rl.tokenizer import build_tokenizer

    tok = build_tokenizer(vocab_size=512)
    config = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=32, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    source = tmp_path / "small"
    with DatasetWriter(source, **{k: open_dataset(crafter_data).card[k] for k in
                                  ("env_id", "size", "agent", "info")}) as writer:  # fmt: skip
        from supervised.dataset import writable

        ep = writable(next(open_dataset(crafter_data).episodes()))
        writer.add_episode({k: (v[:4] if k != "frames" and hasattr(v, "__len__") and len(v) == 24
                                else v) for k, v in {**ep, "frames": ep["frames"][:5]}.items()})  # fmt: skip
    card = reason(source, tmp_path / "s2", reasoner_spec=str(tmp_path / "lm"), max_new_tokens=8)
    assert card["options"]["reasoner"] == str(tmp_path / "lm")
    texts = [str(s["reasoning"]) for s in open_dataset(tmp_path / "s2").steps()]
    assert len(texts) == 4 and all(0 < len(t.split()) <= 40 for t in texts)
    assert main(["data", "reason", str(source), str(tmp_path / "x"), "--reasoner",
                 str(tmp_path / "nothing_here")]) == 2  # fmt: skip


def test_cli_stages_print_counts(crafter_data, tmp_path, capsys):
    assert (
        main(["data", "imagine", str(crafter_data), str(tmp_path / "s4"), "--lookahead", "2"]) == 0
    )
    assert "2 episodes, 48 steps" in capsys.readouterr().out
    assert (
        main(["data", "imagine", str(crafter_data), str(tmp_path / "s4"), "--lookahead", "3"]) == 2
    )
    assert "options" in capsys.readouterr().err
    card = json.loads((tmp_path / "s4" / "card.json").read_text())
    assert card["options"] == {"lookahead": 2} and card["source"] == str(crafter_data.resolve())
