"""``RigRLModule``: RLlib's RLModule (new API stack) around ``rl.policy.RigPolicy``.

RLlib's ``SingleAgentEnvRunner`` calls ``forward_exploration`` once per vector step with the
observations of all its sub-envs batched, so one ``policy.act`` call serves the whole vector::

    batch[OBS]  (B, H, W, 3) uint8  --policy.act(frames, **act_kwargs)-->  ActOutput (B rows)
      -> ACTIONS (B,) int64, ACTION_LOGP (B,) float32 (sum over the action tokens),
         VF_PREDS (B,) float32, and every other ActOutput field as ``act_<name>`` per row

The env runner stores each returned key, row i, in episode i's ``extra_model_outputs`` for that
step (next to ``weights_seq_no``, the runner's weights version), so the learner can rebuild the
exact ``ActOutput`` that ``act`` produced (``actors.rollout.batch_from_episodes``, with
``RigRLModule.stored_fields``).

Generated columns (``tokens`` and the (B, L) fields beside it) vary in width L between calls, so
they are right-padded to ``max_reasoning_tokens + 2 + trie.max_len``, or wider once a call with
lookahead has written more (pad id for ``tokens``, 0/False elsewhere: padding columns are
unattended and unscored, as ``ActOutput.collate`` pads). Fields the episode stores anyway are
not repeated: ``frames`` is the observation, ``actions`` the action. Non-tensor fields are
stored per row too: a list of B items item by item, a scalar (``prompt_length``,
``temperature``) on every row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.rl_module.torch.torch_rl_module import TorchRLModule

from rl.policy import ActOutput, History, RigPolicy

#: Prefix of the extra model outputs that carry ``ActOutput`` fields.
ACT_PREFIX = "act_"
#: Batch columns of each sub-env's last k steps (``actors.rollout.AddHistoryToBatch``).
HISTORY_FRAMES, HISTORY_ACTIONS, HISTORY_MASK = (
    "rig_history_frames",
    "rig_history_actions",
    "rig_history_mask",
)
#: ActOutput fields the episode already holds (as its observations and actions).
FROM_EPISODE = frozenset({"frames", "actions"})


def generated_width(policy: RigPolicy, act_kwargs: dict[str, Any]) -> int:
    """The widest L one ``act`` call can produce: reasoning, ``<end>``, ``<action>``, action."""
    return int(act_kwargs["max_reasoning_tokens"]) + 2 + policy.trie.max_len


def pad_generated(out: ActOutput, width: int, pad_id: int) -> ActOutput:
    """``out`` with its generated columns right-padded from L to ``width`` (>= L).

    Generated-column fields are the 2-d tensors shaped (B, L) like ``tokens``, except
    ``prompt*`` fields (a (B, P) prompt field could have P == L by chance)."""
    B, L = out.tokens.shape
    changes = {}
    for f in dataclasses.fields(out):
        x = getattr(out, f.name)
        if (
            isinstance(x, torch.Tensor)
            and x.ndim == 2
            and tuple(x.shape) == (B, L)
            and not f.name.startswith("prompt")
        ):
            value = pad_id if f.name == "tokens" else 0
            changes[f.name] = torch.nn.functional.pad(x, (0, width - L), value=value)
    return dataclasses.replace(out, **changes)


class RigRLModule(TorchRLModule):
    """Inference-only RLModule: acting through ``RigPolicy.act``; no ``_forward_train``
    (the learner uses ``policy.evaluate`` outside RLlib).

    ``model_config`` keys:
        policy_factory: ``Callable[[ActionCodec], RigPolicy]`` (``actors.policies``), so a preset,
            a checkpoint or a test's policy can be swapped in; it must pickle (module-level).
        codec: the env's action codec.
        act_kwargs: keyword arguments of ``policy.act`` (``max_reasoning_tokens`` required),
            passed through untouched.
        history: k past steps of each sub-env in the prompt (0: none); the batch then holds
            ``HISTORY_*`` columns (``actors.rollout.AddHistoryToBatch``), stored per step as
            ``act_history_frames`` / ``act_history_mask`` like every other ActOutput field.
        num_threads: torch threads for this runner process (None: torch's default, all cores,
            which oversubscribes a machine shared by several runners).
        device: where the policy acts (``cpu``; ``cuda`` on a runner that reserved a GPU).
        inference: Ray handles of ``actors.inference.InferenceActor``s (absent or empty: this
            module acts itself). Then the module holds no policy: ``act`` runs on the actor
            ``client_of`` its runner's index picks (``use_inference``), and every step also
            stores ``ACTED_VERSION``, the weights version that computed it.

    State (``get_state``/``set_state``): the policy's ``state_dict`` (CPU tensors); the weights
    version lives beside it in the env runner (``weights_seq_no``), which tags every step.
    With inference actors the state is empty: the weights live in the actors.
    """

    def setup(self) -> None:
        cfg = self.model_config
        # The env runner seeded torch with config.seed + its worker index; a preset factory
        # re-seeds torch to initialise weights, so the sampler gets its own generator first.
        seed = torch.initial_seed()
        if cfg.get("num_threads"):
            torch.set_num_threads(int(cfg["num_threads"]))
        self.act_kwargs = dict(cfg["act_kwargs"])
        self.handles: list = list(cfg.get("inference") or [])
        self.inference = None  # the handle this runner sends to (use_inference)
        self.policy: RigPolicy | None = None
        # What _act stored per field: a torch dtype (RLlib's TensorToNumpy narrows int64 to
        # int32, so the reader casts back), ``list`` (an item per row) or a scalar's type.
        self.stored_fields: dict[str, Any] = {}
        if self.handles:
            import ray

            meta = ray.get(self.handles[0].meta.remote())
            self.pad_id = meta["pad_id"]
            self.width = int(self.act_kwargs["max_reasoning_tokens"]) + 2 + meta["max_action_len"]
            return
        factory: Callable = cfg["policy_factory"]
        self.policy = factory(cfg["codec"]).eval().to(cfg.get("device") or "cpu")
        self.pad_id = self.policy.ids.pad
        self.width = generated_width(self.policy, self.act_kwargs)
        self.generator = torch.Generator(self.policy.device).manual_seed(seed)

    def use_inference(self, runner_index: int) -> None:
        """Send to the inference actor of env runner ``runner_index`` (a no-op without them)."""
        if self.handles:
            from actors.inference import client_of

            self.inference = self.handles[client_of(runner_index, len(self.handles))]

    def _forward_exploration(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return self._act(batch)

    def _forward_inference(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        """RLlib's ``explore=False``: the same sampled call; greedy decoding is a matter of
        ``act_kwargs`` (temperature), not of a second code path."""
        return self._act(batch)

    def _forward(self, batch: dict[str, Any], **kwargs) -> dict[str, Any]:
        return self._act(batch)

    def _history(self, batch: dict[str, Any]) -> History | None:
        k = int(self.model_config.get("history") or 0)
        if not k:
            return None
        if HISTORY_MASK not in batch:
            raise KeyError(f"history={k} needs the AddHistoryToBatch connector's columns")
        return History(
            frames=torch.as_tensor(batch[HISTORY_FRAMES]),
            actions=torch.as_tensor(batch[HISTORY_ACTIONS]).long(),
            mask=torch.as_tensor(batch[HISTORY_MASK]).bool(),
        )

    @torch.no_grad()
    def _act(self, batch: dict[str, Any]) -> dict[str, Any]:
        frames = batch[Columns.OBS]
        if frames.dtype != torch.uint8:
            raise TypeError(f"RigRLModule needs uint8 frames, the connectors gave {frames.dtype}")
        version = None
        if self.handles:
            import ray

            if self.inference is None:
                raise RuntimeError("RigRLModule with inference actors: call use_inference first")
            out, version = ray.get(self.inference.act.remote(frames.numpy(), self._history(batch)))
        else:
            out = self.policy.act(
                frames, generator=self.generator, history=self._history(batch), **self.act_kwargs
            )
        # Lookahead writes more columns than the formula counts: grow the width then (older
        # steps stay narrower; ActOutput.collate pads them when a batch is assembled).
        self.width = max(self.width, out.tokens.shape[1])
        out = pad_generated(out, self.width, self.pad_id)
        B = len(out.actions)
        result: dict[str, Any] = {
            Columns.ACTIONS: out.actions,
            Columns.ACTION_LOGP: (out.log_probs * out.action_mask).sum(1),  # (B,)
            Columns.VF_PREDS: out.values.float(),
        }
        if version is not None:
            from actors.inference import ACTED_VERSION

            result[ACTED_VERSION] = np.full(B, version, np.int64)
        for f in dataclasses.fields(out):
            x = getattr(out, f.name)
            if f.name in FROM_EPISODE or x is None:
                continue
            if isinstance(x, torch.Tensor):
                result[ACT_PREFIX + f.name] = x
                self.stored_fields[f.name] = x.dtype
            elif isinstance(x, list):  # one item per row (action_texts)
                result[ACT_PREFIX + f.name] = np.array(x)
                self.stored_fields[f.name] = list
            else:  # one value for the call (prompt_length, temperature): on every row, as
                # Python objects, which TensorToNumpy leaves alone (0.7 stays 0.7, not float32)
                result[ACT_PREFIX + f.name] = np.array([x] * B, dtype=object)
                self.stored_fields[f.name] = type(x)
        return result

    def get_state(self, components=None, *, not_components=None, **kwargs) -> dict[str, Any]:
        if self.policy is None:
            return {}
        return {k: v.detach().cpu() for k, v in self.policy.state_dict().items()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Load a state dict, packed by ``actors.weights.pack_state`` or not."""
        from actors.weights import unpack_state

        if self.policy is None:
            if state:
                raise RuntimeError("weights go to the inference actors, not to this runner")
            return
        self.policy.load_state_dict(unpack_state(state))
