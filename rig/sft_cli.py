"""``rig sft`` and ``rig eval``: supervised fine-tuning of a RIG policy on a dataset, and playing
a checkpoint to measure it (docs/sft.md).

    rig sft --dataset data/s2 --stage basic --steps 1000 --out ckpt/basic
    rig sft --dataset data/s4 --stage lookahead --init-from ckpt/basic/final --out ckpt/la
    rig eval --checkpoint ckpt/la/final --episodes 8 --lookahead 2 --num-envs 4
    rig train --init-from ckpt/la/final -c configs/debug.yaml      # RL continues from it

Every input is checked before anything is written: a bad one is one line, exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NamedTuple

import typer

from rig.errors import UserError
from rig.progress import Bar

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="preset YAML (learner, tracking, policy.task and head_hidden, env sections)"
    ),
]
Overrides = Annotated[
    list[str] | None,
    typer.Argument(help="key=value overrides, e.g. learner.grad_clip=0.5", show_default=False),
]


def _out_dir(out: Path | None, cfg, command: str) -> Path:
    from rig.runs import new_run_dir
    from rig.tracking import check_tracking_reachable

    check_tracking_reachable(cfg.tracking, cfg.run.output_dir)  # seconds, not MLflow's minutes

    if out is None:
        return new_run_dir(cfg.run.output_dir, cfg.run.name, command)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty folder; give a new folder")
    return out


def _checkpoint_record(path: Path, flag: str) -> dict[str, Any]:
    """The checkpoint's ``rig_policy.json`` record after the cheap checks; UserError if broken."""
    from rl.model import CheckpointError, check_pretrained_dir

    try:
        record, _ = check_pretrained_dir(path)
    except CheckpointError as err:
        raise UserError(f"{flag}: {err}") from None
    return record or {}


def _load_policy(path: Path, codec, flag: str):
    from rl.model import CheckpointError
    from rl.policy import RigPolicy

    try:
        return RigPolicy.load(path, codec)
    except CheckpointError as err:
        raise UserError(f"{flag}: {err}") from None


def _trained_env(record: dict[str, Any]) -> str | None:
    """The env a checkpoint was trained on (SFT record, or a `rig train` export's config)."""
    return _trained_settings(record).get("env_id")


def _trained_settings(record: dict[str, Any]) -> dict[str, Any]:
    """How a checkpoint acted while it was trained, in the SFT record's keys (``env_id``,
    ``env_kwargs``, ``size``, ``task``, ``history``, ``max_reasoning_tokens``): its
    ``rig sft`` record, else a ``rig train`` export's config (env and policy sections). An RL
    policy trained with 0 reasoning tokens is scored with 0, not the config's default cap."""
    extra = record.get("extra") or {}
    if extra.get("sft"):
        return dict(extra["sft"])
    config = extra.get("config") or {}
    env, policy = config.get("env") or {}, config.get("policy") or {}
    settings = {"env_id": env.get("id"), "env_kwargs": env.get("kwargs"), "size": env.get("size")}
    settings.update({k: policy.get(k) for k in ("task", "history", "max_reasoning_tokens")})
    settings["gamma"] = (config.get("ppo") or {}).get("gamma")  # review "value"'s discount
    return {k: v for k, v in settings.items() if v is not None}


def _codec(env_id: str, size: int, kwargs: dict[str, Any]):
    import envs

    try:
        env = envs.make(env_id, size, **kwargs)
    except (ValueError, TypeError) as err:
        raise UserError(f"env {env_id} with size {size}, kwargs {kwargs}: {err}") from None
    try:
        return envs.get_codec(env)
    finally:
        env.close()


# -- rig sft --------------------------------------------------------------------------------------


