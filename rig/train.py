"""``rig train``: the RL loop that ties env runners, imagination actors and the learner together.

One iteration, from env step to weight update (docs/ARCHITECTURE.md draws it)::

    env runners (Ray, RLlib)   sample fragment_length steps per env with weights version v
          |  RolloutBatch (act outputs, rewards, ends, versions, chunk ids, last frames)
          v
    driver: drop rows older than v - max_policy_lag; V(last frames) for the bootstrap;
            VQ codes of the real next frames; GAE  ->  real Experience
            the gate (rl/gate.py): the world model against copy-the-frame and constant
            predictors on gate_rows of these fresh rows, before any update trains on them
          |  num_starts real frames (once the gate is open)
          v
    imagination actors (Ray)   act -> imagine -> act ... for `horizon` steps with version v
          |  ImaginedBatch (predicted rewards, continues)  ->  lambda returns  ->  imagined
          v  Experience, rows weighted by the imagination.weight x P(reached) (the continues)
    learner (DeepSpeed, in this process)   ppo epochs over minibatches of real + imagined rows
          |  published weights, version v + 1 (Ray object store; a broadcast to inference actors
          |  with rollout.weight_sync: collective)
          v
    env runners and imagination actors load them; MLflow gets the metrics; a checkpoint every N.

With ``ppo.max_policy_lag`` = k >= 1 sampling is asynchronous: k sample requests stay queued on
the runners while the learner updates, and each weight sync is queued behind them, so the runners
never wait for the learner and the learner's data is up to k versions old (``rollout/policy_lag``;
``ppo.decoupled`` corrects for it); with 0 the two alternate. All calls to the runners go through
one worker thread, so the runners see sample and weight-sync requests in order.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rig.config import Config
from rig.errors import UserError

log = logging.getLogger(__name__)

COUNTERS_FILE = "counters.json"
RNG_FILE = "rng.json"  # JSON, nothing to unpickle (checkpoints before it hold rng.pt)
ENGINE_TAG = "engine"
# Settings a DeepSpeed checkpoint only loads back into: its files' layout depends on them.
LAYOUT_KEYS = ("learner.zero_stage", "learner.precision")


class DivergedError(UserError):
    """The loss or the weights turned non-finite; the run stopped before saving or publishing."""


@dataclass
class Counters:
    """What a checkpoint must restore besides weights and optimiser (all monotonic but
    ``kl_coeff``)."""

    iteration: int = 0  # iterations finished
    env_steps: int = 0
    imagined_steps: int = 0
    version: int = 1  # weights version the runners hold (1: the initial weights)
    dropped_stale: int = 0
    episodes: int = 0  # finished episodes
    unlocks: dict[str, int] = field(default_factory=dict)  # achievement -> episodes unlocking it
    # ppo.behaviour_kl_coeff as adapted so far (None: the config's initial value; checkpoints
    # from before it had none)
    kl_coeff: float | None = None
    # the imagination gate's constant predictors (rl.gate.RunningConstants as a dict), fitted on
    # the real transitions of the iterations before the current one
    world_constants: dict[str, float] = field(default_factory=dict)
    # the last imagination.gate_window world-model checks (rl.gate.world_model_check's metrics)
    world_checks: list[dict[str, float]] = field(default_factory=list)


def policy_factory(config: Config):
    """A picklable zero-argument-but-codec factory for the runners' and actors' policy."""
    from actors.rollout import checkpoint_policy, preset_policy

    p = config.policy
    if p.init_from:
        return checkpoint_policy(p.init_from, **p.heads())
    return preset_policy(p.preset, config.run.seed, **p.heads())


def act_kwargs(config: Config) -> dict[str, Any]:
    p = config.policy
    return {
        "task": p.task,
        "max_reasoning_tokens": p.max_reasoning_tokens,
        "temperature": p.temperature,
        "lookahead": p.lookahead,
    }


class Trainer:
    """Builds everything from a validated :class:`Config` and runs ``train.iterations``."""

    def __init__(self, config: Config, run_dir: Path, resume_from: Path | None = None):
        import torch

        from learner.checkpoints import CheckpointManager

        check_learner(config)
        self.config, self.run_dir = config, run_dir
        self.counters = Counters()
        self.resumed_from: int | None = None  # the iteration restored by --resume
        random.seed(config.run.seed)
        np.random.seed(config.run.seed)
        torch.manual_seed(config.run.seed)
        self.generator = torch.Generator().manual_seed(config.run.seed)

        # -- the learner: in this process (one rank), or a group of Ray actors ----------------
        self.group = config.learner.num_ranks > 1
        if self.group:
            from actors.learner import LearnerGroup
            from learner.rank import build_policy, run_codec

            self._start_ray()
            self.learner = LearnerGroup(config)
            self.engine = self.reference = None
        else:
            from learner.rank import LearnerRank

            self.learner = LearnerRank(config)
            self.codec, self.engine = self.learner.codec, self.learner.engine
            self.policy = self.learner.policy
            self.reference = self.learner.reference
        try:
            if self.group:
                # The driver's own copy, loaded with every published version: V(s_T), the next
                # frames' codes, traces and the export read the weights the ranks publish.
                self.codec = run_codec(config)
                self.policy = build_policy(config, self.codec).eval().requires_grad_(False)
                if config.learner.device != "cpu" and torch.cuda.is_available():
                    self.policy.to("cuda")  # the driver's forwards, on its GPU if it has one
            self.checkpoints = CheckpointManager(run_dir, config.train.keep_checkpoints)
            if resume_from is not None:
                self._restore(resume_from)
            self._start_actors()
        except BaseException:
            if self.group:
                self.learner.stop()  # its actors hold CPUs (GPUs) until the process ends
            raise

    def _start_actors(self) -> None:
        """The env runners and imagination actors, then the first publish of the weights."""
        config = self.config
        if not self.group:
            self._start_ray()
        from actors.imagination import ImaginationWorkers
        from actors.rollout import RolloutSettings, RolloutWorkers
        from rl.losses import world_model_trains

        self.rollouts = RolloutWorkers(
            RolloutSettings(
                env_id=config.env.id,
                env_size=config.env.size,
                env_kwargs=dict(config.env.kwargs),
                num_env_runners=config.rollout.num_env_runners,
                num_envs_per_env_runner=config.env.num_envs,
                rollout_fragment_length=config.rollout.fragment_length,
                policy_factory=policy_factory(config),
                act_kwargs=act_kwargs(config),
                seed=config.run.seed,
                history=config.policy.history,
                max_num_env_runner_restarts=config.rollout.max_restarts,
                restart_delay_s=config.rollout.restart_delay_s,
                num_cpus_per_env_runner=config.rollout.num_cpus_per_runner,
                num_gpus_per_env_runner=config.rollout.num_gpus_per_runner,
                custom_resources_per_env_runner=dict(config.rollout.resources),
                num_inference_actors=config.rollout.num_inference_actors,
                num_cpus_per_inference_actor=config.rollout.num_cpus_per_inference_actor,
                num_gpus_per_inference_actor=config.rollout.num_gpus_per_inference_actor,
                inference_wait_s=config.rollout.inference_wait_ms / 1000,
                weight_sync=config.rollout.weight_sync,
                weight_sync_bucket_mb=config.rollout.weight_sync_bucket_mb,
            )
        )
        self.imagination = None
        if config.imagination.horizon > 0:
            kwargs = act_kwargs(config)
            kwargs.pop("task")
            factory = functools.partial(policy_factory(config), self.codec)  # zero-argument
            gpus = config.imagination.num_gpus_per_actor
            self.imagination = ImaginationWorkers(
                config.imagination.num_actors, factory, kwargs, config.run.seed,
                actor_options={"num_gpus": gpus} if gpus else None,
                imagine_temperature=self.imagine_temperature,
            )  # fmt: skip
        # whether an update reads the real next frames' VQ codes; when not, none are encoded
        self.needs_codes = world_model_trains(config.ppo.loss_scales, self.imagination is not None)
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rollouts")
        self._syncs: collections.deque[concurrent.futures.Future] = collections.deque()
        self._publish()  # every runner and actor starts from the learner's weights

    # -- set-up helpers ----------------------------------------------------------------------

    def _start_ray(self) -> None:
        needs_ray = self.config.rollout.num_env_runners > 0 or self.group or (
            self.config.imagination.horizon > 0 and self.config.imagination.num_actors > 0
        )
        self._ray_started = needs_ray
        if not needs_ray:
            return
        import ray

        from actors.local import init_ray

        if not ray.is_initialized():
            address = self.config.train.ray_address
            # A local Ray (loopback only, actors/local.py) counts logical CPUs: declare one per
            # actor at least, so a 2-core laptop runs the debug preset's 3 actors, knowingly
            # oversubscribed, instead of waiting forever for a CPU that never frees up.
            rollout = self.config.rollout
            actors = rollout.num_env_runners + (
                self.config.imagination.num_actors if self.config.imagination.horizon else 0
            ) + int(np.ceil(rollout.num_inference_actors * rollout.num_cpus_per_inference_actor))
            if self.group:
                learner = self.config.learner
                actors += int(np.ceil(learner.num_ranks * learner.num_cpus_per_rank))
            init_ray(address, num_cpus=None if address else max(os.cpu_count() or 1, actors))

    def _publish(self, wait: bool = True) -> float:
        """Send the learner's weights (as ``counters.version``) to runners and actors; seconds.
        ``wait`` False: the runners' sync is queued behind their samples in flight (the worker
        thread keeps the order) and its result is checked later (:meth:`_synced`)."""
        start = time.perf_counter()
        state, packed = self._weights()
        version = self.counters.version
        # rollout.weight_sync collective: the inference actors get the tensors by a broadcast
        # from this process (actors/collective.py); imagination actors the object store still
        collective = self.config.rollout.weight_sync == "collective"
        tensors = state
        if self._ray_started and (not collective or self.imagination is not None):
            import ray

            from actors.weights import publish

            # one zero-copy put for runners and actors alike
            state = ray.put(packed) if self.group else publish(state)
        rollout_state = tensors if collective else state
        self._syncs.append(self.pool.submit(self.rollouts.sync_weights, rollout_state, version))
        self._synced(wait)
        if self.imagination is not None:
            self.imagination.sync_weights(state, version)
        return time.perf_counter() - start

    def _weights(self) -> tuple[dict[str, Any], Any]:
        """The learner's full weights (checked finite), and with a learner group rank 0's
        packed NumPy buffers of them (else None); a group's copy here gets them too."""
        packed = None
        if self.group:  # rank 0's full weights, already packed as NumPy buffers
            from actors.weights import unpack_state

            packed = self.learner.published_state_dict()
            state = unpack_state(packed)
        else:
            state = self.engine.published_state_dict()
        self._check_finite({}, state)  # never hand runners (or a checkpoint) non-finite weights
        if self.group:
            self.policy.load_state_dict(state)
        return state, packed

    def _synced(self, wait: bool = True) -> None:
        """Raise the error of any runner sync that failed; ``wait``: for all of them to end."""
        while self._syncs and (wait or self._syncs[0].done()):
            self._syncs.popleft().result()

    # -- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Engine, counters and RNG states as ``checkpoints/iter_N`` (learner.checkpoints);
        meta.json also keeps the resolved config, so a resume can name a changed setting."""
        from learner.checkpoints import dump_rng

        c = self.counters

        def write(tmp: Path) -> None:
            self.learner.save_checkpoint(tmp, ENGINE_TAG, {"iteration": c.iteration})
            (tmp / COUNTERS_FILE).write_text(json.dumps(vars(c)))
            (tmp / RNG_FILE).write_text(dump_rng({"generator": self.generator}))

        meta = {"version": c.version, "config": self.config.model_dump(mode="json")}
        return self.checkpoints.save(c.iteration, write, meta)

    def _restore(self, checkpoint: Path) -> None:
        """Model, optimiser, scheduler, counters and RNG states from ``checkpoint``.

        A setting the checkpoint's layout depends on (:data:`LAYOUT_KEYS`) that differs from the
        one it was saved with is refused up front, naming it. Files that do not load are then
        told apart by their sha256 digests: changed since saving is corruption (resume from the
        one before); intact is a mismatch with this run's config, and the line names the
        settings that differ from the checkpoint's."""
        from learner.checkpoints import CheckpointError, load_rng, read_meta

        saved = read_meta(checkpoint)["meta"].get("config")
        differs = _config_differences(saved, self.config.model_dump(mode="json"))
        layout = [d for d in differs if d.split("=")[0] in LAYOUT_KEYS]
        run = checkpoint.parent.parent
        if layout:
            raise CheckpointError(
                f"cannot resume {checkpoint} with {', '.join(layout)}: a DeepSpeed checkpoint "
                f"loads only with the ZeRO stage and precision it was saved with (nothing is "
                f"wrong with it); resume with the saved values, or `rig export {run} DIR` and "
                f"start a new run with --init-from DIR"
            )
        try:
            self.learner.load_checkpoint(checkpoint, ENGINE_TAG)
            self.counters = Counters(**json.loads((checkpoint / COUNTERS_FILE).read_text()))
            if (checkpoint / RNG_FILE).is_file():
                load_rng((checkpoint / RNG_FILE).read_text(), {"generator": self.generator})
            else:  # written before rng.json: tensors and plain types only
                self._restore_rng_pt(checkpoint / "rng.pt")
        except UserError:
            raise
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            cause = f"{type(err).__name__}: {first[:200]}"
            try:
                read_meta(checkpoint, verify=True)
            except CheckpointError as damaged:
                raise CheckpointError(
                    f"{damaged}; delete that folder to resume from the one before it"
                ) from err
            if _has_digests(checkpoint):
                changed = f"; settings changed since it was saved: {', '.join(differs)}" if differs else ""
                raise CheckpointError(
                    f"checkpoint {checkpoint} is intact (sha256 checked) but does not load into "
                    f"this run ({cause}){changed}; resume with the settings it was saved with"
                ) from err
            raise CheckpointError(
                f"corrupted checkpoint {checkpoint}: {cause}; "
                f"delete that folder to resume from the one before it"
            ) from err
        self.counters.version += 1  # the restored weights are published as a new version
        self.resumed_from = self.counters.iteration

    def _restore_rng_pt(self, path: Path) -> None:
        import torch

        from learner.checkpoints import set_rng_state

        state = torch.load(path, weights_only=True)
        set_rng_state(state["rng"])
        self.generator.set_state(state["generator"])

    def _check_finite(self, metrics: dict[str, float], state=None) -> None:
        """Stop (DivergedError) before a non-finite loss or weights are published or saved."""
        bad = [k for k, v in metrics.items() if (k.startswith("loss/") or k == "learner/grad_norm")
               and v is not None and not np.isfinite(float(v))]  # fmt: skip
        if state is not None:
            from actors.weights import non_finite

            bad += [f"weights {k}" for k in non_finite(state)]
        if not bad:
            return
        latest = self.checkpoints.latest()
        good = f"the last good checkpoint is {latest.name}" if latest else "no checkpoint was saved"
        more = f" and {len(bad) - 2} more" if len(bad) > 2 else ""
        raise DivergedError(
            f"iteration {self.counters.iteration + 1}: {', '.join(bad[:2])}{more} not finite; "
            f"stopped without saving it, {good} (rig train --resume {self.run_dir}, perhaps with "
            f"a lower learner.lr or learner.grad_clip)"
        )

    # -- one iteration -----------------------------------------------------------------------

    def real_experience(self, batch) -> tuple[Any, dict[str, float], Any]:
        """Drop stale rows, bootstrap chunk ends, encode next frames (if a loss reads them), GAE.
        Also returns each kept row's real next frame (None when nothing reads them)."""
        import torch

        from rl.experience import real_experience
        from rl.imagine import frame_codes
        from rl.policy import History

        cfg, c = self.config, self.counters
        # an iteration publishes 1 + imagination.updates versions at most: a sample in flight
        # is at most max_policy_lag iterations old
        fresh = batch.versions >= c.version - cfg.ppo.max_policy_lag * (1 + cfg.imagination.updates)
        dropped = int((~fresh).sum())
        c.dropped_stale += dropped
        keep = torch.as_tensor(np.flatnonzero(fresh))
        if len(keep) == 0:
            return None, {"rollout/dropped_stale": dropped}, None
        chunks = batch.chunks[fresh]
        used, chunks = np.unique(chunks, return_inverse=True)  # renumber the surviving chunks
        act = batch.act[keep]
        frames = act.frames.cpu()
        last = torch.as_tensor(batch.last_frames[used])
        is_last = np.append(chunks[1:] != chunks[:-1], True)
        # V(s_T) of each chunk's last frame; a chunk that ended in death needs none (GAE cuts)
        boot = torch.zeros(len(used))
        ends = np.flatnonzero(is_last)  # the last row of each chunk
        alive = torch.as_tensor(ends[~batch.terminated[fresh][ends]])
        with torch.no_grad():
            if len(alive):
                # V(s_T) as act computes V(s): the state's prompt with its history (the chunk's
                # last step pushed in), nothing sampled; the learner's current weights, as
                # RLlib's GAE connector uses them
                needs = torch.as_tensor(chunks)[alive]
                boot[needs] = self.policy.state_values(
                    last[needs], cfg.policy.task, History.after(act[alive])
                ).float().cpu()
            codes = following = None  # nothing reads the next frames (world_model_trains)
            if self.needs_codes:
                following = torch.cat([frames[1:], frames[:1]])  # frames[n + 1] (wraps; below)
                following[torch.as_tensor(is_last)] = last[chunks[is_last]]
                codes = frame_codes(self.policy, following)
        exp = real_experience(
            act, batch.rewards[fresh], batch.terminated[fresh], batch.truncated[fresh], chunks,
            boot, codes, batch.versions[fresh], cfg.ppo.gamma, cfg.ppo.lam,
        )  # fmt: skip
        return exp, {"rollout/dropped_stale": dropped}, following

    @property
    def imagine_temperature(self) -> float:
        """The frame sampler's temperature: ``imagination.temperature``, or the policy's."""
        t = self.config.imagination.temperature
        return self.config.policy.temperature if t is None else t

    def check_world_model(self, real, following) -> dict[str, float]:
        """The world model against its baselines (rl.gate) on ``imagination.gate_rows`` of this
        iteration's fresh real rows, before the update trains on them; then the constant
        predictors take in every fresh row. Rows and frames are drawn by a generator of their
        own (seeded by the weights version), so the check leaves the update's draws alone."""
        import torch

        from rl.gate import RunningConstants, world_model_check

        c = self.counters
        constants = RunningConstants(**c.world_constants)
        gen = torch.Generator().manual_seed(c.version)
        rows = torch.randperm(len(real), generator=gen)[: self.config.imagination.gate_rows]
        metrics = world_model_check(
            self.policy, real.act[rows], following[rows], real.rewards[rows],
            real.continues[rows], constants, self.imagine_temperature,
            torch.Generator(self.policy.device).manual_seed(c.version),
            None if real.next_codes is None else real.next_codes[rows],  # encoded once, for both
            self.config.policy.task,
        )  # fmt: skip
        constants.update(real.rewards, real.continues)
        c.world_constants = vars(constants)
        return metrics

    def imagined_experience(self, real) -> tuple[Any, dict[str, float], Any]:
        import torch

        from rl.experience import imagined_experience

        cfg = self.config.imagination
        starts = torch.randperm(len(real), generator=self.generator)[: cfg.num_starts]
        frames = real.act.frames[starts].cpu()
        t0 = time.perf_counter()
        imagined = self.imagination.rollout(frames, self.config.policy.task, cfg.horizon)
        seconds = time.perf_counter() - t0
        exp = imagined_experience(
            imagined.act, imagined.rewards, imagined.continues, imagined.bootstrap,
            imagined.horizon, imagined.version, cfg.weight, self.config.ppo.gamma,
            self.config.ppo.lam, self.policy.image_tokens, cfg.value_weight,
        )  # fmt: skip
        steps = len(imagined.rewards)
        metrics = {
            "imagination/steps_per_s": steps / max(seconds, 1e-9),
            "imagination/reward_mean": float(imagined.rewards.mean()),
            "imagination/reward_std": float(imagined.rewards.std()),
            "imagination/continue_mean": float(imagined.continues.mean()),
            "imagination/return_mean": float(exp.returns.mean()),
        }
        self.counters.imagined_steps += steps
        return exp, metrics, (frames, imagined)

    def imagined_updates(self, real) -> dict[str, float]:
        """``imagination.updates`` more PPO updates, each on imagined rows only: the imagination
        actors get the learner's weights, imagine from this iteration's real start states, and
        the learner updates on that (Dyna's planning steps: the policy improves more per real
        env step than one update of real + imagined rows allows). Each update is a version."""
        c, n = self.counters, self.config.imagination.updates
        rows, kl, off, checked = 0, 0.0, 0.0, 0.0
        scale = float(real.advantages.std()) if len(real) > 1 else None
        for _ in range(n):
            self.imagination.sync_weights(self._weights()[0], c.version)
            exp, _, _ = self.imagined_experience(real)
            if scale is not None:  # scaled as in the update beside the real rows (ppo.normalize)
                exp = dataclasses.replace(exp, real_advantage_std=scale)
            if not bool((exp.versions == c.version).all()):  # on-policy or not at all
                raise RuntimeError(f"imagined rows of weights {exp.versions.unique().tolist()} "
                                   f"for an update of weights {c.version}")  # fmt: skip
            m = self.learner.update(exp, self.generator, c.version, 0.0, False)
            self._check_finite(m)
            rows += len(exp)
            kl += m.get("policy/approx_kl_imagined", 0.0) / n
            off = max(off, m.get("sync/logp_abs_diff_max", 0.0))  # actor vs learner log-probs
            checked += m.get("sync/logp_rows_checked", 0.0)
            c.version += 1
        return {"imagination/extra_updates": float(n), "imagination/extra_rows": float(rows),
                "imagination/extra_approx_kl": kl, "imagination/extra_sync_diff_max": off,
                "imagination/extra_sync_rows_checked": checked,
                **({} if scale is None else {"imagination/extra_real_advantage_std": scale})}  # fmt: skip

    def run(self, tracker, progress=None) -> dict[str, float]:
        """Iterate to ``train.iterations``; returns the last iteration's metrics."""
        from rl.experience import Experience
        from rl.gate import beats_baselines, pooled
        from rl.losses import adapt_kl_coeff

        cfg, c = self.config, self.counters
        depth = cfg.ppo.max_policy_lag  # samples in flight on the runners during an update
        metrics: dict[str, float] = {}
        if self.resumed_from is not None:  # MLflow forgets the abandoned attempt's later steps
            tracker.rewind(self.resumed_from)
        inflight = collections.deque([self.pool.submit(self._sample)])
        while c.iteration < cfg.train.iterations:
            t_start = time.perf_counter()
            batch, sample_seconds = inflight.popleft().result()
            while len(inflight) < depth:  # the runners collect the next batches meanwhile
                inflight.append(self.pool.submit(self._sample))
            c.env_steps += len(batch)
            c.episodes += len(batch.episodes)
            for episode in batch.episodes:
                for name in episode.get("unlocked", ()):
                    c.unlocks[name] = c.unlocks.get(name, 0) + 1
            real, m, following = self.real_experience(batch)
            metrics = {**m}
            parts = [real] if real is not None else []
            images = None
            gate = cfg.imagination.gate
            gate_open = gate == "open"
            if real is not None and following is not None and cfg.imagination.gate_rows:
                check = self.check_world_model(real, following)
                metrics.update(check)
                c.world_checks = [*c.world_checks, check][-cfg.imagination.gate_window :]
                gate_open = gate_open or (gate == "earned"
                                          and beats_baselines(pooled(c.world_checks),
                                                              cfg.imagination.gate_checks))  # fmt: skip
            # a shut gate (earned, not yet) imagines nothing: its rows would not be used
            if real is not None and self.imagination is not None and (gate_open or gate == "closed"):
                imagined, m, images = self.imagined_experience(real)
                metrics.update(m)
                if gate_open:
                    parts.append(imagined)
            metrics["imagination/gate_open"] = float(gate_open and self.imagination is not None)

            t_learn = time.perf_counter()
            if parts:
                exp = Experience.concat(parts, self.policy.ids.pad)
                coeff = cfg.ppo.behaviour_kl_coeff if c.kl_coeff is None else c.kl_coeff
                # ppo.freeze_actor_iterations: the critic fits before the policy moves
                frozen = c.iteration < cfg.ppo.freeze_actor_iterations
                metrics.update(self.learner.update(exp, self.generator, c.version, coeff, frozen))
                metrics["learner/actor_frozen"] = float(frozen)
                self._check_finite(metrics)
                if coeff > 0 and not frozen:  # RLlib's adaptive KL penalty: the next coefficient
                    metrics["learner/kl_coeff"] = coeff
                    if cfg.ppo.behaviour_kl_target is not None and "policy/approx_kl" in metrics:
                        coeff = adapt_kl_coeff(coeff, metrics["policy/approx_kl"],
                                               cfg.ppo.behaviour_kl_target)  # fmt: skip
                    c.kl_coeff = coeff
                metrics["learner/samples_per_s"] = (
                    len(exp) * cfg.ppo.epochs / max(time.perf_counter() - t_learn, 1e-9)
                )
            c.version += 1
            if parts and gate_open and self.imagination is not None and not frozen:
                metrics.update(self.imagined_updates(real))
            # queued behind the samples in flight: they finish on the weights they started with
            metrics["sync/seconds"] = self._publish(wait=False)
            if not inflight:  # max_policy_lag 0: the next sample waits for these weights
                inflight.append(self.pool.submit(self._sample))
            c.iteration += 1

            # -- metrics, artifacts, checkpoints ---------------------------------------------
            metrics.update(self._rollout_metrics(batch, sample_seconds))
            metrics["rollout/policy_lag"] = float(c.version - 1 - batch.versions.min())
            metrics["rollout/runner_restarts"] = float(self.rollouts.num_restarts)
            metrics["rollout/healthy_runners"] = float(self.rollouts.num_healthy_runners)
            metrics["time/iteration_s"] = time.perf_counter() - t_start
            metrics["counters/env_steps"] = float(c.env_steps)
            metrics["counters/imagined_steps"] = float(c.imagined_steps)
            metrics["counters/dropped_stale"] = float(c.dropped_stale)
            if c.iteration % cfg.tracking.log_every == 0 or c.iteration == cfg.train.iterations:
                tracker.log_metrics(metrics, step=c.iteration)
            if c.iteration % cfg.train.traces_every == 0 or c.iteration == 1:
                tracker.log_text(self._traces(batch), f"traces/iter_{c.iteration:06d}.txt")
            if images is not None and (c.iteration % cfg.tracking.image_every == 0
                                       or c.iteration == 1):  # fmt: skip
                self._log_images(tracker, *images)
            if c.iteration % cfg.train.checkpoint_every == 0 or c.iteration == cfg.train.iterations:
                self.save_checkpoint()
            if progress is not None:
                progress(c, metrics)
        for pending in inflight:
            pending.result()
        self._synced()
        return metrics

    def _sample(self) -> tuple[Any, float]:
        """One sample from the runners (on the worker thread) and how long it took."""
        start = time.perf_counter()
        batch = self.rollouts.sample()
        return batch, time.perf_counter() - start

    def _rollout_metrics(self, batch, seconds: float) -> dict[str, float]:
        from envs.crafter_env import ACHIEVEMENTS
        from envs.stats import crafter_score, summarize

        c = self.counters
        out = {
            "rollout/env_steps_per_s": len(batch) / max(seconds, 1e-9),
            "rollout/reward_mean": float(batch.rewards.mean()),  # real, beside imagination/*
            "rollout/reward_std": float(batch.rewards.std()),
            **self.rollouts.inference_stats(),  # the batch the inference actors act on, if any
        }
        if batch.episodes:
            s = summarize(batch.episodes)
            out["episode/return_mean"] = s["return_mean"]
            out["episode/length_mean"] = s["length_mean"]
            out["episode/count"] = float(len(batch.episodes))
        if c.episodes and self.config.env.id == "rig/Crafter-v0":  # over every episode so far
            rates = {a: 100.0 * c.unlocks.get(a, 0) / c.episodes for a in ACHIEVEMENTS}
            out["crafter/score"] = crafter_score(rates)
            out.update({f"crafter/success/{a}": r for a, r in rates.items()})
        return out

    def _traces(self, batch, rows: int = 8) -> str:
        act = batch.act
        lines = []
        for n in range(min(rows, len(batch))):
            r = act.tokens[n][act.reasoning_mask[n]]
            text = self.policy.tok.decode(r.tolist(), skip_special_tokens=True)
            lines.append(f"step {n}: reasoning={text!r} action={act.action_texts[n]!r} "
                         f"reward={float(batch.rewards[n]):+.2f}")  # fmt: skip
        return "\n".join(lines) + "\n"

    def _log_images(self, tracker, frames, imagined) -> None:
        from rig.tracking import side_by_side

        H = imagined.horizon
        real = frames.numpy()[:, None].repeat(H, 1).reshape(-1, *frames.shape[1:])
        dreamt = imagined.imagined_frames.numpy().reshape(-1, *frames.shape[1:])
        tracker.log_image(side_by_side(real[: 4 * H], dreamt[: 4 * H]),
                          f"imagination/iter_{self.counters.iteration:06d}.png")  # fmt: skip

    # -- the end -----------------------------------------------------------------------------

    def export(self, out_dir: Path) -> Path:
        """The current policy as an HF directory (``RigPolicy.save``)."""
        extra = {"iteration": self.counters.iteration, "version": self.counters.version,
                 "config": self.config.model_dump(mode="json")}  # fmt: skip
        return self.policy.save(out_dir, extra=extra, overwrite=True)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)  # queued samples need not run
        self.rollouts.stop()
        if self.imagination is not None:
            self.imagination.stop()
        if self.group:
            self.learner.stop()


