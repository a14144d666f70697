"""Human-readable summaries of play (and later training) results, printed with rich."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from rig.config import Config


def print_play_result(result, cfg: Config, agent: str, console: Console | None = None) -> None:
    console = console or Console()
    finished, everything = result.summary["finished"], result.summary["all"]
    n_done, n_open = len(result.finished), len(result.unfinished)
    console.print(
        f"[bold]{agent}[/] agent on [bold]{cfg.env.id}[/] x{cfg.env.num_envs}: "
        f"{result.steps} env steps in {result.seconds:.1f} s ({result.steps_per_second:.0f} steps/s); "
        f"{n_done} finished episode(s), {n_open} unfinished at the step limit",
        soft_wrap=True,
    )
    table = Table(show_header=True)
    table.add_column("")
    table.add_column("finished episodes", justify="right")
    table.add_column("all episodes (incl. unfinished)", justify="right")

    def cell(summary, key, fmt="{:.2f}"):
        return fmt.format(summary[key]) if key in summary else "-"

    table.add_row("episodes", str(finished["episodes"]), str(everything["episodes"]))
    table.add_row("return (mean)", cell(finished, "return_mean"), cell(everything, "return_mean"))
    table.add_row("length (mean)", cell(finished, "length_mean", "{:.0f}"), cell(everything, "length_mean", "{:.0f}"))
    if "score" in everything:
        table.add_row("Crafter score %", cell(finished, "score"), cell(everything, "score"))
        rates_all = everything["success_rates"]
        rates_done = finished.get("success_rates", {})
        for name, rate in rates_all.items():
            if rate > 0 or rates_done.get(name, 0) > 0:
                done = f"{rates_done[name]:.0f}%" if name in rates_done else "-"
                table.add_row(f"  {name}", done, f"{rate:.0f}%")
    console.print(table)
    if result.invalid_actions:
        console.print(f"invalid action texts mapped to the no-op: {result.invalid_actions}")
