"""The `rig` command line. Each subcommand is a thin shell over a library function.

Errors a user can cause (bad path, bad config, missing optional dependency) print one line,
``error: ...``, and exit with code 2; ``rig --debug ...`` shows the traceback instead. Anything
else is a bug and shows its traceback.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer

from rig import bench, data_cli, sft_cli, tokenizer_cli
from rig.errors import UserError
from rig.progress import Bar

app = typer.Typer(
    help="rig-rl: RL fine-tuning of RIG-style policies that reason, act and imagine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
envs_app = typer.Typer(help="List the registered envs and play them with scripted or random agents.", no_args_is_help=True)
config_app = typer.Typer(help="Show and check configurations.", no_args_is_help=True)
app.add_typer(envs_app, name="envs")
app.add_typer(config_app, name="config")
app.add_typer(bench.app, name="bench")
app.add_typer(tokenizer_cli.tokenizer_app, name="tokenizer")
app.add_typer(data_cli.data_app, name="data")
app.command("collect")(data_cli.collect)
app.command("sft")(sft_cli.sft)
app.command("eval")(sft_cli.evaluate)

_STATE = {"debug": False}

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="preset YAML layered over configs/defaults.yaml (e.g. configs/debug.yaml)"),
]
Overrides = Annotated[
    list[str] | None,
    typer.Argument(help="key=value overrides, e.g. env.num_envs=8 env.kwargs.length=500", show_default=False),
]


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"rig-rl {version('rig-rl')}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks for user errors too")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version")] = False,
) -> None:
    _STATE["debug"] = debug


# -- rig config -----------------------------------------------------------------------------------


@config_app.command("show")
def config_show(config: ConfigOpt = None, overrides: Overrides = None) -> None:
    """Print the resolved configuration (defaults + preset + overrides) after validating it."""
    from rig.config import dump_config, load_config

    typer.echo(dump_config(load_config(config, overrides or [])), nl=False)


# -- rig envs -------------------------------------------------------------------------------------


@envs_app.command("list")
def envs_list(as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False) -> None:
    """The registered envs with their observation and action spaces."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from rig.envinfo import describe_envs

    rows = describe_envs()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="Registered envs (any other Gymnasium pixel env works by its id too)")
    # ids never wrap, so they can be copied whole; the other columns fold to fit the terminal
    table.add_column("id", no_wrap=True, min_width=max(len(row["id"]) for row in rows))
    table.add_column("observation", overflow="fold")
    table.add_column("actions", no_wrap=True)
    for column in ("example actions", "description"):
        table.add_column(column, overflow="fold")
    for row in rows:  # escaped: '[minerl]' or 'camera:[0,10]' are text, not rich markup
        cells = (row["id"], row["observation"], row["actions"], row["examples"], row["description"])
        table.add_row(*(escape(c) for c in cells))
    Console().print(table)


@envs_app.command("play")
def envs_play(
    env: Annotated[str | None, typer.Option("--env", help="env id (default: env.id of the config)")] = None,
    agent: Annotated[str, typer.Option("--agent", help="random | scripted (scripted: Crafter only)")] = "random",
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="steps per env to play")] = None,
    episodes: Annotated[int | None, typer.Option("--episodes", min=1, help="stop after this many finished episodes")] = None,
    num_envs: Annotated[int | None, typer.Option("--num-envs", min=1, help="envs in parallel (default: env.num_envs)")] = None,
    seed: Annotated[int | None, typer.Option("--seed", min=0, help="seed (default: run.seed)")] = None,
    record: Annotated[Path | None, typer.Option("--record", help="write env 0 to this .mp4 file")] = None,
    video_size: Annotated[int, typer.Option("--video-size", min=16, help="video side in pixels")] = 256,
    config: ConfigOpt = None,
    overrides: Overrides = None,
) -> None:
    """Play an env with an agent; print episode statistics (return, length, Crafter score)."""
    from rig.config import load_config
    from rig.runs import check_writable_file, new_run_dir

    if steps is None and episodes is None:
        raise UserError("give --steps N and/or --episodes N")
    if record is not None:
        check_writable_file(record, "--record", suffix=".mp4")
    extra = [f"env.id={env}"] if env else []
    extra += [f"env.num_envs={num_envs}"] if num_envs else []
    extra += [f"run.seed={seed}"] if seed is not None else []
    cfg = load_config(config, [*(overrides or []), *extra])
    run_dir = new_run_dir(cfg.run.output_dir, cfg.run.name, "play")

    from rich.console import Console

    from rig.play import play, write_result
    from rig.report import print_play_result

    console = Console(stderr=True)
    total = steps if steps is not None else None
    with Bar(f"playing ({'steps' if steps else 'episodes'})", total, console) as update:
        def on_step(done_steps: int, done_episodes: int) -> None:
            update(done_steps if steps else done_episodes)

        try:
            result = play(
                cfg, agent, steps, episodes, record=record, video_size=video_size, progress=on_step, run_dir=run_dir
            )
        except ValueError as err:  # an agent that cannot play this env, a bad env kwarg value
            raise UserError(str(err)) from err
    stats_path = write_result(result, run_dir)
    print_play_result(result, cfg, agent)
    if record:
        typer.echo(f"video: {record}")
    typer.echo(f"run folder: {run_dir} (config.yaml, {stats_path.name})")


