"""The VQ tokenizer's training (supervised/vq.py) and `rig tokenizer train`'s user errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rig.errors import UserError
from supervised import vq as vqlib


def slow_psnr(a: np.ndarray, b: np.ndarray) -> list[float]:
    """Per-frame PSNR with plain Python loops over every pixel value."""
    out = []
    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        total, n = 0.0, 0
        for row_x, row_y in zip(x, y, strict=True):
            for px, py in zip(row_x, row_y, strict=True):
                for cx, cy in zip(px, py, strict=True):
                    total += (cx - cy) ** 2
                    n += 1
        mse = total / n
        out.append(vqlib.PSNR_CAP if mse == 0 else 10 * math.log10(255**2 / mse))
    return out


def test_psnr_matches_slow_reference():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 5, 4, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    b[2] = a[2]  # an exact reconstruction: capped, not infinite
    np.testing.assert_allclose(vqlib.psnr(b, a), slow_psnr(b, a), rtol=1e-12)
    assert vqlib.psnr(b, a)[2] == vqlib.PSNR_CAP
    # every channel off by one: MSE 1 -> 20 log10(255)
    assert vqlib.psnr(a[:1] // 2 * 2, a[:1] // 2 * 2 + 1)[0] == pytest.approx(48.1308, abs=1e-4)


def test_foreground_psnr_reads_only_the_pixels_that_move():
    """PSNR over the pixels that differ from the background, against plain loops; a
    reconstruction that drops a small object keeps a high PSNR and a low foreground one (the
    Catch tokenizer that lost the ball: 23 dB overall, 10 dB on the moving pixels)."""
    rng = np.random.default_rng(0)
    back = np.zeros((16, 16, 3), np.uint8)
    back[:, :, 1] = 40
    frames = np.repeat(back[None], 3, 0)
    frames[0, 2:4, 5:7] = (255, 80, 80)  # a 2x2 ball
    frames[1, 10:12, 0:2] = (255, 80, 80)
    pred = np.clip(frames.astype(int) + rng.integers(-9, 10, frames.shape), 0, 255).astype(np.uint8)
    got = vqlib.foreground_psnr(pred, frames, back)
    for i in (0, 1):
        moving = [(r, c) for r in range(16) for c in range(16) if (frames[i, r, c] != back[r, c]).any()]
        assert len(moving) == 4
        mse = sum((int(pred[i, r, c, ch]) - int(frames[i, r, c, ch])) ** 2
                  for r, c in moving for ch in range(3)) / (3 * len(moving))  # fmt: skip
        assert got[i] == pytest.approx(10 * math.log10(255**2 / mse), rel=1e-12)
    assert np.isnan(got[2])  # nothing moves in frame 2
    dropped = np.repeat(back[None], 3, 0)  # the ball erased
    assert vqlib.psnr(dropped, frames)[0] > 20 and vqlib.foreground_psnr(dropped, frames, back)[0] < 5
    assert np.array_equal(vqlib.background(frames), back)


def test_code_consistency_counts_repeated_patches_with_their_usual_code():
    """The share of repeated patch contents coded by their content's most common code, against
    a count by hand: 2x2 frames of 2 px patches (4 codes each)."""
    a, b, c = (np.full((2, 2, 3), v, np.uint8) for v in (0, 100, 200))
    def frame(t0, t1, t2, t3):  # four 2x2 tiles, row-major, into one 4x4 frame
        return np.concatenate([np.concatenate([t0, t1], 1), np.concatenate([t2, t3], 1)], 0)
    frames = np.stack([frame(a, a, b, c), frame(a, a, b, b), frame(a, b, a, a)])
    assert frames.shape == (3, 4, 4, 3)
    codes = np.array([[7, 7, 1, 9], [7, 8, 1, 1], [6, 1, 7, 7]])
    # content a: 7 patches, codes 7,7,7,8,6,7,7 -> 5 usual; b: 4 patches, codes 1,1,1,1 -> 4;
    # c occurs once and is left out
    assert vqlib.code_consistency(frames, codes) == pytest.approx(9 / 11)
    by_content = np.where(frames[:, ::2, ::2, 0] == 0, 7, 1).reshape(3, 4)  # one code per content
    assert vqlib.code_consistency(frames, by_content) == 1.0
    unique = np.arange(48, dtype=np.uint8).reshape(1, 4, 4, 3)  # no content repeats
    assert np.isnan(vqlib.code_consistency(unique, codes[:1]))


def test_a_tokenizer_that_draws_the_moving_pixels_badly_is_warned_about():
    """The figures of Catch's two tokenizers: the one that lost the ball (23.1 dB, 10.0 dB on
    the moving pixels) is warned about, the one that keeps it (31.7, 29.1) is not."""
    lost = vqlib.foreground_warning({"psnr": 23.1, "psnr_foreground": 10.0})
    assert lost is not None and lost.startswith("warning: the moving pixels reconstruct at 10.0 dB")
    assert "13.1 dB below" in lost and "\n" not in lost
    assert vqlib.foreground_warning({"psnr": 31.7, "psnr_foreground": 29.1}) is None
    assert vqlib.foreground_warning({"psnr": 31.5, "psnr_foreground": 34.5}) is None


def test_split_holds_out_whole_episodes():
    episode = np.repeat(np.arange(5), 10)
    frames = np.arange(50)[:, None, None, None].repeat(2, 1).astype(np.uint8)
    train, held = vqlib.split_by_episode(frames, episode, heldout_fraction=0.3)
    assert len(held) == 20 and len(train) == 30  # episodes 3 and 4, never part of one
    assert set(held[:, 0, 0, 0]) == set(range(30, 50))


@pytest.fixture(scope="module")
def crafter_frames():
    frames, episode = vqlib.frames_from_env(16, seed=0, episode_steps=64, stride=4)
    assert frames.shape == (16, 64, 64, 3) and frames.dtype == np.uint8
    assert len(np.unique(episode)) == 1  # 16 frames of one 64-step episode
    return frames


@pytest.fixture(scope="module")
def trained(crafter_frames):
    """The tiny preset's VQ, evaluated, trained 25 steps on 12 frames (32 px crops), evaluated."""
    import torch

    torch.set_num_threads(1)
    vq, _ = vqlib.vq_from_preset("tiny", seed=0)
    data = vqlib.Frames(crafter_frames[:12], crafter_frames[12:], "test")
    before = vqlib.evaluate(vq, data.train)["psnr"]
    losses = []
    settings = vqlib.TrainSettings(
        steps=25, batch_size=6, lr=3e-3, warmup=3, crop=32, eval_every=20, target_psnr=None
    )
    report = vqlib.train_vq(vq, data, settings, lambda step, m: losses.append(m["loss"]))
    after = vqlib.evaluate(vq, data.train)["psnr"]
    return vq, report, losses, before, after


