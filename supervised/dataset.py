"""The on-disk trajectory dataset: sharded, append-only, resumable, checked on read.

Layout of a dataset folder (docs/data.md has the full description)::

    DIR/
      index.json        the manifest: one entry per finished shard (file, sha256, bytes, the
                        episodes it holds); replaced atomically after every shard
      card.json         the dataset card: env, agent, stage, counts, score (derived from index)
      README.md         the card as a short markdown page
      shards/
        shard-000000.npz  whole episodes, numpy's compressed npz, no pickled objects

A shard holds whole episodes. Inside it, three kinds of arrays, told apart by their name:

    frames            (S + E, H, W, 3) uint8   each episode's L+1 frames (obs 0..L), concatenated
    ep_*              (E, ...)                 one row per episode (ep_length, ep_episode_id, ...)
    anything else     (S, ...)                 one row per step, episodes concatenated

so step t of an episode with frame offset f has frame ``frames[f + t]`` and its real next frame
``frames[f + t + 1]`` (the last step's next frame is the episode's final observation)::

    frames   o0   o1   o2  ...  oL        (L+1 frames)
    steps    a0   a1   a2  ...            (L steps: a_t taken on o_t, reward_t and o_{t+1} follow)

Writing: a shard goes to ``shards/.shard-N.npz.tmp``, is fsynced, renamed, then index.json is
rewritten the same way (tmp, fsync, rename). A crash leaves at worst a stray tmp or a shard that
the index does not list; both are removed when the writer reopens the folder, and the episodes
they held are simply written again. Reading checks every shard's size and sha256 against the index.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import zipfile
from collections.abc import Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from rig.errors import UserError

FORMAT = "rig-dataset"
VERSION = 1
INDEX = "index.json"
CARD = "card.json"
SHARDS = "shards"
IDENTITY = ("env_id", "env_kwargs", "size", "agent", "stage", "seed", "source", "options")
"""Card fields that must match when a writer resumes a folder (a different value is refused)."""

EPISODE_KEYS = ("episode_id", "world_seed")
"""Scalars every episode carries; stored as ``ep_episode_id`` and ``ep_world_seed``."""


class DatasetError(UserError):
    """A dataset folder is missing, corrupted, or not the one a command expects."""


class ShardError(DatasetError):
    """A shard file is missing, truncated or corrupted."""


# -- writing --------------------------------------------------------------------------------------


def _fsync_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: tmp file, fsync, rename, fsync the folder (the tmp
    name ``.<name>.tmp`` is what reopening a folder cleans up)."""
    from learner.checkpoints import atomic_write  # here: importing learner imports torch

    atomic_write(path, data, path.with_name(f".{path.name}.tmp"))


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n").encode()


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class DatasetWriter:
    """Appends whole episodes to a dataset folder, one shard at a time.

    ``DatasetWriter(path, resume=True, shard_steps=4096, env_id=..., agent=..., ...)``: the
    keyword arguments other than ``resume``/``shard_steps`` are card fields (``env_id``,
    ``env_kwargs``, ``size``, ``agent``, ``stage``, ``seed``, ``source`` identify the dataset;
    anything else JSON-able is kept as is). Reopening an existing folder with ``resume=True``
    continues it (its identity fields must match); ``resume=False`` refuses a non-empty folder.

    ``add_episode(ep)`` takes a dict: ``frames`` (L+1, H, W, 3) uint8, per-step arrays of
    length L (``action``, ``reward``, ...), ``episode_id`` and ``world_seed`` (ints), and
    optional ``ep_*`` per-episode values and ``summary`` (return/length/unlocked for the card).
    Episodes are buffered and a shard is written once ``shard_steps`` steps are buffered;
    ``close()`` (or leaving the ``with`` block without an error) writes the rest.
    """

    def __init__(
        self, path: str | os.PathLike, *, resume: bool = True, shard_steps: int = 4096, **card
    ):
        if shard_steps < 1:
            raise ValueError(f"shard_steps must be >= 1, got {shard_steps}")
        self.path = Path(path)
        self.shard_steps = int(shard_steps)
        self._buffer: list[dict[str, Any]] = []
        self._buffered_steps = 0
        if (self.path / INDEX).exists():
            if not resume:
                raise DatasetError(
                    f"{self.path} already holds a dataset; give a new folder or resume it"
                )
            self.index = _load_index(self.path)
            _check_identity(self.path, self.index["card"], card)
            self.index["card"].update({k: v for k, v in card.items() if k not in IDENTITY})
            self._clean_strays()
            for shard in self.index["shards"]:
                _verify_shard(self.path, shard)
        else:
            if self.path.exists() and any(self.path.iterdir()):
                raise DatasetError(
                    f"{self.path} exists and is not a dataset folder; give a new or empty folder"
                )
            (self.path / SHARDS).mkdir(parents=True, exist_ok=True)
            now = time.strftime("%Y-%m-%dT%H:%M:%S")
            self.index = {
                "format": FORMAT,
                "version": VERSION,
                "card": {**{k: None for k in IDENTITY}, **card, "created": now},
                "shards": [],
            }
            self._write_index()

    # -- public ---------------------------------------------------------------------------------

    @property
    def episode_ids(self) -> set[int]:
        """Ids of the episodes already on disk or buffered."""
        ids = {int(e["id"]) for s in self.index["shards"] for e in s["episodes"]}
        return ids | {int(ep["episode_id"]) for ep in self._buffer}

    @property
    def num_episodes(self) -> int:
        return sum(len(s["episodes"]) for s in self.index["shards"]) + len(self._buffer)

    @property
    def num_steps(self) -> int:
        """Steps on disk or buffered: the global index the next episode's first step gets."""
        written = sum(int(s["steps"]) for s in self.index["shards"])
        return written + sum(len(ep["frames"]) - 1 for ep in self._buffer)

    def add_episode(self, episode: Mapping[str, Any]) -> None:
        ep = _check_episode(episode)
        if int(ep["episode_id"]) in self.episode_ids:
            raise ValueError(f"episode {ep['episode_id']} is already in {self.path}")
        self._buffer.append(ep)
        self._buffered_steps += len(ep["frames"]) - 1
        if self._buffered_steps >= self.shard_steps:
            self.flush()

    def flush(self) -> None:
        """Write the buffered episodes as one shard and update the index (no-op when empty)."""
        if not self._buffer:
            return
        number = max((int(s["file"][-10:-4]) for s in self.index["shards"]), default=-1) + 1
        name = f"{SHARDS}/shard-{number:06d}.npz"
        arrays = _pack(self._buffer)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        data = buf.getvalue()
        _fsync_write(self.path / name, data)
        self.index["shards"].append(
            {
                "file": name,
                "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data),
                "steps": int(sum(len(ep["frames"]) - 1 for ep in self._buffer)),
                "episodes": [_episode_entry(ep) for ep in self._buffer],
            }
        )
        self._buffer, self._buffered_steps = [], 0
        self._write_index()

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()  # on an error the buffered episodes are dropped; a rerun redoes them

    # -- internals ------------------------------------------------------------------------------

    def _write_index(self) -> None:
        self.index["card"].update(counts(self.index))
        self.index["card"]["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        _fsync_write(self.path / INDEX, _json(self.index))
        card = self.index["card"]
        _fsync_write(self.path / CARD, _json(card))
        _fsync_write(self.path / "README.md", card_markdown(card).encode())

    def _clean_strays(self) -> None:
        """Remove tmp files and shards the index does not list (a crash before the index update)."""
        listed = {s["file"] for s in self.index["shards"]}
        for file in (self.path / SHARDS).iterdir():
            if f"{SHARDS}/{file.name}" not in listed:
                file.unlink()
        for file in self.path.glob(".*.tmp"):
            file.unlink()


def _check_episode(episode: Mapping[str, Any]) -> dict[str, Any]:
    ep = dict(episode)
    for key in ("frames", *EPISODE_KEYS):
        if key not in ep:
            raise ValueError(f"an episode needs {key!r}")
    frames = np.asarray(ep["frames"])
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) < 2:
        raise ValueError(f"frames must be (L+1, H, W, 3) uint8 with L >= 1, got {frames.shape}")
    ep["frames"] = frames
    length = len(frames) - 1
    for key, value in ep.items():
        if key in ("frames", "summary", *EPISODE_KEYS) or key.startswith("ep_"):
            continue
        value = np.asarray(value)
        if value.dtype == object:
            raise ValueError(f"{key}: object arrays are not stored; use str, int or float arrays")
        if len(value) != length:
            raise ValueError(f"{key} has {len(value)} rows, expected one per step ({length})")
        ep[key] = value
    return ep


