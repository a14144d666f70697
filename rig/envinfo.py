"""What `rig envs list` shows: each registered env's spaces and a few of its action strings."""

from __future__ import annotations

from typing import Any

import envs
from envs.errors import MissingDependencyError


def describe_envs(size: int = 64) -> list[dict[str, Any]]:
    rows = []
    for info in envs.ENVS.values():
        row = {"id": info.id, "description": info.description}
        try:
            env = envs.make(info.id, size=size)
        except MissingDependencyError as err:  # minerl is an optional extra
            # Same adapter, same spaces and codec: describe it through the MineRL-shaped env.
            env = envs.make("rig/FakeMineRL-v0", size=size)
            row["description"] += " [not installed here]"
            row["missing"] = str(err)
        try:
            codec = envs.get_codec(env)
            obs = env.observation_space
            row["observation"] = f"{tuple(obs.shape)} {obs.dtype}"
            row["actions"] = f"Discrete({env.action_space.n})"
            row["examples"] = ", ".join(repr(t) for t in _examples(codec.vocab, codec.noop))
            row["noop"] = codec.noop
        finally:
            env.close()
        rows.append(row)
    return rows


def _examples(vocab, noop: str, k: int = 3) -> list[str]:
    """The no-op, then entries spread over the rest of the vocabulary."""
    rest = [v for v in vocab if v != noop]
    if len(rest) < k:
        return [noop, *rest]
    step = len(rest) / k
    return [noop, *(rest[int(i * step + step / 2)] for i in range(k - 1))]
