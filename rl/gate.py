"""The imagination gate: imagined rows enter the loss only once the world model has earned it.

Dyna with warm-up (Dedieu et al. 2025, the Craftax-Classic record at 1M steps) adds imagined
data only once the model is good. "Good" is measured here, not assumed from a training
accuracy: on REAL transitions the learner has not trained on (each iteration's fresh batch,
checked before its update), the world model must beat the trivial predictor of each thing it
predicts::

    what it predicts       the world model (what imagination uses)   the trivial baseline
    next frame's codes     ``RigPolicy.imagine``'s sampled codes      the current frame's codes
                           (accuracy against the real next codes)     ("copy the current frame")
    next frame's pixels    those codes decoded (PSNR to the real      the current frame's codes
                           next frame)                                decoded (the same VQ ceiling)
    reward                 the reward head after the imagined frame  the mean real reward of the
                           (mean squared error)                      earlier iterations
    episode goes on        the continue head (log loss)              the real continue rate of the
                                                                     earlier iterations
    the next state's value the critic on the imagined next frame     the critic on the current
                           (|V(imagined s') - V(s')|, s' the real     frame (|V(s) - V(s')|: "the
                           next frame, both with s_t, a_t as the      value does not change")
                           newest history step)

``world/value_error_reconstruction`` (logged, not compared) is the critic on the real next frame's
VQ reconstruction: the part of ``value_error`` the tokenizer alone makes.

The last row is what imagined advantages are built on: a lambda-return bootstraps from the
critic's value of imagined frames, so a world model whose frames the critic reads differently
from the real ones turns the imagined rows' advantages into noise, however many codes it gets
right (on Catch at 10k env steps: 0.7 of the codes right, the imagined rows' value EV -4 to -30).

The two constants are fitted on earlier iterations' real transitions only
(:class:`RunningConstants`), so every comparison is on data neither side trained on. The gate
is open on an iteration when the model beats the baselines of ``imagination.gate_checks`` (all
five by default; :func:`beats_baselines`) on the mean of the last ``imagination.gate_window``
checks (:func:`pooled`); while it is shut no imagined row enters the loss (``imagination.gate``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from rl.imagine import decode_codes, frame_codes, psnr

if TYPE_CHECKING:
    from rl.policy import ActOutput, RigPolicy

# each check's name (``imagination.gate_checks``) -> (model metric, baseline metric, True when
# higher is better)
CHECKS = {
    "codes": ("world/code_accuracy", "world/code_accuracy_copy", True),
    "psnr": ("world/psnr", "world/psnr_copy", True),
    "reward": ("world/reward_mse", "world/reward_mse_constant", False),
    "continue": ("world/continue_logloss", "world/continue_logloss_constant", False),
    "value": ("world/value_error", "world/value_error_copy", False),
}
COMPARISONS = tuple(CHECKS.values())
_EPS = 1e-6  # probabilities are clamped to [eps, 1 - eps] in the log loss


@dataclass
class RunningConstants:
    """The constant predictors' fit: sums over the real transitions seen so far (checkpointed
    with the run's counters, so a resumed run's baselines are the same)."""

    transitions: int = 0
    reward_sum: float = 0.0
    terminations: int = 0

    def update(self, rewards: np.ndarray | Tensor, continues: np.ndarray | Tensor) -> None:
        """Add a batch of real transitions (rewards, continue targets 1 - terminated)."""
        r = np.asarray(rewards, dtype=np.float64)
        c = np.asarray(continues, dtype=np.float64)
        self.transitions += len(r)
        self.reward_sum += float(r.sum())
        self.terminations += int(round(float((1.0 - c).sum())))

    @property
    def reward(self) -> float:
        return self.reward_sum / self.transitions

    @property
    def continue_rate(self) -> float:
        return 1.0 - self.terminations / self.transitions


def logloss(prob: Tensor, target: Tensor) -> float:
    """Mean binary log loss (nats) of probabilities ``prob`` against 0/1 ``target``."""
    p = prob.double().clamp(_EPS, 1.0 - _EPS)
    t = target.double()
    return float(-(t * p.log() + (1.0 - t) * (1.0 - p).log()).mean())


@torch.no_grad()
def world_model_check(
    policy: RigPolicy,
    act: ActOutput,
    next_frames: Tensor,
    rewards: Tensor,
    continues: Tensor,
    constants: RunningConstants,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    next_codes: Tensor | None = None,
    task: str | Sequence[str] | None = None,
) -> dict[str, float]:
    """The world model against its baselines (module docstring) on N real transitions: ``act``
    the rows that acted on s_t, ``next_frames`` (N, H, W, 3) uint8 s_{t+1}, ``rewards`` (N,) r_t,
    ``continues`` (N,) 1 - terminated. ``constants`` are the constant predictors, fitted on
    other transitions (none yet: the reward and continue comparisons are left out, and the gate
    stays shut). ``next_codes`` (N, G): the next frames' VQ codes when the caller has them
    (the driver encoded them for the next-frame loss); None: encoded here. ``task``: the
    rows' task (one str or one per row), for the critic's values of the next frames; None
    leaves the value comparison out (and the gate shut). Returns the :data:`COMPARISONS`
    metrics and ``world/checked_rows``."""
    next_frames = torch.as_tensor(np.asarray(next_frames))
    rewards = torch.as_tensor(np.asarray(rewards), dtype=torch.float32)
    continues = torch.as_tensor(np.asarray(continues), dtype=torch.float32)
    n = len(rewards)
    if not (len(act.frames) == len(next_frames) == len(continues) == n) or n == 0:
        raise ValueError(f"world_model_check needs N >= 1 rows of each, got {len(act.frames)} rows, "
                         f"{len(next_frames)} next frames, {n} rewards, {len(continues)} continues")  # fmt: skip
    img = policy.imagine(act, temperature=temperature, generator=generator)
    real = (frame_codes(policy, next_frames) if next_codes is None else next_codes).cpu()
    current = frame_codes(policy, act.frames).cpu()
    out = {
        "world/checked_rows": float(n),
        "world/code_accuracy": float((img.codes.cpu() == real).float().mean()),
        "world/code_accuracy_copy": float((current == real).float().mean()),
        "world/psnr": float(psnr(img.frames.cpu(), next_frames).mean()),
        "world/psnr_copy": float(psnr(decode_codes(policy, current).cpu(), next_frames).mean()),
        "world/reward_mse": float((img.reward.float().cpu() - rewards).square().mean()),
        "world/continue_logloss": logloss(img.continue_prob.cpu(), continues),
    }
    if task is not None:
        from rl.policy import History

        after = History.after(act)  # s' follows s_t, a_t in its episode: the same history for both
        v_next = policy.state_values(next_frames, task, after).float().cpu()
        v_imagined = policy.state_values(img.frames, task, after).float().cpu()
        out["world/value_error"] = float((v_imagined - v_next).abs().mean())
        out["world/value_error_copy"] = float((act.values.float().cpu() - v_next).abs().mean())
        # logged, not compared: the part of value_error the VQ alone makes (the critic on the
        # real next frame's reconstruction), apart from the dynamics the model got wrong
        recon = decode_codes(policy, real.to(policy.device))
        v_recon = policy.state_values(recon, task, after).float().cpu()
        out["world/value_error_reconstruction"] = float((v_recon - v_next).abs().mean())
    if constants.transitions:
        out["world/reward_mse_constant"] = float((constants.reward - rewards).square().mean())
        rate = torch.full_like(continues, constants.continue_rate)
        out["world/continue_logloss_constant"] = logloss(rate, continues)
    return out


def pooled(checks: Sequence[dict[str, float]]) -> dict[str, float]:
    """The mean of each metric over several checks (the gate's window: a verdict on 4 x 64 rows
    is steadier than on 64, whose copy baseline moves with each batch's share of moving
    paddles). A metric missing from any check is left out, so the verdict stays shut on it."""
    if not checks:
        return {}
    keys = set.intersection(*(set(c) for c in checks))
    return {k: float(np.mean([c[k] for c in checks])) for k in sorted(keys)}


def beats_baselines(metrics: dict[str, float], checks: Sequence[str] = tuple(CHECKS)) -> bool:
    """Whether the checked world model beats the baseline of each of ``checks`` (names of
    :data:`CHECKS`; all five by default) strictly; a comparison whose baseline is missing counts
    as not beaten. Metrics of the checks left out are still logged, just not required."""
    unknown = sorted(set(checks) - set(CHECKS))
    if unknown or not checks:
        raise ValueError(f"gate checks must be a non-empty subset of {list(CHECKS)}, got {list(checks)}")
    for model, baseline, higher in (CHECKS[name] for name in checks):
        if model not in metrics or baseline not in metrics:
            return False
        if not (metrics[model] > metrics[baseline] if higher else metrics[model] < metrics[baseline]):
            return False
    return True


__all__ = [
    "CHECKS", "COMPARISONS", "RunningConstants", "beats_baselines", "logloss", "pooled", "world_model_check",
]  # fmt: skip
