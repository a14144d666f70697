"""`rig collect` and `rig data ...`: the supervised stage's data commands (docs/data.md).

    rig collect --agent scripted --episodes 8 --workers 2 --out data/s1 [key=value ...]
    rig data reason  data/s1 data/s2              # S2: reasoning per step
    rig data review  data/s2 data/s3 --policy ckpt # S3: states where the policy does worse
    rig data imagine data/s3 data/s4 --lookahead 3 # S4: next-frame targets and chains
    rig data info data/s4 ; rig data check data/s4

Every command can be rerun with the same arguments to continue an interrupted one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rig.errors import UserError
from rig.progress import Bar

data_app = typer.Typer(
    help="Dataset stages of the supervised pipeline: reason (S2), review (S3), imagine (S4).",
    no_args_is_help=True,
)

In = Annotated[Path, typer.Argument(help="input dataset folder (read only)")]
Out = Annotated[Path, typer.Argument(help="output dataset folder (new, or one to continue)")]
ShardSteps = Annotated[int, typer.Option("--shard-steps", min=1, help="steps per shard file")]


def _summary(card: dict, path: Path) -> None:
    score = card.get("score")
    line = (
        f"{path}: {card['episodes']} episodes, {card['steps']} steps, {card['shards']} shards"
        f" ({card.get('stage')} stage, env {card.get('env_id')}, agent {card.get('agent')})"
    )
    stats = card.get("stats") or {}
    if "return_mean" in stats:
        line += f"; return {stats['return_mean']:.2f}, length {stats['length_mean']:.0f}"
    if score is not None:
        line += f"; Crafter score {score:.2f}%"
    typer.echo(line)


def collect(
    out: Annotated[Path, typer.Option("--out", "-o", help="dataset folder to write or continue")],
    agent: Annotated[
        str,
        typer.Option(
            "--agent",
            help="random | scripted | a policy checkpoint directory | module.path:ClassName",
        ),
    ] = "scripted",
    episodes: Annotated[int, typer.Option("--episodes", min=1, help="episodes in the dataset")] = 8,
    workers: Annotated[
        int, typer.Option("--workers", min=1, help="parallel envs (Ray actors)")
    ] = 1,
    env: Annotated[str | None, typer.Option("--env", help="env id (default: env.id)")] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", min=0, help="seed (default: run.seed)")
    ] = None,
    shard_steps: ShardSteps = 4096,
    max_steps: Annotated[
        int | None,
        typer.Option("--max-steps-per-episode", min=1, help="truncate episodes at this length"),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="preset YAML (env, run, policy sections)")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="key=value overrides, e.g. env.kwargs.length=500", show_default=False),
    ] = None,
) -> None:
    """Run an agent in parallel envs and store its trajectories as a dataset (S1); resumable."""
    from rig.config import load_config
    from supervised.collect import collect as run_collect

    extra = [f"env.id={env}"] if env else []
    cfg = load_config(config, [*(overrides or []), *extra])
    seed = cfg.run.seed if seed is None else seed
    policy_kwargs = {
        "task": cfg.policy.task,
        "max_reasoning_tokens": cfg.policy.max_reasoning_tokens,
        "temperature": cfg.policy.temperature,
    }
    with Bar("collecting (episodes)") as bar:
        try:
            card = run_collect(
                out, env_id=cfg.env.id, size=cfg.env.size, env_kwargs=dict(cfg.env.kwargs),
                agent=agent, episodes=episodes, workers=workers, seed=seed,
                shard_steps=shard_steps, max_steps=max_steps, policy_kwargs=policy_kwargs,
                progress=bar,
            )  # fmt: skip
        except ValueError as err:  # a bad env kwarg value
            raise UserError(f"env {cfg.env.id} with env.kwargs={cfg.env.kwargs}: {err}") from err
    _summary(card, out)


@data_app.command("reason")
def reason(
    src: In,
    dst: Out,
    reasoner: Annotated[
        str,
        typer.Option(
            "--reasoner", help="template | a local causal LM directory | module.path:Class"
        ),
    ] = "template",
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", min=1, help="LM reasoner: tokens per step")
    ] = 48,
    seed: Annotated[int, typer.Option("--seed", min=0, help="varies the template wording")] = 0,
    shard_steps: ShardSteps = 4096,
) -> None:
    """S2: write the reasoning behind every step's action."""
    from supervised.stages import reason as run

    kwargs = {} if reasoner == "template" else {"max_new_tokens": max_new_tokens}
    with Bar("reasoning (episodes)") as bar:
        card = run(src, dst, reasoner, seed=seed, shard_steps=shard_steps, progress=bar, **kwargs)
    _summary(card, dst)


@data_app.command("review")
def review(
    src: In,
    dst: Out,
    policy: Annotated[
        str,
        typer.Option("--policy", help="the current policy: checkpoint dir | random | module:Class"),
    ],
    expert: Annotated[str, typer.Option("--expert", help="the expert agent")] = "scripted",
    horizon: Annotated[int, typer.Option("--horizon", min=1, help="steps each one plays")] = 8,
    every: Annotated[int, typer.Option("--every", min=1, help="review every n-th step")] = 10,
    margin: Annotated[float, typer.Option("--margin", min=0, help="return gap that counts")] = 0.0,
    seed: Annotated[int, typer.Option("--seed", min=0, help="seeds the policy's sampling")] = 0,
    shard_steps: ShardSteps = 4096,
) -> None:
    """S3: keep states where the policy does worse than the expert, with the correction text."""
    from supervised.stages import review as run

    with Bar("reviewing (episodes)") as bar:
        card = run(
            src, dst, policy, expert=expert, horizon=horizon, every=every, margin=margin,
            seed=seed, shard_steps=shard_steps, progress=bar,
        )  # fmt: skip
    _summary(card, dst)
    from supervised.dataset import open_dataset

    kept = sum(int(ep["review"].sum()) for ep in open_dataset(dst).episodes())
    typer.echo(f"reviewed states kept: {kept}")


@data_app.command("imagine")
def imagine(
    src: In,
    dst: Out,
    lookahead: Annotated[int, typer.Option("--lookahead", min=1, help="chain length n")] = 3,
    shard_steps: ShardSteps = 4096,
) -> None:
    """S4: the real next frame as each step's imagination target, and lookahead chains."""
    from supervised.stages import imagine as run

    with Bar("aligning (episodes)") as bar:
        card = run(src, dst, lookahead=lookahead, shard_steps=shard_steps, progress=bar)
    _summary(card, dst)


@data_app.command("info")
def info(path: In) -> None:
    """Print a dataset's card."""
    import json

    from supervised.dataset import open_dataset

    typer.echo(json.dumps(open_dataset(path).card, indent=2))


@data_app.command("check")
def check(path: In) -> None:
    """Verify every shard (size, sha256, readable); one line naming the first bad one."""
    from supervised.dataset import open_dataset

    reader = open_dataset(path)
    reader.verify()
    _summary(reader.card, path)
    typer.echo("all shards verified")