def check_learner(config: Config) -> None:
    """Learner settings that only fail together, as one line naming the key and the fix."""
    from rig.errors import ConfigError

    lc = config.learner
    if lc.num_ranks > 1 and config.ppo.minibatch_size < lc.num_ranks:
        raise ConfigError(
            f"learner.num_ranks={lc.num_ranks} needs ppo.minibatch_size >= {lc.num_ranks} (each "
            f"rank trains on its share of every minibatch), got {config.ppo.minibatch_size}; "
            f"raise ppo.minibatch_size or lower learner.num_ranks"
        )
    if lc.num_ranks > 1 and lc.device == "cuda" and lc.num_gpus_per_rank < 1:
        raise ConfigError(
            f"learner.device=cuda with learner.num_ranks={lc.num_ranks} needs "
            f"learner.num_gpus_per_rank=1 (each rank's GPU is reserved through Ray), got "
            f"{lc.num_gpus_per_rank:g}"
        )


def _config_differences(saved: dict | None, current: dict) -> list[str]:
    """``key=current (saved: old)`` for every dotted key whose value changed (none if unknown)."""
    if saved is None:
        return []
    from rig.tracking import flatten_params

    old, new = flatten_params(saved), flatten_params(current)
    return [f"{k}={new.get(k)} (saved: {old.get(k)})" for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k)]  # fmt: skip


