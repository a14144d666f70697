"""Does lookahead pay? One trained checkpoint played at lookahead n = 0, 1, 2, 3 on the same
worlds: RIG's test-time scaling curve (issue 12).

Each n is one ``rig eval`` (``sft_cli.prepare_eval`` reads the checkpoint, its env and its own act
settings as ``rig eval --checkpoint`` does; ``supervised.evaluate.evaluate_policy`` plays), with
the same env seed, number of envs and episodes for every n; only ``--lookahead`` changes. Before
each timed eval, one untimed vector step at that n warms its code path up.

Same worlds: an env's k-th episode is the same world whatever the policy does (Crafter seeds
episode k's world from the reset seed and k, Catch draws episode k's ball from the env's reset
RNG, which a step never touches), so an episode's world is ``(env, k)``. Reported per n: the mean
return and (for ``rig/Crafter-v0``) the Crafter score, each with its bootstrap 95% interval
(``benchmarks/eval_spread``), and the difference to n = 0 with a paired bootstrap interval: the
worlds both played, resampled together (``eval_spread.spread`` with one seed over equally long,
world-aligned lists of episodes draws the same indices for both). Where the first ``episodes``
finished episodes of two n are not the same worlds (episodes that end at different times), the
difference is over the worlds they share, and says how many. Seconds per decision: the eval's
wall-clock (env steps included) over the decisions taken (one per env step, unreported
episodes' included).

Written to ``--out``: ``results.json`` (settings, the figures, and per n each episode's world
and outcome, so the intervals can be recomputed), ``lookahead-<n>/report.json`` (``rig eval``'s
report: ``python benchmarks/eval_spread.py OUT/lookahead-*/report.json`` reads them) and
``lookahead.png`` (score or return against n, with the intervals; seconds per decision beside).

    rig bench lookahead --checkpoint ckpt/la/final --lookaheads 0,1,2,3 --episodes 64
    python benchmarks/lookahead.py --checkpoint ckpt/la/final --lookaheads 0,1 --episodes 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))  # run as a script from anywhere

from benchmarks.common import run_and_print  # noqa: E402
from rig.errors import UserError  # noqa: E402

CRAFTER = "rig/Crafter-v0"  # the one env with a Crafter score
NO_IMAGINE = 10**9  # evaluate_policy's psnr_every: imagine on the first step only, not measured
DIFF_SEED = 1  # bootstrap seed of the paired differences (the per-n intervals use 0)


def parse_lookaheads(text: str) -> list[int]:
    """``--lookaheads`` as sorted distinct integers >= 0 that include 0 (the baseline)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(
            f"--lookaheads must be integers separated by commas, got {text!r}"
        ) from None
    if not values or min(values) < 0:
        raise UserError(f"--lookaheads must be integers >= 0, got {text!r}")
    if len(set(values)) != len(values):
        raise UserError(f"--lookaheads names a lookahead twice: {text!r}")
    if 0 not in values:
        raise UserError(f"--lookaheads must include 0, the baseline the others are compared with, "
                        f"got {text!r}")  # fmt: skip
    return sorted(values)


def worlds(episodes: Sequence[dict[str, Any]]) -> list[list[int]]:
    """Each finished episode's world ``[env, k]``: it was env ``env``'s k-th episode (the list is
    in the order they finished, as ``play_episodes`` gives it)."""
    seen: dict[int, int] = {}
    out = []
    for episode in episodes:
        env = int(episode["env"])
        out.append([env, seen.get(env, 0)])
        seen[env] = seen.get(env, 0) + 1
    return out


def paired(base: dict[str, Any], other: dict[str, Any]) -> tuple[dict, dict]:
    """Two reports cut down to the worlds both played, their episodes in the same world order:
    :func:`benchmarks.eval_spread.spread` with one seed then resamples them as pairs."""
    at_base = {tuple(w): e for w, e in zip(worlds(base["episodes"]), base["episodes"], strict=True)}
    at_other = {tuple(w): e for w, e in zip(worlds(other["episodes"]), other["episodes"],
                                            strict=True)}  # fmt: skip
    shared = sorted(set(at_base) & set(at_other))
    return ({"episodes": [at_base[w] for w in shared], "summary": base["summary"]},
            {"episodes": [at_other[w] for w in shared], "summary": other["summary"]})  # fmt: skip