def test_training_lowers_loss_and_raises_psnr(trained):
    vq, report, losses, before, after = trained
    assert report["steps_done"] == 25 and len(losses) == 25
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5])
    assert after > before + 2.5, (before, after)
    assert [h["step"] for h in report["history"]] == [20]
    assert report["heldout"]["psnr"] > before
    norms = vq.quantize.embedding.weight.norm(dim=1)  # encode's argmin relies on unit codes
    np.testing.assert_allclose(norms.detach().numpy(), 1.0, atol=1e-5)


def test_saved_vq_loads_into_policy_with_identical_codes(trained, crafter_frames, tmp_path):
    from envs.crafter_env import crafter_codec
    from rl.imagine import decode_codes, frame_codes
    from rl.policy import RigPolicy

    vq, report, *_ = trained
    out = vqlib.save_vq(vq, tmp_path / "tok", report)
    assert {p.name for p in out.iterdir()} == {"vq.safetensors", "vq_config.json", "report.json"}
    want, codes = vqlib.reconstruct(vq, crafter_frames)

    policy = RigPolicy.from_preset("tiny", crafter_codec(), seed=1)
    assert not np.array_equal(frame_codes(policy, crafter_frames).numpy(), codes)
    assert vqlib.load_vq_into(policy, out) is policy
    got = frame_codes(policy, crafter_frames)
    np.testing.assert_array_equal(got.numpy(), codes)
    np.testing.assert_array_equal(decode_codes(policy, got).numpy(), want)

    # into a saved checkpoint directory: RigPolicy.load then gives the same codes
    fresh = RigPolicy.from_preset("tiny", crafter_codec(), seed=2)
    vqlib.load_vq_into(fresh.model, out)  # a bare JanusForConditionalGeneration works too
    np.testing.assert_array_equal(frame_codes(fresh, crafter_frames).numpy(), codes)
    fresh = RigPolicy.from_preset("tiny", crafter_codec(), seed=2)
    ckpt = fresh.save(tmp_path / "ckpt")
    vqlib.write_vq_into_checkpoint(ckpt, out)
    loaded = RigPolicy.load(ckpt, crafter_codec())
    np.testing.assert_array_equal(frame_codes(loaded, crafter_frames).numpy(), codes)
    assert loaded.heads_loaded


