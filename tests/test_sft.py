"""SFT and evaluation (supervised/sft.py, supervised/evaluate.py, `rig sft`, `rig eval`).

Component tier: the sequence SFT builds is act's, token for token, and scores what act samples;
review masks; then the whole chain on two short scripted Crafter episodes: SFT lowers the loss,
its checkpoint loads, runs one `rig train --init-from` iteration and plays in `rig eval`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")

from rig.cli import main  # noqa: E402
from rl.policy import History  # noqa: E402
from supervised.sft import (  # noqa: E402
    ACTION,
    IMAGE,
    NONE,
    REASONING,
    Decision,
    Example,
    SftData,
    build_batch,
    token_log_probs,
)

TASK = "collect wood for a table"
ROOT = Path(__file__).resolve().parents[1]
QUIET = ["tracking.system_metrics=false"]
DEBUG = str(ROOT / "configs" / "debug.yaml")
# tests/test_train.py's in-process FAST overrides: 1 runner x 2 envs x 4 steps, tiny imagination
FAST = [
    "rollout.num_env_runners=0", "env.num_envs=2", "rollout.fragment_length=4",
    "imagination.num_actors=0", "imagination.num_starts=2", "imagination.horizon=2",
    "imagination.gate=open", "policy.max_reasoning_tokens=2", "env.kwargs.length=6",
    "tracking.system_metrics=false", "policy.history=1",
]  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: the test machine's 2 cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# -- the sequence layout --------------------------------------------------------------------------


def _parse(policy, out, history, b: int) -> Example:
    """Example whose teacher-forced sequence should be act's row ``b``: proposals read back
    from act's prompt (reasoning ids, action, imagined codes), the decision from its tokens."""
    p, G = policy.ids, policy.image_tokens
    base_ids, base_mask = policy.prompt(TASK, out.frames.shape[0], history)
    seq = out.prompt_ids[b][out.prompt_mask[b]].tolist()
    i = int(base_mask[b].sum())
    assert seq[:i] == base_ids[b][base_mask[b]].tolist()  # act's prompt starts the row
    proposals = []
    for a in out.lookahead_actions[b].tolist():
        end = seq.index(p.end, i)
        reasoning = seq[i:end]
        i = end + 2 + len(policy.trie.sequence(a))  # <end> <action> a .. <end>
        assert seq[i] == p.imagine
        codes = torch.tensor(seq[i + 1 : i + 1 + G])
        i += 1 + G
        assert seq[i] == p.end
        i += 2 if seq[i + 1] == p.reasoning else 3  # <end> [<review>] <reasoning>
        proposals.append(Decision([(reasoning, True)], a, codes))
    row = out.tokens[b][out.attention_mask[b]].tolist()
    final = Decision([(row[: row.index(p.end)], True)], int(out.actions[b]), torch.zeros(G).long())
    return Example(out.frames[b], history.frames[b], history.actions[b].tolist(),
                   history.mask[b].tolist(), proposals, final)  # fmt: skip


@pytest.mark.parametrize("lookahead", [0, 2])
def test_batch_is_acts_sequence_token_for_token(tiny_policy, lookahead):
    policy = tiny_policy
    rng = np.random.default_rng(lookahead)
    frames = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    hist = History.empty(3, 1, 64)
    hist.push(rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8), np.array([1, 5, 2]))
    hist.reset(np.array([False, True, False]))  # row 1 starts an episode
    gen = torch.Generator().manual_seed(lookahead)
    out = policy.act(frames, TASK, 6, 1.0, gen, history=hist, lookahead=lookahead)
    examples = [_parse(policy, out, hist, b) for b in range(3)]
    if lookahead:  # the parse is right when the proposals' codes are act's imagined codes
        assert all(len(e.proposals) == lookahead for e in examples)
    batch = build_batch(policy, examples, TASK, max_reasoning_tokens=6)
    a = batch.act
    # the generated columns are act's, column for column (same lockstep padding)
    for name in ("tokens", "attention_mask", "reasoning_mask", "action_mask", "actions"):
        assert torch.equal(getattr(a, name), getattr(out, name)), name
    # the prompt holds the same attended sequence per row (act leaves lockstep holes in it)
    for b in range(3):
        assert a.prompt_ids[b][a.prompt_mask[b]].tolist() == (
            out.prompt_ids[b][out.prompt_mask[b]].tolist()
        )
        assert torch.equal(
            a.prompt_codes[b][a.prompt_mask[b]], out.prompt_codes[b][out.prompt_mask[b]]
        )
    assert torch.equal(a.history_mask, out.history_mask)
    # SFT scores exactly what act sampled: log-probs of the decision's tokens agree
    with torch.no_grad():
        scored = token_log_probs(policy, batch)
    mine = torch.zeros(batch.kinds.shape)  # (B, T) log-prob of each supervised token
    for kind in (REASONING, ACTION, IMAGE):
        mine[:, 1:][batch.kinds[:, 1:] == kind] = scored[kind][0]
    P, L = a.prompt_length, a.tokens.shape[1]
    generated = mine[:, P : P + L][out.token_mask]
    assert torch.allclose(generated, out.log_probs[out.token_mask], atol=1e-4)
    if lookahead:  # proposals' reasoning, action and codes are supervised in the prompt too
        prompt_kinds = batch.kinds[:, : a.prompt_length]
        assert int((prompt_kinds == IMAGE).sum()) == 3 * lookahead * policy.image_tokens
        assert bool((prompt_kinds == ACTION).any()) and bool((prompt_kinds == REASONING).any())


