"""The RIG policy (rl/policy.py): batched KV-cached acting, and the learner's teacher-forced
recomputation of the same log-probs. Component tier: tiny preset, 64 px frames, Crafter codec."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from rl.policy import ActOutput, History, positions  # noqa: E402

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
    assert out.prompt_mask.all() and not out.prompt_codes.any()
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
    assert policy.value_head.out.weight.grad is not None
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
    ids, mask = policy.prompt(TASK, 2)  # (2, P) ends "... <image> x 16 <end> <reasoning>"
    embeds = policy.embed(ids, torch.zeros_like(mask), torch.as_tensor(frames(2, seed=3)))
    P, pos = ids.shape[1], positions(mask)
    with torch.no_grad():
        full, _ = policy.hidden(None, mask, pos, inputs_embeds=embeds)
        h, cache = policy.hidden(None, mask[:, :-2], pos[:, :-2], inputs_embeds=embeds[:, :-2],
                                 use_cache=True)  # fmt: skip
        for t in (P - 2, P - 1):
            h, cache = policy.hidden(ids[:, t : t + 1], mask[:, : t + 1], pos[:, t : t + 1],
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


def test_per_row_tasks_left_pad_and_evaluate_agrees(policy):
    tasks = ["collect wood", "place a crafting table next to the water and then sleep", "eat"]
    gen = torch.Generator().manual_seed(2)
    out = policy.act(frames(3, 2), tasks, 4, 1.0, gen)
    lengths = out.prompt_mask.sum(1)
    assert len(set(lengths.tolist())) == 3 and int(lengths.max()) == out.prompt_length
    for b, task in enumerate(tasks):  # left padding: each row's prompt is its own, right-aligned
        row = out.prompt_ids[b][out.prompt_mask[b]]
        assert policy.tok.decode(row[2 : 2 + len(policy.task_ids(task))]) == task
        assert not out.prompt_mask[b, : out.prompt_length - int(lengths[b])].any()
    with torch.no_grad():
        res = policy.evaluate(out)
    mask = out.token_mask
    torch.testing.assert_close(res["log_probs"][mask], out.log_probs[mask], atol=1e-4, rtol=0)
    torch.testing.assert_close(res["values"], out.values, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="2 tasks for 3 frames"):
        policy.act(frames(3), tasks[:2], 2)


def test_history_keeps_the_last_k_steps_per_row():
    hist = History.empty(2, 3, 64)
    assert hist.k == 3 and not hist.mask.any()
    for t in range(4):
        hist.push(np.full((2, 64, 64, 3), t, np.uint8), np.array([t, 10 + t]))
    assert hist.mask.all() and hist.actions.tolist() == [[1, 2, 3], [11, 12, 13]]
    assert hist.frames[:, :, 0, 0, 0].tolist() == [[1, 2, 3], [1, 2, 3]]
    hist.reset(np.array([False, True]))
    hist.push(np.full((2, 64, 64, 3), 9, np.uint8), np.array([4, 14]))
    assert hist.mask.tolist() == [[True, True, True], [False, False, True]]
    assert hist.actions[1, -1] == 14 and hist.frames[1, -1, 0, 0, 0] == 9
    zero = History.empty(2, 0, 64)
    zero.push(np.zeros((2, 64, 64, 3), np.uint8), np.array([0, 0]))  # k = 0 keeps nothing
    assert zero.mask.shape == (2, 0)


def test_history_enters_the_prompt_and_evaluate_agrees(policy):
    G = policy.image_tokens
    hist = History.empty(3, 2, 64)
    hist.push(frames(3, 20), np.array([0, 1, 2]))
    hist.push(frames(3, 21), np.array([3, 4, 5]))
    hist.reset(np.array([False, False, True]))  # row 2 starts an episode: no history
    hist.push(frames(3, 22), np.array([6, 7, 8]))  # rows 0, 1: two steps; row 2: one
    out = policy.act(frames(3, 4), TASK, 4, 1.0, torch.Generator().manual_seed(4), history=hist)
    images = (out.prompt_ids == policy.ids.image) & out.prompt_mask
    assert images.sum(1).tolist() == [3 * G, 3 * G, 2 * G]
    assert out.images().shape == (8, 64, 64, 3)
    row0 = out.prompt_ids[0][out.prompt_mask[0]].tolist()
    assert row0.count(policy.ids.action) == 2  # the two past actions, as text
    cut = row0.index(policy.ids.action)
    assert (
        policy.tok.decode(row0[cut + 1 : row0.index(policy.ids.end, cut)])
        == (
            policy.codec.vocab[3]  # row 0 keeps actions 3, 6 (k = 2), oldest first
        )
    )
    with torch.no_grad():
        res = policy.evaluate(out)
        plain = policy.act(frames(3, 4), TASK, 4, 1.0, torch.Generator().manual_seed(4))
    mask = out.token_mask
    torch.testing.assert_close(res["log_probs"][mask], out.log_probs[mask], atol=1e-4, rtol=0)
    torch.testing.assert_close(res["values"], out.values, atol=1e-4, rtol=0)
    assert not torch.allclose(plain.values, out.values)  # the history does reach the model

    # rows without history (imagined ones) collate beside rows with it: empty slots added
    both = ActOutput.collate([out, plain], pad_id=policy.ids.pad)
    assert both.history_frames.shape == (6, 2, 64, 64, 3)
    assert both.history_mask[3:].sum() == 0 and torch.equal(both.history_mask[:3], out.history_mask)
    with torch.no_grad():
        res = policy.evaluate(both)
    mask = both.token_mask
    torch.testing.assert_close(res["log_probs"][mask], both.log_probs[mask], atol=1e-4, rtol=0)
    torch.testing.assert_close(res["values"], both.values, atol=1e-4, rtol=0)


def test_lookahead_imagines_reviews_and_decides(policy):
    G = policy.image_tokens
    gen = torch.Generator().manual_seed(6)
    out = policy.act(frames(3, 6), TASK, 4, 1.0, gen, lookahead=2)
    assert out.lookahead_actions.shape == (3, 2)
    assert ((out.lookahead_actions >= 0) & (out.lookahead_actions < len(policy.codec))).all()
    assert out.imagined_frames.shape == (3, 2, 64, 64, 3)
    assert out.imagined_frames.dtype == torch.uint8
    assert (out.prompt_codes.sum(1) == 2 * G).all()  # two imagined frames of G codes
    for b in range(3):
        row = out.prompt_ids[b][out.prompt_mask[b] & ~out.prompt_codes[b]].tolist()
        assert row.count(policy.ids.imagine) == 2 and row.count(policy.ids.review) == 1
        assert row[-2:] == [policy.ids.review, policy.ids.reasoning]
        assert row.count(policy.ids.action) == 2  # the two proposals; the final one is generated
        # each proposal's action text is the recorded lookahead action
        starts = [i for i, t in enumerate(row) if t == policy.ids.action]
        for j, s in enumerate(starts):
            text = policy.tok.decode(row[s + 1 : row.index(policy.ids.end, s)])
            assert text == policy.codec.vocab[int(out.lookahead_actions[b, j])]
        assert policy.codec.decode(out.action_texts[b]) == int(out.actions[b])
    with torch.no_grad():
        res = policy.evaluate(out)
    mask = out.token_mask
    torch.testing.assert_close(res["log_probs"][mask], out.log_probs[mask], atol=1e-4, rtol=0)
    torch.testing.assert_close(res["values"], out.values, atol=1e-4, rtol=0)

    # collate keeps lookahead rows of different prompt lengths aligned
    other = policy.act(frames(2, 7), "eat", 2, 1.0, torch.Generator().manual_seed(7), lookahead=2)
    both = ActOutput.collate([out, other], pad_id=policy.ids.pad)
    assert both.prompt_length == max(out.prompt_length, other.prompt_length)
    with torch.no_grad():
        res = policy.evaluate(both)
    mask = both.token_mask
    torch.testing.assert_close(res["log_probs"][mask], both.log_probs[mask], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="lookahead_actions differs"):
        ActOutput.collate([out, act(policy, 1)], pad_id=policy.ids.pad)


def test_evaluate_with_next_codes_matches_imagine(policy):
    from rl.imagine import code_log_probs, teacher_forced

    out = act(policy, 3, seed=8)
    img = policy.imagine(out, 1.0, torch.Generator().manual_seed(8))
    with torch.no_grad():
        res = policy.evaluate(out, next_codes=img.codes)
        logits, h_last = teacher_forced(policy, out, img.codes)
    logp = code_log_probs(res["next_frame_logits"], img.codes, 1.0)
    torch.testing.assert_close(logp, img.log_probs, atol=1e-4, rtol=0)
    torch.testing.assert_close(res["next_frame_logits"], logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(res["reward_pred"], img.reward_pred, atol=1e-4, rtol=0)
    torch.testing.assert_close(res["continue_logit"], img.continue_logit, atol=1e-4, rtol=0)
    mask = out.token_mask  # the action part is unchanged by what follows it (causal)
    torch.testing.assert_close(res["log_probs"][mask], out.log_probs[mask], atol=1e-4, rtol=0)


def test_context_budget_is_checked(policy):
    with pytest.raises(ValueError, match="context"):
        policy.act(frames(1), TASK, max_reasoning_tokens=policy.context_length)


def test_save_load_round_trip(tmp_path):
    from envs.crafter_env import crafter_codec
    from rl.model import CheckpointError
    from rl.policy import HEADS_FILE, RigPolicy

    policy = RigPolicy.from_preset("tiny", crafter_codec(), seed=3).eval()
    with torch.no_grad():
        policy.world.reward[-1].weight.normal_()
        policy.value_head.out.bias.fill_(0.25)
        policy.value_head.out.weight.normal_()
        policy.value_head.norm.mean.normal_()
        policy.value_head.norm.var.uniform_(0.5, 2.0)
        policy.action_head.weight.normal_(0.0, 0.05)
    path = policy.save(tmp_path / "ckpt", extra={"iteration": 7})
    loaded = RigPolicy.load(path, crafter_codec())
    assert loaded.heads_loaded and loaded.record["extra"] == {"iteration": 7}
    a = policy.act(frames(2, 9), TASK, 4, 1.0, torch.Generator().manual_seed(9), lookahead=1)
    b = loaded.act(frames(2, 9), TASK, 4, 1.0, torch.Generator().manual_seed(9), lookahead=1)
    for name in ("tokens", "actions", "prompt_ids", "imagined_frames"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    torch.testing.assert_close(a.log_probs, b.log_probs, atol=0, rtol=0)
    torch.testing.assert_close(a.values, b.values, atol=0, rtol=0)
    ia = policy.imagine(a, 1.0, torch.Generator().manual_seed(1))
    ib = loaded.imagine(b, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(ia.codes, ib.codes) and torch.equal(ia.reward_pred, ib.reward_pred)

    # transformers' own Janus class loads the directory as is (the heads file is ours)
    from transformers import JanusForConditionalGeneration

    JanusForConditionalGeneration.from_pretrained(path, local_files_only=True)

    # a checkpoint without heads (a supervised one) starts them fresh; a broken one is refused
    (path / HEADS_FILE).unlink()
    assert not RigPolicy.load(path, crafter_codec()).heads_loaded
    (path / HEADS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="corrupted heads file"):
        RigPolicy.load(path, crafter_codec())
    with pytest.raises(FileExistsError):
        policy.save(path)


def test_heads_with_a_hidden_layer_save_and_load_at_their_width(tmp_path):
    """``head_hidden`` comes back from the heads file; a width the file disagrees with is refused
    by name; both heads change the policy's act and value once their outputs are non-zero."""
    from envs.crafter_env import crafter_codec
    from rl.model import CheckpointError
    from rl.policy import RigPolicy

    policy = RigPolicy.from_preset("tiny", crafter_codec(), seed=3, head_hidden=16).eval()
    assert policy.value_head.inner[0].weight.shape == (16, policy.head_features)
    with torch.no_grad():
        policy.value_head.norm.var.uniform_(0.5, 2.0)
        policy.value_head.out.weight.normal_()
        policy.action_head.weight.normal_(0.0, 0.5)
    path = policy.save(tmp_path / "ckpt")
    loaded = RigPolicy.load(path, crafter_codec())
    assert loaded.heads_loaded and loaded.head_hidden == 16
    assert RigPolicy.load(path, crafter_codec(), head_hidden=16).head_hidden == 16
    a = policy.act(frames(2, 9), TASK, 0, 1.0, torch.Generator().manual_seed(9))
    b = loaded.act(frames(2, 9), TASK, 0, 1.0, torch.Generator().manual_seed(9))
    torch.testing.assert_close(a.log_probs, b.log_probs, atol=0, rtol=0)
    torch.testing.assert_close(a.values, b.values, atol=0, rtol=0)
    assert float(a.values.abs().sum()) > 0
    linear = RigPolicy.from_preset("tiny", crafter_codec(), seed=3).eval()
    c = linear.act(frames(2, 9), TASK, 0, 1.0, torch.Generator().manual_seed(9))
    assert not torch.equal(a.log_probs, c.log_probs)
    with pytest.raises(CheckpointError, match="hidden width 16 but head_hidden is 0; set "
                                              "policy.head_hidden=16"):  # fmt: skip
        RigPolicy.load(path, crafter_codec(), head_hidden=0)