def _has_digests(checkpoint: Path) -> bool:
    from learner.checkpoints import META

    return bool(json.loads((checkpoint / META).read_text()).get("sha256"))


def export_checkpoint(config: Config, checkpoint: Path, out_dir: Path) -> Path:
    """A ``rig train`` checkpoint -> an HF directory: the run's policy architecture (preset or
    init_from), the DeepSpeed checkpoint's weights, ``RigPolicy.save``. The learner settings
    are the checkpoint's own (meta.json), so a resume that changed them does not matter; a
    checkpoint with non-finite weights is refused."""
    from actors.weights import non_finite
    from learner import DeepSpeedEngine
    from learner.checkpoints import CheckpointError, read_meta
    from learner.rank import build_policy, run_codec
    from rig.config import LearnerConfig

    saved = read_meta(checkpoint)["meta"].get("config")
    if saved is not None:
        config = config.model_copy(update={"learner": LearnerConfig.model_validate(saved["learner"])})

    policy = build_policy(config, run_codec(config))  # as in training: same optimiser layout
    engine = DeepSpeedEngine(policy, config.learner)
    engine.load_checkpoint(checkpoint, ENGINE_TAG)
    bad = non_finite(engine.published_state_dict())
    if bad:
        raise CheckpointError(f"checkpoint {checkpoint} holds non-finite weights ({len(bad)} "
                              f"tensors, e.g. {bad[0]}); delete that folder to export the one before it")  # fmt: skip
    counters = json.loads((checkpoint / COUNTERS_FILE).read_text())
    extra = {"iteration": counters["iteration"], "version": counters["version"],
             "config": config.model_dump(mode="json")}  # fmt: skip
    return engine.module.save(out_dir, extra=extra)


__all__ = ["Counters", "DivergedError", "Trainer", "act_kwargs", "export_checkpoint", "policy_factory"]