def test_scores_equal_evaluate_and_padding_has_no_loss(tiny_policy):
    """At lookahead 0 the SFT heads are evaluate's: same log-probs of reasoning and action
    tokens, same next-frame logits; padding and forced markers carry no loss."""
    policy, G = tiny_policy, tiny_policy.image_tokens
    rng = np.random.default_rng(3)
    frames = torch.as_tensor(rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8))
    empty = torch.zeros(0, 64, 64, 3, dtype=torch.uint8)
    ids = [policy.tok(t, add_special_tokens=False)["input_ids"] for t in ("a tree is near", "go")]
    examples = [
        Example(frames[b], empty, [], [], [],
                Decision([(ids[b], True)], b + 3, torch.randint(0, 512, (G,))))
        for b in range(2)
    ]  # fmt: skip
    batch = build_batch(policy, examples, TASK, max_reasoning_tokens=16)
    with torch.no_grad():
        ev = policy.evaluate(batch.act, batch.next_codes)
        scored = token_log_probs(policy, batch)
    a = batch.act
    assert torch.allclose(ev["log_probs"][a.reasoning_mask], scored[REASONING][0], atol=1e-5)
    assert torch.allclose(ev["log_probs"][a.action_mask], scored[ACTION][0], atol=1e-5)
    frame_lp = torch.log_softmax(ev["next_frame_logits"], -1)
    frame_lp = frame_lp.gather(-1, batch.next_codes[..., None]).squeeze(-1)
    assert torch.allclose(frame_lp.flatten(), scored[IMAGE][0], atol=1e-5)
    G = policy.image_tokens
    codes = torch.zeros_like(batch.kinds, dtype=torch.bool)  # columns holding VQ codes
    codes[:, : a.prompt_length] = a.prompt_codes
    codes[:, -G:] = True
    text = ~codes
    for marker in ("pad", "action", "imagine", "reasoning", "bos", "task", "image", "observation"):
        assert not bool((batch.kinds[text & (batch.ids == getattr(policy.ids, marker))] > 0).any())
    assert bool((batch.kinds[codes] == IMAGE).all())
    # row 1's reasoning (2 tokens) is padded to row 0's length: the pad columns are not attended
    assert int(a.attention_mask[1].logical_not().sum()) > 0
    assert int(a.reasoning_mask.sum()) == len(ids[0]) + 1 + len(ids[1]) + 1


# -- a tiny dataset -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two scripted Crafter episodes of 30 steps on a 16x16 map: S1, S2 reasoning, S4 chains."""
    from supervised.collect import collect
    from supervised.stages import imagine, reason

    root = tmp_path_factory.mktemp("sftdata")
    collect(root / "s1", env_id="rig/Crafter-v0", size=64,
            env_kwargs={"length": 30, "area": [16, 16]}, agent="scripted", episodes=2)  # fmt: skip
    reason(root / "s1", root / "s2")
    imagine(root / "s2", root / "s4", lookahead=2)
    return root


def _with_review(src: Path, dst: Path, wrong: str, right: str) -> None:
    """A copy of ``src`` where step 3 of every episode is an S3-reviewed step."""
    from supervised import DatasetWriter, open_dataset
    from supervised.dataset import writable

    reader = open_dataset(src)
    card = {k: reader.card.get(k) for k in ("env_id", "env_kwargs", "size", "agent", "seed")}
    with DatasetWriter(dst, **card, stage="review") as writer:
        for ep in reader.episodes():
            ep = writable(ep)
            n = len(ep["action"])
            ep["review"] = np.arange(n) == 3
            ep["review_text"] = np.array([[wrong, f"Wait! Let's re-observe... {right}"]] * n)
            ep["review_loss"] = np.tile([False, True], (n, 1))
            ep["review_right_action"] = np.array(["do"] * n)
            writer.add_episode(ep)