def _pack(episodes: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Concatenate episodes into one shard's arrays (see the module doc for the naming)."""
    keys = [k for k in episodes[0] if k != "summary"]
    for ep in episodes[1:]:
        if sorted(k for k in ep if k != "summary") != sorted(keys):
            raise ValueError("all episodes of a dataset must carry the same fields")
    out: dict[str, np.ndarray] = {
        "ep_length": np.array([len(ep["frames"]) - 1 for ep in episodes], np.int64)
    }
    for key in keys:
        if key in EPISODE_KEYS:
            out[f"ep_{key}"] = np.array([int(ep[key]) for ep in episodes], np.int64)
        elif key.startswith("ep_"):
            out[key] = np.stack([np.asarray(ep[key]) for ep in episodes])
        else:
            out[key] = np.concatenate([np.asarray(ep[key]) for ep in episodes])
    return out


def _episode_entry(ep: Mapping[str, Any]) -> dict[str, Any]:
    entry = {"id": int(ep["episode_id"]), "world_seed": int(ep["world_seed"])}
    entry["length"] = len(ep["frames"]) - 1
    summary = dict(ep.get("summary") or {})
    if "reward" in ep and "return" not in summary:
        summary["return"] = float(np.sum(ep["reward"]))
    for key in ("terminated", "truncated"):
        if key in ep and key not in summary:
            summary[key] = bool(np.asarray(ep[key])[-1])
    entry.update(summary)
    return entry


def counts(index: Mapping[str, Any]) -> dict[str, Any]:
    """The card's derived figures: episodes, steps, frames, shards, returns, Crafter score."""
    from envs.crafter_env import ACHIEVEMENTS
    from envs.stats import summarize

    episodes = [e for s in index["shards"] for e in s["episodes"]]
    steps = sum(int(s["steps"]) for s in index["shards"])
    out: dict[str, Any] = {
        "episodes": len(episodes),
        "steps": steps,
        "frames": steps + len(episodes),
        "shards": len(index["shards"]),
    }
    if episodes and all("return" in e for e in episodes):
        crafter = all("unlocked" in e for e in episodes)
        stats = summarize(episodes, ACHIEVEMENTS if crafter else None)
        stats.pop("episodes")
        out["stats"] = stats
        if "score" in stats:
            out["score"] = stats["score"]
    return out


def card_markdown(card: Mapping[str, Any]) -> str:
    """The dataset card as a short markdown page (README.md of the folder)."""
    lines = [
        f"# rig-rl dataset: {card.get('stage') or 'collect'} stage",
        "",
        "| field | value |",
        "| --- | --- |",
    ]
    shown = ("env_id", "env_kwargs", "size", "agent", "seed", "source", "stage")
    shown += ("episodes", "steps", "frames", "shards", "score", "created", "updated")
    for key in shown:
        value = card.get(key)
        if key == "score" and value is not None:
            value = f"{value:.2f}% (Crafter score, envs/stats.py)"
        if value is not None:
            lines.append(f"| {key} | {json.dumps(value) if isinstance(value, dict) else value} |")
    stats = card.get("stats") or {}
    if "return_mean" in stats:
        lines.append(
            f"| return | mean {stats['return_mean']:.2f}, min {stats['return_min']:.2f}, "
            f"max {stats['return_max']:.2f} |"
        )
        lines.append(f"| length | mean {stats['length_mean']:.1f} |")
    rates = stats.get("success_rates")
    if rates:
        lines += ["", "Achievement success rates (% of episodes):", ""]
        lines += [f"- {name}: {rate:.0f}" for name, rate in rates.items() if rate > 0]
    lines += [
        "",
        "Format: docs/data.md of rig-rl (index.json lists shards; card.json is this card).",
    ]
    return "\n".join(lines) + "\n"


# -- reading --------------------------------------------------------------------------------------


def _load_index(path: Path) -> dict[str, Any]:
    file = path / INDEX
    if not path.is_dir():
        raise DatasetError(f"{path} is not a dataset folder (it does not exist)")
    if not file.exists():
        raise DatasetError(f"{path} is not a dataset folder (no {INDEX}); give a dataset folder")
    try:
        index = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise DatasetError(f"{file} is unreadable ({err}); the dataset is corrupted") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DatasetError(f"{file} is not a rig-rl dataset index")
    if index.get("version") != VERSION:
        raise DatasetError(
            f"{file} has format version {index.get('version')}, this rig-rl reads {VERSION}"
        )
    return index


def _check_identity(path: Path, have: Mapping[str, Any], want: Mapping[str, Any]) -> None:
    for key in IDENTITY:
        if key in want and _canon(want[key]) != _canon(have.get(key)):
            raise DatasetError(
                f"{path} was made with {key}={have.get(key)!r}, not {want[key]!r}; "
                f"give another output folder"
            )


def _canon(value: Any) -> Any:
    return json.loads(json.dumps(value, default=_jsonable))


def _verify_shard(root: Path, shard: Mapping[str, Any], full: bool = True) -> bytes:
    """The shard's bytes after checking size and sha256 against the index; ShardError if not."""
    file = root / shard["file"]
    fix = "restore it or re-create the dataset"
    if not file.exists():
        raise ShardError(f"dataset shard {file} is missing; {fix}")
    data = file.read_bytes()
    if len(data) != int(shard["bytes"]):
        raise ShardError(
            f"dataset shard {file} is truncated or changed ({len(data)} bytes, the index says "
            f"{shard['bytes']}); {fix}"
        )
    if full and hashlib.sha256(data).hexdigest() != shard["sha256"]:
        raise ShardError(f"dataset shard {file} is corrupted (sha256 mismatch); {fix}")
    return data


@lru_cache(maxsize=4)
def _read_shard(
    root: str, file: str, sha256: str, size: int, mtime_ns: int
) -> dict[str, np.ndarray]:
    """A verified shard's arrays (cached by path, hash and mtime, so a changed file is re-read)."""
    shard = {"file": file, "sha256": sha256, "bytes": size}
    data = _verify_shard(Path(root), shard)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise ShardError(f"dataset shard {Path(root) / file} is unreadable ({err})") from None


_EP_SCALARS = ("ep_episode_id", "ep_world_seed", "ep_length")
_ENTRY_KEYS = ("id", "world_seed", "length")
READ_ONLY = ("length", "step_offset", "frame_offset")
"""Keys ``episodes()`` adds that ``DatasetWriter.add_episode`` does not take (see ``writable``)."""


def writable(episode: Mapping[str, Any]) -> dict[str, Any]:
    """An episode from ``DatasetReader.episodes()`` in the form ``add_episode`` takes."""
    return {k: v for k, v in episode.items() if k not in READ_ONLY}


class DatasetReader:
    """Read access to a dataset folder (``open_dataset(path)``).

    - ``card``: the dataset card (dict); ``num_episodes``, ``num_steps``, ``num_frames``;
    - ``episodes()``: one dict per episode: ``frames`` (L+1, H, W, 3), per-step arrays (L, ...),
      ``episode_id``, ``world_seed``, ``length`` (ints), the other ``ep_*`` values, ``summary``
      (return, unlocked, ... from the index), ``step_offset`` / ``frame_offset`` (the episode's
      first global step / frame index); ``writable(ep)`` turns it back into writer input;
    - ``steps()``: one dict per step: the per-step fields, ``frame`` and ``next_frame``,
      ``episode_id``, ``world_seed``, ``t`` (step in the episode), ``index`` (global step);
    - ``frames(max_frames=None, seed=0)``: every frame as (N, H, W, 3) uint8, or a deterministic
      random subset of ``max_frames`` of them (in dataset order);
    - ``frames_at(indices)``: frames by global frame index (step g of an episode starting at
      global step s and frame f has frame ``f + (g - s)``; ``frame_index(g)`` computes it).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.index = _load_index(self.path)
        self.card: dict[str, Any] = dict(self.index["card"])
        shards = self.index["shards"]
        self._steps_per_shard = np.array([int(s["steps"]) for s in shards], np.int64)
        self._eps_per_shard = np.array([len(s["episodes"]) for s in shards], np.int64)
        lengths = [int(e["length"]) for s in shards for e in s["episodes"]]
        self._ep_step_start = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    @property
    def num_episodes(self) -> int:
        return int(self._eps_per_shard.sum())

    @property
    def num_steps(self) -> int:
        return int(self._steps_per_shard.sum())

    @property
    def num_frames(self) -> int:
        return self.num_steps + self.num_episodes

    @property
    def episode_ids(self) -> list[int]:
        return [int(e["id"]) for s in self.index["shards"] for e in s["episodes"]]

    def verify(self) -> None:
        """Check every shard (size, sha256, readable); ShardError naming the first bad one."""
        for shard in self.index["shards"]:
            self._shard(shard)

    def frame_index(self, step: int | np.ndarray) -> np.ndarray:
        """Global frame index of global step(s) ``step``: its episode's ordinal is added."""
        step = np.asarray(step, np.int64)
        episode = np.searchsorted(self._ep_step_start, step, side="right") - 1
        return step + episode

    def _shard(self, shard: Mapping[str, Any]) -> dict[str, np.ndarray]:
        file = self.path / shard["file"]
        mtime = file.stat().st_mtime_ns if file.exists() else -1
        return _read_shard(
            str(self.path), shard["file"], shard["sha256"], int(shard["bytes"]), mtime
        )

    def episodes(self) -> Iterator[dict[str, Any]]:
        step0 = frame0 = 0
        for shard in self.index["shards"]:
            arrays = self._shard(shard)
            lengths = arrays["ep_length"]
            s = f = 0
            for e, length in enumerate(lengths):
                length = int(length)
                ep: dict[str, Any] = {"step_offset": step0 + s, "frame_offset": frame0 + f}
                for key, value in arrays.items():
                    if key == "frames":
                        ep[key] = value[f : f + length + 1]
                    elif key in _EP_SCALARS:
                        ep[key[3:]] = int(value[e])
                    elif key.startswith("ep_"):
                        ep[key] = value[e]
                    else:
                        ep[key] = value[s : s + length]
                entry = shard["episodes"][e]
                ep["summary"] = {k: v for k, v in entry.items() if k not in _ENTRY_KEYS}
                yield ep
                s += length
                f += length + 1
            step0 += s
            frame0 += f

    def steps(self) -> Iterator[dict[str, Any]]:
        for ep in self.episodes():
            per_step = {
                k: v
                for k, v in ep.items()
                if isinstance(v, np.ndarray) and k != "frames" and not k.startswith("ep_")
            }
            for t in range(ep["length"]):
                record = {k: v[t] for k, v in per_step.items()}
                record.update(
                    frame=ep["frames"][t],
                    next_frame=ep["frames"][t + 1],
                    episode_id=ep["episode_id"],
                    world_seed=ep["world_seed"],
                    t=t,
                    index=ep["step_offset"] + t,
                )
                yield record

    def frames(self, max_frames: int | None = None, seed: int = 0) -> np.ndarray:
        total = self.num_frames
        if max_frames is None or max_frames >= total:
            return self.frames_at(np.arange(total))
        pick = np.sort(np.random.default_rng(seed).choice(total, int(max_frames), replace=False))
        return self.frames_at(pick)

    def frames_at(self, indices: np.ndarray | list[int]) -> np.ndarray:
        """Frames by global frame index, in the order given."""
        indices = np.asarray(indices, np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_frames):
            raise IndexError(f"frame index out of range [0, {self.num_frames})")
        starts = np.concatenate([[0], np.cumsum(self._steps_per_shard + self._eps_per_shard)])
        out = None
        for k, shard in enumerate(self.index["shards"]):
            rows = np.flatnonzero((indices >= starts[k]) & (indices < starts[k + 1]))
            if not rows.size:
                continue
            frames = self._shard(shard)["frames"]
            if out is None:
                out = np.empty((len(indices), *frames.shape[1:]), np.uint8)
            out[rows] = frames[indices[rows] - starts[k]]
        if out is None:
            size = self.card.get("size") or 0
            return np.zeros((0, size, size, 3), np.uint8)
        return out


def open_dataset(path: str | os.PathLike) -> DatasetReader:
    """Open a dataset folder for reading; DatasetError (one line) if it is not one."""
    return DatasetReader(path)