@pytest.mark.parametrize("lookahead", [0, 2])
def test_plays_a_whole_crafter_episode_with_history_and_lookahead(policy, lookahead):
    """The tiny policy drives two real Crafter envs to the time limit, with a history of 2 steps
    and lookahead 0 or 2, as the env runners will."""
    from envs.vector import EpisodeTracker, make_vector

    venv = make_vector("rig/Crafter-v0", num_envs=2, length=8)
    tracker = EpisodeTracker(2)
    hist = History.empty(2, 2, 64)
    obs, _ = venv.reset(seed=lookahead)
    gen = torch.Generator().manual_seed(lookahead)
    for _ in range(8):
        out = policy.act(obs, TASK, 3, 1.0, gen, history=hist, lookahead=lookahead)
        assert out.lookahead_actions.shape == (2, lookahead)
        hist.push(obs, out.actions)
        obs, rewards, terminated, truncated, infos = venv.step(out.actions.numpy())
        hist.reset(terminated | truncated)
        tracker.step(rewards, terminated, truncated, infos)
    venv.close()
    assert len(tracker.finished) == 2 and all(e["length"] == 8 for e in tracker.finished)
    assert not hist.mask.any()  # both episodes ended: the history starts afresh


def test_value_is_a_baseline_of_the_state_alone(policy):
    """V(s) is read before anything is sampled: two act calls on the same frames with different
    sampled reasoning give the same values, ``state_values`` (the bootstrap) gives them too, and
    ``evaluate`` reads them back from the stored sequence, also with history."""
    hist = History.empty(3, 2, 64)
    hist.push(frames(3, 30), np.array([1, 2, 3]))
    hist.reset(np.array([False, True, False]))
    a = policy.act(frames(3, 5), TASK, 6, 1.0, torch.Generator().manual_seed(1), history=hist)
    b = policy.act(frames(3, 5), TASK, 6, 1.0, torch.Generator().manual_seed(2), history=hist)
    assert not torch.equal(a.tokens, b.tokens)  # different reasoning was sampled ...
    torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=0)  # ... same V(s)
    torch.testing.assert_close(policy.state_values(frames(3, 5), TASK, hist), a.values,
                               atol=1e-5, rtol=0)  # fmt: skip
    assert torch.equal(a.history_actions, hist.actions)
    with torch.no_grad():
        torch.testing.assert_close(policy.evaluate(a)["values"], a.values, atol=1e-4, rtol=0)
    ahead = policy.act(frames(3, 5), TASK, 2, 1.0, torch.Generator().manual_seed(3), history=hist,
                       lookahead=1)  # fmt: skip
    torch.testing.assert_close(ahead.values, a.values, atol=1e-5, rtol=0)  # before the lookahead
    with torch.no_grad():
        torch.testing.assert_close(policy.evaluate(ahead)["values"], a.values, atol=1e-4, rtol=0)


