"""S2-S4: each stage reads a dataset and writes a new one with more per-step fields.

The input is never modified. The output folder is an ordinary dataset (docs/data.md) whose card
names its ``source`` and ``stage``; a stage that is interrupted continues when rerun with the same
arguments (episodes already written are skipped), and it refuses an output folder made from
another source or with other options. Episodes are written in input order, so global step and
frame indices of the output equal the input's once a stage has finished.

    reason   (S2)  + reasoning         (L,) str   why each action was taken (Reasoner)
    review   (S3)  + review, review_text, review_loss, ...   (policy vs expert from one state)
    imagine  (S4)  + next_frame_index, chain_steps, chain_frames, chain_len

A reasoner is any object with ``reason(step) -> str``, ``step`` being one record of
``DatasetReader.steps()`` (frame, action_text, goal, inventory, local_view, ...).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from supervised.dataset import DatasetError, DatasetWriter, open_dataset, writable

MAX_WORDS = 40
WAIT = "Wait! Let's re-observe..."
"""RIG's review marker between the wrong and the corrected reasoning (S3)."""


# -- the derive loop shared by the stages ---------------------------------------------------------


def derive(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    stage: str,
    transform: Callable[[dict[str, Any], int, int], dict[str, Any]],
    options: Mapping[str, Any],
    shard_steps: int = 4096,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Write ``transform(episode, step_offset, frame_offset)`` of every input episode to ``dst``.

    The offsets are the episode's first global step and frame index in the OUTPUT dataset.
    Returns the output card."""
    reader = open_dataset(src)
    if Path(dst).resolve() == reader.path.resolve():
        raise DatasetError(f"{dst} is the input dataset; a stage writes a new folder")
    card = {k: reader.card.get(k) for k in ("env_id", "env_kwargs", "size", "agent", "seed")}
    previous = reader.card.get("stages") or [reader.card.get("stage") or "collect"]
    card.update(
        stage=stage, source=str(reader.path.resolve()), options=dict(options),
        stages=[*previous, stage], info=reader.card.get("info"),
    )  # fmt: skip
    writer = DatasetWriter(dst, resume=True, shard_steps=shard_steps, **card)
    done_ids = writer.episode_ids
    total = reader.num_episodes
    for n, ep in enumerate(reader.episodes(), 1):
        if ep["episode_id"] not in done_ids:
            frame_offset = writer.num_steps + writer.num_episodes
            writer.add_episode(transform(writable(ep), writer.num_steps, frame_offset))
        if progress:
            progress(n, total)
    writer.close()
    return writer.index["card"]


def _per_step(episode: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """The step records of one episode (as ``DatasetReader.steps()`` gives them)."""
    length = len(episode["frames"]) - 1
    arrays = {
        k: v
        for k, v in episode.items()
        if isinstance(v, np.ndarray) and k != "frames" and not k.startswith("ep_")
    }
    for t in range(length):
        record = {k: v[t] for k, v in arrays.items()}
        record.update(
            frame=episode["frames"][t], next_frame=episode["frames"][t + 1],
            episode_id=episode["episode_id"], world_seed=episode["world_seed"], t=t,
        )  # fmt: skip
        yield record


# -- S2: reasoning --------------------------------------------------------------------------------


class Reasoner(Protocol):
    """Writes the reasoning that leads to a step's action: ``reason(step) -> str`` (short: it
    becomes training tokens)."""

    def reason(self, step: Mapping[str, Any]) -> str: ...


_DIRS = {(-1, 0): "left", (1, 0): "right", (0, -1): "up", (0, 1): "down"}
_INTERESTING = ("water", "tree", "stone", "coal", "iron", "diamond", "table", "furnace", "lava",
                "cow", "zombie", "skeleton", "plant", "sand")  # fmt: skip
_ACTION_WHY = {
    "noop": "I wait here", "do": "I interact with what I face", "sleep": "I sleep to restore energy",
    "move_left": "I move left", "move_right": "I move right", "move_up": "I move up",
    "move_down": "I move down",
}  # fmt: skip


def _clip(text: str, words: int = MAX_WORDS) -> str:
    parts = text.split()
    return " ".join(parts[:words])


class TemplateReasoner:
    """Reasons from the env's ground truth (Crafter): what is in view, the inventory, the
    agent's goal, why this action. Phrasing varies by a seeded choice per step, the content
    does not; at most ``MAX_WORDS`` words. Envs without Crafter's info get a one-line template.

    Args:
        card: the dataset card (its ``info.semantic_ids`` names the ids of ``local_view``).
        seed: varies the phrasing, deterministically per (episode, step).
    """

    def __init__(self, card: Mapping[str, Any], seed: int = 0):
        info = card.get("info") or {}
        self.names = {int(v): k for k, v in (info.get("semantic_ids") or {}).items()}
        self.inventory = list(info.get("inventory") or [])
        self.seed = int(seed)

    def _rng(self, step: Mapping[str, Any]) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(step["episode_id"]), int(step["t"])])

    def seen(self, step: Mapping[str, Any]) -> str:
        """The nearest cell of each interesting kind in view, e.g. 'water 2 left, tree 1 up'."""
        view = np.asarray(step["local_view"])
        cx, cy = view.shape[0] // 2, view.shape[1] // 2
        best: dict[str, tuple[int, str]] = {}
        for (x, y), ident in np.ndenumerate(view):
            name = self.names.get(int(ident))
            if name not in _INTERESTING or (x, y) == (cx, cy):
                continue
            dx, dy = x - cx, y - cy
            dist = abs(dx) + abs(dy)
            where = " ".join(
                f"{abs(d)} {_DIRS[(int(np.sign(d)), 0) if axis == 0 else (0, int(np.sign(d)))]}"
                for axis, d in ((0, dx), (1, dy))
                if d
            )
            if name not in best or dist < best[name][0]:
                best[name] = (dist, where)
        ranked = sorted(best.items(), key=lambda kv: kv[1][0])[:3]
        return ", ".join(f"{name} {where}" for name, (_, where) in ranked)

    def reason(self, step: Mapping[str, Any]) -> str:
        rng = self._rng(step)
        action = str(step["action_text"])
        goal = str(step.get("goal", "") or "")
        if "local_view" not in step:
            why = goal or "it moves me towards the goal"
            return _clip(f"I see the screen. I choose {action} because {why}.")
        view = np.asarray(step["local_view"])
        fx, fy = (int(v) for v in step["facing"])
        faced = self.names.get(int(view[view.shape[0] // 2 + fx, view.shape[1] // 2 + fy]), "")
        inv = dict(zip(self.inventory, (int(v) for v in step["inventory"]), strict=False))
        low = [k for k in ("health", "food", "drink", "energy") if k in inv and inv[k] <= 4]
        items = [f"{v} {k}" for k, v in inv.items() if v > 0 and k not in
                 ("health", "food", "drink", "energy")]  # fmt: skip
        goal_text = goal.split("(")[0].strip().rstrip(":") or "survive"
        if action == "do" and faced:
            why = f"I hit the {faced} in front of me"
        else:
            why = _ACTION_WHY.get(action, f"I {action.replace('_', ' ')}")
        parts = [  # most important first: later parts are dropped to stay under MAX_WORDS
            f"{rng.choice(['Goal:', 'My goal is', 'I want to'])} {goal_text}.",
            f"{rng.choice(['So', 'Therefore', 'Next,'])} {why}.",
            f"{rng.choice(['I see', 'In view:', 'Nearby:'])} {self.seen(step) or 'nothing useful'}.",
            f"Low {', '.join(low)}." if low else "",
            f"{rng.choice(['I have', 'I carry'])} {', '.join(items[:3])}." if items else "",
        ]
        # parts are in priority order; drop from the end until short enough, then read them as
        # goal, view, needs, items, and the action last
        for keep in range(len(parts), 1, -1):
            chosen = parts[:keep]
            text = " ".join(p for p in [chosen[0], *chosen[2:], chosen[1]] if p)
            if len(text.split()) <= MAX_WORDS:
                return text
        return _clip(text)


class HFReasoner:
    """A local causal language model (a transformers checkpoint directory) as the reasoner.

    The prompt is the template reasoner's facts about the step plus ``Reasoning:``; the model's
    continuation (greedy, at most ``max_new_tokens`` tokens, clipped to ``MAX_WORDS`` words) is the
    reasoning. No download: ``path`` must hold the model and its tokenizer."""

    def __init__(
        self,
        path: str | os.PathLike,
        card: Mapping[str, Any],
        max_new_tokens: int = 48,
        device: str = "cpu",
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rig.errors import UserError

        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"--reasoner {path}: not a causal LM checkpoint ({first})") from None
        self.model.to(device).eval()
        self.device = device
        self.max_new_tokens = int(max_new_tokens)
        self.facts = TemplateReasoner(card)

    def prompt(self, step: Mapping[str, Any]) -> str:
        return (
            f"Facts: {self.facts.reason(step)}\nAction: {step['action_text']}\n"
            f"Explain briefly why this action is right.\nReasoning:"
        )

    def reason(self, step: Mapping[str, Any]) -> str:
        import torch

        ids = self.tok(self.prompt(step), return_tensors="pt").to(self.device)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        with torch.no_grad():
            out = self.model.generate(
                **ids, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad
            )
        text = self.tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        return _clip(" ".join(text.split())) or f"I choose {step['action_text']}."


def make_reasoner(spec: str, card: Mapping[str, Any], seed: int = 0, **kwargs: Any) -> Reasoner:
    """``template`` (default), a transformers checkpoint directory, or ``module.path:Class``
    (built with ``card=``)."""
    from rig.errors import UserError

    if spec == "template":
        return TemplateReasoner(card, seed=seed)
    if Path(spec).is_dir():
        return HFReasoner(spec, card, **kwargs)
    if ":" in spec:
        import importlib

        module, _, name = spec.partition(":")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise UserError(f"--reasoner {spec}: {err}") from None
        return cls(card=card)
    raise UserError(f"--reasoner {spec!r}: give template, a model directory or module:Class")


def reason(src, dst, reasoner_spec: str = "template", seed: int = 0, shard_steps: int = 4096,
           progress=None, **reasoner_kwargs) -> dict[str, Any]:  # fmt: skip
    """S2: add ``reasoning`` (L,) str to every step."""
    card = open_dataset(src).card
    reasoner = make_reasoner(reasoner_spec, card, seed=seed, **reasoner_kwargs)

    def transform(ep: dict[str, Any], step_offset: int, frame_offset: int) -> dict[str, Any]:
        ep["reasoning"] = np.array([reasoner.reason(step) for step in _per_step(ep)])
        return ep

    options = {"reasoner": reasoner_spec, "seed": seed}
    return derive(src, dst, "reason", transform, options, shard_steps, progress)


# -- S3: review -----------------------------------------------------------------------------------


def review_segments(step: Mapping[str, Any]) -> list[tuple[str, bool]]:
    """The reasoning of a reviewed step as (text, in_loss) segments, in order: the wrong
    reasoning is context only (False), the marker and the corrected reasoning are trained
    (True). A step without a review has one trained segment, its ``reasoning``."""
    if not bool(step.get("review", False)):
        return [(str(step.get("reasoning", "")), True)]
    texts, loss = step["review_text"], step["review_loss"]
    return [(str(t), bool(m)) for t, m in zip(texts, loss, strict=True)]


def _progress_of(infos: list[dict[str, Any]], rewards: list[float]) -> tuple[float, int]:
    unlocked = 0
    if infos and "achievements" in infos[-1]:
        start, end = infos[0]["achievements"], infos[-1]["achievements"]
        unlocked = sum(1 for k in end if end[k] > 0 and start.get(k, 0) == 0)
    return float(sum(rewards)), unlocked


def _rollout(env, agent, obs, info, horizon: int) -> dict[str, Any]:
    """Play ``agent`` for up to ``horizon`` steps from the env's current state (a clone)."""
    infos, rewards, actions, goals = [info], [], [], []
    for _ in range(horizon):
        action = int(agent.act(obs, info))
        actions.append(action)
        goals.append(str(getattr(agent, "goal", "") or ""))
        obs, reward, terminated, truncated, info = env.step(action)
        infos.append(info)
        rewards.append(float(reward))
        if terminated or truncated:
            break
    ret, unlocked = _progress_of(infos, rewards)
    return {"actions": actions, "goals": goals, "return": ret, "unlocked": unlocked}