def test_vq_of_another_preset_is_refused(trained, tmp_path):
    vq, report, *_ = trained
    out = vqlib.save_vq(vq, tmp_path / "tok", report)
    other = tmp_path / "other.yaml"
    other.write_text(
        (vqlib.Path(__file__).parent.parent / "configs/policy/tiny.yaml")
        .read_text()
        .replace("num_embeddings: 512", "num_embeddings: 256")
    )
    small_vq, _ = vqlib.vq_from_preset(other)
    with pytest.raises(UserError, match="do not fit this model's VQ"):
        vqlib.load_vq_into(small_vq, out)


def test_wrong_frame_size_is_a_user_error():
    with pytest.raises(UserError, match="frames are 32x32 but the preset's VQ reads 64x64"):
        vqlib.check_frames(np.zeros((2, 32, 32, 3), np.uint8), 64, "--dataset d")


def test_dataset_frames_label_episodes_and_wrong_size_exits_2(tmp_path, capsys):
    from rig.cli import main
    from supervised.dataset import DatasetWriter

    path = tmp_path / "data"
    with DatasetWriter(path, size=32, env_id="rig/Crafter-v0", agent="test") as writer:
        for k, length in enumerate((3, 5, 2)):
            frames = np.full((length + 1, 32, 32, 3), k, np.uint8)
            writer.add_episode({"frames": frames, "episode_id": k, "world_seed": k,
                                "action": np.zeros(length, np.int64)})  # fmt: skip
    frames, episode = vqlib.dataset_frames(path)
    assert frames.shape == (4 + 6 + 3, 32, 32, 3)
    np.testing.assert_array_equal(episode, frames[:, 0, 0, 0])
    sub, sub_episode = vqlib.dataset_frames(path, max_frames=5, seed=1)
    np.testing.assert_array_equal(sub_episode, sub[:, 0, 0, 0])

    args = [
        "tokenizer",
        "train",
        "--dataset",
        str(path),
        "--no-track",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --dataset") and "32x32" in err and "\n" not in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "no/such/dir"], "no such dataset folder"),
        ([], "give exactly one of --dataset DIR or --frames-from-env N"),
        (["--frames-from-env", "4", "--preset", "nope"], "unknown policy preset"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(args, message, tmp_path, capsys):
    from rig.cli import main

    code = main(["tokenizer", "train", *args, "--no-track", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err


def test_cli_trains_and_reports_the_moving_pixels_and_code_consistency(tmp_path, capsys):
    """`rig tokenizer train` end to end on a few expert frames: exit 0, the last lines name the
    moving pixels' PSNR and the code consistency, and report.json holds them."""
    import json

    from rig.cli import main

    out = tmp_path / "vq"
    code = main(["tokenizer", "train", "--frames-from-env", "40", "--steps", "3",
                 "--eval-every", "2", "--no-track", "--out", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0 and "on the moving pixels" in printed and "code consistency" in printed
    held = json.loads((out / vqlib.REPORT_FILE).read_text())["heldout"]
    assert {"psnr", "psnr_foreground", "code_consistency"} <= set(held)
    assert json.loads((out / vqlib.REPORT_FILE).read_text())["settings"]["foreground"] == 1.0