def test_history_after_a_step_is_what_the_next_prompt_shows(policy):
    """``History.after(out)``: the next step's history, the row's own frame and action newest."""
    hist = History.empty(2, 2, 64)
    hist.push(frames(2, 40), np.array([4, 5]))
    out = policy.act(frames(2, 6), TASK, 2, 1.0, torch.Generator().manual_seed(0), history=hist)
    nxt = History.after(out)
    expected = History(hist.frames.clone(), hist.actions.clone(), hist.mask.clone())
    expected.push(frames(2, 6), out.actions)
    assert torch.equal(nxt.frames, expected.frames) and torch.equal(nxt.mask, expected.mask)
    assert torch.equal(nxt.actions, expected.actions)


def test_forced_action_tokens_are_not_choices(policy):
    """A token the trie forces (one allowed id: an action's own continuation, END at a leaf) has
    log-prob 0 under any weights; ``choice_mask`` leaves it out of the losses' means."""
    out = act(policy, 16, seed=3)
    with torch.no_grad():
        res = policy.evaluate(out)
    choice = res["choice_mask"]
    assert torch.equal(choice & out.reasoning_mask, out.reasoning_mask)  # reasoning all counts
    forced = out.action_mask & ~choice
    assert bool(forced.any())  # every action's closing <end> at least is forced
    assert bool((out.log_probs[forced] == 0).all()) and bool((res["log_probs"][forced] == 0).all())
    nodes = policy.trie.path_nodes(out.tokens, out.action_mask)
    assert bool((policy.trie.num_choices(nodes[forced]) == 1).all())
    assert bool((policy.trie.num_choices(nodes[out.action_mask & choice]) > 1).all())