def test_review_wrong_part_is_context_only(tiny_policy, dataset):
    policy = tiny_policy
    _with_review(dataset / "s4", dataset / "s3", "go left to the lava", "drink the water")
    data = SftData(dataset / "s3")
    data.encode(policy)
    cache: dict = {}
    step = 3  # episode 0, step 3
    batch = build_batch(policy, [data.example(policy, step, 2, 0, cache)], TASK, 64)
    ids, kinds = batch.ids[0], batch.kinds[0]
    wrong = policy.tok("go left to the lava", add_special_tokens=False)["input_ids"]
    right = policy.tok(" Wait! Let's re-observe... drink the water",
                       add_special_tokens=False)["input_ids"]  # fmt: skip
    P = batch.act.prompt_length
    gen_ids, gen_kinds = ids[P:].tolist(), kinds[P:].tolist()
    assert gen_ids[: len(wrong) + len(right)] == wrong + right
    assert gen_kinds[: len(wrong)] == [NONE] * len(wrong)  # the wrong part: no loss
    assert gen_kinds[len(wrong) : len(wrong) + len(right) + 1] == [REASONING] * (len(right) + 1)
    assert batch.act.action_texts == ["do"]  # the expert's action is the decision
    # the real next frame followed the recorded action, not "do": its codes are context only
    recorded = str(data.fields["action_text"][step])
    assert bool((kinds[-policy.image_tokens :] == IMAGE).all()) == (recorded == "do")
    # the lookahead chain is real: proposal codes are the real future frames' codes
    codes = batch.ids[0, :P][batch.act.prompt_codes[0]].view(2, -1)
    f = int(data.frame_of[step])
    assert torch.equal(codes, data.codes[f + 1 : f + 3])


# -- the commands ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_run(dataset, tmp_path_factory):
    """`rig sft` for 30 steps on the tiny dataset (lookahead stage), in-process."""
    out = tmp_path_factory.mktemp("sft") / "out"
    code = main(["sft", "--dataset", str(dataset / "s4"), "--stage", "lookahead", "--steps", "30",
                 "--batch-size", "4", "--lr", "1e-3", "--max-reasoning-tokens", "8",
                 "--eval-every", "15", "--save-every", "10", "--history", "1", "--out", str(out),
                 *QUIET])  # fmt: skip
    assert code == 0
    return out


@pytest.mark.slow
def test_sft_lowers_the_loss_and_writes_checkpoints(sft_run):
    import mlflow

    from envs.crafter_env import crafter_codec
    from rig.tracking import saved_run_id
    from rl.policy import RigPolicy

    report = json.loads((sft_run / "sft.json").read_text())
    first, last = report["first_loss"], report["record"]["metrics"]["loss/sft"]
    assert last < 0.8 * first, (first, last)
    names = sorted(p.name for p in (sft_run / "checkpoints").iterdir())
    assert names == ["step_000010", "step_000020"]  # every 10 steps, the last 2 kept
    policy = RigPolicy.load(sft_run / "final", crafter_codec())
    sft = policy.record["extra"]["sft"]
    assert sft["step"] == 30 and sft["env_id"] == "rig/Crafter-v0" and sft["history"] == 1
    assert policy.heads_loaded
    client = mlflow.MlflowClient(f"sqlite:///{sft_run.parent / 'mlflow.db'}")
    run = client.get_run(saved_run_id(sft_run))
    for key in ("loss/sft", "ce/reasoning", "ce/action", "ce/image", "accuracy/reasoning",
                "accuracy/action", "accuracy/image", "heldout/loss/sft",
                "heldout_lookahead2/loss/sft", "heldout/imagined_psnr"):  # fmt: skip
        assert key in run.data.metrics, key
    images = client.list_artifacts(run.info.run_id, "imagination")
    assert len(images) == 3  # steps 1, 15, 30


@pytest.mark.slow
def test_checkpoint_runs_in_rig_train(sft_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--config", DEBUG, *FAST, "train.iterations=1",
                 "--init-from", str(sft_run / "final")])  # fmt: skip
    assert code == 0
    assert any((tmp_path / "runs").glob("*-train-*/export/model.safetensors"))