def sft(
    dataset: Annotated[Path, typer.Option("--dataset", help="a dataset folder (docs/data.md)")],
    stage: Annotated[
        str, typer.Option("--stage", help="basic (S0-S2) | lookahead (+ S3 reviews, S4 chains)")
    ] = "basic",
    steps: Annotated[int, typer.Option("--steps", min=1, help="optimiser steps")] = 1000,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="steps per batch")] = 8,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="peak AdamW learning rate")] = 3e-4,
    preset: Annotated[
        str | None, typer.Option("--preset", help="start from a fresh policy preset (default tiny)")
    ] = None,
    init_from: Annotated[
        Path | None, typer.Option("--init-from", help="start from this HF checkpoint directory")
    ] = None,
    vq: Annotated[
        Path | None,
        typer.Option("--vq", help="load a trained VQ tokenizer (`rig tokenizer train` folder)"),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="new output folder (default: runs/<name>-sft-<time>)"),
    ] = None,
    lookahead: Annotated[
        int | None,
        typer.Option("--lookahead", min=1, help="lookahead stage: longest chain (default: S4's)"),
    ] = None,
    history: Annotated[int, typer.Option("--history", min=0, help="past steps per prompt")] = 0,
    max_reasoning_tokens: Annotated[
        int,
        typer.Option(
            "--max-reasoning-tokens", min=0, help="act's reasoning cap (0: actions only, no reasoning)"
        ),
    ] = 64,
    eval_every: Annotated[
        int, typer.Option("--eval-every", min=1, help="steps between held-out evaluations")
    ] = 100,
    save_every: Annotated[
        int, typer.Option("--save-every", min=0, help="steps between checkpoints (0: end only)")
    ] = 0,
    minutes: Annotated[
        float | None, typer.Option("--minutes", min=0.0, help="wall-clock budget")
    ] = None,
    threads: Annotated[int, typer.Option("--threads", min=1, help="torch CPU threads")] = 1,
    seed: Annotated[int, typer.Option("--seed", min=0, help="seed of init and sampling")] = 0,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Supervised next-token training (reasoning, action, image tokens) on the RL learner."""
    from rig.config import load_config
    from supervised.sft import STAGES

    if stage not in STAGES:
        raise UserError(f"--stage {stage!r}: give one of {', '.join(STAGES)}")
    if preset is not None and init_from is not None:
        raise UserError("give --preset or --init-from, not both")
    cfg = load_config(config, overrides or [])
    out = _out_dir(out, cfg, "sft")
    record = _checkpoint_record(init_from, "--init-from") if init_from is not None else {}
    if vq is not None and not vq.exists():
        raise UserError(f"--vq {vq}: no such tokenizer folder or file")

    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    from rich.console import Console

    from rl.policy import RigPolicy
    from supervised.sft import SftData, SftSettings, SftTrainer, chain_length, write_report

    console = Console(stderr=True)
    with console.status("reading the dataset"):
        data = SftData(dataset)
    card = data.card
    env_id, env_kwargs = card.get("env_id"), dict(card.get("env_kwargs") or {})
    trained_on = _trained_env(record)
    if trained_on is not None and trained_on != env_id:
        raise UserError(
            f"--init-from {init_from} was trained on {trained_on} but --dataset {dataset} is "
            f"{env_id}; give a dataset of {trained_on}"
        )
    codec = _codec(env_id, data.size, env_kwargs)
    if init_from is not None:
        policy = _load_policy(init_from, codec, "--init-from")
    else:
        try:
            policy = RigPolicy.from_preset(preset or "tiny", codec, seed, cfg.policy.head_hidden)
        except ValueError as err:
            raise UserError(f"--preset: {err}") from None
    if vq is not None:
        try:
            from supervised.vq import load_vq_into
        except ImportError:
            raise UserError("--vq needs supervised/vq.py (the tokenizer trainer)") from None
        load_vq_into(policy, vq)
    data.check(policy, stage)
    settings = SftSettings(
        stage=stage, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
        warmup_steps=min(cfg.learner.warmup_steps * 2, max(1, steps // 10)),
        eval_every=eval_every, save_every=save_every, lookahead=lookahead, history=history,
        max_reasoning_tokens=max_reasoning_tokens, task=cfg.policy.task,
        max_seconds=None if minutes is None else 60.0 * minutes,
    )  # fmt: skip
    _check_context(policy, settings, chain_length(data, settings))

    # -- everything checked: build the learner and write ----------------------------------------
    from learner import DeepSpeedEngine
    from rig.config import save_config
    from rig.tracking import Tracker

    with console.status("encoding the dataset's frames with the VQ"):
        data.encode(policy)
    policy.model.model.vqmodel.requires_grad_(False)  # codes are the targets: they stay fixed
    learner = cfg.learner.model_copy(update={"lr": lr, "warmup_steps": settings.warmup_steps})
    engine = DeepSpeedEngine(policy, learner)
    policy = engine.module
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    params = {
        "sft": vars(settings), "dataset": str(dataset), "env_id": env_id,
        "start": str(init_from) if init_from else f"preset {preset or 'tiny'}",
        "vq": str(vq) if vq else None, "learner": learner.model_dump(mode="json"),
        "dataset_steps": data.num_steps, "dataset_stages": card.get("stages"),
    }  # fmt: skip
    console.print(
        f"SFT ({stage}) of {params['start']} on {dataset}: {len(data.train_steps)} train / "
        f"{len(data.heldout_steps)} held-out steps, lookahead chains up to "
        f"{chain_length(data, settings)}, {engine.num_trainable / 1e6:.1f}M trainable parameters",
        highlight=False,
    )
    import time

    start = time.perf_counter()
    with Tracker(cfg.tracking, out, params) as tracker:
        trainer = SftTrainer(policy, data, settings, engine, out, tracker)
        with Bar(f"SFT {stage}", steps, console) as bar:

            def progress(step: int, m: dict[str, float]) -> None:
                status = (
                    f"loss {m['loss/sft']:.3f} | acc r {m.get('accuracy/reasoning', 0):.2f} "
                    f"a {m.get('accuracy/action', 0):.2f} i {m.get('accuracy/image', 0):.2f}"
                )
                bar(step, status=status)
                if not console.is_terminal and (step % eval_every == 0 or step == steps):
                    console.print(f"step {step}: {status}", highlight=False)

            state = trainer.run(progress)
        report = write_report(out, trainer, time.perf_counter() - start)
        tracker.log_text(report.read_text(), "sft.json")
    h = state.heldout
    typer.echo(
        f"step {state.step}: loss {state.first_loss:.3f} -> {state.metrics['loss/sft']:.3f}; "
        f"held-out CE {h.get('heldout/loss/sft', float('nan')):.3f}, accuracy reasoning "
        f"{h.get('heldout/accuracy/reasoning', float('nan')):.2f}, action "
        f"{h.get('heldout/accuracy/action', float('nan')):.2f}, image "
        f"{h.get('heldout/accuracy/image', float('nan')):.2f}; imagined PSNR "
        f"{h.get('heldout/imagined_psnr', float('nan')):.2f} dB"
    )
    typer.echo(f"checkpoint: {out / 'final'}  (rig eval --checkpoint / rig train --init-from)")
    typer.echo(f"MLflow: {tracker.tracking_uri} (run {tracker.run_id})")


def _check_context(policy, settings, n: int) -> None:
    """UserError if the longest SFT sequence exceeds the model's context."""
    G, K, m = policy.image_tokens, settings.max_reasoning_tokens, policy.trie.max_len
    prompt = 4 + len(policy.task_ids(settings.task)) + (settings.history + 1) * (G + 3 + m)
    decision = K + 2 + m  # reasoning (capped) <end> <action> action..<end>
    longest = prompt + n * (decision + 3 + G) + 1 + decision + 1 + G
    if longest > policy.context_length:
        raise UserError(
            f"a training sequence can take {longest} tokens but the model's context is "
            f"{policy.context_length}: lower --max-reasoning-tokens, --lookahead or --history"
        )


