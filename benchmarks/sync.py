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

Without Ray (``--no-ray``, :func:`bench_sync_local`): one sync on one machine with a GPU, the
part of ``rig train``'s publish that does not depend on Ray, for a preset too big for the actors
of this machine (janus-1.3b). The learner's policy sits on ``--device`` in ``--dtype`` (bf16 on
a GPU, as DeepSpeed holds it) and a second copy, the receiver, beside it on the same device.
Each sync is timed in its steps, in order: ``host copy`` (the state dict to host memory, as
``DeepSpeedEngine.published_state_dict`` copies it under ZeRO 0-2, where its gather is a no-op),
``finite check`` (``rig train``'s ``_check_finite`` over it, before anything is published),
``pack`` (``actors.weights.pack_state``: NumPy views), ``put copy`` (a stand-in for
``ray.put``: one memcpy of the packed buffers into preallocated host arrays, which is what the
put into the object store's shared memory costs at least) and ``load`` (``unpack_state``, then
the receiver's ``load_state_dict``: the copy from host memory to the device, as an inference
actor on that GPU does it). Left out: Ray itself (the object store's allocation and
serialisation, the actor calls, a receiver on another node fetching the bytes over the
network), more than one receiver (each loads its own copy), the collective path
(``rollout.weight_sync: collective``, NCCL between two GPUs, which one GPU cannot show) and
ZeRO-3's gather. The receiver starts from other weights (another seed); after the last sync its
state must equal the learner's (``max_abs_diff`` 0).

    python -m benchmarks.sync --no-ray --presets janus-1.3b --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import functools
import json
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


def bench_sync_local(
    presets: Sequence[str] = ("tiny",),
    device: str = "cpu",
    dtype: str = "fp32",
    repeats: int = 5,
    warmup: int = 1,
) -> dict[str, Any]:
    """Seconds of each step of a sync without Ray (module docstring), per preset. Returns
    ``{"config", "presets": [{"preset", "parameters", "megabytes", "steps": {step: median s},
    "sync_s", "sync_min_s", "sync_max_s", "gb_per_s", "max_abs_diff"}, ...]}``; ``gb_per_s`` =
    payload / median sync seconds."""
    import torch

    from benchmarks.policy import DTYPES, build_policy

    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    results = []
    for preset in presets:
        learner = build_policy(preset, device, dtype, seed=0)
        receiver = build_policy(preset, device, dtype, seed=1)
        parameters = sum(p.numel() for p in learner.parameters())
        sync = _LocalSync(learner, receiver)
        times = interleaved({"sync": sync}, repeats, warmup)["sync"]
        s = spread(times)
        megabytes = sync.bytes / 1e6
        results.append({
            "preset": preset, "parameters": parameters, "megabytes": megabytes,
            "steps": {k: spread(v)["median"] for k, v in sync.steps.items()},
            "sync_s": s["median"], "sync_min_s": s["min"], "sync_max_s": s["max"],
            "gb_per_s": megabytes / 1e3 / s["median"], "max_abs_diff": sync.max_abs_diff(),
        })  # fmt: skip
        del learner, receiver, sync
        if device == "cuda":
            torch.cuda.empty_cache()
    config = {"device": device, "dtype": dtype, "repeats": repeats, "warmup": warmup,
              "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
              "torch_dtype": str(DTYPES[dtype])}  # fmt: skip
    return {"config": config, "presets": results}


class _LocalSync:
    """One sync from ``learner`` to ``receiver`` per call, each step timed into ``steps``
    (seconds of every call, warm-up included; :func:`bench_sync_local` takes the medians)."""

    STEPS = ("host copy", "finite check", "pack", "put copy", "load")

    def __init__(self, learner, receiver) -> None:
        import numpy as np

        from actors.weights import PACKED, pack_state

        self.learner, self.receiver = learner, receiver
        packed = pack_state(learner.state_dict())
        self.store = {k: np.empty_like(a) for k, a in packed[PACKED].items()}  # the "object store"
        self.bytes = sum(a.nbytes for a in self.store.values())
        self.steps: dict[str, list[float]] = {name: [] for name in self.STEPS}

    def __call__(self) -> None:
        import numpy as np

        from actors.weights import PACKED, non_finite, pack_state, unpack_state
        from learner.engine import cpu_state_dict

        clock = _Clock(self.steps, self.learner.device)
        state = cpu_state_dict(self.learner)
        clock("host copy")
        bad = non_finite(state)
        if bad:
            raise RuntimeError(f"non-finite weights: {bad[:3]}")
        clock("finite check")
        packed = pack_state(state)
        clock("pack")
        for name, array in packed[PACKED].items():
            np.copyto(self.store[name], array)
        clock("put copy")
        stored = {PACKED: self.store, "dtypes": packed["dtypes"]}
        self.receiver.load_state_dict(unpack_state(stored))
        clock("load")

    def max_abs_diff(self) -> float:
        """Largest |learner - receiver| over the state dicts (0: the sync delivered them)."""
        mine, theirs = self.learner.state_dict(), self.receiver.state_dict()
        return max(float((mine[k].double() - theirs[k].double()).abs().max()) if mine[k].numel()
                   else 0.0 for k in mine)  # fmt: skip


class _Clock:
    """Appends the seconds since the last call (the device's work finished) under each name."""

    def __init__(self, into: dict[str, list[float]], device) -> None:
        self.into, self.device = into, device
        self.last = time.perf_counter()

    def __call__(self, name: str) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.into[name].append(now - self.last)
        self.last = now


def local_lines(result: dict[str, Any]) -> list[str]:
    """:func:`bench_sync_local`'s printout: a header, a line per preset, the steps' seconds."""
    c = result["config"]
    lines = [f"one sync without Ray on {c['gpu'] or c['device']}, {c['dtype']}: learner -> host "
             f"-> a second copy on the same device; median of {c['repeats']} syncs"]  # fmt: skip
    for r in result["presets"]:
        steps = ", ".join(f"{k} {v:.3f}" for k, v in r["steps"].items())
        lines.append(
            f"{r['preset']} ({r['parameters'] / 1e6:,.1f}M parameters, {r['megabytes']:,.0f} MB): "
            f"{r['sync_s']:.3f} s per sync, {r['gb_per_s']:.2f} GB/s (goal <= 1 s for 2.1B "
            f"parameters on one node); steps (s): {steps}; max |learner - receiver| after: "
            f"{r['max_abs_diff']:g}"
        )
    return lines


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
    parser.add_argument("--no-ray", action="store_true", help="one sync without Ray (docstring)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="--no-ray")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="--no-ray")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.no_ray:
        result = bench_sync_local(args.presets, args.device, args.dtype, args.repeats)
        print("\n".join(local_lines(result)))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return result
    result = bench_sync(args.presets, args.runners, args.imagination_actors, args.repeats,
                        inference_actors=args.inference_actors, bucket_mb=args.bucket_mb)  # fmt: skip
    print_result(sys.modules[__name__], result, args.json)
    return result


if __name__ == "__main__":
    main()