def test_heads_of_the_old_mlp_value_head_load_with_a_fresh_value_head(tmp_path):
    """A checkpoint saved before rl.heads (value_head.0/.2: an MLP on the raw state) still
    loads: its world heads are used, the value head starts fresh (V = 0), with a warning."""
    from safetensors.torch import load_file, save_file

    from envs.crafter_env import crafter_codec
    from rl.policy import HEADS_FILE, RigPolicy

    policy = RigPolicy.from_preset("tiny", crafter_codec(), seed=3).eval()
    with torch.no_grad():
        policy.world.reward[-1].weight.normal_()
    path = policy.save(tmp_path / "ckpt")
    state = {k: v for k, v in load_file(str(path / HEADS_FILE)).items()
             if not k.startswith("value_head.")}  # fmt: skip
    D = policy.value_head.out.in_features
    state.update({"value_head.0.weight": torch.ones(D, D), "value_head.0.bias": torch.ones(D),
                  "value_head.2.weight": torch.ones(1, D), "value_head.2.bias": torch.ones(1)})
    save_file(state, str(path / HEADS_FILE))
    with pytest.warns(UserWarning, match="old MLP value head"):
        loaded = RigPolicy.load(path, crafter_codec())
    torch.testing.assert_close(loaded.world.reward[-1].weight, policy.world.reward[-1].weight)
    assert torch.equal(loaded.value_head.out.weight, torch.zeros_like(loaded.value_head.out.weight))


