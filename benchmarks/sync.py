"""Weight sync: seconds per publish of the learner's weights to every runner and actor, and MB/s.

For each policy preset, ``num_env_runners`` RLlib env runners (``actors.rollout.RolloutWorkers``)
and ``imagination_actors`` imagination actors (``actors.imagination.ImaginationWorkers``) are
built on a local Ray, and the learner's publish is timed as ``rig train`` does it after every
update: one ``ray.put`` of the full ``state_dict`` (CPU tensors), then every runner and actor
fetches the reference and loads it (``set_state`` / ``load_state_dict``), each call waited for.
Two encodings are timed interleaved: ``zero-copy`` (``actors.weights.publish``: NumPy buffers,
what ``rig train`` does) and ``pickled`` (``ray.put`` of the torch tensors as they are, the
baseline). Reported per preset and encoding: the payload (MB), the median seconds of the put
alone and of the whole sync, and MB/s = payload / sync seconds (the rate at which a new version reaches all receivers;
each receiver gets its own copy, so the bytes moved are receivers x payload). The presets are
measured one after the other (each needs its own actors), each sync repeated ``repeats`` times.

Then, for ``inference_actors`` > 0, the two ways weights reach the inference actors
(``rollout.weight_sync``), interleaved on the same actors: ``object store`` (one zero-copy put,
each actor fetches and loads it: ``RolloutWorkers.sync_weights``) and ``collective`` (the
driver's bucketed broadcast, ``actors/collective.py``: gloo over TCP here, nccl between distinct
GPUs), ``result["inference"]``, with the collective-vs-store ratio.

    rig bench sync --presets tiny,small
    python -m benchmarks.sync --presets tiny small --repeats 5
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.common import interleaved, print_result, spread  # noqa: E402

# zero-copy: actors.weights.publish (NumPy buffers, what rig train does); pickled: ray.put of the
# torch state dict as it is (the baseline)
ENCODINGS = ("zero-copy", "pickled")
# to the inference actors: rollout.weight_sync's two values
PATHS = ("object store", "collective")


def bench_sync(
    presets: Sequence[str] = ("tiny", "small"),
    num_env_runners: int = 2,
    imagination_actors: int = 1,
    repeats: int = 5,
    warmup: int = 1,
    inference_actors: int = 1,
    bucket_mb: float = 256,
) -> dict[str, Any]:
    """Time the publish for each preset; returns ``{"config", "presets": [{"preset",
    "parameters", "megabytes", "put_s", "sync_s", "sync_min_s", "sync_max_s", "mb_per_s",
    "receivers"}, ...], "inference": [the same keys, "path" for "encoding"]}``. Starts a local
    Ray (one logical CPU per actor) unless one runs."""
    import ray
    import torch

    from actors.imagination import ImaginationWorkers
    from actors.rollout import RolloutWorkers, preset_policy
    from actors.weights import publish
    from envs.crafter_env import crafter_codec
    from rl.policy import RigPolicy

    if repeats < 1 or warmup < 0 or num_env_runners < 1 or min(imagination_actors,
                                                               inference_actors) < 0:  # fmt: skip
        raise ValueError("need repeats >= 1, warmup >= 0, num_env_runners >= 1, actors >= 0")
    started = not ray.is_initialized()
    if started:
        cpus = max(num_env_runners + imagination_actors, inference_actors)
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    results, inference = [], []
    try:
        for preset in presets:
            policy = RigPolicy.from_preset(preset, crafter_codec(), seed=0)
            state = {k: v.detach().to("cpu", copy=True) for k, v in policy.state_dict().items()}
            parameters = sum(p.numel() for p in policy.parameters())
            del policy
            megabytes = sum(v.numel() * v.element_size() for v in state.values()) / 1e6
            rollouts = RolloutWorkers(
                num_env_runners=num_env_runners,
                num_envs_per_env_runner=1,
                rollout_fragment_length=1,
                policy_factory=preset_policy(preset),
                act_kwargs={"task": "collect wood", "max_reasoning_tokens": 1},
            )
            factory = functools.partial(preset_policy(preset), crafter_codec())
            imagination = (
                ImaginationWorkers(imagination_actors, factory, {"max_reasoning_tokens": 1})
                if imagination_actors
                else None
            )
            version = 0
            puts: dict[str, list[float]] = {name: [] for name in ENCODINGS}
            syncs: dict[str, list[float]] = {name: [] for name in ENCODINGS}
            try:
                for i in range(warmup + repeats):
                    for name in ENCODINGS if i % 2 == 0 else ENCODINGS[::-1]:
                        version += 1
                        start = time.perf_counter()
                        ref = publish(state) if name == "zero-copy" else ray.put(state)
                        put = time.perf_counter() - start
                        rollouts.sync_weights(ref, version)
                        if imagination is not None:
                            imagination.sync_weights(ref, version)
                        if i >= warmup:
                            puts[name].append(put)
                            syncs[name].append(time.perf_counter() - start)
                        del ref
            finally:
                rollouts.stop()
                if imagination is not None:
                    imagination.stop()
            for name in ENCODINGS:
                s = spread(syncs[name])
                results.append({
                    "preset": preset, "encoding": name, "parameters": parameters,
                    "megabytes": megabytes, "put_s": spread(puts[name])["median"],
                    "sync_s": s["median"], "sync_min_s": s["min"], "sync_max_s": s["max"],
                    "mb_per_s": megabytes / s["median"],
                    "receivers": num_env_runners + imagination_actors,
                })  # fmt: skip
            if inference_actors:
                times = _inference_syncs(preset, state, inference_actors, repeats, warmup,
                                         bucket_mb)  # fmt: skip
                for name in PATHS:
                    s = spread(times[name])
                    inference.append({
                        "preset": preset, "path": name, "parameters": parameters,
                        "megabytes": megabytes, "sync_s": s["median"], "sync_min_s": s["min"],
                        "sync_max_s": s["max"], "mb_per_s": megabytes / s["median"],
                        "receivers": inference_actors,
                    })  # fmt: skip
            del state
    finally:
        if started:
            ray.shutdown()
    config = {"num_env_runners": num_env_runners, "imagination_actors": imagination_actors,
              "inference_actors": inference_actors, "bucket_mb": bucket_mb, "repeats": repeats,
              "threads": torch.get_num_threads()}  # fmt: skip
    return {"config": config, "presets": results, "inference": inference}


def _inference_syncs(preset: str, state: dict, actors: int, repeats: int, warmup: int,
                     bucket_mb: float) -> dict[str, list[float]]:  # fmt: skip
    """Seconds of each sync to ``actors`` inference actors by either path, interleaved."""
    import ray

    from actors.collective import ActorBroadcast
    from actors.inference import start_inference_actors
    from actors.rollout import preset_policy
    from actors.weights import publish
    from envs.crafter_env import crafter_codec

    handles = start_inference_actors(actors, actors, 0.02, preset_policy(preset), crafter_codec(),
                                     {"task": "collect wood", "max_reasoning_tokens": 1}, 0)  # fmt: skip
    broadcast = ActorBroadcast(handles, bucket_mb)
    version = [0]

    def store() -> None:  # RolloutWorkers.sync_weights with inference actors
        version[0] += 1
        ref = publish(state)
        ray.get([a.set_weights.remote(ref, version[0]) for a in handles])

    def collective() -> None:
        version[0] += 1
        broadcast.sync(state, version[0])

    try:
        return interleaved({"object store": store, "collective": collective}, repeats, warmup)
    finally:
        for actor in handles:
            ray.kill(actor)


COLUMNS = ("preset", "parameters", "payload MB", "encoding", "put s", "sync s", "MB/s")


def header(result: dict[str, Any]) -> str:
    c = result["config"]
    text = (
        f"publish to {c['num_env_runners']} env runners + {c['imagination_actors']} imagination "
        f"actors through the Ray object store (one put, every receiver loads it); median of "
        f"{c['repeats']} syncs"
    )
    if c.get("inference_actors"):
        text += (f"; then to {c['inference_actors']} inference actor(s): object store vs "
                 f"collective broadcast ({c['bucket_mb']:g} MiB buckets)")  # fmt: skip
    return text


def table_rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = [(r["preset"], f"{r['parameters'] / 1e6:.1f}M", f"{r['megabytes']:.1f}", r["encoding"],
             f"{r['put_s']:.4f}", f"{r['sync_s']:.4f}", f"{r['mb_per_s']:.0f}")
            for r in result["presets"]]  # fmt: skip
    rows += [(r["preset"], f"{r['parameters'] / 1e6:.1f}M", f"{r['megabytes']:.1f}",
              f"{r['path']} -> {r['receivers']} inference", "-", f"{r['sync_s']:.4f}",
              f"{r['mb_per_s']:.0f}") for r in result.get("inference", [])]  # fmt: skip
    return rows


def ratio_lines(result: dict[str, Any]) -> list[str]:
    rows = [r for r in result["presets"] if r["encoding"] == "zero-copy"]
    pickled = {r["preset"]: r for r in result["presets"] if r["encoding"] == "pickled"}
    lines = []
    for r in rows:
        line = (f"{r['preset']}: {r['sync_s']:.3f} s per sync, {r['mb_per_s']:.0f} MB/s "
                f"({r['receivers']} receivers)")  # fmt: skip
        if r["preset"] in pickled:
            speedup = pickled[r["preset"]]["sync_s"] / r["sync_s"]
            line += f"; zero-copy vs pickled tensors: {speedup:.1f}x faster"
        lines.append(line)
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        lines.append(
            f"{b['preset']} vs {a['preset']}: {b['megabytes'] / a['megabytes']:.1f}x the payload, "
            f"{b['sync_s'] / a['sync_s']:.1f}x the seconds"
        )
    paths = {(r["preset"], r["path"]): r for r in result.get("inference", [])}
    for (preset, path), r in paths.items():
        if path == "collective" and (preset, "object store") in paths:
            store = paths[(preset, "object store")]
            lines.append(
                f"{preset} to {r['receivers']} inference actor(s): collective {r['sync_s']:.3f} s "
                f"({r['mb_per_s']:.0f} MB/s) vs object store {store['sync_s']:.3f} s "
                f"({store['mb_per_s']:.0f} MB/s): collective / store = "
                f"{r['sync_s'] / store['sync_s']:.2f}x the seconds"
            )
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--runners", type=int, default=2, help="env runners")
    parser.add_argument("--imagination-actors", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--inference-actors", type=int, default=1, help="0: skip that part")
    parser.add_argument("--bucket-mb", type=float, default=256)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    result = bench_sync(args.presets, args.runners, args.imagination_actors, args.repeats,
                        inference_actors=args.inference_actors, bucket_mb=args.bucket_mb)  # fmt: skip
    print_result(sys.modules[__name__], result, args.json)
    return result


if __name__ == "__main__":
    main()
