"""The RL loop learns (whole-loop tier): `rig train`'s Trainer, in-process, on ColorBandit
(envs/bandit.py), where the right action is the frame's colour. A fixed env-step budget and a
fixed seed, not a timed test: after 1,024 env steps the tiny policy, from scratch, must earn
clearly more than a policy that ignores the frame. Any bookkeeping error between env step and
weight update (rewards, values or log-probs of another row or token) keeps it at random."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]
LENGTH = 8  # steps per episode
ITERATIONS = 16  # x 8 envs x 8 steps = 1,024 env steps


def test_the_loop_learns_a_pixel_bandit_from_scratch(tmp_path):
    from envs.bandit import RANDOM_RETURN_PER_STEP
    from rig.config import load_config
    from rig.train import Trainer

    cfg = load_config(str(ROOT / "configs" / "catch.yaml"), [
        "env.id=rig/ColorBandit-v0", f"env.kwargs={{length: {LENGTH}}}",
        "rollout.num_env_runners=0", "env.num_envs=8", "rollout.fragment_length=8",
        "ppo.minibatch_size=32", f"train.iterations={ITERATIONS}", "train.checkpoint_every=1000",
        "train.keep_checkpoints=1", "train.export_at_end=false", "tracking.system_metrics=false",
        f"run.output_dir={tmp_path}",
    ])  # fmt: skip
    logged: list[dict] = []

    class Tracker:
        def log_metrics(self, metrics, step):
            logged.append(dict(metrics))

        def log_text(self, *args):
            pass

        def log_image(self, *args):
            pass

    trainer = Trainer(cfg, tmp_path / "run")
    try:
        trainer.run(Tracker())
    finally:
        trainer.close()

    def per_step(rows):  # episode-weighted mean return per step
        n = sum(r.get("episode/count", 0) for r in rows)
        total = sum(r["episode/return_mean"] * r["episode/count"] for r in rows if r.get("episode/count"))
        return total / max(n, 1) / LENGTH

    first, last = per_step(logged[:2]), per_step(logged[-3:])
    print(f"ColorBandit return per step: first 2 iterations {first:+.2f}, last 3 {last:+.2f}")
    assert first < 0.2, first  # from scratch: about random (-1/3 per step)
    assert last > 0.4 and last > RANDOM_RETURN_PER_STEP + 0.7, (first, last)  # >= 70% right
    # the diagnostics a broken loop is seen by are logged every iteration
    for key in ("value/explained_variance", "policy/approx_kl", "policy/clip_frac",
                "policy/action_entropy", "advantage/std", "grad_norm/policy", "grad_norm/value"):
        assert np.isfinite(logged[-1][key]), key