def test_heads_saved_before_the_action_head_load_with_a_zero_one(tmp_path):
    """A heads file without ``action_head.*`` (saved before rl.heads.ActionHead) loads, its value
    and world heads used, with a zero action head: the saved policy's own distribution."""
    from safetensors.torch import load_file, save_file

    from envs.crafter_env import crafter_codec
    from rl.policy import HEADS_FILE, RigPolicy

    policy = RigPolicy.from_preset("tiny", crafter_codec(), seed=3).eval()
    with torch.no_grad():
        policy.value_head.out.weight.normal_()
    path = policy.save(tmp_path / "ckpt")
    state = {k: v for k, v in load_file(str(path / HEADS_FILE)).items()
             if not k.startswith("action_head.")}  # fmt: skip
    save_file(state, str(path / HEADS_FILE))
    loaded = RigPolicy.load(path, crafter_codec())
    assert loaded.heads_loaded
    assert torch.equal(loaded.action_head.weight, torch.zeros_like(loaded.action_head.weight))
    a = policy.act(frames(3, 4), TASK, 4, 1.0, torch.Generator().manual_seed(2))
    b = loaded.act(frames(3, 4), TASK, 4, 1.0, torch.Generator().manual_seed(2))
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.log_probs, b.log_probs, atol=0, rtol=0)
    torch.testing.assert_close(a.values, b.values, atol=0, rtol=0)