def bench_lookahead(
    checkpoint: str | Path,
    lookaheads: Sequence[int] = (0, 1, 2, 3),
    episodes: int = 16,
    num_envs: int = 4,
    seed: int = 0,
    out: str | Path | None = None,
    env: str | None = None,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    threads: int = 1,
    max_reasoning_tokens: int | None = None,
    temperature: float | None = None,
    review: str = "sample",
    imagine_temperature: float | None = None,
    review_depth: int = 1,
) -> dict[str, Any]:
    """Play ``checkpoint`` at every lookahead on the worlds of ``seed``; write results.json, the
    reports and the plot to ``out``; returns the results. Bad input is a ``UserError``."""
    from benchmarks.eval_spread import difference, spread
    from benchmarks.learning import eval_digest
    from rig.config import load_config
    from rig.runs import ensure_writable_dir
    from rig.sft_cli import _check_review, prepare_eval

    lookaheads = parse_lookaheads(",".join(map(str, lookaheads)))
    if episodes < 1 or num_envs < 1 or seed < 0 or threads < 1:
        raise UserError("--episodes, --num-envs and --threads must be >= 1, --seed >= 0")
    if config is not None and not Path(config).is_file():
        raise UserError(f"--config {config}: no such file (rig presets live in configs/)")
    _check_review(review, review_depth)
    cfg = load_config(config, list(overrides))
    import torch

    torch.set_num_threads(threads)
    policy, env_id, size, kwargs, settings = prepare_eval(
        Path(checkpoint), cfg, env, episodes=episodes, num_envs=num_envs,
        lookahead=max(lookaheads), max_reasoning_tokens=max_reasoning_tokens,
        temperature=temperature, psnr_every=NO_IMAGINE, seed=seed, review=review,
        imagine_temperature=imagine_temperature, review_depth=review_depth,
    )  # fmt: skip
    out = Path(out or f"runs/bench-lookahead-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty; give a new folder")
    ensure_writable_dir(out, "--out")

    from supervised import evaluate as ev

    reports: dict[int, dict[str, Any]] = {}
    timing: dict[int, dict[str, float]] = {}
    for n in lookaheads:
        at_n = dataclasses.replace(settings, lookahead=n)
        ev.evaluate_policy(policy, env_id, size, kwargs, dataclasses.replace(at_n, max_steps=1),
                           vectorization=cfg.env.vectorization)  # warm-up, untimed  # fmt: skip
        result = ev.evaluate_policy(policy, env_id, size, kwargs, at_n,
                                    vectorization=cfg.env.vectorization)  # fmt: skip
        folder = out / f"lookahead-{n}"
        folder.mkdir()
        path = ev.write_report(result, folder, {"checkpoint": str(Path(checkpoint).resolve()),
                                                "env_id": env_id, "env_kwargs": kwargs})  # fmt: skip
        reports[n] = json.loads(path.read_text())
        timing[n] = {"seconds": result.seconds, "decisions": result.steps,
                     "s_per_decision": result.seconds / max(result.steps, 1)}  # fmt: skip
        print(f"lookahead {n}: {len(result.episodes)} episodes, "
              f"{timing[n]['s_per_decision']:.4f} s / decision", file=sys.stderr, flush=True)  # fmt: skip

    base = reports[0]
    rows = []
    for n in lookaheads:
        report = reports[n]
        s = spread(report)
        digest = eval_digest(out / f"lookahead-{n}" / ev.REPORT)
        digest["outcomes"]["worlds"] = worlds(report["episodes"])
        row = {"lookahead": n, **{k: v for k, v in s.items() if not k.endswith("_draws")},
               **timing[n], "report": digest["report"], "outcomes": digest["outcomes"],
               "settings": report["settings"]}  # fmt: skip
        if n != 0:
            a, b = paired(base, report)
            row["vs_0"] = {"paired_worlds": len(a["episodes"])}
            if a["episodes"]:  # none shared: no difference to give (never on Catch or Crafter)
                row["vs_0"].update(difference(spread(a, seed=DIFF_SEED), spread(b, seed=DIFF_SEED)))
        rows.append(row)
    result = {
        "config": {"checkpoint": str(Path(checkpoint).resolve()), "env": env_id, "size": size,
                   "env_kwargs": kwargs, "lookaheads": lookaheads, "episodes": episodes,
                   "num_envs": num_envs, "seed": seed, "threads": threads,
                   "task": settings.task, "max_reasoning_tokens": settings.max_reasoning_tokens,
                   "temperature": settings.temperature, "history": settings.history,
                   "review": settings.review, "gamma": settings.gamma,
                   "imagine_temperature": settings.imagine_temperature,
                   "review_depth": settings.review_depth,
                   "scored": env_id == CRAFTER},
        "lookaheads": rows,
        "out": str(out),
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "lookahead.png")
    return result


# -- output --------------------------------------------------------------------------------------


def _figure(row: dict[str, Any], scored: bool) -> tuple[str, float, float, float]:
    """The plotted figure of one n: the Crafter score (Crafter) or the mean return, its interval."""
    key = "score" if scored else "return"
    return key, row[key], row[f"{key}_lo"], row[f"{key}_hi"]


