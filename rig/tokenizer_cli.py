"""``rig tokenizer``: train the policy preset's VQ tokenizer on game frames (``supervised/vq.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rig.errors import UserError
from rig.progress import Bar

tokenizer_app = typer.Typer(
    help="Train the VQ tokenizer (the policy's image codes) and report its reconstruction PSNR.",
    no_args_is_help=True,
)


@tokenizer_app.command("train")
def train(
    dataset: Annotated[
        Path | None, typer.Option("--dataset", help="a `rig collect` dataset folder")
    ] = None,
    frames_from_env: Annotated[
        int | None,
        typer.Option(
            "--frames-from-env",
            min=1,
            help="instead: play the scripted Crafter expert for N frames",
        ),
    ] = None,
    preset: Annotated[
        str, typer.Option("--preset", help="policy preset (name or YAML path) whose VQ is trained")
    ] = "tiny",
    steps: Annotated[int, typer.Option("--steps", min=1, help="optimiser steps at most")] = 2000,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="frames (or crops) per step")
    ] = 8,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="peak learning rate (AdamW)")] = 2e-3,
    target_psnr: Annotated[
        float | None,
        typer.Option("--target-psnr", help="stop once held-out PSNR reaches this (dB)"),
    ] = 30.0,
    crop: Annotated[
        int | None,
        typer.Option(
            "--crop",
            min=1,
            help="train on random crops of this side (a multiple of the VQ's downsampling)",
        ),
    ] = None,
    full_tail: Annotated[
        float,
        typer.Option(
            "--full-tail",
            min=0.0,
            max=1.0,
            help="with --crop: fraction of the budget (at the end) trained on whole frames",
        ),
    ] = 0.25,
    foreground: Annotated[
        float,
        typer.Option(
            "--foreground",
            min=0.0,
            help="weight of the reconstruction error over the pixels that move (differ from the "
            "frames' median); 0: plain MSE, which may drop a small object",
        ),
    ] = 1.0,
    minutes: Annotated[
        float | None, typer.Option("--minutes", min=0.0, help="wall-clock budget of training")
    ] = None,
    max_frames: Annotated[
        int | None, typer.Option("--max-frames", min=1, help="use at most this many dataset frames")
    ] = None,
    eval_every: Annotated[
        int, typer.Option("--eval-every", min=1, help="steps between held-out evaluations")
    ] = 250,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="output folder (default: a new runs/<name>-tokenizer-<time>)"),
    ] = None,
    into_checkpoint: Annotated[
        Path | None,
        typer.Option(
            "--into-checkpoint",
            help="also write the trained VQ into this policy checkpoint directory",
        ),
    ] = None,
    threads: Annotated[int, typer.Option("--threads", min=1, help="torch CPU threads")] = 1,
    seed: Annotated[
        int, typer.Option("--seed", min=0, help="seed of init, sampling and env frames")
    ] = 0,
    track: Annotated[bool, typer.Option("--track/--no-track", help="log metrics to MLflow")] = True,
) -> None:
    """Train the preset's JanusVQVAE (reconstruction + commitment, EMA codebook) and report
    held-out PSNR; writes vq.safetensors, vq_config.json and report.json."""
    from rig.config import load_config
    from rig.runs import new_run_dir

    if (dataset is None) == (frames_from_env is None):
        raise UserError("give exactly one of --dataset DIR or --frames-from-env N")
    if dataset is not None and not dataset.is_dir():
        raise UserError(f"--dataset {dataset}: no such dataset folder; make one with `rig collect`")
    if into_checkpoint is not None and not (into_checkpoint / "model.safetensors").is_file():
        raise UserError(
            f"--into-checkpoint {into_checkpoint}: not a policy checkpoint directory (no model.safetensors)"
        )
    cfg = load_config(None, [])
    from rig.tracking import check_tracking_reachable

    check_tracking_reachable(cfg.tracking, cfg.run.output_dir)  # seconds, not MLflow's minutes
    if out is None:
        out = new_run_dir(cfg.run.output_dir, cfg.run.name, "tokenizer")
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: folder exists and is not empty; give a new folder")

    import torch

    torch.set_num_threads(threads)
    from rich.console import Console

    from supervised import vq as vqlib

    console = Console(stderr=True)
    model, _ = vqlib.vq_from_preset(preset, seed=seed)
    size = vqlib.image_size_of(model)
    with console.status("reading frames"):
        if dataset is not None:
            frames, episode = vqlib.dataset_frames(dataset, max_frames, seed)
            source, what = f"dataset {dataset}", f"--dataset {dataset}"
        else:
            frames, episode = vqlib.frames_from_env(frames_from_env, seed=seed, size=size)
            source, what = f"scripted Crafter expert, {frames_from_env} frames", "--frames-from-env"
    vqlib.check_frames(frames, size, what)
    train_frames, heldout = vqlib.split_by_episode(frames, episode)
    data = vqlib.Frames(train_frames, heldout, source)
    settings = vqlib.TrainSettings(
        steps=steps, batch_size=batch_size, lr=lr, target_psnr=target_psnr, crop=crop,
        full_tail=full_tail, foreground=foreground, eval_every=eval_every, max_seconds=None if minutes is None else 60.0 * minutes, seed=seed,
    )  # fmt: skip
    console.print(
        f"VQ of preset {preset}: {model.config.num_patches}x{model.config.num_patches} codes per "
        f"frame, codebook {model.config.num_embeddings}; {len(train_frames)} train / "
        f"{len(heldout)} held-out frames ({source})",
        highlight=False,
    )

    out.mkdir(parents=True, exist_ok=True)
    params = {"preset": preset, "frames_source": source, **vqlib.asdict(settings),
              "vq": vqlib.vq_config_dict(model)}  # fmt: skip
    tracker = None
    if track:
        from rig.tracking import Tracker

        tracker = Tracker(cfg.tracking, out, params)
    try:
        with _Progress(console, steps) as progress:

            def on_step(step: int, metrics: dict[str, float]) -> None:
                progress(step, metrics)
                if tracker is not None and (step % 10 == 0 or "heldout/psnr" in metrics):
                    tracker.log_metrics({f"vq/{k}": v for k, v in metrics.items()}, step)

            report = vqlib.train_vq(model, data, settings, on_step)
        report["preset"] = preset
        vqlib.save_vq(model, out, report)
        if tracker is not None:
            final = {f"vq/final/{k}": v for k, v in report["heldout"].items()}
            tracker.log_metrics(final, report["steps_done"])
            tracker.log_artifacts(out, "tokenizer")
    except BaseException as err:
        if tracker is not None:
            tracker.end("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    if tracker is not None:
        tracker.end()
    if into_checkpoint is not None:
        vqlib.write_vq_into_checkpoint(into_checkpoint, out)
        typer.echo(f"wrote the VQ into {into_checkpoint}")

    held = report["heldout"]
    verdict = (
        ""
        if target_psnr is None
        else (
            " (target reached)"
            if report["reached_target"]
            else f" (target {target_psnr:.1f} dB not reached)"
        )
    )
    typer.echo(
        f"held-out PSNR {held['psnr']:.2f} dB{verdict}, 10th percentile {held['psnr_p10']:.2f} dB, "
        f"on the moving pixels {held['psnr_foreground']:.2f} dB, code consistency "
        f"{held['code_consistency']:.2f}, "
        f"{int(held['codes_used'])}/{model.config.num_embeddings} codes used; "
        f"{report['steps_done']} steps in {report['train_seconds']:.0f} s"
    )
    typer.echo(f"tokenizer folder: {out} ({vqlib.VQ_FILE}, {vqlib.REPORT_FILE})")
    warning = vqlib.foreground_warning(held)
    if warning is not None:
        typer.echo(warning, err=True)


class _Progress:
    """The bar with the loss and the last held-out PSNR as its status."""

    def __init__(self, console, total: int):
        self._bar = Bar("training VQ", total, console)
        self._psnr = "-"

    def __enter__(self):
        self._bar.__enter__()
        return self

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        if "heldout/psnr" in metrics:
            self._psnr = (f"{metrics['heldout/psnr']:.2f} dB (moving "
                          f"{metrics['heldout/psnr_foreground']:.2f} dB)")  # fmt: skip
        self._bar(step, status=f"loss {metrics['loss']:.4f} | held-out PSNR {self._psnr}")

    def __exit__(self, *exc):
        self._bar.__exit__(*exc)