def test_the_action_head_steers_act_and_evaluate_scores_what_act_sampled(policy):
    """A large score for one root choice along the current state makes act take that action on
    every row, and evaluate recomputes the same log-probs (the head is in both)."""
    from rl.policy import value_columns

    out = act(policy, 4, seed=5, max_reasoning_tokens=0)
    col = value_columns(out.prompt_ids, out.prompt_mask, out.prompt_codes, policy.ids.reasoning)
    with torch.no_grad():
        full, _, _ = policy.forward_sequence(out)
        z = policy.state_features(full, col)  # eval: no statistics update
    tokens, edges = policy.trie.choice_edges()
    root = [int(e) for e in edges[0] if e >= 0]
    saved = policy.action_head.weight.detach().clone()
    try:
        with torch.no_grad():
            policy.action_head.weight[root] = 0.0
            policy.action_head.weight[root[-1]] = 50.0 * z.mean(0) / z.mean(0).norm() ** 2
        steered = act(policy, 4, seed=5, max_reasoning_tokens=0)
        first = [policy.trie.sequence(int(a))[0] for a in steered.actions]
        target = int(tokens[0][edges[0].tolist().index(root[-1])])
        assert first == [target] * 4, (first, target)
        with torch.no_grad():
            ev = policy.evaluate(steered)
        torch.testing.assert_close(ev["log_probs"], steered.log_probs, atol=1e-4, rtol=0)
    finally:
        with torch.no_grad():
            policy.action_head.weight.copy_(saved)


def test_frame_features_are_the_current_frames_columns_pooled_on_the_image_grid():
    """Against a loop: the G image columns before ``<end> <reasoning>``, cell means of the grid
    in row-major order; nothing from any other column (task, history, ``<reasoning>``)."""
    from rl.policy import frame_features

    B, T, D, G = 3, 30, 5, 16
    full = torch.randn(B, T, D, generator=torch.Generator().manual_seed(0))
    col = torch.tensor([29, 25, 20])  # each row's first <reasoning>
    for grid, size in ((4, 1), (2, 2), (1, 4)):  # cells of size x size image tokens
        out = frame_features(full, col, G, grid)
        want = []
        for b in range(B):
            img = full[b, col[b] - 1 - G : col[b] - 1].reshape(4, 4, D)  # row-major 4x4 grid
            want.append(torch.stack([img[i : i + size, j : j + size].mean((0, 1))
                                     for i in range(0, 4, size) for j in range(0, 4, size)]))  # fmt: skip
        torch.testing.assert_close(out, torch.stack(want).flatten(1))
    other = full.clone()
    for b in range(B):  # every column but the frame's
        keep = torch.zeros(T, dtype=torch.bool)
        keep[col[b] - 1 - G : col[b] - 1] = True
        other[b, ~keep] = 7.0
    torch.testing.assert_close(frame_features(other, col, G, 4), frame_features(full, col, G, 4))