def plot(result: dict[str, Any], path: Path) -> None:
    """Score (Crafter) or mean return against lookahead with 95% intervals; s / decision beside."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    c, rows = result["config"], result["lookaheads"]
    ns = [r["lookahead"] for r in rows]
    key, *_ = _figure(rows[0], c["scored"])
    mid = [_figure(r, c["scored"])[1] for r in rows]
    err = [[m - _figure(r, c["scored"])[2] for m, r in zip(mid, rows, strict=True)],
           [_figure(r, c["scored"])[3] - m for m, r in zip(mid, rows, strict=True)]]  # fmt: skip
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax, cost = fig.subplots(1, 2)
    ax.errorbar(ns, mid, yerr=err, marker="o", capsize=4, color="tab:blue")
    ax.set_xlabel("lookahead n (imagined steps before each decision)")
    ax.set_ylabel("Crafter score (%)" if key == "score" else "mean episode return")
    ax.set_title(f"{c['env']}: {c['episodes']} episodes per n, seed {c['seed']}; 95% bootstrap")
    cost.plot(ns, [r["s_per_decision"] for r in rows], marker="o", color="tab:orange")
    cost.set_xlabel("lookahead n")
    cost.set_ylabel("seconds per decision")
    cost.set_ylim(bottom=0)
    for a in (ax, cost):
        a.set_xticks(ns)
        a.grid(alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")


COLUMNS = ("n", "episodes", "return [95%]", "score % [95%]", "return - n=0 [95%]",
           "score - n=0 [95%]", "s / decision")  # fmt: skip
"""The table: per lookahead n, the intervals of its own figures and (paired) of its difference to
n = 0; the score is Crafter's, "-" for other envs."""


def _interval(value: float | None, lo: float | None, hi: float | None, sign: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:{sign}.2f} [{lo:{sign}.2f}, {hi:{sign}.2f}]"


def header(result: dict[str, Any]) -> str:
    c = result["config"]
    return (f"{c['checkpoint']} on {c['env']} ({c['size']}px), {c['episodes']} episodes per "
            f"lookahead on {c['num_envs']} envs, env seed {c['seed']} for every n (the same "
            f"worlds); up to {c['max_reasoning_tokens']} reasoning tokens, temperature "
            f"{c['temperature']}, {c['threads']} torch thread(s); review "
            f"{c.get('review', 'sample')}"
            + (f", {c['review_depth']} imagined steps per candidate"
               if c.get("review_depth", 1) > 1 else ""))  # fmt: skip


def table_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for r in result["lookaheads"]:
        d = r.get("vs_0") if "return" in r.get("vs_0", {}) else None
        rows.append((
            str(r["lookahead"]), str(r["episodes"]),
            _interval(r["return"], r["return_lo"], r["return_hi"]),
            _interval(r["score"], r["score_lo"], r["score_hi"]),
            _interval(d["return"], d["return_lo"], d["return_hi"], "+") if d else "-",
            _interval(d["score"], d["score_lo"], d["score_hi"], "+") if d else "-",
            f"{r['s_per_decision']:.4f}",
        ))  # fmt: skip
    return rows


def ratio_lines(result: dict[str, Any]) -> list[str]:
    rows = result["lookaheads"]
    base = rows[0]
    lines = []
    for r in rows[1:]:
        d = r["vs_0"]
        if "return" not in d:
            lines.append(f"lookahead {r['lookahead']} vs 0: no world played by both")
            continue
        figure = "score" if d["score"] is not None else "return"
        verdict = ("better" if d[f"{figure}_lo"] > 0 else "worse" if d[f"{figure}_hi"] < 0
                   else "no difference the episodes support")  # fmt: skip
        lines.append(
            f"lookahead {r['lookahead']} vs 0: {figure} "
            f"{_interval(d[figure], d[f'{figure}_lo'], d[f'{figure}_hi'], '+')} over "
            f"{d['paired_worlds']} shared worlds ({verdict}); "
            f"{r['s_per_decision'] / base['s_per_decision']:.2f}x the seconds per decision"
        )
    out = Path(result["out"])
    lines.append(f"results: {out / 'results.json'}; plot: {out / 'lookahead.png'}")
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="an exported policy directory")
    parser.add_argument("--lookaheads", default="0,1,2,3", help="comma-separated, with 0")
    parser.add_argument("--episodes", type=int, default=16, help="finished episodes per n")
    parser.add_argument("--num-envs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="env and sampling seed of every n")
    parser.add_argument("--env", default=None, help="env id (default: the checkpoint's)")
    parser.add_argument("--config", default=None, help="rig preset YAML (as rig eval -c)")
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        metavar="KEY=VALUE", help="config override (repeatable)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="default runs/bench-lookahead-<time>")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    return run_and_print(sys.modules[__name__], lambda: bench_lookahead(
        args.checkpoint, parse_lookaheads(args.lookaheads), args.episodes, args.num_envs,
        args.seed, args.out, args.env, args.config, args.overrides, args.threads,
    ), args.json)  # fmt: skip


if __name__ == "__main__":
    main()