# -- rig eval -------------------------------------------------------------------------------------


class EvalInputs(NamedTuple):
    """What ``rig eval`` plays: the loaded policy, the env it plays (id, frame size, kwargs) and
    the settings it acts with."""

    policy: Any  # rl.policy.RigPolicy
    env_id: str
    size: int
    kwargs: dict[str, Any]
    settings: Any  # supervised.evaluate.EvalSettings


def prepare_eval(
    checkpoint: Path,
    cfg,
    env: str | None = None,
    *,
    history: int | None = None,
    max_reasoning_tokens: int | None = None,
    temperature: float | None = None,
    **settings: Any,
) -> EvalInputs:
    """``rig eval``'s checks and choices for ``checkpoint``, before anything is written: the env
    it was trained on (``env`` must match it; its kwargs, then ``cfg.env.kwargs``), its frame
    size, and its own act settings where ``history``, ``max_reasoning_tokens`` or
    ``temperature`` are None (else ``cfg``'s); ``settings`` are the rest of ``EvalSettings``.
    The context must hold ``settings["lookahead"]``. Bad input is a ``UserError``. ``rig bench
    lookahead`` plays one checkpoint through this at several lookaheads."""
    from supervised.evaluate import EvalSettings

    record = _checkpoint_record(checkpoint, "--checkpoint")
    trained = _trained_settings(record)  # the SFT's or the RL run's own act settings
    trained_on = trained.get("env_id")  # the rule of rig sft and rig train --init-from
    if env is not None and trained_on is not None and env != trained_on:
        raise UserError(
            f"--checkpoint {checkpoint} was trained on {trained_on} but --env is {env}; "
            f"evaluate it on {trained_on} (leave out --env)"
        )
    env_id = env or trained_on or cfg.env.id
    kwargs = dict(trained.get("env_kwargs") or {}) if env_id == trained.get("env_id") else {}
    kwargs.update(cfg.env.kwargs)
    size = int(trained.get("size") or cfg.env.size)

    codec = _codec(env_id, size, kwargs)
    policy = _load_policy(checkpoint, codec, "--checkpoint")
    if policy.image_size != size:
        raise UserError(
            f"--checkpoint {checkpoint} sees {policy.image_size}px frames but the env renders "
            f"{size}px; set env.size={policy.image_size}"
        )
    chosen = EvalSettings(
        history=trained.get("history", 0) if history is None else history,
        task=trained.get("task") or cfg.policy.task,
        max_reasoning_tokens=next(cap for cap in (
            max_reasoning_tokens, trained.get("max_reasoning_tokens"),
            cfg.policy.max_reasoning_tokens) if cap is not None),  # 0 is a cap, not unset
        temperature=cfg.policy.temperature if temperature is None else temperature,
        **{"gamma": trained.get("gamma", cfg.ppo.gamma), **settings},
    )  # fmt: skip
    try:
        policy.check_context(
            policy.prompt(chosen.task, 1)[0].shape[1]
            + chosen.history * (policy.image_tokens + 3 + policy.trie.max_len),
            chosen.max_reasoning_tokens,
            chosen.lookahead,
        )
    except ValueError as err:
        raise UserError(str(err)) from None
    return EvalInputs(policy, env_id, size, kwargs, chosen)