# -- rig train / rig export -----------------------------------------------------------------------


@app.command("train")
def train(
    config: ConfigOpt = None,
    init_from: Annotated[Path | None, typer.Option("--init-from", help="start policy and reference from this HF checkpoint directory")] = None,
    resume: Annotated[str | None, typer.Option("--resume", help="RUN_DIR, or 'auto' for the newest run with a checkpoint")] = None,
    overrides: Overrides = None,
) -> None:
    """RL fine-tuning: env runners + imagination actors + DeepSpeed learner, tracked in MLflow."""
    import shutil

    from rig.config import load_config, save_config
    from rig.runs import claim_run_dir

    extra = [f"policy.init_from={init_from}"] if init_from is not None else []
    checkpoint = None
    if resume is not None:
        from learner.checkpoints import resolve_resume

        defaults = load_config(config, [*(overrides or [])])
        checkpoint = resolve_resume(resume, defaults.run.output_dir)
        run_dir = checkpoint.parent.parent
        cfg = load_config(run_dir / "config.yaml", [*(overrides or []), *extra])
    else:
        cfg = load_config(config, [*(overrides or []), *extra])
    flag = "--init-from" if init_from is not None else "policy.init_from"
    if cfg.policy.init_from is not None:  # before any folder exists: a bad one leaves nothing
        _check_init_from(Path(cfg.policy.init_from), flag, cfg.env.id, cfg.policy.head_hidden,
                         cfg.policy.frame_head)  # fmt: skip
    if cfg.policy.vq is not None:  # a missing tokenizer is named before any folder exists
        from supervised.vq import vq_file

        try:
            vq_file(cfg.policy.vq)
        except UserError as err:
            raise UserError(f"policy.vq={err}") from None
    from rig.tracking import check_tracking_reachable

    check_tracking_reachable(cfg.tracking, cfg.run.output_dir)  # seconds, not MLflow's minutes
    if checkpoint is None:  # mkdir is the claim: atomic, never another run's folder
        run_dir = claim_run_dir(cfg.run.output_dir, cfg.run.name, "train")

    from rich.console import Console

    from rig.console import LOG_FILE, to_log_file
    from rig.tracking import Tracker, saved_run_id
    from rig.train import Trainer

    # warnings, library log lines and C++ stderr go to <run>/train.log (rig/console.py)
    with to_log_file(run_dir / LOG_FILE) as terminal:
        console = Console(file=terminal)  # the live line; the rest goes to the log file
        created = checkpoint is None  # claimed above: ours alone, removed if the start fails
        try:
            with console.status("starting Ray, env runners, imagination actors and the learner"):
                trainer = Trainer(cfg, run_dir, resume_from=checkpoint)
        except BaseException as err:
            if created:
                shutil.rmtree(run_dir, ignore_errors=True)  # nothing of value was written yet
            from rl.model import CheckpointError

            if isinstance(err, CheckpointError):  # the init_from directory's files do not load
                raise UserError(f"{flag}: {err}") from None
            raise
        save_config(cfg, run_dir)
        params = cfg.model_dump(mode="json")
        try:
            tracker = Tracker(cfg.tracking, run_dir, params, run_id=saved_run_id(run_dir) if checkpoint else None)
        except BaseException:
            trainer.close()
            if created:
                shutil.rmtree(run_dir, ignore_errors=True)  # the run never started
            raise
        try:
            with tracker:
                with _TrainProgress(console, cfg.train.iterations, trainer.counters.iteration) as progress:
                    trainer.run(tracker, progress)
                if cfg.train.export_at_end:
                    export_dir = trainer.export(run_dir / "export")
                    tracker.log_artifacts(export_dir, "policy")
                    typer.echo(f"exported policy: {export_dir}")
        finally:
            trainer.close()
        typer.echo(f"run folder: {run_dir}")
        typer.echo(f"MLflow: {tracker.tracking_uri} (run {tracker.run_id}); browse with: mlflow ui --backend-store-uri {tracker.tracking_uri}")


@app.command("export")
def export(
    run_dir: Annotated[Path, typer.Argument(help="a run folder of `rig train` (its newest checkpoint is exported)")],
    out_dir: Annotated[Path, typer.Argument(help="new HF checkpoint directory to write")],
    iteration: Annotated[int | None, typer.Option(min=0, help="export this iteration's checkpoint instead of the newest")] = None,
) -> None:
    """A training checkpoint as an HF directory that RigPolicy.load and transformers' Janus load."""
    from learner.checkpoints import checkpoint_at, resolve_resume
    from rig.config import load_config

    if out_dir.exists():
        raise UserError(f"{out_dir} exists; give a new directory (nothing is overwritten)")
    if iteration is None:
        checkpoint = resolve_resume(str(run_dir), run_dir.parent)
    else:
        checkpoint = checkpoint_at(run_dir, iteration)
    cfg = load_config(run_dir / "config.yaml", [])
    from rig.train import export_checkpoint

    path = export_checkpoint(cfg, checkpoint, out_dir)
    typer.echo(f"exported {checkpoint} -> {path}")


