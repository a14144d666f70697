"""What every benchmark shares: interleaved timing and the medians it reports.

Timings on a shared machine drift with its load, so no figure here is compared across runs:
each benchmark measures its variants side by side in one run, interleaved (each round calls every
variant once, in an order rotated by one per round), so that a busy moment hits all of them, and
reports medians and their ratios.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any


def interleaved(
    variants: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds of each call of each variant: ``warmup`` untimed rounds, then ``repeats`` rounds,
    each calling every variant once, the order rotated by one per round. ``sync`` is called
    before and after each timed call (e.g. ``torch.cuda.synchronize``)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            if sync is not None:
                sync()
            start = time.perf_counter()
            variants[name]()
            if sync is not None:
                sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def setups(times: dict[str, list[float]], samples: int) -> dict[str, dict[str, float]]:
    """Per variant of :func:`interleaved`'s ``times``: median and min seconds of one call and
    ``samples`` per median second."""
    out = {}
    for name, seconds in times.items():
        median = statistics.median(seconds)
        out[name] = {"median_s": median, "min_s": min(seconds), "samples_per_s": samples / median}
    return out


def spread(values: list[float]) -> dict[str, float]:
    """``{"median", "min", "max"}`` of a list of figures."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_and_print(bench: ModuleType, run: Callable[[], dict[str, Any]],
                  json_path: Path | None = None) -> dict[str, Any]:
    """A benchmark script's ``main`` body: ``run()``, then :func:`print_result`; a ``UserError``
    is one line on stderr and exit code 2, as from ``rig bench``."""
    from rig.errors import UserError

    try:
        result = run()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print_result(bench, result, json_path)
    return result


def print_result(bench: ModuleType, result: dict[str, Any], json_path: Path | None = None) -> None:
    """A benchmark script's plain-text output: ``bench.header``, the ``bench.COLUMNS`` table of
    ``bench.table_rows``, ``bench.ratio_lines``; the result as JSON to ``json_path`` if given.
    (``rig bench`` prints the same parts as a rich table.)"""
    print(bench.header(result))
    print(" | ".join(bench.COLUMNS))
    for row in bench.table_rows(result):
        print(" | ".join(row))
    print("\n".join(bench.ratio_lines(result)))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
