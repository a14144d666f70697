"""The RIG policy: one Janus transformer that reads the frame, writes reasoning, then an action.

One env step is one sequence (lookahead 0; imagination and review come later)::

    prompt (P tokens, identical for every row of a batch)                      generated (L columns)
    <bos> <task> task-text <end> <observation> <image> x G <end> <reasoning> | r1 .. rk <end> <action> a1 .. am <end>
                                                                    p = P-1  | 0 ..              c           .. L-1

The segment layout is ``rl.tokenizer``'s (each segment closed by ``<end>``). ``<image>`` x G are
placeholders where the model puts the SigLIP features of the observed frame (G =
``image_tokens_per_frame``). Frames are normalised as ``x / 127.5 - 1`` (mean = std = 0.5, what
the released Janus checkpoints' ``preprocessor_config.json`` uses; transformers'
``JanusImageProcessor`` class default is CLIP's mean/std, which we do not use).

Off by one: the logits at position i predict the token at i + 1::

    position:    P-1          P     ..  P+k-1   P+k     P+k+1    ..  P+k+m+1
    token:       <reasoning>  r1    ..  rk      <end>   <action> a1 .. <end>
    its logits predict:       r1    r2 ..       <end>   <action>  a1     a2 .. <end>  (sampled)
                                                        (forced)
    value head:                                         hidden state at <action> (it has read
                                                        the frame and the reasoning, not the action)

So generated column j is predicted by the hidden state at absolute position P + j - 1: the
learner takes ``hidden[:, P-1 : P+L-1]``.

Which tokens are sampled (and scored): reasoning tokens and the ``<end>`` that closes them (from
the tempered softmax with the segment markers other than ``<end>`` banned, since an ``<image>``
or ``<pad>`` in the text would corrupt the sequence), and the action tokens with their ``<end>``
(from the trie-masked tempered softmax, ``rl.constrained``). Forced tokens (``<action>``, and the
``<end>`` that closes reasoning cut by the cap) have log-prob 0 and no mask bit.

Batching: rows decode in lockstep with one KV cache. A row that has finished its reasoning
feeds ``<pad>`` columns with attention 0 until every row has, so ``<action>`` sits in the same
column for all rows; ``position_ids = cumsum(attention) - 1`` makes each row's positions those of
its own unpadded sequence. ``evaluate`` rebuilds exactly this layout (same columns, same mask,
same positions) in one forward, so its log-probs equal ``act``'s to float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from rl.constrained import ActionTrie, build_action_trie
from rl.tokenizer import SegmentIds, segment_ids

if TYPE_CHECKING:
    from transformers import JanusForConditionalGeneration, PreTrainedTokenizerBase

    from envs.codecs import ActionCodec


@dataclass
class ActOutput:
    """One batched ``act`` call: everything ``evaluate`` needs to recompute it, and the losses'
    inputs. B rows, P prompt tokens, L generated columns (padding: ``<pad>``, attention 0)."""

    actions: Tensor  # (B,) int64 codec index of each row's action
    action_texts: list[str]  # B action strings, codec.vocab[actions[i]]
    prompt_ids: Tensor  # (B, P) int64 the prompt, same for every row
    frames: Tensor  # (B, H, W, 3) uint8 the observed frames
    tokens: Tensor  # (B, L) int64 generated ids: reasoning, <end>, <action>, action ids, <end>
    attention_mask: Tensor  # (B, L) bool, False at padding columns
    log_probs: Tensor  # (B, L) float32 log-prob of each sampled token, 0 elsewhere
    reasoning_mask: Tensor  # (B, L) bool sampled reasoning tokens (closing <end> included)
    action_mask: Tensor  # (B, L) bool sampled action tokens (closing <end> included)
    values: Tensor  # (B,) float32 value at the <action> marker
    prompt_length: int  # P
    temperature: float  # the sampler's temperature; evaluate uses the same

    @property
    def token_mask(self) -> Tensor:
        """(B, L) bool every sampled token: what the policy loss sums over."""
        return self.reasoning_mask | self.action_mask

    @staticmethod
    def collate(outputs: list[ActOutput], pad_id: int) -> ActOutput:
        """Concatenate act outputs along B, right-padding the generated columns to the longest L.
        All must share the prompt length and temperature."""
        if (
            len({o.prompt_length for o in outputs}) != 1
            or len({o.temperature for o in outputs}) != 1
        ):
            raise ValueError("collate needs outputs with one prompt length and one temperature")
        length = max(o.tokens.shape[1] for o in outputs)

        def pad(x: Tensor, value: Any) -> Tensor:
            return nn.functional.pad(x, (0, length - x.shape[1]), value=value)

        cat: dict[str, Any] = {}
        for f in fields(ActOutput):
            items = [getattr(o, f.name) for o in outputs]
            if f.name == "action_texts":
                cat[f.name] = [t for item in items for t in item]
            elif f.name in ("prompt_length", "temperature"):
                cat[f.name] = items[0]
            elif f.name == "tokens":
                cat[f.name] = torch.cat([pad(x, pad_id) for x in items])
            elif f.name in ("attention_mask", "log_probs", "reasoning_mask", "action_mask"):
                cat[f.name] = torch.cat([pad(x, 0) for x in items])
            else:
                cat[f.name] = torch.cat(items)
        return ActOutput(**cat)


class RigPolicy(nn.Module):
    """Janus model + tokenizer + action trie + value head (an MLP on the ``<action>`` hidden state).

    Args:
        model: a ``JanusForConditionalGeneration`` (``rl.model.build_model`` or a checkpoint).
        tok: its tokenizer, with the segment markers.
        codec: the env's action codec; the trie allows exactly ``codec.vocab``.
    """

    def __init__(
        self,
        model: JanusForConditionalGeneration,
        tok: PreTrainedTokenizerBase,
        codec: ActionCodec,
    ):
        super().__init__()
        from rl.model import image_tokens_per_frame

        self.model = model
        self.tok = tok
        self.codec = codec
        self.ids: SegmentIds = segment_ids(tok)
        self.trie: ActionTrie = build_action_trie(tok, codec.vocab)
        self.image_tokens = image_tokens_per_frame(model)
        self.image_size = int(model.config.vision_config.image_size)
        hidden = int(model.config.text_config.hidden_size)
        self.vocab_size = int(model.config.text_config.vocab_size)
        param = next(model.parameters())
        self.value_head = nn.Sequential(
            nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1)
        ).to(param.device)
        # Reasoning may not write markers other than <end>, nor ids past the tokenizer.
        banned = torch.zeros(self.vocab_size, dtype=torch.bool)
        banned[len(tok) :] = True
        for name in ("pad", "bos", "eos", "task", "observation", "image", "reasoning",
                     "action", "imagine", "review"):  # fmt: skip
            banned[getattr(self.ids, name)] = True
        self.register_buffer("reasoning_banned", banned.to(param.device), persistent=False)

    # -- constructors ------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str, codec: ActionCodec, seed: int = 0) -> RigPolicy:
        """A randomly initialised policy of preset ``name`` with the built-in tokenizer."""
        from rl.model import build_model, load_preset
        from rl.tokenizer import build_tokenizer

        tok = build_tokenizer()
        torch.manual_seed(seed)
        return cls(build_model(load_preset(name), tok), tok, codec)

    @classmethod
    def from_model(
        cls, model: JanusForConditionalGeneration, tok: PreTrainedTokenizerBase, codec: ActionCodec
    ) -> RigPolicy:
        return cls(model, tok, codec)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- building blocks ---------------------------------------------------------------------

    def prompt_ids(self, task: str, batch: int) -> Tensor:
        """(batch, P) int64 the prompt up to and including ``<reasoning>``. The task is user
        text: a marker's spelling in it stays ordinary text."""
        ids = self.ids
        text = self.tok(task, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        row = [ids.bos, ids.task, *text, ids.end, ids.observation]
        row += [ids.image] * self.image_tokens + [ids.end, ids.reasoning]
        return torch.tensor([row] * batch, dtype=torch.int64, device=self.device)

    def pixel_values(self, frames: np.ndarray | Tensor) -> Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, H, W) in [-1, 1] (mean = std = 0.5), the model's dtype."""
        x = torch.as_tensor(np.asarray(frames) if not isinstance(frames, Tensor) else frames)
        if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
            raise ValueError(f"frames must be (B, H, W, 3) uint8, got {tuple(x.shape)} {x.dtype}")
        if x.shape[1] != self.image_size or x.shape[2] != self.image_size:
            raise ValueError(
                f"frames are {x.shape[1]}x{x.shape[2]} but the policy sees "
                f"{self.image_size}x{self.image_size}; render or resize the env to that size"
            )
        dtype = next(self.model.parameters()).dtype
        x = x.to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W)
        return x.to(dtype)

    def hidden(
        self,
        input_ids: Tensor | None,
        attention_mask: Tensor,
        position_ids: Tensor,
        pixel_values: Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        inputs_embeds: Tensor | None = None,
    ) -> tuple[Tensor, Any]:
        """Last hidden states (B, T, D) of the LM over ``input_ids`` (B, T), or over ready
        ``inputs_embeds`` (B, T, D) (imagined VQ codes enter that way), and the cache.
        ``attention_mask`` covers the cached positions too: (B, past + T)."""
        out = self.model.model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            pixel_values=pixel_values,
            attention_mask=attention_mask.long(),
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        return out.last_hidden_state, out.past_key_values

    def logits(self, hidden: Tensor) -> Tensor:
        """(..., D) hidden -> (..., V) float32 logits (float32 on both sides: act == evaluate)."""
        return self.model.lm_head(hidden).float()

    def value(self, hidden: Tensor) -> Tensor:
        """(..., D) hidden at the ``<action>`` marker -> (...) float32 value."""
        head_dtype = self.value_head[0].weight.dtype
        return self.value_head(hidden.to(head_dtype)).squeeze(-1).float()

    def reasoning_log_softmax(self, logits: Tensor, temperature: float) -> Tensor:
        """(..., V) logits -> (..., V) log-probs of the tempered softmax, markers banned."""
        scaled = logits.float() / temperature
        return torch.log_softmax(scaled.masked_fill(self.reasoning_banned, float("-inf")), -1)

    # -- acting ------------------------------------------------------------------------------

    @torch.no_grad()
    def act(
        self,
        frames: np.ndarray | Tensor,
        task: str,
        max_reasoning_tokens: int = 32,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> ActOutput:
        """Sample reasoning then an action for each frame, with one prefill and a KV cache."""
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        ids = self.ids
        pixels = self.pixel_values(frames)  # (B, 3, H, W)
        batch = pixels.shape[0]
        dev = self.device
        prompt = self.prompt_ids(task, batch)  # (B, P)
        attn = torch.ones_like(prompt, dtype=torch.bool)  # (B, P + t) grows by one per column
        pos = torch.arange(prompt.shape[1], device=dev).expand(batch, -1)  # (B, P)
        hidden, cache = self.hidden(prompt, attn, pos, pixels, use_cache=True)
        logits = self.logits(hidden[:, -1])  # (B, V) predicts generated column 0

        cols: dict[str, list[Tensor]] = {k: [] for k in ("tok", "attn", "logp", "reason", "act")}
        zero = torch.zeros(batch, device=dev)
        no = torch.zeros(batch, dtype=torch.bool, device=dev)

        def push(tok: Tensor, live: Tensor, logp: Tensor, reason: Tensor, action: Tensor) -> None:
            for key, val in zip(cols, (tok, live, logp, reason, action), strict=True):
                cols[key].append(val)

        def feed(tok: Tensor, live: Tensor) -> Tensor:
            """Append a column (B,) to the cache; the hidden state (B, D) at it."""
            nonlocal attn, cache
            attn = torch.cat([attn, live.unsqueeze(1)], 1)
            pos = attn.long().sum(1, keepdim=True).sub(1).clamp_min(0)  # (B, 1) = cumsum - 1
            h, cache = self.hidden(tok.unsqueeze(1), attn, pos, past_key_values=cache,
                                   use_cache=True)  # fmt: skip
            return h[:, -1]

        def sample(logp: Tensor) -> Tensor:
            return torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)

        # Reasoning: free sampling until <end> or the cap; finished rows feed masked <pad>.
        writing = torch.ones(batch, dtype=torch.bool, device=dev)
        for _ in range(max_reasoning_tokens):
            logp = self.reasoning_log_softmax(logits, temperature)  # (B, V)
            tok = torch.where(writing, sample(logp), ids.pad)
            taken = logp.gather(1, tok.unsqueeze(1)).squeeze(1)
            push(tok, writing, torch.where(writing, taken, zero), writing, no)
            logits = self.logits(feed(tok, writing))
            writing = writing & (tok != ids.end)
            if not bool(writing.any()):
                break
        if bool(writing.any()):  # rows cut by the cap: close their reasoning (forced)
            push(torch.where(writing, ids.end, ids.pad), writing, zero, no, no)
            feed(cols["tok"][-1], writing)

        # <action> (forced); the value reads the hidden state there.
        every = torch.ones(batch, dtype=torch.bool, device=dev)
        push(torch.full((batch,), ids.action, device=dev), every, zero, no, no)
        h_action = feed(cols["tok"][-1], every)
        values = self.value(h_action)
        logits = self.logits(h_action)

        # Action: constrained by the trie until every row sits at a leaf.
        nodes = self.trie.root(batch, dev)
        for _ in range(self.trie.max_len):
            live = ~self.trie.is_done(nodes)
            logp = self.trie.log_softmax(logits, nodes, temperature)  # (B, V)
            tok = torch.where(live, sample(logp), ids.pad)
            taken = logp.gather(1, tok.unsqueeze(1)).squeeze(1)
            push(tok, live, torch.where(live, taken, zero), no, live)
            nodes = nodes.clone()
            nodes[live] = self.trie.advance(nodes[live], tok[live])
            if bool(self.trie.is_done(nodes).all()):
                break
            logits = self.logits(feed(tok, live))

        actions = self.trie.action_index(nodes)
        return ActOutput(
            actions=actions,
            action_texts=[self.codec.vocab[int(a)] for a in actions],
            prompt_ids=prompt,
            frames=torch.as_tensor(
                np.asarray(frames) if not isinstance(frames, Tensor) else frames
            ).to(dev),  # fmt: skip
            tokens=torch.stack(cols["tok"], 1),
            attention_mask=torch.stack(cols["attn"], 1),
            log_probs=torch.stack(cols["logp"], 1).float(),
            reasoning_mask=torch.stack(cols["reason"], 1),
            action_mask=torch.stack(cols["act"], 1),
            values=values,
            prompt_length=prompt.shape[1],
            temperature=float(temperature),
        )

    # -- learning ----------------------------------------------------------------------------

    def evaluate(self, batch: ActOutput) -> dict[str, Tensor]:
        """Teacher-forced recomputation of ``act`` in one forward (no cache), with gradients.

        Returns ``log_probs`` (B, L) float32 (0 off the sampled tokens), ``entropies`` (B, L)
        float32 of the distribution each sampled token was drawn from (0 elsewhere) and
        ``values`` (B,) float32.
        """
        P, T = batch.prompt_length, batch.temperature
        tokens = batch.tokens.to(self.device)  # (B, L)
        reason = batch.reasoning_mask.to(self.device)
        action = batch.action_mask.to(self.device)
        ids = torch.cat([batch.prompt_ids.to(self.device), tokens], 1)  # (B, P + L)
        attn = torch.cat([torch.ones_like(batch.prompt_ids, dtype=torch.bool).to(self.device),
                          batch.attention_mask.to(self.device)], 1)  # fmt: skip
        pos = attn.long().cumsum(1).sub(1).clamp_min(0)  # (B, P + L) as act's positions
        hidden, _ = self.hidden(ids, attn, pos, self.pixel_values(batch.frames))
        hidden = hidden[:, P - 1 : -1]  # (B, L, D) column j is predicted at P + j - 1

        # Value: the hidden state at <action> predicts column c + 1, i.e. it is hidden[:, c + 1].
        col = (tokens == self.ids.action).long().argmax(1)  # (B,) column of <action>
        values = self.value(hidden[torch.arange(len(col)), col + 1])

        log_probs = torch.zeros(tokens.shape, device=self.device)
        entropies = torch.zeros(tokens.shape, device=self.device)
        for mask, logp in (
            (reason, self.reasoning_log_softmax(self.logits(hidden[reason]), T)),  # (N, V)
            (action, self._action_log_softmax(hidden, tokens, action, T)),
        ):
            taken = logp.gather(1, tokens[mask].unsqueeze(1)).squeeze(1)  # (N,)
            p = logp.exp()
            ent = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)  # (N,)
            log_probs = log_probs.masked_scatter(mask, taken)
            entropies = entropies.masked_scatter(mask, ent)
        return {"log_probs": log_probs, "entropies": entropies, "values": values}

    def _action_log_softmax(
        self, hidden: Tensor, tokens: Tensor, action: Tensor, temperature: float
    ) -> Tensor:
        """(N, V) trie-masked log-probs at the N action positions, in row-major order."""
        nodes = self.trie.path_nodes(tokens, action)  # (B, L) node before each token
        return self.trie.log_softmax(self.logits(hidden[action]), nodes[action], temperature)


__all__ = ["ActOutput", "RigPolicy"]