def _check_init_from(path: Path, flag: str, env_id: str, head_hidden: int | None = None,
                     frame_head: int | None = None) -> None:  # fmt: skip
    """A clear one-line error, up front, for a missing, broken or foreign checkpoint directory
    (its heads file included), one trained on another env than ``env_id`` (the rule
    ``rig sft --init-from`` applies, ``sft_cli._trained_env``), heads of another hidden width
    than ``head_hidden`` (``policy.head_hidden``) or a frame head of another width than
    ``frame_head`` (``policy.frame_head``; a checkpoint without one gets a fresh one)."""
    from safetensors import safe_open

    from rl.model import CheckpointError, check_pretrained_dir
    from rl.policy import FRAME_HEAD_KEY, HEAD_INNER_KEY, HEADS_FILE

    try:
        record, _ = check_pretrained_dir(path)
    except CheckpointError as err:
        raise UserError(f"{flag}: {err}") from None
    heads = path / HEADS_FILE
    if heads.is_file():
        try:
            with safe_open(str(heads), framework="pt") as f:
                keys = set(f.keys())
                saved = f.get_slice(HEAD_INNER_KEY).get_shape()[0] if HEAD_INNER_KEY in keys else 0
                frame = f.get_slice(FRAME_HEAD_KEY).get_shape()[1] if FRAME_HEAD_KEY in keys else 0
        except Exception as err:  # safetensors' own SafetensorError, OSError
            raise UserError(f"{flag}: corrupted heads file {heads}: {err}") from None
        if head_hidden is not None and saved != head_hidden:
            raise UserError(
                f"{flag} {path} has heads with hidden width {saved} but policy.head_hidden is "
                f"{head_hidden}; set policy.head_hidden={saved} to load them (or start from a "
                f"checkpoint without {HEADS_FILE})"
            )
        if frame and frame_head is not None and frame != frame_head:
            raise UserError(
                f"{flag} {path} has a frame head of width {frame} but policy.frame_head is "
                f"{frame_head}; set policy.frame_head={frame} (or null) to load it"
            )
    trained_on = sft_cli._trained_env(record or {})
    if trained_on is not None and trained_on != env_id:
        raise UserError(
            f"{flag} {path} was trained on {trained_on} but env.id is {env_id}; "
            f"set env.id={trained_on} (or start from a checkpoint of {env_id})"
        )


class _TrainProgress:
    """A live line on stderr: iteration, env/imagined steps, return, Crafter score, losses, speed."""

    def __init__(self, console, total: int, done: int):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = console
        self._progress = Progress(
            TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"), console=console, disable=not console.is_terminal,
        )  # fmt: skip
        self._task = self._progress.add_task("train", total=total, completed=done, status="")

    def __enter__(self):
        self._progress.start()
        return self

    def __call__(self, counters, metrics: dict[str, float]) -> None:
        def f(key: str, fmt: str = "{:.3f}") -> str:
            value = metrics.get(key)
            return "-" if value is None else fmt.format(value)

        # the next-frame loss is 0 and its accuracy absent where no world-model term trains
        frame = f("loss/next_frame", "{:.2f}") if "next_frame/accuracy" in metrics else "-"
        status = (
            f"env {counters.env_steps} img {counters.imagined_steps} | return {f('episode/return_mean', '{:.2f}')}"
            f" score {f('crafter/score', '{:.1f}%')} | pg {f('loss/policy')} v {f('loss/value')}"
            f" frame {frame} acc {f('next_frame/accuracy', '{:.2f}')}"
            f" | ev {f('value/explained_variance', '{:.2f}')} kl {f('policy/approx_kl')}"
            f" clip {f('policy/clip_frac', '{:.2f}')} ent {f('policy/action_entropy', '{:.2f}')}"
            f" | {f('rollout/env_steps_per_s', '{:.1f}')} steps/s"
        )
        self._progress.update(self._task, completed=counters.iteration, status=status)
        if not self.console.is_terminal:  # logs and CI: one plain line per iteration
            self.console.print(f"iter {counters.iteration}: {status}", highlight=False, soft_wrap=True)

    def __exit__(self, *exc):
        self._progress.stop()


# -- entry point ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Console-script entry: run the app, turning user errors into one line and exit code 2."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args
    command = typer.main.get_command(app)
    try:
        command.main(args=args, prog_name="rig", standalone_mode=False)
    except typer.Exit as exit_:
        return exit_.exit_code
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        return 130
    except typer.TyperException as err:  # usage errors (bad flag, bad value): exit code 2
        err.show()
        return err.exit_code
    except Exception as err:
        if not _is_user_error(err):
            raise
        if debug or _STATE["debug"]:
            traceback.print_exc()
        typer.echo(f"error: {err}", err=True)
        return 2
    return 0


def _is_user_error(err: Exception) -> bool:
    from envs.errors import MissingDependencyError

    return isinstance(err, UserError | MissingDependencyError)


if __name__ == "__main__":
    sys.exit(main())
