"""Learning: ``rig train`` against RLlib's PPO on one env, one env-step budget and the same seeds.

Each run is a subprocess with a fresh Ray, so a crash ends that run and not the benchmark; runs
go seed by seed, rig then peer, so a busy stretch of a shared machine hits both sides. Everything
lands in ``--out``: ``results.json`` (every curve), ``curves.png`` and one log per run::

    rig-seed<S>.log, rig-seed<S>/   rig train -c CONFIG train.export_at_end=false [--set ...]
                                      env.id=ENV run.seed=S run.output_dir=OUT/rig-seed<S>
                                      train.iterations=N tracking.tracking_uri=<that folder's
                                      mlflow.db>; N = ceil(steps / env steps per iteration),
                                      an iteration being max(1, rollout.num_env_runners) x
                                      env.num_envs x rollout.fragment_length of the resolved
                                      config. The curve is read back from that MLflow store:
                                      episode/return_mean, episode/count, counters/env_steps
                                      at each iteration's step.
    peer-seed<S>.log, .json         RLlib's PPO (new API stack) on the env rig builds from the
                                      same resolved config (actors.env.make_env, i.e.
                                      envs.make(env.id, env.size, **env.kwargs)); lr 3e-4, 8
                                      envs, the budget split into equal train batches of ~1024
                                      (a multiple of 8), minibatch 128, 10 epochs (--peer-epochs),
                                      .debugging(seed=S), until the budget is sampled.
    random-seed<S>.log              the baseline: uniformly random actions on the same env
                                      (one env, reset and action space seeded with S) for the
                                      same budget, in this process, recorded per 1,024 steps.

The peer's model is RLlib's default for a (64, 64, 3) image (PPOCatalog, ray 2.60): a CNN
encoder with RLlib's 64x64 filters [[16, 4, 2], [32, 4, 2], [64, 4, 2], [128, 4, 2]] ("same"
padding, ReLU, 4x4x128 = 2048 features) shared by policy and value (vf_share_layers), and linear
heads (2048 -> action logits, 2048 -> value): 181k parameters for Catch's 3 actions. That CNN
does not cast uint8 frames (its first conv fails on them), so frames go through RLlib's own
``NormalizedImageEnv`` (float32, x / 128 - 1), as in RLlib's Atari examples.
``num_env_runners=0``: the envs step in the peer's process, where a wrapper records each finished
episode's return, so both sides give the same record per iteration (mean return and count of the
episodes that ended in it); RLlib's ``episode_return_mean`` (its 100-episode moving mean) is kept
next to it in results.json.

On an env that reports ``info["achievements"]`` (Crafter) every side also records, per
iteration, how many of its finished episodes unlocked each achievement (rig's from the success
rates rig train logs to MLflow), and the summary gives each run's Crafter score (``envs.stats``)
two ways: over the episodes of its final return's window (the policy at the end, about 100
episodes), and over every episode of the run (Crafter's own definition: the success rates of
all episodes within the agent's budget, about 1,000 episodes at 100k steps, so the rare
achievements that weigh most in the score are counted over ten times as many episodes).

Training curves mix the policies of a whole run and a window of ~100 episodes; with
``--eval-episodes N`` each side's final policy is also played on held-out worlds by one
protocol, ``rig eval``'s: ``EVAL_ENVS`` (8) envs in a vector env reset with ``--eval-seed``
(11, the worlds of the SFT comparisons in docs/sft.md), actions sampled from the policy, until
N episodes have finished (the first N are kept)::

    rig-seed<S>-final/, -eval/      rig export of the run's newest checkpoint, then rig eval of
                                      it (-c CONFIG and --set as trained, lookahead 0, no
                                      imagined frames): its report.json
    peer-seed<S>-module/            the peer's final RLModule (RLModule.save_to_path, always)
    peer-seed<S>-eval/report.json   that module played so (play_peer): frames through the same
                                      NormalizedImageEnv transform, its logits sampled

Each run's figures (episodes, mean return, Crafter score) and, per side, every seed's episodes
pooled with bootstrap 95% intervals and the rig - peer difference (benchmarks/eval_spread.py)
are in results.json and the printed report. ``--merge --eval-episodes N`` evaluates, into the
new folder, every run of the merged folders not yet evaluated with those settings, from the
policy it kept (runs from before this existed included, on the rig side; a peer run needs its
saved module). results.json also keeps each evaluated episode's return and achievements
(``outcomes``), so a committed results.json still pools and compares its seeds once the run
folders are gone (session 38's peer reports were lost that way).

The curve maths are pure functions (unit tested). An iteration's smoothed return is the
episode-weighted mean of the newest iterations that hold at least ``WINDOW`` (100) episodes
between them (all so far, before there are that many). A seed's value at a mark is that of its
last iteration at or before the mark. The table shows the median over seeds at 10 evenly spaced
marks; steps to threshold is the first of 50 marks where the smoothed return over a full window
is >= the threshold (so its resolution is budget / 50, or an iteration of that side if coarser),
"never" otherwise, and a median over seeds counts "never" as infinitely late. Ratios rig / peer
of the medians: env steps to threshold (lower is better; <= 1.0: rig is at least as
sample-efficient) and wall-clock seconds of a whole run (process start to exit).

    rig bench learning --steps 15000 --seeds 0,1,2
    python benchmarks/learning.py --only peer --steps 15000 --seeds 0
    rig bench learning --merge RIG_DIR --merge PEER_DIR --out POOLED --eval-episodes 256
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))  # run as a script from anywhere

from benchmarks.common import run_and_print  # noqa: E402
from rig.errors import UserError  # noqa: E402

METHODS = ("rig", "peer", "random")
COMPARED = ("rig", "peer")  # the sides the ratios compare; "random" is the baseline beside them
WINDOW = 100  # episodes in a moving mean
TABLE_MARKS = 10
THRESHOLD_MARKS = 50
RIG_RETURN, RIG_COUNT, RIG_STEPS = "episode/return_mean", "episode/count", "counters/env_steps"
PEER_ENV = "rig-bench-learning"  # the name the peer's env creator is registered under
PEER_ENVS = 8
PEER_BATCH = 1024
PEER_MINIBATCH = 128
PEER_EPOCHS = 10
PEER_LR = 3e-4
RIG_SUCCESS = "crafter/success/"  # rig train's per-achievement success rates (all episodes so far)
RANDOM_ITERATION = PEER_BATCH  # env steps per recorded iteration of the random agent
EVAL_SEED = 11  # the worlds of rig eval --seed 11, as the SFT comparisons (docs/sft.md)
EVAL_ENVS = 8
EVAL_NO_IMAGINE = 10**9  # rig eval --psnr-every: imagine on the first step only, not measured

Point = Sequence[float]  # (env steps, mean return, episodes): one iteration, or its window
Unlocks = Sequence[Any]  # (env steps, episodes, {achievement: episodes that unlocked it}), likewise


PEER_DIAGNOSTICS = {
    "policy/action_entropy": "entropy", "policy/approx_kl": "mean_kl_loss",
    "value/explained_variance": "vf_explained_var", "learner/kl_coeff": "curr_kl_coeff",
}  # fmt: skip
"""rig train's metric name -> RLlib PPO's learner metric of the same quantity, recorded per
iteration on both sides: the action distribution's entropy in nats, the KL of the updated
policy from the sampling one (rig: the mean approx KL over the update's minibatches; RLlib: its
last minibatch's KL term), the value's explained variance, the adaptive KL coefficient
(``ppo.behaviour_kl_coeff``; RLlib's ``kl_coeff``)."""
DIAGNOSTIC_LABELS = {"policy/action_entropy": "action entropy (nats)",
                     "policy/approx_kl": "approx KL", "value/explained_variance": "value EV",
                     "learner/kl_coeff": "KL coefficient"}  # fmt: skip


# -- curve maths ---------------------------------------------------------------------------------


def windowed(points: Sequence[Point], window: int = WINDOW) -> list[list[float]]:
    """Per-iteration ``(env steps, mean return, episodes)`` -> ``[env steps, smoothed mean,
    episodes in the window]``: the episode-weighted mean of the newest iterations that hold at
    least ``window`` episodes together. Iterations without episodes give no point."""
    out = []
    for i, (steps, _, count) in enumerate(points):
        if count <= 0:
            continue
        total = episodes = 0.0
        for _, mean, n in reversed(points[: i + 1]):
            if n > 0:
                total, episodes = total + mean * n, episodes + n
                if episodes >= window:
                    break
        out.append([steps, total / episodes, episodes])
    return out


def late_means(diagnostics: Sequence[Any], budget: int, share: float = 0.1) -> dict[str, float]:
    """Mean of each diagnostic (``[[env steps, {name: value}]]``) over the iterations in the
    last ``share`` of the ``budget`` (how the policy ends, where one iteration is noisy)."""
    late: dict[str, list[float]] = {}
    for steps, values in diagnostics:
        if steps > budget * (1.0 - share):
            for name, value in values.items():
                late.setdefault(name, []).append(value)
    return {name: statistics.fmean(values) for name, values in late.items()}


def marks(budget: int, n: int) -> list[int]:
    """``n`` evenly spaced env-step marks ending at ``budget`` (fewer if ``budget < n``)."""
    return sorted({round(budget * k / n) for k in range(1, n + 1)} - {0})


def value_at(curve: Sequence[Point], step: float) -> Point | None:
    """The curve's last point at or before ``step`` (None before its first point)."""
    found = None
    for point in curve:
        if point[0] > step:
            break
        found = point
    return found


def median_curve(curves: Sequence[Sequence[Point]], at: Sequence[int]) -> list[float | None]:
    """Median over curves of their value at each mark; curves with no point yet are left out;
    None where no curve has one."""
    out = []
    for mark in at:
        values = [p[1] for p in (value_at(c, mark) for c in curves) if p is not None]
        out.append(statistics.median(values) if values else None)
    return out


def steps_to_threshold(
    curve: Sequence[Point], at: Sequence[int], threshold: float, min_episodes: float = WINDOW
) -> int | None:
    """The first mark where the curve's value, over at least ``min_episodes`` episodes, is
    >= ``threshold``; None: never."""
    for mark in at:
        point = value_at(curve, mark)
        if point is not None and point[2] >= min_episodes and point[1] >= threshold:
            return mark
    return None


def median_steps(values: Sequence[int | None]) -> float | None:
    """Median of steps-to-threshold over seeds, "never" (None) counting as infinitely late."""
    if not values:
        return None
    median = statistics.median(math.inf if v is None else v for v in values)
    return None if math.isinf(median) else median


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def window_score(unlocks: Sequence[Unlocks], window: float = WINDOW) -> list[float] | None:
    """``[Crafter score in percent, episodes]`` over the newest iterations that hold at least
    ``window`` episodes together (the episodes of the final return's window; all, if fewer or
    ``window`` is ``math.inf``: the run's score by Crafter's definition):
    each achievement's success rate is the share of those episodes that unlocked it
    (``envs.stats``). None without any episode."""
    from envs.crafter_env import ACHIEVEMENTS
    from envs.stats import crafter_score

    total: dict[str, int] = {}
    episodes = 0
    for _, n, counts in reversed(unlocks):
        if n <= 0:
            continue
        episodes += n
        for name, count in counts.items():
            total[name] = total.get(name, 0) + count
        if episodes >= window:
            break
    if not episodes:
        return None
    return [crafter_score({a: 100.0 * total.get(a, 0) / episodes for a in ACHIEVEMENTS}),
            episodes]  # fmt: skip


# -- plans ---------------------------------------------------------------------------------------


def rig_plan(config: Any, steps: int) -> dict[str, int]:
    """Env steps per ``rig train`` iteration of a resolved config and the iterations to cover
    ``steps`` (0 env runners sample in-process: one runner's worth)."""
    per = max(1, config.rollout.num_env_runners) * config.env.num_envs
    per *= config.rollout.fragment_length
    return {"steps_per_iteration": per, "iterations": math.ceil(steps / per)}


def peer_plan(steps: int, envs: int = PEER_ENVS, batch: int = PEER_BATCH) -> dict[str, int]:
    """The budget as equal train batches of about ``batch`` env steps, each a multiple of
    ``envs`` (RLlib's automatic fragment length is batch / envs), covering ``steps``."""
    iterations = max(1, round(steps / batch))
    size = math.ceil(steps / iterations / envs) * envs
    return {"iterations": math.ceil(steps / size), "batch": size,
            "minibatch": min(PEER_MINIBATCH, size)}  # fmt: skip


def rig_command(
    config: Path, overrides: Sequence[str], env: str, seed: int, iterations: int, run_out: Path
) -> list[str]:
    """``rig train`` for one seed; the benchmark's own keys come last, so they win."""
    return [
        sys.executable, "-m", "rig.cli", "train", "-c", str(config), "train.export_at_end=false",
        *overrides, f"env.id={env}", f"run.seed={seed}", f"run.output_dir={run_out}",
        f"train.iterations={iterations}", f"tracking.tracking_uri=sqlite:///{run_out}/mlflow.db",
    ]  # fmt: skip


# -- the rig side --------------------------------------------------------------------------------


def _rig_history(run_out: Path, keys: Sequence[str] = (),
                 prefix: str | None = None) -> dict[str, dict[int, float]] | None:  # fmt: skip
    """``{metric: {iteration: value}}`` of the ``rig train`` run in ``run_out`` from its MLflow
    store, for ``keys`` and every metric starting with ``prefix``; None without a run."""
    ids = sorted(run_out.glob("*/mlflow_run_id"))
    if not ids or not (run_out / "mlflow.db").is_file():
        return None
    import mlflow

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    client = mlflow.MlflowClient(f"sqlite:///{run_out.resolve()}/mlflow.db")
    run_id = ids[-1].read_text().strip()
    names = list(keys)
    if prefix is not None:
        names += sorted(k for k in client.get_run(run_id).data.metrics if k.startswith(prefix))
    return {key: {m.step: m.value for m in client.get_metric_history(run_id, key)}
            for key in names}  # fmt: skip


def read_rig_curve(run_out: Path) -> list[list[float]]:
    """``[env steps, mean return, episodes]`` per iteration of the ``rig train`` run in
    ``run_out``, from its MLflow store (iterations without finished episodes log none)."""
    history = _rig_history(run_out, (RIG_RETURN, RIG_COUNT, RIG_STEPS))
    if history is None:
        return []
    returns, counts, env_steps = history[RIG_RETURN], history[RIG_COUNT], history[RIG_STEPS]
    return [[env_steps[s], returns[s], counts[s]]
            for s in sorted(counts) if s in returns and s in env_steps]  # fmt: skip


def read_rig_unlocks(run_out: Path) -> list[list[Any]]:
    """``[env steps, episodes, {achievement: episodes that unlocked it}]`` per iteration of the
    ``rig train`` run in ``run_out`` that ended episodes, from its MLflow store; [] for an env
    without achievements. rig train logs each achievement's success rate over every episode so
    far (``crafter/success/<name>``), so an iteration's counts are the differences of rate x
    episodes so far (whole numbers, rounded from float)."""
    history = _rig_history(run_out, (RIG_COUNT, RIG_STEPS), prefix=RIG_SUCCESS)
    names = [k.removeprefix(RIG_SUCCESS) for k in history or {} if k.startswith(RIG_SUCCESS)]
    if not names:
        return []
    out, episodes, before = [], 0, dict.fromkeys(names, 0)
    for step in sorted(history[RIG_COUNT]):
        n = round(history[RIG_COUNT][step])
        episodes += n
        if n <= 0 or step not in history[RIG_STEPS]:
            continue
        so_far = {a: round(history[RIG_SUCCESS + a].get(step, 0.0) * episodes / 100.0)
                  for a in names}  # fmt: skip
        out.append([history[RIG_STEPS][step], n,
                    {a: so_far[a] - before[a] for a in names if so_far[a] > before[a]}])
        before = so_far
    return out


def read_rig_diagnostics(run_out: Path) -> list[list[Any]]:
    """``[env steps, {name: value}]`` per iteration of the ``rig train`` run in ``run_out``: its
    PPO diagnostics that the peer also reports (:data:`PEER_DIAGNOSTICS`' names)."""
    history = _rig_history(run_out, (RIG_STEPS, *PEER_DIAGNOSTICS))
    if history is None:
        return []
    rows = [[history[RIG_STEPS][step], {k: history[k][step] for k in PEER_DIAGNOSTICS
                                        if step in history[k]}]
            for step in sorted(history[RIG_STEPS])]  # fmt: skip
    return [row for row in rows if row[1]]


def run_rig(config: Path, overrides: Sequence[str], env: str, seed: int, iterations: int,
            out: Path, threads: int) -> dict[str, Any]:  # fmt: skip
    run_out = (out / f"rig-seed{seed}").resolve()
    log = out / f"rig-seed{seed}.log"
    command = rig_command(config.resolve(), overrides, env, seed, iterations, run_out)
    code, seconds = _subprocess(command, log, threads)
    return {**_run(seed, code, seconds, log, read_rig_curve(run_out)),
            "unlocks": read_rig_unlocks(run_out), "diagnostics": read_rig_diagnostics(run_out)}  # fmt: skip


# -- the peer side -------------------------------------------------------------------------------

_FINISHED: list[float] = []  # returns of episodes ended since the last drain (the peer's process)
_UNLOCKED: list[list[str]] = []  # and their unlocked achievements, for envs that report them


class _EpisodeReturns(gym.Wrapper):
    """Appends each finished episode's return to ``_FINISHED`` and, where the env reports
    ``info["achievements"]`` (Crafter), its unlocked achievements to ``_UNLOCKED``."""

    def reset(self, **kwargs):
        self._return = 0.0
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._return += float(reward)
        if terminated or truncated:
            _FINISHED.append(self._return)
            if "achievements" in info:
                from envs.stats import unlocked_from_counts

                _UNLOCKED.append(unlocked_from_counts(info["achievements"]))
        return obs, reward, terminated, truncated, info


def _drain(steps: int, points: list, unlocks: list) -> list[float]:
    """Moves the episodes ended since the last drain into one iteration's ``points`` entry
    (and ``unlocks``, where they reported achievements) at ``steps``; returns their returns."""
    returns, unlocked = _FINISHED[:], _UNLOCKED[:]
    _FINISHED.clear()
    _UNLOCKED.clear()
    if returns:
        points.append([steps, statistics.fmean(returns), len(returns)])
    if unlocked:
        counts: dict[str, int] = {}
        for name in (name for names in unlocked for name in names):
            counts[name] = counts.get(name, 0) + 1
        unlocks.append([steps, len(returns), counts])
    return returns


def _peer_env(env_config: dict[str, Any]) -> gym.Env:
    from ray.rllib.env.wrappers.atari_wrappers import NormalizedImageEnv

    from actors.env import make_env

    return NormalizedImageEnv(_EpisodeReturns(make_env(env_config)))


def peer_config(
    env: str, env_config: dict[str, Any], batch: int, minibatch: int, epochs: int, seed: int,
    lr: float = PEER_LR,
):  # fmt: skip
    """The peer's ``PPOConfig`` (module doc): RLlib's defaults but for lr, ``PEER_ENVS`` envs
    stepping in the driver, the train batch, minibatch and epochs, on the registered ``env``."""
    from ray.rllib.algorithms.ppo import PPOConfig

    return (
        PPOConfig()
        .environment(env, env_config=env_config)
        .env_runners(
            num_env_runners=0, num_envs_per_env_runner=PEER_ENVS, rollout_fragment_length="auto"
        )
        .training(lr=lr, train_batch_size_per_learner=batch, minibatch_size=minibatch,
                  num_epochs=epochs)  # fmt: skip
        .debugging(seed=seed)
    )


def run_peer_here(
    env: str, size: int, kwargs: dict[str, Any], seed: int, steps: int,
    epochs: int = PEER_EPOCHS, threads: int = 1, out: str | None = None,
    eval_episodes: int = 0, eval_seed: int = EVAL_SEED,
) -> dict[str, Any]:  # fmt: skip
    """RLlib's PPO in this process until ``steps`` env steps are sampled (module doc); returns
    ``{"points": [[env steps, mean return, episodes]], "unlocks": [[env steps, episodes,
    {achievement: count}]] (Crafter), "rllib_return_mean": [[env steps, v]], "diagnostics":
    [[env steps, {name: v}]]}``: the diagnostics are RLlib's learner metrics of the iteration
    (:data:`PEER_DIAGNOSTICS`), beside which rig train's own are read. With ``out`` the final
    RLModule is saved to :func:`peer_module_dir` and, with ``eval_episodes``, played on held-out
    worlds (:func:`eval_peer`, under ``"eval"``)."""
    import ray
    import torch
    from ray.rllib.core import DEFAULT_MODULE_ID
    from ray.rllib.utils.metrics import (
        ENV_RUNNER_RESULTS,
        EPISODE_RETURN_MEAN,
        LEARNER_RESULTS,
        NUM_ENV_STEPS_SAMPLED_LIFETIME,
    )
    from ray.tune.registry import register_env

    torch.set_num_threads(threads)
    plan = peer_plan(steps)
    register_env(PEER_ENV, _peer_env)
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    points, unlocks, rllib_means, diagnostics, sampled = [], [], [], [], 0
    try:
        config = peer_config(PEER_ENV, {"id": env, "size": size, "kwargs": kwargs},
                             plan["batch"], plan["minibatch"], epochs, seed)  # fmt: skip
        algo = config.build_algo()
        _drain(0, [], [])  # episodes of the spaces-probing env, if any
        while sampled < steps:
            result = algo.train()
            now = int(result[NUM_ENV_STEPS_SAMPLED_LIFETIME])
            if now <= sampled:
                raise RuntimeError(f"RLlib sampled no env steps in an iteration (at {now})")
            sampled, returns = now, _drain(now, points, unlocks)
            rllib = result.get(ENV_RUNNER_RESULTS, {}).get(EPISODE_RETURN_MEAN)
            if rllib is not None and math.isfinite(rllib):
                rllib_means.append([sampled, float(rllib)])
            learner = result.get(LEARNER_RESULTS, {}).get(DEFAULT_MODULE_ID, {})
            found = {ours: float(learner[theirs]) for ours, theirs in PEER_DIAGNOSTICS.items()
                     if theirs in learner}  # fmt: skip
            if found:
                diagnostics.append([sampled, found])
            mean = f"{points[-1][1]:+.3f} over {len(returns)} episodes" if returns else "-"
            print(f"peer seed {seed}: {sampled} env steps, return {mean}", flush=True)
        evaluated = None
        if out is not None:
            module, folder = algo.get_module(), peer_module_dir(Path(out), seed)
            module.save_to_path(str(folder.resolve()))
            if eval_episodes:
                evaluated = eval_peer(folder, Path(out), seed, env, size, kwargs, eval_episodes,
                                      eval_seed, module=module)  # fmt: skip
                print(f"peer seed {seed}: held-out {evaluated}", flush=True)
        algo.stop()
    finally:
        ray.shutdown()
    return {"points": points, "unlocks": unlocks, "rllib_return_mean": rllib_means,
            "diagnostics": diagnostics, "eval": evaluated}  # fmt: skip


def run_peer(env: str, size: int, kwargs: dict[str, Any], seed: int, steps: int, out: Path,
             epochs: int, threads: int, eval_episodes: int = 0,
             eval_seed: int = EVAL_SEED) -> dict[str, Any]:  # fmt: skip
    """``run_peer_here`` in a subprocess (this file with ``--peer-worker``)."""
    log, answer = out / f"peer-seed{seed}.log", out / f"peer-seed{seed}.json"
    spec = {"env": env, "size": size, "kwargs": kwargs, "seed": seed, "steps": steps,
            "epochs": epochs, "threads": threads, "out": str(out.resolve()),
            "eval_episodes": eval_episodes, "eval_seed": eval_seed,
            "answer": str(answer.resolve())}  # fmt: skip
    command = [sys.executable, str(Path(__file__).resolve()), "--peer-worker", json.dumps(spec)]
    code, seconds = _subprocess(command, log, threads)
    found = json.loads(answer.read_text()) if answer.is_file() else {}
    run = _run(seed, code, seconds, log, found.get("points", []))
    run["unlocks"] = found.get("unlocks", [])
    run["rllib_return_mean"] = found.get("rllib_return_mean", [])
    run["diagnostics"] = found.get("diagnostics", [])
    if eval_episodes and run["ok"]:
        run["eval"] = found.get("eval") or {"error": f"no held-out evaluation (log {log})"}
    return run


# -- the random agent ----------------------------------------------------------------------------


def random_agent(
    env: str, size: int, kwargs: dict[str, Any], seed: int, steps: int,
    iteration: int = RANDOM_ITERATION,
) -> dict[str, list]:  # fmt: skip
    """Uniformly random actions on the env rig builds (``actors.env.make_env``, one env, reset
    with ``seed``, actions from the action space seeded with ``seed``) for ``steps`` env steps;
    ``{"points": ..., "unlocks": ...}`` per ``iteration`` env steps, recorded by the peer's
    wrapper. Not thread-safe (the wrapper's lists are the module's)."""
    from actors.env import make_env

    e = _EpisodeReturns(make_env({"id": env, "size": size, "kwargs": kwargs}))
    points: list[list[float]] = []
    unlocks: list[list[Any]] = []
    _drain(0, [], [])
    try:
        e.action_space.seed(seed)
        e.reset(seed=seed)
        for t in range(1, steps + 1):
            _, _, terminated, truncated, _ = e.step(e.action_space.sample())
            if terminated or truncated:
                e.reset()
            if t % iteration == 0 or t == steps:
                _drain(t, points, unlocks)
    finally:
        e.close()
    return {"points": points, "unlocks": unlocks}


def run_random(env: str, size: int, kwargs: dict[str, Any], seed: int, steps: int,
               out: Path) -> dict[str, Any]:  # fmt: skip
    """``random_agent`` in this process (no Ray, no model: seconds to minutes), as a run."""
    import traceback

    log = out / f"random-seed{seed}.log"
    start = time.perf_counter()
    try:
        found = random_agent(env, size, kwargs, seed, steps)
        code = 0
        log.write_text(f"random agent, seed {seed}: {len(found['points'])} iterations\n")
    except Exception:  # a broken env: the run fails, the benchmark goes on
        found, code = {"points": [], "unlocks": []}, 1
        log.write_text(traceback.format_exc())
    run = _run(seed, code, time.perf_counter() - start, log, found["points"])
    run["unlocks"] = found["unlocks"]
    return run


def _peer_worker(spec_json: str) -> None:
    # By the module's name, not __main__'s: Ray pickles the env creator, and a function of
    # __main__ travels by value with a copy of _FINISHED instead of this process's list.
    from benchmarks.learning import run_peer_here as run

    spec = json.loads(spec_json)
    answer = Path(spec.pop("answer"))
    answer.write_text(json.dumps(run(**spec)) + "\n")


# -- held-out evaluation of the final policies ---------------------------------------------------


def _peer_frames(obs):
    """The peer's view of a batch of uint8 frames: RLlib's ``NormalizedImageEnv`` (x / 128 - 1,
    float32), as it saw them in training (``_peer_env``)."""
    return (obs.astype(np.float32) / 128.0) - 1.0


def play_peer(module: Any, env: str, size: int, kwargs: dict[str, Any], episodes: int,
              num_envs: int = EVAL_ENVS, seed: int = EVAL_SEED) -> dict[str, Any]:  # fmt: skip
    """``rig eval``'s protocol (``supervised.evaluate``) for the peer's RLModule: ``num_envs``
    envs of ``envs.make`` in a vector env reset with ``seed``, actions sampled from the module's
    distribution (a generator seeded with ``seed``), until ``episodes`` episodes have finished;
    the first ``episodes`` of them are reported. A report of the shape ``rig eval`` writes
    (``episodes``, ``unfinished``, ``summary``, ``steps``, ``seconds``, ``settings``), so
    ``benchmarks/eval_spread.py`` reads both."""
    import torch

    from envs.crafter_env import ACHIEVEMENTS
    from envs.stats import summarize
    from envs.vector import make_vector, play_episodes

    generator = torch.Generator().manual_seed(seed)

    def act(obs: np.ndarray, infos: dict[str, Any]) -> np.ndarray:
        with torch.no_grad():
            out = module.forward_inference({"obs": torch.from_numpy(_peer_frames(obs))})
        probs = torch.softmax(out["action_dist_inputs"].float(), dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0].numpy()

    venv = make_vector(env, num_envs, size=size, **kwargs)
    try:
        played = play_episodes(venv, act, seed, episodes)
    finally:
        venv.close()
    finished = played.finished
    summary = summarize(finished, ACHIEVEMENTS if played.crafter_like else None)
    settings = {"episodes": episodes, "num_envs": num_envs, "seed": seed, "sampling": "stochastic"}
    return {"episodes": finished, "unfinished": played.unfinished, "summary": summary,
            "steps": played.steps * num_envs, "seconds": played.seconds,
            "settings": settings}  # fmt: skip


def eval_digest(report_path: Path) -> dict[str, Any]:
    """A run's held-out evaluation as results.json keeps it: episodes, mean return, Crafter
    score (None without achievements), the report's path, and each episode's outcome
    (``outcomes``: its return and, with achievements, a bitmask over their sorted names), so
    that the pooled figures and their intervals can be recomputed from results.json alone once
    the run's folder is gone (:func:`kept_report`)."""
    report = json.loads(report_path.read_text())
    summary = report["summary"]
    names = sorted(summary.get("success_rates") or {})
    outcomes: dict[str, Any] = {"returns": [e["return"] for e in report["episodes"]]}
    if names:
        outcomes["achievements"] = names
        outcomes["unlocked"] = [sum(1 << i for i, n in enumerate(names) if n in e["unlocked"])
                                for e in report["episodes"]]  # fmt: skip
    return {"episodes": summary["episodes"], "return": summary.get("return_mean"),
            "score": summary.get("score"), "report": str(report_path.resolve()),
            "outcomes": outcomes}  # fmt: skip


def kept_report(found: dict[str, Any]) -> dict[str, Any] | None:
    """The episodes of a digest (:func:`eval_digest`) as ``benchmarks/eval_spread`` reads a
    report: the report file if it is still there, else the outcomes results.json kept; None
    for neither (a digest written before the outcomes were kept, its folder gone)."""
    path = Path(found["report"])
    if path.is_file():
        return json.loads(path.read_text())
    kept = found.get("outcomes")
    if kept is None:
        return None
    names = kept.get("achievements") or []
    masks = kept.get("unlocked") or [0] * len(kept["returns"])
    episodes = [{"return": r, "unlocked": [n for i, n in enumerate(names) if mask >> i & 1]}
                for r, mask in zip(kept["returns"], masks, strict=True)]  # fmt: skip
    return {"episodes": episodes, "summary": {"success_rates": dict.fromkeys(names, 0.0)}}


def _eval_failed(log: Path, code: int) -> dict[str, Any]:
    return {"error": f"{_log_error(log, code)} (log {log})"}


def eval_rig(run_out: Path, out: Path, seed: int, config: Path, overrides: Sequence[str],
             episodes: int, eval_seed: int = EVAL_SEED, threads: int = 1) -> dict[str, Any]:  # fmt: skip
    """The final policy of the ``rig train`` run in ``run_out`` on held-out worlds: ``rig export``
    of its newest checkpoint to ``out/rig-seed<S>-final``, then ``rig eval`` of that (``-c
    config`` and ``overrides`` as trained, lookahead 0, no imagined frames) with ``episodes``
    episodes on ``EVAL_ENVS`` envs reset with ``eval_seed``, to ``out/rig-seed<S>-eval``.
    :func:`eval_digest` of its report, or ``{"error": ...}``."""
    found = sorted(path.parent for path in run_out.glob("*/mlflow_run_id"))
    if not found:
        return {"error": f"no rig train run in {run_out}"}
    final, folder = out / f"rig-seed{seed}-final", out / f"rig-seed{seed}-eval"
    rig = [sys.executable, "-m", "rig.cli"]
    log = out / f"rig-seed{seed}-export.log"
    code, _ = _subprocess([*rig, "export", str(found[-1]), str(final)], log, threads)
    if code != 0:
        return _eval_failed(log, code)
    log = out / f"rig-seed{seed}-eval.log"
    code, _ = _subprocess([*rig, "eval", "--checkpoint", str(final), "--episodes", str(episodes),
                           "--num-envs", str(EVAL_ENVS), "--lookahead", "0", "--psnr-every",
                           str(EVAL_NO_IMAGINE), "--seed", str(eval_seed), "--threads",
                           str(threads), "--out", str(folder), "-c", str(config.resolve()),
                           *overrides], log, threads)  # fmt: skip
    if code != 0:
        return _eval_failed(log, code)
    return eval_digest(folder / "report.json")


def peer_module_dir(out: Path, seed: int) -> Path:
    """Where a peer run keeps its final RLModule (``RLModule.save_to_path``)."""
    return out / f"peer-seed{seed}-module"


def eval_peer(module_dir: Path, out: Path, seed: int, env: str, size: int,
              kwargs: dict[str, Any], episodes: int, eval_seed: int = EVAL_SEED,
              module: Any = None) -> dict[str, Any]:  # fmt: skip
    """:func:`play_peer` of the peer's final module (``module``, else loaded from
    ``module_dir``), its report to ``out/peer-seed<S>-eval/report.json``; the digest, or
    ``{"error": ...}`` where there is no module."""
    if module is None:
        if not module_dir.is_dir():
            return {"error": f"no saved peer module at {module_dir}"}
        from ray.rllib.core.rl_module.rl_module import RLModule

        module = RLModule.from_checkpoint(str(module_dir.resolve()))
    report = play_peer(module, env, size, kwargs, episodes, seed=eval_seed)
    folder = out / f"peer-seed{seed}-eval"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "report.json"
    path.write_text(json.dumps({"module": str(module_dir), **report}, indent=2) + "\n")
    return eval_digest(path)


# -- running both --------------------------------------------------------------------------------


def _subprocess(command: list[str], log: Path, threads: int) -> tuple[int, float]:
    """Exit code and wall-clock seconds of ``command``, its output to ``log``."""
    limits = {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env = {**os.environ, **limits, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    return code, time.perf_counter() - start


def _run(seed: int, code: int, seconds: float, log: Path, points: list) -> dict[str, Any]:
    error = None if code == 0 else _log_error(log, code)
    return {"seed": seed, "ok": code == 0, "error": error, "wall_s": seconds, "log": str(log),
            "points": points}  # fmt: skip


def _log_error(log: Path, code: int) -> str:
    """A failed subprocess as one line: its exit code and the last line of its log."""
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return f"exit code {code}: {lines[-1].strip() if lines else 'no output'}"


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--seeds must be integers separated by commas, got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise UserError(f"--seeds must be integers >= 0, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds names a seed twice: {text!r}")
    return seeds


def bench_learning(
    env: str = "rig/Catch-v0",
    steps: int = 15000,
    seeds: Sequence[int] = (0, 1, 2),
    config: str | Path = "configs/catch.yaml",
    overrides: Sequence[str] = (),
    threshold: float = 0.8,
    only: str = "both",
    out: str | Path | None = None,
    threads: int = 1,
    peer_epochs: int = PEER_EPOCHS,
    say: Callable[[str], None] | None = None,
    random_baseline: bool = True,
    eval_episodes: int = 0,
    eval_seed: int = EVAL_SEED,
) -> dict[str, Any]:
    """Run both sides (or ``only`` one) for every seed, and the random agent unless
    ``random_baseline`` is False (it is deterministic per seed: a folder that has it can be
    merged in); with ``eval_episodes``, play each side's final policy for that many episodes on
    the held-out worlds of ``eval_seed`` (:func:`eval_rig`, :func:`eval_peer`); write
    ``results.json`` and ``curves.png`` to ``out``; returns the results. Bad input is a
    ``UserError``."""
    from rig.config import load_config

    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    if only not in (*COMPARED, "both"):
        raise UserError(f"--only must be rig, peer or both, got {only!r}")
    _check_eval(eval_episodes, eval_seed)
    config = check_run_inputs(env, steps, seeds, config)
    cfg = load_config(config, [*overrides, f"env.id={env}"])
    out = _fresh_out(out or f"runs/bench-learning-{time.strftime('%Y%m%d-%H%M%S')}")

    baseline = ("random",) if random_baseline else ()
    methods = (*(COMPARED if only == "both" else (only,)), *baseline)
    plans = {"rig": rig_plan(cfg, steps), "peer": {**peer_plan(steps), "epochs": peer_epochs},
             "random": {"steps_per_iteration": RANDOM_ITERATION}}  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for seed in seeds:  # seed by seed, both sides, so a busy stretch hits both
        for method in methods:
            say(f"{method} seed {seed}: running, log {out / f'{method}-seed{seed}.log'}")
            if method == "rig":
                run = run_rig(config, overrides, env, seed, plans["rig"]["iterations"], out,
                              threads)  # fmt: skip
                if eval_episodes and run["ok"]:
                    say(f"rig seed {seed}: held-out evaluation, log {out / f'rig-seed{seed}-eval.log'}")
                    run["eval"] = eval_rig((out / f"rig-seed{seed}").resolve(), out, seed,
                                           config, overrides, eval_episodes, eval_seed, threads)  # fmt: skip
            elif method == "peer":
                run = run_peer(env, cfg.env.size, dict(cfg.env.kwargs), seed, steps, out,
                               peer_epochs, threads, eval_episodes, eval_seed)  # fmt: skip
            else:
                run = run_random(env, cfg.env.size, dict(cfg.env.kwargs), seed, steps, out)
            say(f"{method} seed {seed}: {'done' if run['ok'] else run['error']} "
                f"({run['wall_s']:.0f} s, {len(run['points'])} points)")  # fmt: skip
            runs[method].append(run)
    result = summarize(runs, steps, threshold)
    result["config"] = {
        "env": env, "size": cfg.env.size, "env_kwargs": dict(cfg.env.kwargs), "steps": steps,
        "seeds": list(seeds), "config": str(config), "overrides": list(overrides),
        "threshold": threshold, "window": WINDOW, "threads": threads, "only": only,
        "out": str(out), "plans": {m: plans[m] for m in methods}, "ray": _version("ray"),
        "rig_variant": rig_variant(cfg.model_dump(mode="json")) if "rig" in methods else None,
        "eval": _eval_config(eval_episodes, eval_seed),
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_curves(result, out / "curves.png")
    return result


def check_run_inputs(env: str, steps: int, seeds: Sequence[int], config: str | Path) -> Path:
    """The inputs every benchmark of ``rig train`` runs checks first (a ``UserError`` each):
    a budget >= 1, seeds >= 0, a registered env, a preset file. Returns the preset's path."""
    from envs import check_env_id

    if steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    if not seeds or min(seeds) < 0:
        raise UserError(f"seeds must be integers >= 0, got {list(seeds)}")
    try:
        check_env_id(env)
    except ValueError as err:
        raise UserError(f"--env: {err}") from None
    config = Path(config)
    if not config.is_file():
        raise UserError(f"--config {config}: no such file (rig presets live in configs/)")
    return config


def _check_eval(episodes: int, seed: int) -> None:
    if episodes < 0:
        raise UserError(f"--eval-episodes must be >= 0 (0: no held-out evaluation), got {episodes}")
    if seed < 0:
        raise UserError(f"--eval-seed must be >= 0, got {seed}")


def _eval_config(episodes: int, seed: int) -> dict[str, Any] | None:
    return {"episodes": episodes, "seed": seed, "envs": EVAL_ENVS} if episodes else None


def _fresh_out(out: str | Path) -> Path:
    """``--out`` as a new or empty, writable folder (nothing in it is ever overwritten)."""
    from rig.runs import ensure_writable_dir

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty; give a new folder")
    ensure_writable_dir(out, "--out")
    return out


MERGE_SAME = ("env", "size", "env_kwargs", "steps", "threshold", "window")  # across all folders
MERGE_SAME_RIG = ("config", "overrides")  # across rig folders, where a resolved config is missing
PER_RUN = ("run.seed", "run.name", "run.output_dir", "train.iterations", "train.export_at_end",
           "tracking.tracking_uri")  # fmt: skip
"""Keys of a resolved ``rig train`` config that the benchmark sets per run (or that only name
it): left out of the variant two folders are compared on."""


def rig_variant(config: dict[str, Any]) -> dict[str, Any]:
    """A resolved ``rig train`` config (``Config.model_dump(mode="json")``) as flat dotted keys,
    less :data:`PER_RUN`: what makes two rig runs the same variant. A preset edited to what an
    override set (``configs/crafter.yaml`` with ``--set learner.lr_scales.action_head=0.1``
    and the preset that later says 0.1) gives the same variant."""

    def flat(node: Any, key: str) -> dict[str, Any]:
        if not isinstance(node, dict) or not node:
            return {key: node}
        return {k: v for name, child in node.items()
                for k, v in flat(child, f"{key}.{name}" if key else name).items()}  # fmt: skip

    return {key: value for key, value in flat(config, "").items() if key not in PER_RUN}


def _folder_variant(folder: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The rig variant of a results folder: as recorded (``config["rig_variant"]``), else from
    the ``config.yaml`` its rig runs saved (folders from before it was recorded), else None."""
    import yaml

    if config.get("rig_variant") is not None:
        return config["rig_variant"]
    for saved in sorted(folder.glob("rig-seed*/*/config.yaml")):
        try:
            data = yaml.safe_load(saved.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(data, dict):
            return rig_variant(data)
    return None


def _variant_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """The first key (sorted) on which two variants differ, as ``key a!r / b!r``; None if equal."""
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return f"{key} {a.get(key)!r} / {b.get(key)!r}"
    return None


def read_results(folder: Path, flag: str) -> dict[str, Any]:
    """A finished benchmark folder's ``results.json`` (with its ``config`` and ``methods``);
    a ``UserError`` naming ``flag`` and the folder if it has none or it is not one."""
    path = folder / "results.json"
    try:
        result = json.loads(path.read_text())
        result["config"], result["methods"]  # noqa: B018 (the keys every reader needs)
    except FileNotFoundError:
        raise UserError(f"{flag} {folder}: no results.json (give a folder that "
                        "`rig bench learning --out` wrote)") from None  # fmt: skip
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{flag} {path}: not a learning benchmark's results") from None
    return result


def merge_results(folders: Sequence[str | Path], out: str | Path, eval_episodes: int = 0,
                  eval_seed: int = EVAL_SEED) -> dict[str, Any]:  # fmt: skip
    """One result from the ``results.json`` of several finished benchmark folders (seeds or
    sides run as separate processes, e.g. two at once on two cores): their runs pooled by
    side, summarised afresh, written with its plot to ``out``. The folders must agree on env,
    budget and threshold, and those holding rig runs on the preset and overrides; a seed may
    appear once per side (the random agent's, the same in every folder for a seed, is kept
    from the first folder that has it). Held-out evaluations are kept where the folders ran them
    with one setting (and their reports are still there); with ``eval_episodes``, every rig and
    peer run whose folder evaluated otherwise, failed to, or did not is evaluated now from the
    final policy it kept (rig: its run's newest checkpoint; peer: its saved module), into
    ``out``. Bad input is a ``UserError``."""
    if len(folders) < 2:
        raise UserError(f"--merge needs at least two result folders, got {len(folders)}")
    _check_eval(eval_episodes, eval_seed)
    loaded = []
    for folder in map(Path, folders):
        result = read_results(folder, "--merge")
        loaded.append((folder, result["config"], result["methods"]))
    first_folder, first, _ = loaded[0]
    for folder, config, _ in loaded[1:]:
        for key in MERGE_SAME:
            if config.get(key) != first.get(key):
                raise UserError(f"--merge: {folder} has {key} {config.get(key)!r}, "
                                f"{first_folder} {first.get(key)!r}; merge runs of one "
                                "benchmark setting only")  # fmt: skip
    with_rig = [(folder, config) for folder, config, methods in loaded if "rig" in methods]
    variants = [_folder_variant(folder, config) for folder, config in with_rig]
    if all(v is not None for v in variants):  # resolved configs: a preset edit = an override
        for (folder, _), variant in zip(with_rig[1:], variants[1:], strict=True):
            differs = _variant_difference(variants[0], variant)
            if differs:
                raise UserError(f"--merge: {with_rig[0][0]} and {folder} ran different rig "
                                f"variants ({differs}); merge runs of one variant only")  # fmt: skip
    else:  # a folder without its resolved config: compare the command lines
        for folder, config in with_rig[1:]:
            for key in MERGE_SAME_RIG:
                if config.get(key) != with_rig[0][1].get(key):
                    raise UserError(f"--merge: {folder} ran rig with {key} {config.get(key)!r}, "
                                    f"{with_rig[0][0]} with {with_rig[0][1].get(key)!r}; those "
                                    "are different variants")  # fmt: skip
    wanted = _eval_config(eval_episodes, eval_seed)
    if wanted is None:
        settings = [c["eval"] for _, c, _ in loaded if c.get("eval")]
        if any(other != settings[0] for other in settings):
            raise UserError("--merge: the folders ran held-out evaluations with different "
                            "settings; give --eval-episodes (and --eval-seed) to evaluate every "
                            "run alike")  # fmt: skip
        wanted = settings[0] if settings else None
    runs: dict[str, list[dict[str, Any]]] = {}
    plans: dict[str, Any] = {}
    sources: dict[tuple[str, int], tuple[Path, dict[str, Any]]] = {}  # (side, seed) -> folder
    for folder, config, methods in loaded:
        for method, data in methods.items():
            seen = {run["seed"] for run in runs.get(method, [])}
            for run in data["runs"]:
                if run["seed"] in seen and method == "random":
                    continue  # a deterministic baseline, run beside each side
                if run["seed"] in seen:
                    raise UserError(f"--merge: {method} seed {run['seed']} is in more than "
                                    f"one folder ({folder} and another); keep one")  # fmt: skip
                keep = ("seed", "ok", "error", "wall_s", "log", "points", "unlocks", "diagnostics")
                kept = {key: run.get(key, []) for key in keep}
                if config.get("eval") == wanted and _report_kept(run.get("eval")):
                    kept["eval"] = run["eval"]  # failed or moved ones are evaluated anew
                runs.setdefault(method, []).append(kept)
                sources[method, run["seed"]] = (folder, config)
            plan = plans.setdefault(method, config["plans"][method])
            if plan != config["plans"][method]:
                raise UserError(f"--merge: {folder} ran {method} with plan "
                                f"{config['plans'][method]}, another folder with {plan}; those "
                                "are different variants")  # fmt: skip
    out = _fresh_out(out)
    if eval_episodes:
        for method in COMPARED:
            for run in runs.get(method, []):
                if run["ok"] and "eval" not in run:
                    folder, config = sources[method, run["seed"]]
                    run["eval"] = _evaluate_kept(method, run["seed"], folder, config, out,
                                                 eval_episodes, eval_seed)  # fmt: skip
    for method_runs in runs.values():
        method_runs.sort(key=lambda run: run["seed"])
    runs = {method: runs[method] for method in METHODS if method in runs}
    result = summarize(runs, first["steps"], first["threshold"])
    rig_config = with_rig[0][1] if with_rig else first
    seeds = sorted({run["seed"] for method_runs in runs.values() for run in method_runs})
    result["config"] = {
        **{key: first[key] for key in MERGE_SAME},
        "seeds": seeds, "config": rig_config["config"], "overrides": rig_config["overrides"],
        "threads": first.get("threads"),
        "only": "both" if set(COMPARED) <= set(runs) else next(iter(runs)),
        "out": str(out), "plans": plans, "ray": first.get("ray"),
        "rig_variant": variants[0] if variants else None,
        "merged_from": [str(folder) for folder, _, _ in loaded], "eval": wanted,
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_curves(result, out / "curves.png")
    return result


def _report_kept(found: dict[str, Any] | None) -> bool:
    return bool(found) and "error" not in found and (
        Path(found["report"]).is_file() or "outcomes" in found
    )


def _evaluate_kept(method: str, seed: int, folder: Path, config: dict[str, Any], out: Path,
                   episodes: int, eval_seed: int) -> dict[str, Any]:  # fmt: skip
    """The held-out evaluation of a finished run of ``folder`` from the policy it kept."""
    print(f"{method} seed {seed}: held-out evaluation of {folder}'s final policy",
          file=sys.stderr, flush=True)  # fmt: skip
    if method == "rig":
        return eval_rig((folder / f"rig-seed{seed}").resolve(), out, seed, Path(config["config"]),
                        config["overrides"], episodes, eval_seed, config.get("threads") or 1)  # fmt: skip
    return eval_peer(peer_module_dir(folder, seed), out, seed, config["env"], config["size"],
                     config["env_kwargs"], episodes, eval_seed)  # fmt: skip


def summarize(runs: dict[str, list[dict[str, Any]]], steps: int, threshold: float) -> dict:
    """Smoothed curves, steps to threshold, final return and (envs with achievements) final
    Crafter score per run; medians over the runs that finished; rig / peer ratios."""
    table, fine = marks(steps, TABLE_MARKS), marks(steps, THRESHOLD_MARKS)
    methods: dict[str, Any] = {}
    for method, method_runs in runs.items():
        for run in method_runs:
            run["curve"] = windowed(run["points"])
            run["steps_to_threshold"] = steps_to_threshold(run["curve"], fine, threshold)
            final = value_at(run["curve"], steps)
            run["final_return"] = None if final is None else final[1]
            score = window_score(run.get("unlocks") or [])
            run["final_score"] = None if score is None else score[0]
            score = window_score(run.get("unlocks") or [], window=math.inf)
            run["run_score"] = None if score is None else score[0]
            run["late_diagnostics"] = late_means(run.get("diagnostics") or [], steps)
        ok = [r for r in method_runs if r["ok"]]
        evaluated = [r["eval"] for r in ok if r.get("eval") and "error" not in r["eval"]]
        finals = [r["final_return"] for r in ok if r["final_return"] is not None]
        scores = [r["final_score"] for r in ok if r["final_score"] is not None]
        run_scores = [r["run_score"] for r in ok if r["run_score"] is not None]
        methods[method] = {
            "runs": method_runs,
            "median": {
                "returns": median_curve([r["curve"] for r in ok], table),
                "steps_to_threshold": median_steps([r["steps_to_threshold"] for r in ok]),
                "final_return": statistics.median(finals) if finals else None,
                "final_score": statistics.median(scores) if scores else None,
                "run_score": statistics.median(run_scores) if run_scores else None,
                "wall_s": statistics.median(r["wall_s"] for r in ok) if ok else None,
                "eval_return": _median([e["return"] for e in evaluated]),
                "eval_score": _median([e["score"] for e in evaluated]),
                "late_diagnostics": {
                    name: statistics.median(values)
                    for name in PEER_DIAGNOSTICS
                    if (values := [r["late_diagnostics"][name] for r in ok
                                   if name in r["late_diagnostics"]])
                },  # fmt: skip
            },
        }
    ratios = {"steps": None, "wall": None}
    if set(COMPARED) <= set(methods):
        rig, peer = methods["rig"]["median"], methods["peer"]["median"]
        ratios["steps"] = ratio(rig["steps_to_threshold"], peer["steps_to_threshold"])
        ratios["wall"] = ratio(rig["wall_s"], peer["wall_s"])
    return {"marks": table, "threshold_marks": fine, "methods": methods, "ratios": ratios,
            "eval": pooled_eval(methods)}  # fmt: skip


def _median(values: Sequence[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return statistics.median(found) if found else None


def pooled_eval(methods: dict[str, Any]) -> dict[str, Any] | None:
    """Each side's held-out episodes pooled over its seeds (every seed's report read back, or
    the outcomes results.json kept of it; a side with a seed of neither is not pooled):
    mean return and Crafter score with bootstrap 95% intervals (``benchmarks/eval_spread``),
    and rig - peer with the interval of the difference; None where no side was evaluated. The
    intervals are over episodes of these trained policies: the spread between seeds is in each
    run's own figures, beside."""
    from benchmarks.eval_spread import difference, pool, spread

    pooled: dict[str, Any] = {}
    for method in COMPARED:
        reports = [kept_report(r["eval"]) for r in methods.get(method, {}).get("runs", [])
                   if r["ok"] and r.get("eval") and "error" not in r["eval"]]  # fmt: skip
        if reports and all(report is not None for report in reports):  # no partial pools
            pooled[method] = {**pool(reports), "seeds": len(reports)}
    if not pooled:
        return None
    spreads = {m: spread(data, seed=1 if m == "rig" else 2) for m, data in pooled.items()}
    found: dict[str, Any] = {
        m: {"seeds": pooled[m]["seeds"],
            **{k: v for k, v in s.items() if not k.endswith("_draws")}}
        for m, s in spreads.items()
    }  # fmt: skip
    if set(COMPARED) <= set(spreads):
        found["rig_minus_peer"] = difference(spreads["peer"], spreads["rig"])
    return found


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


# -- output --------------------------------------------------------------------------------------


def plot_curves(result: dict[str, Any], path: Path) -> None:
    """Return vs env steps: a thin line per seed, a thick median, the threshold dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    c = result["config"]
    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for method, color in zip(METHODS, ("tab:blue", "tab:orange", "tab:gray"), strict=True):
        if method not in result["methods"]:
            continue
        # a seed's return holds from one iteration to the next (value_at): steps, drawn "post"
        runs = result["methods"][method]["runs"]
        for run in runs:
            if run["curve"]:
                ax.step(*zip(*[p[:2] for p in run["curve"]], strict=True), where="post",
                        color=color, lw=0.8, alpha=0.4, marker=".", ms=3)  # fmt: skip
        ok = [r["curve"] for r in runs if r["ok"]]
        at = sorted({p[0] for curve in ok for p in curve})
        median = [(m, v) for m, v in zip(at, median_curve(ok, at), strict=True) if v is not None]
        if median:
            ax.step(*zip(*median, strict=True), where="post", color=color, lw=2.5, marker="o",
                    ms=3, label=f"{method}{' agent' if method == 'random' else ''}: median of "
                    f"{len(ok)} seeds")  # fmt: skip
    ax.axhline(c["threshold"], color="gray", ls="--", lw=1, label=f"threshold {c['threshold']}")
    ax.set_xlabel("env steps")
    ax.set_ylabel(f"mean episode return (moving, >= {c['window']} episodes)")
    ax.set_title(f"{c['env']}: rig train vs RLlib PPO, seeds {', '.join(map(str, c['seeds']))}")
    ax.set_xlim(0, c["steps"])
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=120, bbox_inches="tight")


def _num(value: float | None, fmt: str = "{:.2f}", none: str = "-") -> str:
    return none if value is None else fmt.format(value)


def header(result: dict[str, Any]) -> str:
    c = result["config"]
    parts = [f"{c['env']} ({c['size']}px), {c['steps']} env steps per run, seeds "
             f"{','.join(map(str, c['seeds']))}; median over seeds of the mean episode return "
             f"(episode-weighted moving mean over >= {c['window']} episodes)"]  # fmt: skip
    if "rig" in c["plans"]:
        p = c["plans"]["rig"]
        command = " ".join(["rig train -c", c["config"], *c["overrides"]])
        parts.append(f"rig: {command} ({p['iterations']} iterations x "
                     f"{p['steps_per_iteration']} env steps)")  # fmt: skip
    if "peer" in c["plans"]:
        p = c["plans"]["peer"]
        parts.append(f"peer: RLlib {c['ray']} PPO, default CNN, lr {PEER_LR}, {PEER_ENVS} envs, "
                     f"{p['iterations']} iterations x {p['batch']} env steps, minibatch "
                     f"{p['minibatch']}, {p['epochs']} epochs")  # fmt: skip
    return "; ".join(parts)


COLUMNS = ("env steps", "rig return", "peer return", "random return")


def table_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    columns = [result["methods"][m]["median"]["returns"] if m in result["methods"]
               else [None] * len(result["marks"]) for m in METHODS]  # fmt: skip
    return [(str(mark), *(_num(col[i], "{:+.3f}") for col in columns))
            for i, mark in enumerate(result["marks"])]  # fmt: skip


def ratio_lines(result: dict[str, Any]) -> list[str]:
    c, methods = result["config"], result["methods"]

    def per_seed(method: str, key: str, fmt: str, none: str) -> str:
        data = methods[method]
        seeds = [f"seed {r['seed']} " + (_num(r[key], fmt, none) if r["ok"] else "failed")
                 for r in data["runs"]]  # fmt: skip
        return f"{method}: {', '.join(seeds)}; median {_num(data['median'][key], fmt, none)}"

    lines = [f"env steps to reach return {c['threshold']} (moving mean over >= {c['window']} "
             "episodes, at budget/50 marks):"]  # fmt: skip
    compared = [m for m in methods if m in COMPARED]
    lines += [f"  {per_seed(m, 'steps_to_threshold', '{:.0f}', 'never')}" for m in compared]
    lines.append(f"final return at {c['steps']} env steps:")
    lines += [f"  {per_seed(m, 'final_return', '{:+.3f}', '-')}" for m in methods]
    if any(methods[m]["median"].get("final_score") is not None for m in methods):
        lines.append(f"Crafter score (%) of the final return's episodes (>= {c['window']}):")
        lines += [f"  {per_seed(m, 'final_score', '{:.2f}', '-')}" for m in methods]
        lines.append("Crafter score (%) over every episode of the run (Crafter's definition):")
        lines += [f"  {per_seed(m, 'run_score', '{:.2f}', '-')}" for m in methods]
    lines += eval_lines(result)
    late = {m: methods[m]["median"].get("late_diagnostics") for m in compared}
    if any(late.values()):
        lines.append("PPO diagnostics, mean over each run's last tenth (median over seeds):")
        for m in compared:
            found = ", ".join(f"{label} {late[m][name]:.3f}"
                              for name, label in DIAGNOSTIC_LABELS.items() if name in late[m])  # fmt: skip
            lines.append(f"  {m}: {found or '-'}")
    lines.append("wall-clock seconds per run:")
    lines += [f"  {per_seed(m, 'wall_s', '{:.0f}', '-')}" for m in compared]
    if set(COMPARED) <= set(methods):
        steps = result["ratios"]["steps"]
        lines.append(f"steps-to-threshold ratio rig / peer (medians): "
                     f"{_num(steps, none='n/a (a side never reached it)')} "
                     "(lower is better; <= 1.0: rig is at least as sample-efficient)")  # fmt: skip
        lines.append(f"wall-clock ratio rig / peer (medians): {_num(result['ratios']['wall'])}")
    failed = [f"{m} seed {r['seed']}: {r['error']} (log {r['log']})"
              for m in methods for r in methods[m]["runs"] if not r["ok"]]  # fmt: skip
    lines += [f"failed: {line}" for line in failed]
    if c.get("merged_from"):
        lines.append(f"merged from: {', '.join(c['merged_from'])}")
    lines.append(f"results: {c['out']}/results.json, plot: {c['out']}/curves.png")
    return lines


def eval_lines(result: dict[str, Any]) -> list[str]:
    """The held-out evaluation's lines of the report (none where there was none)."""
    from benchmarks.eval_spread import describe, describe_difference

    settings, methods = result["config"].get("eval"), result["methods"]
    evaluated = {m: [r for r in methods[m]["runs"] if r.get("eval")]
                 for m in COMPARED if m in methods}  # fmt: skip
    if not settings or not any(evaluated.values()):
        return []
    lines = [f"final policies on held-out worlds ({settings['episodes']} episodes per run, "
             f"{settings['envs']} envs reset with seed {settings['seed']}, actions sampled):"]  # fmt: skip
    for method, runs in evaluated.items():
        parts = []
        for run in runs:
            e = run["eval"]
            if "error" in e:
                parts.append(f"seed {run['seed']} failed ({e['error']})")
                continue
            score = "" if e["score"] is None else f", score {e['score']:.2f}%"
            parts.append(f"seed {run['seed']} return {e['return']:+.3f}{score}")
        median = methods[method]["median"]
        score = median.get("eval_score")
        lines.append(f"  {method}: {'; '.join(parts)}; median return "
                     f"{_num(median.get('eval_return'), '{:+.3f}')}"
                     + ("" if score is None else f", score {score:.2f}%"))  # fmt: skip
    pooled = result.get("eval") or {}
    for method in COMPARED:
        if method in pooled:
            lines.append(f"  {method}, {pooled[method]['seeds']} seeds pooled: "
                         f"{describe(pooled[method])} (bootstrap 95%)")  # fmt: skip
    if "rig_minus_peer" in pooled:
        lines.append(f"  rig - peer, pooled: {describe_difference(pooled['rig_minus_peer'])} "
                     "(bootstrap 95%; an interval that excludes 0 is a difference the episodes "
                     "support)")  # fmt: skip
    return lines


def add_run_arguments(parser: argparse.ArgumentParser, overrides_help: str) -> None:
    """The script options of a benchmark made of ``rig train`` runs (this one, the imagination
    ablation): env, real env-step budget, seeds, preset, overrides, threshold, threads."""
    parser.add_argument("--env", default="rig/Catch-v0")
    parser.add_argument("--steps", type=int, default=15000, help="env-step budget per run")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated")
    parser.add_argument("--config", default="configs/catch.yaml", help="rig preset YAML")
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        metavar="KEY=VALUE", help=overrides_help)  # fmt: skip
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, "rig train override (repeatable)")
    parser.add_argument("--only", default="both", choices=("rig", "peer", "both"))
    parser.add_argument("--out", default=None, help="default runs/bench-learning-<time>")
    parser.add_argument("--peer-epochs", type=int, default=PEER_EPOCHS)
    parser.add_argument("--no-random", action="store_false", dest="random_baseline",
                        help="skip the random agent (merge in a folder that has it)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                        help="pool the results.json of finished runs into --out (runs nothing)")
    parser.add_argument("--eval-episodes", type=int, default=0,
                        help="play each final policy this many episodes on held-out worlds")
    parser.add_argument("--eval-seed", type=int, default=EVAL_SEED,
                        help="the held-out worlds' reset seed")
    parser.add_argument("--peer-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer_worker is not None:  # one peer run, started by run_peer
        _peer_worker(args.peer_worker)
        return None

    def run() -> dict[str, Any]:
        if args.merge is not None:
            if args.out is None:
                raise UserError("--merge needs --out, the folder for the pooled results")
            return merge_results(args.merge, args.out, args.eval_episodes, args.eval_seed)
        return bench_learning(
            args.env, args.steps, parse_seeds(args.seeds), args.config, args.overrides,
            args.threshold, args.only, args.out, args.threads, args.peer_epochs,
            random_baseline=args.random_baseline, eval_episodes=args.eval_episodes,
            eval_seed=args.eval_seed,
        )  # fmt: skip

    return run_and_print(sys.modules[__name__], run, args.json)


if __name__ == "__main__":
    main()
