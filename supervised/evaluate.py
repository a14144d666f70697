"""``rig eval``: play episodes with a policy checkpoint and measure it.

One batched ``RigPolicy.act`` per vector step over ``num_envs`` envs (a Gymnasium vector env with
SAME_STEP autoreset, as ``rig envs play``), with a ``History`` of the last k steps that is reset
per row at its episode's end, and lookahead n. Every ``psnr_every``-th vector step the policy
also imagines the frame its action leads to (``RigPolicy.imagine``), compared with what
happened::

    step t:   obs_t --act--> a_t --env--> obs_t+1 (or final_obs at an episode end)
                               \\--imagine--> imagined_t+1      PSNR(imagined_t+1, obs_t+1)

Reported: return, length, Crafter score and per-achievement success (``envs.stats``) over the
first N finished episodes, and the imagined-frame PSNR (dB, per frame, then mean/median).
The video shows env 0: the real frame beside the imagined one (grey where none was made).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rl.imagine import psnr

if TYPE_CHECKING:
    from rl.policy import RigPolicy

REPORT = "report.json"
VIDEO = "video.mp4"

REVIEWS = ("sample", "value")
"""How a lookahead n > 0 decides: ``sample``, RIG's (n proposals and their imagined frames in
the sequence, then ``<review>`` and a sampled action, ``RigPolicy.act``); ``value``, the world
model and the critic choose among n sampled candidates by ``r + gamma * c * V(imagined frame)``
(``rl.review``)."""


@dataclass
class EvalSettings:
    episodes: int = 4
    num_envs: int = 4
    lookahead: int = 0
    review: str = "sample"  # REVIEWS
    gamma: float = 0.99  # review "value"'s discount (the checkpoint's ppo.gamma when it has one)
    imagine_temperature: float | None = None  # review "value"'s code sampler; None: temperature
    review_depth: int = 1  # review "value"'s imagined steps per candidate (rl.review)
    history: int = 0
    task: str = "survive and unlock as many achievements as you can"
    max_reasoning_tokens: int = 64
    temperature: float = 1.0
    psnr_every: int = 1
    seed: int = 0
    max_steps: int | None = None  # vector steps at most (unfinished episodes are reported too)
    video_size: int = 256


@dataclass
class EvalResult:
    episodes: list[dict[str, Any]]
    unfinished: list[dict[str, Any]]
    summary: dict[str, Any]
    psnr: dict[str, float]
    steps: int
    seconds: float
    invalid_actions: int
    settings: dict[str, Any] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_policy(
    policy: RigPolicy,
    env_id: str,
    size: int,
    env_kwargs: dict[str, Any],
    settings: EvalSettings,
    video: Path | None = None,
    vectorization: str = "sync",
    progress=None,
) -> EvalResult:
    """Play until ``settings.episodes`` episodes have finished (or ``max_steps`` vector steps)."""
    import torch

    import envs  # noqa: F401  (registers the envs)
    from envs.crafter_env import ACHIEVEMENTS
    from envs.stats import summarize
    from envs.vector import Step, make_vector, play_episodes
    from rig.play import _VideoWriter
    from rig.tracking import side_by_side
    from rl.policy import History
    from rl.review import review_by_value

    s = settings
    if s.review not in REVIEWS:
        raise ValueError(f"review must be one of {REVIEWS}, got {s.review!r}")
    if s.review_depth < 1:
        raise ValueError(f"review_depth must be >= 1, got {s.review_depth}")
    n = s.num_envs
    venv = make_vector(env_id, n, size=size, vectorization=vectorization, **env_kwargs)
    writer = None
    try:
        if video is not None:
            writer = _VideoWriter(video, s.video_size, venv.metadata.get("render_fps", 10))
        generator = torch.Generator().manual_seed(s.seed)
        history = History.empty(n, s.history, size)
        codec = policy.codec
        invalid0 = codec.invalid_count
        scores: list[np.ndarray] = []
        imagined: np.ndarray | None = None  # this step's imagined frames, every psnr_every-th
        calls = 0  # act is called once per vector step

        def act(obs: np.ndarray, infos: dict[str, Any]) -> np.ndarray:
            nonlocal imagined, calls
            measured = calls % s.psnr_every == 0
            calls += 1
            if s.review == "value" and s.lookahead > 0:
                review = review_by_value(
                    policy, obs, s.task, s.lookahead, s.max_reasoning_tokens, s.temperature,
                    generator, history=history, gamma=s.gamma,
                    imagine_temperature=s.imagine_temperature, depth=s.review_depth,
                )  # fmt: skip
                actions, dream = review.actions, review.imagined.frames  # the chosen one's
            else:
                out = policy.act(obs, s.task, s.max_reasoning_tokens, s.temperature, generator,
                                 history=history, lookahead=s.lookahead)  # fmt: skip
                actions = out.actions
                dream = policy.imagine(out, s.temperature, generator).frames if measured else None
            imagined = dream.cpu().numpy() if measured else None
            return actions.cpu().numpy()

        def on_step(step: Step) -> None:
            done = np.logical_or(step.terminated, step.truncated)
            real = step.new_obs.copy()
            for i in np.flatnonzero(done):
                real[i] = step.infos["final_obs"][i]
            if imagined is not None:
                scores.append(psnr(imagined, real))
            if writer is not None:
                dreamt = imagined[:1] if imagined is not None else np.full_like(real[:1], 128)
                writer.add(side_by_side(real[:1], dreamt))
            history.push(step.obs, step.actions)
            history.reset(done)
            if progress is not None:
                progress(step.steps, step.finished)

        played = play_episodes(venv, act, s.seed, s.episodes, s.max_steps, on_step=on_step)
    finally:
        venv.close()
        if writer is not None:
            writer.close()
    finished, unfinished = played.finished, played.unfinished
    achievements = ACHIEVEMENTS if played.crafter_like else None
    summary = summarize(finished or unfinished, achievements)
    summary["from_unfinished"] = not finished
    values = np.concatenate(scores) if scores else np.zeros(0)
    stats = {"mean": float(values.mean()), "median": float(np.median(values)),
             "std": float(values.std()), "frames": int(values.size)} if values.size else {
             "frames": 0}  # fmt: skip
    return EvalResult(
        episodes=finished, unfinished=unfinished, summary=summary, psnr=stats,
        steps=played.steps * n, seconds=played.seconds,
        invalid_actions=codec.invalid_count - invalid0,
        settings=asdict(s),
    )  # fmt: skip


def metrics_of(result: EvalResult) -> dict[str, float]:
    """Flat MLflow metrics of a result: eval/return_mean, eval/score, eval/psnr, success."""
    s = result.summary
    out = {f"eval/{k}": v for k, v in s.items() if isinstance(v, int | float)
           and not isinstance(v, bool)}  # fmt: skip
    out.update({f"eval/success/{k}": v for k, v in (s.get("success_rates") or {}).items()})
    out.update({f"eval/psnr_{k}": v for k, v in result.psnr.items()})
    out["eval/steps_per_s"] = result.steps / max(result.seconds, 1e-9)
    return out


def write_report(result: EvalResult, out: Path, extra: dict[str, Any]) -> Path:
    path = Path(out) / REPORT
    path.write_text(json.dumps({**extra, **result.report()}, indent=2) + "\n")
    return path


__all__ = ["REVIEWS", "EvalResult", "EvalSettings", "evaluate_policy", "metrics_of", "psnr", "write_report"]