@pytest.mark.slow
def test_actions_only_sft_with_mlp_heads_feeds_rl_and_eval(dataset, tmp_path, capsys, monkeypatch):
    """`--max-reasoning-tokens 0` trains on actions (and frames) alone, written as act writes a
    cap of 0 (a forced ``<end>``, no reasoning in the loss), and `policy.head_hidden` is honoured:
    the checkpoint is one `rig train --init-from` with the same head width takes, and `rig eval`
    plays it at the SFT's cap of 0 (not the config's)."""
    from envs.crafter_env import crafter_codec
    from rl.policy import RigPolicy

    out = tmp_path / "bc"
    code, _, err = run_cli(capsys, "sft", "--dataset", dataset / "s1", "--steps", 4,
                           "--batch-size", 2, "--max-reasoning-tokens", 0, "--eval-every", 4,
                           "--out", out, "policy.head_hidden=8", *QUIET)  # fmt: skip
    assert code == 0, err
    policy = RigPolicy.load(out / "final", crafter_codec())
    assert policy.head_hidden == 8 and policy.record["extra"]["sft"]["max_reasoning_tokens"] == 0
    data = SftData(dataset / "s1")
    data.encode(policy)
    batch = build_batch(policy, [data.example(policy, 0, 0, 0, {})], TASK, 0)
    assert not bool((batch.kinds == REASONING).any())  # nothing of the reasoning is trained
    assert bool((batch.kinds == ACTION).any())

    code, _, err = run_cli(capsys, "eval", "--checkpoint", out / "final", "--episodes", 1,
                           "--num-envs", 1, "--out", tmp_path / "ev", "env.kwargs.length=4",
                           *QUIET)  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["settings"]["max_reasoning_tokens"] == 0

    monkeypatch.chdir(tmp_path)
    code = main(["train", "--config", DEBUG, *FAST, "train.iterations=1", "policy.head_hidden=8",
                 "policy.max_reasoning_tokens=0", "--init-from", str(out / "final")])  # fmt: skip
    assert code == 0


@pytest.mark.slow
def test_eval_reports_scores_psnr_and_a_video(sft_run, tmp_path, capsys):
    out = tmp_path / "eval"
    code, stdout, err = run_cli(
        capsys, "eval", "--checkpoint", sft_run / "final", "--episodes", 2, "--num-envs", 2,
        "--lookahead", 1, "--max-reasoning-tokens", 4, "--out", out, "env.kwargs.length=6", *QUIET,
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert len(report["episodes"]) == 2 and report["settings"]["lookahead"] == 1
    assert report["settings"]["history"] == 1  # the SFT's, from the checkpoint
    summary = report["summary"]
    assert {"return_mean", "length_mean", "score", "success_rates"} <= set(summary)
    assert np.isfinite(report["psnr"]["mean"]) and report["psnr"]["frames"] >= 12
    assert (out / "video.mp4").stat().st_size > 0
    assert "Crafter score" in stdout and "PSNR" in stdout


# -- bad input ------------------------------------------------------------------------------------


def _one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, (word, err)


def test_sft_bad_input_is_one_line_and_writes_nothing(dataset, tmp_path, capsys):
    from supervised import DatasetWriter

    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "sft", "--dataset", tmp_path / "nope", "--out", out, *QUIET)
    _one_line_error(code, err, "nope")
    code, _, err = run_cli(capsys, "sft", "--dataset", dataset / "s2", "--stage", "lookahead",
                           "--out", out, *QUIET)  # fmt: skip
    _one_line_error(code, err, "rig data imagine")
    code, _, err = run_cli(capsys, "sft", "--dataset", dataset / "s2", "--stage", "wrong")
    _one_line_error(code, err, "--stage")
    code, _, err = run_cli(capsys, "sft", "--dataset", dataset / "s2", "--init-from",
                           tmp_path / "missing", "--out", out, *QUIET)  # fmt: skip
    _one_line_error(code, err, "--init-from")
    # frames of another size than the preset sees
    rng = np.random.default_rng(0)
    small = {"env_id": "rig/Crafter-v0", "size": 32, "env_kwargs": {}}
    with DatasetWriter(tmp_path / "small", **small) as writer:
        writer.add_episode({"frames": rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8),
                            "action": np.array([0, 1], np.int16),
                            "action_text": np.array(["noop", "move_left"]),
                            "episode_id": 0, "world_seed": 1})  # fmt: skip
    code, _, err = run_cli(capsys, "sft", "--dataset", tmp_path / "small", "--out", out, *QUIET)
    _one_line_error(code, err, "32x32", "64x64")
    # actions of another codec
    with DatasetWriter(tmp_path / "other", **{**small, "size": 64}) as writer:
        writer.add_episode({"frames": rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8),
                            "action": np.array([0, 1], np.int16),
                            "action_text": np.array(["forward", "jump"]),
                            "episode_id": 0, "world_seed": 1})  # fmt: skip
    code, _, err = run_cli(capsys, "sft", "--dataset", tmp_path / "other", "--out", out, *QUIET)
    _one_line_error(code, err, "codec")
    assert not out.exists()
    # an existing output folder is refused and left as it was
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "sft", "--dataset", dataset / "s2", "--out", out, *QUIET)
    _one_line_error(code, err, "--out")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_eval_bad_input_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "eval", "--checkpoint", tmp_path / "nope", "--out",
                           tmp_path / "e", *QUIET)  # fmt: skip
    _one_line_error(code, err, "--checkpoint", "nope")
    assert not (tmp_path / "e").exists()