def evaluate(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="an HF policy checkpoint dir")],
    episodes: Annotated[int, typer.Option("--episodes", min=1, help="finished episodes")] = 4,
    lookahead: Annotated[int, typer.Option("--lookahead", min=0, help="lookahead n")] = 0,
    review: Annotated[str, typer.Option(
        "--review", help="how a lookahead decides: sample (RIG's: proposals, <review>, a sampled "
        "action) or value (n candidates, the one whose imagined outcome r + gamma c V is best)",
    )] = "sample",
    imagine_temperature: Annotated[float | None, typer.Option(
        "--imagine-temperature", min=1e-6, help="--review value's code sampler "
        "(default: --temperature)")] = None,
    review_depth: Annotated[int, typer.Option(
        "--review-depth", help="--review value: imagined steps per candidate before the "
        "critic judges (1: the next frame's r + gamma c V)")] = 1,
    num_envs: Annotated[int, typer.Option("--num-envs", min=1, help="envs in parallel")] = 4,
    history: Annotated[
        int | None, typer.Option("--history", min=0, help="past steps (default: the checkpoint's)")
    ] = None,
    max_reasoning_tokens: Annotated[
        int | None,
        typer.Option("--max-reasoning-tokens", min=0, help="default: the checkpoint's (its SFT or RL run), else config"),
    ] = None,
    temperature: Annotated[
        float | None, typer.Option("--temperature", min=1e-6, help="default: policy.temperature")
    ] = None,
    psnr_every: Annotated[
        int, typer.Option("--psnr-every", min=1, help="imagine every n-th vector step")
    ] = 1,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", min=1, help="stop after this many vector steps")
    ] = None,
    env: Annotated[str | None, typer.Option("--env", help="env id (default: the checkpoint's)")] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="new output folder (default: runs/<name>-eval-<time>)"),
    ] = None,
    video_size: Annotated[int, typer.Option("--video-size", min=16, help="video height")] = 256,
    threads: Annotated[int, typer.Option("--threads", min=1, help="torch CPU threads")] = 1,
    seed: Annotated[int, typer.Option("--seed", min=0, help="env and sampling seed")] = 0,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Play episodes with a checkpoint: return, Crafter score, achievements, imagined PSNR."""
    from rig.config import load_config

    cfg = load_config(config, overrides or [])
    _check_review(review, review_depth)
    out = _out_dir(out, cfg, "eval")

    import torch

    torch.set_num_threads(threads)
    from rich.console import Console

    from rig.config import save_config
    from rig.tracking import Tracker
    from supervised import evaluate as ev

    policy, env_id, size, kwargs, settings = prepare_eval(
        checkpoint, cfg, env, episodes=episodes, num_envs=num_envs, lookahead=lookahead,
        history=history, max_reasoning_tokens=max_reasoning_tokens, temperature=temperature,
        psnr_every=psnr_every, seed=seed, max_steps=max_steps, video_size=video_size,
        review=review, imagine_temperature=imagine_temperature, review_depth=review_depth,
    )  # fmt: skip

    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    console = Console(stderr=True)
    params = {"checkpoint": str(checkpoint), "env_id": env_id, "env_kwargs": kwargs,
              "size": size, **vars(settings)}  # fmt: skip
    with Tracker(cfg.tracking, out, params) as tracker:
        with Bar("evaluating (episodes)", episodes, console) as bar:
            result = ev.evaluate_policy(
                policy, env_id, size, kwargs, settings, video=out / ev.VIDEO,
                vectorization=cfg.env.vectorization,
                progress=lambda steps, done: bar(done, status=f"{steps} vector steps"),
            )  # fmt: skip
        report = ev.write_report(result, out, {"checkpoint": str(checkpoint.resolve()),
                                               "env_id": env_id, "env_kwargs": kwargs})  # fmt: skip
        tracker.log_metrics(ev.metrics_of(result), 0)
        tracker.log_artifacts(out, "eval")
    s, p = result.summary, result.psnr
    line = f"{len(result.episodes)} episodes: return {s.get('return_mean', float('nan')):.2f}"
    if "score" in s:
        line += f", Crafter score {s['score']:.2f}%"
    if p.get("frames"):
        line += f"; imagined-frame PSNR {p['mean']:.2f} dB over {p['frames']} frames"
    how = f"lookahead {lookahead}" + (f", review {review}" if lookahead else "")
    typer.echo(line + f" ({how}, {result.steps} env steps, {result.seconds:.0f} s)")
    typer.echo(f"report: {report}; video: {out / ev.VIDEO}")
    typer.echo(f"MLflow: {tracker.tracking_uri} (run {tracker.run_id})")


def _check_review(review: str, depth: int = 1) -> None:
    from supervised.evaluate import REVIEWS

    if review not in REVIEWS:
        raise UserError(f"--review must be one of {', '.join(REVIEWS)}, got {review!r}")
    if depth < 1:
        raise UserError(f"--review-depth must be >= 1 (1: judge the next imagined frame), "
                        f"got {depth}")  # fmt: skip


__all__ = ["EvalInputs", "evaluate", "prepare_eval", "sft"]