def review(
    src,
    dst,
    policy: str,
    expert: str = "scripted",
    horizon: int = 8,
    every: int = 10,
    margin: float = 0.0,
    seed: int = 0,
    shard_steps: int = 4096,
    progress=None,
    reasoner: Reasoner | None = None,
    policy_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """S3: at every ``every``-th step, clone the world, play ``policy`` and ``expert`` for
    ``horizon`` steps each, and keep the state when the policy does worse: a lower return (by
    more than ``margin``), or a different first action with fewer new achievements. Kept states
    get ``review`` True and the correction text; all steps stay in the output.

    The world is re-simulated from the episode's seed and stored actions (rig/Crafter-v0 is
    deterministic per seed; every replayed frame is checked against the stored one) and cloned
    with ``copy.deepcopy`` at each reviewed state. When the dataset was collected by the expert
    itself, the expert is replayed alongside, so its plans and clock match the state.

    New per-step fields: ``review`` bool; ``review_text`` (L, 2) str = [wrong part, marker +
    right part]; ``review_loss`` (L, 2) bool = [False, True] (the wrong part is context only);
    ``review_action`` str (the policy's action), ``review_right_action`` str (the expert's);
    ``review_policy_return``, ``review_expert_return`` float32."""
    import envs
    from supervised.collect import agent_factory, world_seed

    reader = open_dataset(src)
    card = reader.card
    env = envs.make(card["env_id"], size=card["size"], **(card.get("env_kwargs") or {}))
    codec = envs.get_codec(env)
    make_policy = agent_factory(policy, card["env_id"], codec, **(policy_kwargs or {}))
    make_expert = agent_factory(expert, card["env_id"], codec)
    replay_expert = card.get("agent") == expert
    reasoner = reasoner or TemplateReasoner(card, seed=seed)

    def transform(ep: dict[str, Any], step_offset: int, frame_offset: int) -> dict[str, Any]:
        length = len(ep["frames"]) - 1
        fields = {
            "review": np.zeros(length, bool),
            "review_text": np.full((length, 2), "", dtype=object),
            "review_loss": np.tile(np.array([False, True]), (length, 1)),
            "review_action": np.full(length, "", dtype=object),
            "review_right_action": np.full(length, "", dtype=object),
            "review_policy_return": np.zeros(length, np.float32),
            "review_expert_return": np.zeros(length, np.float32),
        }
        records = list(_per_step(ep))
        obs, info = env.reset(seed=int(ep["world_seed"]))
        expert_agent = make_expert(world_seed(int(card.get("seed") or 0) + 1, ep["episode_id"]))
        expert_agent.reset()
        for t in range(length):
            if not np.array_equal(obs, ep["frames"][t]):
                raise DatasetError(
                    f"episode {ep['episode_id']} step {t}: re-simulating from the world seed "
                    f"does not reproduce the stored frame; the env is not deterministic"
                )
            if t % every == 0:
                if not replay_expert:  # a fresh expert from this state
                    expert_agent = make_expert(world_seed(seed, ep["episode_id"] * 100003 + t))
                    expert_agent.reset()
                mine = make_policy(world_seed(seed + 7, ep["episode_id"] * 100003 + t))
                mine.reset()
                p = _rollout(copy.deepcopy(env), mine, obs, info, horizon)
                e = _rollout(copy.deepcopy(env), copy.deepcopy(expert_agent), obs, info, horizon)
                worse = p["return"] < e["return"] - margin or (
                    p["actions"][0] != e["actions"][0] and p["unlocked"] < e["unlocked"]
                )
                fields["review_policy_return"][t] = p["return"]
                fields["review_expert_return"][t] = e["return"]
                if worse:
                    rec = records[t]
                    wrong_act = codec.vocab[p["actions"][0]]
                    right_act = codec.vocab[e["actions"][0]]
                    wrong = reasoner.reason(
                        {**rec, "action_text": wrong_act, "goal": p["goals"][0]}
                    )
                    if right_act == str(rec["action_text"]) and "reasoning" in rec:
                        right = str(rec["reasoning"])
                    else:
                        right = reasoner.reason({**rec, "action_text": right_act,
                                                 "goal": e["goals"][0]})  # fmt: skip
                    fields["review"][t] = True
                    fields["review_text"][t] = [wrong, f"{WAIT} {right}"]
                    fields["review_action"][t] = wrong_act
                    fields["review_right_action"][t] = right_act
            if replay_expert:
                expert_agent.act(obs, info)  # keeps the expert's plans and clock in step
            obs, _, _, _, info = env.step(int(ep["action"][t]))
        for key in ("review_text", "review_action", "review_right_action"):
            fields[key] = fields[key].astype(str)
        ep.update(fields)
        return ep

    options = {"policy": policy, "expert": expert, "horizon": horizon, "every": every,
               "margin": margin, "seed": seed}  # fmt: skip
    try:
        return derive(src, dst, "review", transform, options, shard_steps, progress)
    finally:
        env.close()


# -- S4: imagination ------------------------------------------------------------------------------


def imagine(src, dst, lookahead: int = 3, shard_steps: int = 4096, progress=None) -> dict:
    """S4: the real next frame as each step's imagination target, and lookahead chains.

    For step t of an episode of L steps (global step s0 + t, global frame f0 + t)::

        frames    o_t    o_t+1    o_t+2   ...   o_t+n
        steps     a_t    a_t+1    ...   a_t+n-1
        chain i   0      1        ...   n-1       chain_steps[t, i]  = s0 + t + i
                                                  chain_frames[t, i] = f0 + t + i + 1

    i.e. the lookahead proposes a_t, imagines o_t+1, reasons and proposes a_t+1 there, ... as
    ``RigPolicy.act(lookahead=n)`` does. Entries past the episode's end are -1; ``chain_len`` is
    min(n, L - t). ``next_frame_index`` = f0 + t + 1 (= ``chain_frames[:, 0]``). All indices are
    global indices into the OUTPUT dataset (``DatasetReader.frames_at`` / ``steps()``' ``index``).
    """
    if lookahead < 1:
        raise ValueError(f"lookahead must be >= 1, got {lookahead}")

    def transform(ep: dict[str, Any], step_offset: int, frame_offset: int) -> dict[str, Any]:
        length = len(ep["frames"]) - 1
        t = np.arange(length)[:, None]
        i = np.arange(lookahead)[None, :]
        valid = t + i < length
        ep["chain_steps"] = np.where(valid, step_offset + t + i, -1).astype(np.int64)
        ep["chain_frames"] = np.where(valid, frame_offset + t + i + 1, -1).astype(np.int64)
        ep["chain_len"] = valid.sum(1).astype(np.int16)
        ep["next_frame_index"] = (frame_offset + np.arange(length) + 1).astype(np.int64)
        return ep

    return derive(src, dst, "imagine", transform, {"lookahead": lookahead}, shard_steps, progress)
