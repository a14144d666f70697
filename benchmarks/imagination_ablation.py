"""Does imagination pay? ``rig train`` with imagined rollouts in the loss against the same run
without them: real env steps to a return, on one env, budget, seeds and config (issue 12).

Two arms, each :func:`benchmarks.learning.bench_learning` with ``only="rig"`` and no random
agent, into its own folder of ``--out``; every run is ``rig train`` exactly as that benchmark
starts it (``train.iterations`` from the real env-step budget, the curve read back from the
run's MLflow store)::

    on/     rig train -c CONFIG [--set ...]: imagination as configured (its horizon must be > 0)
    off/    the same + imagination.horizon=0: nothing is imagined and no imagined row enters
              the loss; the world model's terms still train and the gate's world/* metrics
              are still logged, so the arms differ in the imagined rows alone

The arms run one after the other (on, then off); wall-clock is reported but not compared, since
env steps are the measure. From each run's MLflow metrics (``learning._rig_history``) the
benchmark also reads the gate: the first iteration ``imagination/gate_open`` was 1 and the real
env steps by then, how many iterations it was open, and the imagined steps
(``counters/imagined_steps``) and real ones (``counters/env_steps``) at the end, which shows
that both arms sampled the same real budget and that "off" imagined nothing.

Reported per seed and as the median over seeds: real env steps to reach ``--threshold`` (the
learning benchmark's definition: the first of 50 marks where the moving mean over >= 100
episodes is at or above it; "never" counts as infinitely late in a median), the ratio on / off
of those steps (the issue's target on Catch is <= 0.5: imagination halves the real data needed;
where "off" never reached it within the budget and "on" did, the ratio is below on / budget,
given as a bound), the final return of each arm and the gate figures of "on".

Written to ``--out``: ``results.json`` (both arms' digests and the comparison), ``ablation.png``
(both arms' return curves against real env steps, a thin line per seed and the median), and
``on/``, ``off/``: each arm's own learning-benchmark folder (results.json, curves.png, the run
folders and logs).

The arms and seeds can also run apart (two at once on two cores, each a ``rig bench learning
--only rig`` folder, merged per arm with ``--merge``); ``--on DIR --off DIR`` then compares the
finished folders and runs nothing (:func:`ablation_from_folders`): the two must agree on env,
budget, threshold, seeds and every setting outside ``imagination.*``, with the horizon > 0 in
"on" and 0 in "off".

    rig bench imagination-ablation -c configs/catch.yaml --set imagination.horizon=3 \\
        --set imagination.gate=open --steps 15360 --seeds 0,1,2
    rig bench imagination-ablation --on runs/on-seeds012 --off runs/off-seeds012 --out runs/ab
    python benchmarks/imagination_ablation.py --set imagination.horizon=3 --steps 15360 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))  # run as a script from anywhere

from benchmarks import learning  # noqa: E402
from benchmarks.common import run_and_print  # noqa: E402
from rig.errors import UserError  # noqa: E402

ARMS = ("on", "off")
OFF = "imagination.horizon=0"  # the one override the "off" arm adds
TARGET = 0.5  # issue 12: imagination reaches the return with at most half the real env steps
GATE, IMAGINED = "imagination/gate_open", "counters/imagined_steps"
COLORS = {"on": "tab:blue", "off": "tab:gray"}


def arm_overrides(overrides: Sequence[str]) -> dict[str, list[str]]:
    """Each arm's ``rig train`` overrides: the user's as given, and the same with ``OFF`` last
    (so it wins over any horizon the user set)."""
    return {"on": list(overrides), "off": [*overrides, OFF]}


def imagination_stats(run_out: Path) -> dict[str, Any] | None:
    """The gate and the counters of the ``rig train`` run in ``run_out``, from its MLflow store:
    iterations logged, the first iteration the gate was open (None: never) and the real env
    steps at it, the iterations it was open, and the final real and imagined step counters;
    None without a run."""
    history = learning._rig_history(run_out, (GATE, IMAGINED, learning.RIG_STEPS))
    if history is None:
        return None
    gate, env_steps, imagined = history[GATE], history[learning.RIG_STEPS], history[IMAGINED]
    opened = sorted(step for step, value in gate.items() if value > 0.5)
    first = opened[0] if opened else None
    return {
        "iterations": len(gate),
        "gate_first_open": first,
        "gate_first_open_env_steps": None if first is None else env_steps.get(first),
        "gate_open_iterations": len(opened),
        "env_steps": env_steps[max(env_steps)] if env_steps else None,
        "imagined_steps": imagined[max(imagined)] if imagined else 0.0,
    }  # fmt: skip


def digest(result: dict[str, Any], horizon: int) -> dict[str, Any]:
    """One arm's learning-benchmark result as results.json keeps it: its overrides, resolved
    horizon and plan, and per run the curve, steps to threshold, final return and
    :func:`imagination_stats` (under ``"imagination"``, read from the run's folder)."""
    c, rig = result["config"], result["methods"]["rig"]
    runs = []
    for run in rig["runs"]:
        run_out = _run_folder(run, Path(c["out"]))
        keep = ("seed", "ok", "error", "wall_s", "log", "curve", "steps_to_threshold",
                "final_return")  # fmt: skip
        runs.append({**{k: run[k] for k in keep}, "imagination": imagination_stats(run_out)})
    median = rig["median"]
    return {
        "overrides": c["overrides"], "horizon": horizon, "plan": c["plans"]["rig"],
        "results": str(Path(c["out"]) / "results.json"), "runs": runs,
        "median": {k: median[k] for k in ("returns", "steps_to_threshold", "final_return",
                                          "wall_s")},
    }  # fmt: skip


def _run_folder(run: dict[str, Any], out: Path) -> Path:
    """The ``rig train`` output folder of one learning-benchmark run: beside its log (a merged
    folder keeps each run's log where it ran), else ``out/rig-seed<seed>``."""
    beside_log = Path(run.get("log") or "").with_suffix("")
    return beside_log if run.get("log") and beside_log.is_dir() else out / f"rig-seed{run['seed']}"


def _median(values: Sequence[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return statistics.median(found) if found else None


def compare(arms: dict[str, dict[str, Any]], steps: int) -> dict[str, Any]:
    """On against off from the arms' digests: per seed both arms' steps to threshold, their
    ratio on / off, both final returns and the on arm's gate; the medians over the seeds that
    finished, their ratio (or, where off never reached the threshold and on did, the bound
    ``ratio_below`` = on / budget, since off's steps exceed the budget) and whether it meets
    ``TARGET``."""
    on, off = ({r["seed"]: r for r in arms[arm]["runs"]} for arm in ARMS)
    seeds = []
    for seed in sorted(set(on) | set(off)):
        a, b = on.get(seed), off.get(seed)
        gate = (a or {}).get("imagination") or {}
        seeds.append({
            "seed": seed, "ok": bool(a and a["ok"] and b and b["ok"]),
            "on_steps": a and a["steps_to_threshold"], "off_steps": b and b["steps_to_threshold"],
            "ratio": learning.ratio(a and a["steps_to_threshold"], b and b["steps_to_threshold"]),
            "on_final": a and a["final_return"], "off_final": b and b["final_return"],
            "gate_first_open": gate.get("gate_first_open"),
            "gate_first_open_env_steps": gate.get("gate_first_open_env_steps"),
            "gate_open_iterations": gate.get("gate_open_iterations"),
        })  # fmt: skip
    on_steps, off_steps = (arms[arm]["median"]["steps_to_threshold"] for arm in ARMS)
    found = learning.ratio(on_steps, off_steps)
    below = on_steps / steps if off_steps is None and on_steps is not None else None
    bound = found if found is not None else below
    ok = [s for s in seeds if s["ok"]]
    firsts = [s["gate_first_open"] for s in ok]
    return {
        "seeds": seeds,
        "median": {
            "on_steps": on_steps, "off_steps": off_steps, "ratio": found, "ratio_below": below,
            "on_final": arms["on"]["median"]["final_return"],
            "off_final": arms["off"]["median"]["final_return"],
            "gate_first_open": learning.median_steps(firsts) if firsts else None,
            "gate_open_iterations": _median([s["gate_open_iterations"] for s in ok]),
        },
        "target": TARGET,
        "met": bound is not None and bound <= TARGET,
    }  # fmt: skip


def bench_imagination_ablation(
    env: str = "rig/Catch-v0",
    steps: int = 15000,
    seeds: Sequence[int] = (0, 1, 2),
    config: str | Path = "configs/catch.yaml",
    overrides: Sequence[str] = (),
    threshold: float = 0.8,
    out: str | Path | None = None,
    threads: int = 1,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run both arms for every seed (module doc); write results.json and ablation.png to
    ``out``; returns the results. Bad input, a config whose resolved ``imagination.horizon`` is
    0 included, is a ``UserError`` before any folder is made."""
    from rig.config import load_config

    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    if threads < 1:
        raise UserError(f"--threads must be >= 1, got {threads}")
    config = learning.check_run_inputs(env, steps, seeds, config)
    per_arm = arm_overrides(overrides)
    resolved = {arm: load_config(config, [*per_arm[arm], f"env.id={env}"]) for arm in ARMS}
    horizon = resolved["on"].imagination.horizon
    if horizon == 0:
        raise UserError(f"--config {config} resolves imagination.horizon to 0: imagination is "
                        "off already, nothing to ablate; give --set imagination.horizon=N "
                        "(e.g. 3)")  # fmt: skip
    out = learning._fresh_out(out or f"runs/bench-imagination-ablation-"
                                     f"{time.strftime('%Y%m%d-%H%M%S')}")  # fmt: skip

    arms = {}
    for arm in ARMS:
        result = learning.bench_learning(
            env, steps, seeds, config, per_arm[arm], threshold, "rig", out / arm, threads,
            say=lambda line, arm=arm: say(f"imagination {arm}: {line}"), random_baseline=False,
        )  # fmt: skip
        arms[arm] = digest(result, resolved[arm].imagination.horizon)
    cfg = resolved["on"]
    result = {
        "config": {"env": env, "size": cfg.env.size, "env_kwargs": dict(cfg.env.kwargs),
                   "steps": steps, "seeds": list(seeds), "config": str(config),
                   "overrides": list(overrides), "threshold": threshold,
                   "window": learning.WINDOW, "threads": threads, "gate": cfg.imagination.gate,
                   "out": str(out)},
        "marks": learning.marks(steps, learning.TABLE_MARKS),
        "arms": arms,
        "comparison": compare(arms, steps),
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "ablation.png")
    return result


def ablation_from_folders(on: str | Path, off: str | Path, out: str | Path | None = None
                          ) -> dict[str, Any]:  # fmt: skip
    """The comparison of two finished ``rig bench learning`` folders with rig runs (each one
    arm, its seeds run apart and merged or not), written like :func:`bench_imagination_ablation`
    writes its own (results.json and ablation.png to ``out``); runs nothing. The folders must
    agree on env, budget, threshold and window, and on every resolved ``rig train`` setting
    outside ``imagination.*``; "on" must have imagined (horizon > 0), "off" not (horizon 0).
    Bad input is a ``UserError`` before ``out`` is made."""
    loaded = {}
    for arm, folder in (("on", Path(on)), ("off", Path(off))):
        result = learning.read_results(folder, f"--{arm}")
        config = result["config"]
        try:
            [run["seed"] for run in result["methods"]["rig"]["runs"]]  # what the comparison reads
        except (KeyError, TypeError):
            raise UserError(f"--{arm} {folder}: its results hold no rig runs (give a `rig "
                            "bench learning --only rig` folder)") from None  # fmt: skip
        variant = learning._folder_variant(folder, config)
        if variant is None:
            raise UserError(f"--{arm} {folder}: its rig runs' resolved config is gone (no "
                            "rig_variant, no rig-seed*/*/config.yaml); the arms cannot be "
                            "checked to differ in imagination alone")  # fmt: skip
        loaded[arm] = (folder, result, variant)
    (on_dir, on_result, on_variant), (off_dir, off_result, off_variant) = loaded["on"], loaded["off"]
    for key in learning.MERGE_SAME:
        if on_result["config"].get(key) != off_result["config"].get(key):
            raise UserError(f"--on {on_dir} has {key} {on_result['config'].get(key)!r}, --off "
                            f"{off_dir} {off_result['config'].get(key)!r}: compare arms of one "
                            "benchmark setting")  # fmt: skip
    horizon = {arm: loaded[arm][2].get("imagination.horizon") for arm in ARMS}
    if not horizon["on"]:
        raise UserError(f"--on {on_dir} ran imagination.horizon {horizon['on']!r}: nothing was "
                        "imagined in the on arm")  # fmt: skip
    if horizon["off"] != 0:
        raise UserError(f"--off {off_dir} ran imagination.horizon {horizon['off']!r}: the off "
                        "arm must imagine nothing (imagination.horizon=0)")  # fmt: skip
    outside = learning._variant_difference(
        *({k: v for k, v in variant.items() if not k.startswith("imagination.")}
          for variant in (on_variant, off_variant)))  # fmt: skip
    if outside:
        raise UserError(f"--on {on_dir} and --off {off_dir} differ beyond imagination "
                        f"({outside}): the ablation compares imagination alone")  # fmt: skip
    ran = {arm: sorted(run["seed"] for run in loaded[arm][1]["methods"]["rig"]["runs"])
           for arm in ARMS}  # fmt: skip
    if ran["on"] != ran["off"]:
        raise UserError(f"--on {on_dir} ran seeds {ran['on']}, --off {off_dir} {ran['off']}: "
                        "compare arms run on the same seeds (merge or run the missing ones)")
    out = learning._fresh_out(out or f"runs/bench-imagination-ablation-"
                                     f"{time.strftime('%Y%m%d-%H%M%S')}")  # fmt: skip
    arms = {arm: digest(loaded[arm][1], horizon[arm]) for arm in ARMS}
    c = on_result["config"]
    result = {
        "config": {"env": c["env"], "size": c["size"], "env_kwargs": c["env_kwargs"],
                   "steps": c["steps"], "seeds": ran["on"], "config": c["config"],
                   "overrides": c["overrides"], "threshold": c["threshold"],
                   "window": c["window"], "threads": c.get("threads"),
                   "gate": on_variant.get("imagination.gate"), "out": str(out),
                   "from": {"on": str(on_dir), "off": str(off_dir)},
                   "off_overrides": off_result["config"]["overrides"]},
        "marks": learning.marks(c["steps"], learning.TABLE_MARKS),
        "arms": arms,
        "comparison": compare(arms, c["steps"]),
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "ablation.png")
    return result


# -- output --------------------------------------------------------------------------------------


def plot(result: dict[str, Any], path: Path) -> None:
    """Return vs real env steps of both arms: a thin line per seed, a thick median, the
    threshold dashed (as ``learning.plot_curves`` draws its sides)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    c = result["config"]
    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for arm in ARMS:
        data, color = result["arms"][arm], COLORS[arm]
        for run in data["runs"]:
            if run["curve"]:
                ax.step(*zip(*[p[:2] for p in run["curve"]], strict=True), where="post",
                        color=color, lw=0.8, alpha=0.4, marker=".", ms=3)  # fmt: skip
        ok = [r["curve"] for r in data["runs"] if r["ok"]]
        at = sorted({p[0] for curve in ok for p in curve})
        median = [(m, v) for m, v in zip(at, learning.median_curve(ok, at), strict=True)
                  if v is not None]  # fmt: skip
        label = f"imagination {arm} (horizon {data['horizon']})"
        if median:
            ax.step(*zip(*median, strict=True), where="post", color=color, lw=2.5, marker="o",
                    ms=3, label=f"{label}: median of {len(ok)} seeds")  # fmt: skip
        else:
            ax.plot([], [], color=color, lw=2.5, label=f"{label}: no finished episodes")
    ax.axhline(c["threshold"], color="gray", ls="--", lw=1, label=f"threshold {c['threshold']}")
    ax.set_xlabel("real env steps")
    ax.set_ylabel(f"mean episode return (moving, >= {c['window']} episodes)")
    ax.set_title(f"{c['env']}: imagined rollouts on vs off, seeds "
                 f"{', '.join(map(str, c['seeds']))}")  # fmt: skip
    ax.set_xlim(0, c["steps"])
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=120, bbox_inches="tight")


COLUMNS = ("real env steps", "on return", "off return")


def _num(value: float | None, fmt: str = "{:.2f}", none: str = "-") -> str:
    return none if value is None else fmt.format(value)


def header(result: dict[str, Any]) -> str:
    c, arms = result["config"], result["arms"]
    plan = arms["on"]["plan"]
    command = " ".join(["rig train -c", c["config"], *c["overrides"]])
    return (f"{c['env']} ({c['size']}px), {c['steps']} real env steps per run "
            f"({plan['iterations']} iterations x {plan['steps_per_iteration']}), seeds "
            f"{','.join(map(str, c['seeds']))}; on: {command} (horizon {arms['on']['horizon']}, "
            f"gate {c['gate']}); off: {_off_command(c)}; median over seeds of the mean episode "
            f"return (episode-weighted moving mean over >= {c['window']} episodes)")  # fmt: skip


def _off_command(c: dict[str, Any]) -> str:
    if "off_overrides" not in c:
        return f"the same + {OFF}"
    return " ".join(["rig train -c", c["config"], *c["off_overrides"]])


def table_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    on, off = (result["arms"][arm]["median"]["returns"] for arm in ARMS)
    return [(str(mark), _num(on[i], "{:+.3f}"), _num(off[i], "{:+.3f}"))
            for i, mark in enumerate(result["marks"])]  # fmt: skip


def ratio_lines(result: dict[str, Any]) -> list[str]:
    c, comparison = result["config"], result["comparison"]
    m = comparison["median"]

    def per_seed(key: str, fmt: str, none: str) -> str:
        return ", ".join(f"seed {s['seed']} " + (_num(s[key], fmt, none) if s["ok"] else "failed")
                         for s in comparison["seeds"])  # fmt: skip

    lines = [f"real env steps to reach return {c['threshold']} (moving mean over >= "
             f"{c['window']} episodes, at budget/50 marks):"]  # fmt: skip
    for arm in ARMS:
        lines.append(f"  {arm}: {per_seed(f'{arm}_steps', '{:.0f}', 'never')}; median "
                     f"{_num(m[f'{arm}_steps'], '{:.0f}', 'never')}")  # fmt: skip
    if m["ratio"] is not None:
        verdict = _num(m["ratio"])
    elif m["ratio_below"] is not None:
        verdict = f"< {m['ratio_below']:.2f} (off never reached it within the budget)"
    else:
        verdict = "n/a (on never reached it)"
    lines.append(f"  ratio on / off (medians): {verdict}; per seed {per_seed('ratio', '{:.2f}', '-')}"
                 f"; target <= {comparison['target']}: "
                 f"{'met' if comparison['met'] else 'not met'}")  # fmt: skip
    lines.append(f"final return at {c['steps']} real env steps:")
    for arm in ARMS:
        lines.append(f"  {arm}: {per_seed(f'{arm}_final', '{:+.3f}', '-')}; median "
                     f"{_num(m[f'{arm}_final'], '{:+.3f}')}")  # fmt: skip
    gates = []
    for s in comparison["seeds"]:
        first = s["gate_first_open"]
        when = "never open" if first is None else (
            f"first open at iteration {first} ({_num(s['gate_first_open_env_steps'], '{:.0f}')} "
            f"real env steps), open {s['gate_open_iterations']} iterations")  # fmt: skip
        gates.append(f"seed {s['seed']} {when}")
    lines.append(f"gate of the on arm ({c['gate']}): {'; '.join(gates)}")
    for arm in ARMS:
        runs = result["arms"][arm]["runs"]
        counts = ", ".join(f"seed {r['seed']} " + (
            "-" if r["imagination"] is None else
            f"{_num(r['imagination']['env_steps'], '{:.0f}')} real / "
            f"{_num(r['imagination']['imagined_steps'], '{:.0f}')} imagined") for r in runs)  # fmt: skip
        lines.append(f"steps sampled, {arm}: {counts}; wall-clock median "
                     f"{_num(result['arms'][arm]['median']['wall_s'], '{:.0f}')} s")  # fmt: skip
    failed = [f"{arm} seed {r['seed']}: {r['error']} (log {r['log']})"
              for arm in ARMS for r in result["arms"][arm]["runs"] if not r["ok"]]  # fmt: skip
    lines += [f"failed: {line}" for line in failed]
    where = c.get("from") or {arm: f"{c['out']}/{arm}" for arm in ARMS}
    lines.append(f"results: {c['out']}/results.json, plot: {c['out']}/ablation.png "
                 f"(each arm's runs: {where['on']}, {where['off']})")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    learning.add_run_arguments(parser, "rig train override of both arms (repeatable)")
    parser.add_argument("--out", default=None,
                        help="default runs/bench-imagination-ablation-<time>")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--on", type=Path, default=None,
                        help="a finished learning-benchmark folder of the on arm (with --off: "
                        "compare, run nothing)")  # fmt: skip
    parser.add_argument("--off", type=Path, default=None, help="the off arm's folder")
    args = parser.parse_args(argv)
    if (args.on is None) != (args.off is None):
        parser.error("--on and --off go together")
    if args.on is not None:
        return run_and_print(sys.modules[__name__], lambda: ablation_from_folders(
            args.on, args.off, args.out), args.json)  # fmt: skip
    return run_and_print(sys.modules[__name__], lambda: bench_imagination_ablation(
        args.env, args.steps, learning.parse_seeds(args.seeds), args.config, args.overrides,
        args.threshold, args.out, args.threads,
    ), args.json)  # fmt: skip


if __name__ == "__main__":
    main()