def test_heads_that_read_the_reasoning_state_load_fresh_with_a_warning(tmp_path):
    """A heads file from when the value and action heads read the one state at ``<reasoning>``
    (D inputs) loads: world heads used, value and action heads fresh (V = 0, the LM's policy)."""
    from safetensors.torch import load_file, save_file

    from envs.crafter_env import crafter_codec
    from rl.policy import HEADS_FILE, RigPolicy

    policy = RigPolicy.from_preset("tiny", crafter_codec(), seed=3).eval()
    with torch.no_grad():
        policy.world.reward[-1].weight.normal_()
    path = policy.save(tmp_path / "ckpt")
    state = load_file(str(path / HEADS_FILE))
    D = policy.model.config.text_config.hidden_size
    assert policy.value_head.out.in_features == 16 * D  # the tiny grid, unpooled
    state.update({"value_head.out.weight": torch.ones(1, D), "value_head.norm.mean": torch.ones(D),
                  "value_head.norm.var": torch.ones(D),
                  "action_head.weight": torch.ones(len(state["action_head.weight"]), D)})  # fmt: skip
    save_file(state, str(path / HEADS_FILE))
    with pytest.warns(UserWarning, match="state at <reasoning>"):
        loaded = RigPolicy.load(path, crafter_codec())
    torch.testing.assert_close(loaded.world.reward[-1].weight, policy.world.reward[-1].weight)
    assert not loaded.value_head.out.weight.any() and not loaded.action_head.weight.any()


def test_a_policy_that_sees_reconstructions_reads_every_frame_through_its_vq(tmp_path):
    """``sees="reconstructions"``: act, evaluate and state_values read decode(encode(x)) of the
    current and the history's frames, exactly what a policy that sees frames does given those
    reconstructions; evaluate still recomputes act; the choice survives save and load (a heads
    file without it means frames) and an explicit ``sees`` overrides the file's."""
    from safetensors.torch import load_file, save_file

    from envs.crafter_env import crafter_codec
    from rl.policy import HEADS_FILE, RigPolicy

    sees = RigPolicy.from_preset("tiny", crafter_codec(), seed=3, sees="reconstructions").eval()
    plain = RigPolicy.from_preset("tiny", crafter_codec(), seed=3).eval()
    with torch.no_grad():
        sees.value_head.out.weight.normal_()
        sees.action_head.weight.normal_(0.0, 0.5)
    plain.load_state_dict(sees.state_dict())
    x, past = frames(3, 9), frames(3, 10)
    r, r_past = sees.reconstruct(x), sees.reconstruct(past)
    assert r.shape == x.shape and r.dtype == torch.uint8 and not torch.equal(r, torch.as_tensor(x))
    history = History.empty(3, 1, 64)
    history.push(past, np.array([1, 2, 3]))
    seen_history = History.empty(3, 1, 64)
    seen_history.push(r_past, np.array([1, 2, 3]))

    a = sees.act(x, TASK, 4, 1.0, torch.Generator().manual_seed(9), history=history)
    b = plain.act(r, TASK, 4, 1.0, torch.Generator().manual_seed(9), history=seen_history)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.actions, b.actions)
    torch.testing.assert_close(a.log_probs, b.log_probs, atol=1e-4, rtol=0)
    torch.testing.assert_close(a.values, b.values, atol=1e-4, rtol=1e-4)
    assert torch.equal(a.frames.cpu(), torch.as_tensor(x))  # the rows keep the env's frames
    with torch.no_grad():
        res = sees.evaluate(a)
    mask = a.token_mask
    torch.testing.assert_close(res["log_probs"][mask], a.log_probs[mask], atol=1e-4, rtol=0)
    torch.testing.assert_close(res["values"], a.values, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sees.state_values(x, TASK, history),
                               plain.state_values(r, TASK, seen_history), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(plain.state_values(x, TASK, history), a.values, atol=1e-3)

    path = sees.save(tmp_path / "ckpt")
    assert RigPolicy.load(path, crafter_codec()).sees == "reconstructions"
    assert RigPolicy.load(path, crafter_codec(), sees="frames").sees == "frames"
    file = str(path / HEADS_FILE)
    save_file(load_file(file), file)  # a heads file from before the choice was recorded
    assert RigPolicy.load(path, crafter_codec()).sees == "frames"
    with pytest.raises(ValueError, match="sees must be one of"):
        RigPolicy.from_preset("tiny", crafter_codec(), sees="pixels")
