"""Supervised fine-tuning (SFT) of a RIG policy: next-token cross-entropy over reasoning, action
and image (VQ) tokens, in exactly the sequence layout ``RigPolicy.act`` writes (docs/sft.md).

A training example is one dataset step t, teacher-forced as one act sequence. Lookahead 0 (the
basic stage, RIG's S0-S2)::

    prompt (P, left-padded)                                        | generated (L)                     | target frame
    <bos> <task> text <end> [<observation> <image>xG <end> <action> a <end>] x k
          <observation> <image>xG <end> <reasoning>               | r1 .. rk <end> <action> a .. <end> | <Imagine:> c0 .. c_{G-1}
    loss:                                                           | R  .. R  R     -        A .. A     | -         I  .. I

and with a lookahead chain of n real future steps (the lookahead stage, + S3 and S4)::

    ... <observation> <image>xG <end> <reasoning>
        r(t) <end> <action> a(t) <end> <Imagine:> codes(o_t+1) <end> <reasoning>       proposal 0
        r(t+1) <end> <action> a(t+1) <end> <Imagine:> codes(o_t+2) <end> <review> <reasoning>
                                                                   | final decision   | <Imagine:> codes(o_t+1)

R, A, I mark the supervised tokens (reasoning with its closing ``<end>``, action with its
``<end>``, image codes); markers the policy does not sample (``<action>``, ``<Imagine:>``, the
``<end>`` after codes, ``<review>``, ``<reasoning>``) are context, as is padding. The final
decision of an S3-reviewed step is its review text, [wrong reasoning] (context only) +
"Wait! Let's re-observe... right reasoning" (trained), then the expert's action; the real frame
after that action is unknown unless it is the recorded one, so its codes are then context only.

The forward is ``RigPolicy.forward_sequence`` (the learner's one forward, the one RL uses); the
heads on top are the ones ``act`` samples from: the tempered softmax with markers banned for
reasoning, the trie-masked softmax for actions, the generation head for codes, all at
temperature 1. So after SFT, ``act`` at temperature 1 samples from the trained distribution,
and for the generated columns the log-probs here equal ``RigPolicy.evaluate``'s (tested).
"""

from __future__ import annotations

import json
import math
import shutil
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rig.errors import UserError

if TYPE_CHECKING:
    from torch import Tensor

    from rl.policy import ActOutput, RigPolicy

STAGES = ("basic", "lookahead")
NONE, REASONING, ACTION, IMAGE = 0, 1, 2, 3
"""Kinds of a column's token: what predicts it, and whether it is in the loss (NONE: not)."""
SEGMENTS = {REASONING: "reasoning", ACTION: "action", IMAGE: "image"}
FINAL = "final"
CHECKPOINTS = "checkpoints"
REPORT = "sft.json"


# -- one example ----------------------------------------------------------------------------------


@dataclass
class Decision:
    """One (reasoning, action[, imagined frame]) unit of the sequence, teacher-forced."""

    reasoning: list[tuple[list[int], bool]]  # text ids per segment, and whether it is trained
    action: int  # codec index
    codes: Tensor | None = None  # (G,) int64 codes of the frame the action leads to
    codes_loss: bool = True  # train the codes (False: a frame we do not know, context only)
    train_action: bool = True


@dataclass
class Example:
    """One dataset step as act's sequence: frame, history, lookahead proposals, decision."""

    frame: Tensor  # (H, W, 3) uint8 the frame acted on
    history_frames: Tensor  # (k, H, W, 3) uint8, oldest first
    history_actions: list[int]  # k codec indices
    history_mask: list[bool]  # k, False for slots before the episode started
    proposals: list[Decision]  # lookahead chain (with codes), empty at lookahead 0
    decision: Decision  # the final decision; its codes are the next-frame target


@dataclass
class SftBatch:
    """Teacher-forced batch: ``act`` is what ``RigPolicy.act`` would have written, ``next_codes``
    the real next frame's codes, and per column of ``forward_sequence(act, next_codes)``
    (T = P + L + 1 + G) the token there, its kind and the trie node before it."""

    act: ActOutput
    next_codes: Tensor  # (B, G) int64
    ids: Tensor  # (B, T) int64 text ids, or VQ code ids at IMAGE / prompt-code columns
    kinds: Tensor  # (B, T) int64 NONE, REASONING, ACTION or IMAGE: what the loss counts
    nodes: Tensor  # (B, T) int64 trie node before each ACTION token (0 elsewhere)
    # Each run of G IMAGE columns (a proposal's imagined frame, then the next frame), row by
    # row in column order: its row (S,) and the action it follows (S,), what the frame head reads
    frame_rows: Tensor
    frame_actions: Tensor


def text_ids(policy: RigPolicy, text: str, cache: dict[str, list[int]] | None = None) -> list[int]:
    """Ids of free text (a marker's spelling stays ordinary text, as for the task)."""
    if cache is not None and text in cache:
        return cache[text]
    ids = policy.tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    if cache is not None:
        cache[text] = ids
    return ids


def _reasoning_columns(policy: RigPolicy, d: Decision, cap: int) -> tuple[list[int], list[int]]:
    """Reasoning ids and kinds of one decision as act writes them: at most ``cap`` sampled
    tokens; one that ends in time closes with a sampled (trained) ``<end>``, a longer one is cut
    at ``cap`` and closed by a forced (context) ``<end>``."""
    ids, kinds = [], []
    for seg, trained in d.reasoning:
        ids += seg
        kinds += [REASONING if trained else NONE] * len(seg)
    if len(ids) + 1 <= cap:
        return [*ids, policy.ids.end], [*kinds, REASONING]
    return [*ids[:cap], policy.ids.end], [*kinds[:cap], NONE]


_PATHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # trie -> {action: nodes}


def _action_columns(policy: RigPolicy, d: Decision) -> tuple[list[int], list[int], list[int]]:
    """The action's ids (END included), kinds and the trie node before each token."""
    import torch

    seq = list(policy.trie.sequence(d.action))
    paths = _PATHS.setdefault(policy.trie, {})
    if d.action not in paths:
        nodes = policy.trie.path_nodes(torch.tensor([seq]), torch.ones(1, len(seq), dtype=bool))
        paths[d.action] = nodes[0].tolist()
    kind = ACTION if d.train_action else NONE
    return seq, [kind] * len(seq), paths[d.action]


def build_batch(
    policy: RigPolicy, examples: Sequence[Example], task: str, max_reasoning_tokens: int
) -> SftBatch:
    """The teacher-forced batch of ``examples`` in act's layout (module docstring)."""
    import torch

    from rl.policy import ActOutput, History

    p, dev, B, G = policy.ids, policy.device, len(examples), policy.image_tokens
    k = max((len(e.history_mask) for e in examples), default=0)
    size = policy.image_size
    history = History.empty(B, k, size)
    for b, e in enumerate(examples):
        j = len(e.history_mask)
        if j:
            history.frames[b, k - j :] = e.history_frames
            history.actions[b, k - j :] = torch.tensor(e.history_actions)
            history.mask[b, k - j :] = torch.tensor(e.history_mask)
    base_ids, base_mask = policy.prompt(task, B, history)  # exactly act's prompt

    # -- prompts: act's prompt + the lookahead chain, left-padded ----------------------------
    rows: list[tuple[list[int], list[bool], list[int], list[int]]] = []  # ids, codes, kind, node
    frames: list[tuple[int, int]] = []  # (row, action) of each trained frame, in column order
    for b, e in enumerate(examples):
        ids = base_ids[b][base_mask[b]].tolist()
        codes, kinds, nodes = [False] * len(ids), [NONE] * len(ids), [0] * len(ids)
        for i, d in enumerate(e.proposals):
            r_ids, r_kinds = _reasoning_columns(policy, d, max_reasoning_tokens)
            a_ids, a_kinds, a_nodes = _action_columns(policy, d)
            c = d.codes.tolist()
            tail = [p.end, p.review, p.reasoning] if i == len(e.proposals) - 1 else [
                p.end, p.reasoning]  # fmt: skip
            ids += [*r_ids, p.action, *a_ids, p.imagine, *c, *tail]
            codes += [False] * (len(r_ids) + 2 + len(a_ids)) + [True] * G + [False] * len(tail)
            code_kind = IMAGE if d.codes_loss else NONE
            if d.codes_loss:
                frames.append((b, d.action))
            kinds += [*r_kinds, NONE, *a_kinds, NONE, *[code_kind] * G, *[NONE] * len(tail)]
            nodes += [0] * (len(r_ids) + 1) + a_nodes + [0] * (1 + G + len(tail))
        rows.append((ids, codes, kinds, nodes))
        if e.decision.codes_loss:  # the next frame closes the row
            frames.append((b, e.decision.action))
    P = max(len(r[0]) for r in rows)

    # -- the decision: act's lockstep columns (<action> in one column for every row) -----------
    decided = []
    for e in examples:
        r_ids, r_kinds = _reasoning_columns(policy, e.decision, max_reasoning_tokens)
        decided.append((r_ids, r_kinds, *_action_columns(policy, e.decision)))
    R = max(len(d[0]) for d in decided)
    A = max(len(d[2]) for d in decided)
    L = R + 1 + A

    def tensor(rows_: list[list[Any]], dtype) -> Tensor:
        return torch.tensor(rows_, dtype=dtype, device=dev)

    prompt_ids, prompt_mask, prompt_codes, tokens, attn = [], [], [], [], []
    reason_mask, action_mask, all_kinds, all_nodes, actions = [], [], [], [], []
    for (ids, codes, kinds, nodes), (r_ids, r_kinds, a_ids, a_kinds, a_nodes), e in zip(
        rows, decided, examples, strict=True
    ):
        pad = P - len(ids)
        prompt_ids.append([p.pad] * pad + ids)
        prompt_mask.append([False] * pad + [True] * len(ids))
        prompt_codes.append([False] * pad + codes)
        gap, tail = R - len(r_ids), A - len(a_ids)
        tokens.append([*r_ids, *[p.pad] * gap, p.action, *a_ids, *[p.pad] * tail])
        attn.append([True] * len(r_ids) + [False] * gap + [True] * (1 + len(a_ids))
                    + [False] * tail)  # fmt: skip
        gen_kinds = [*r_kinds, *[NONE] * (gap + 1), *a_kinds, *[NONE] * tail]
        reason_mask.append([k_ == REASONING for k_ in gen_kinds])
        action_mask.append([k_ == ACTION for k_ in gen_kinds])
        frame_kind = IMAGE if e.decision.codes_loss else NONE
        all_kinds.append([NONE] * pad + kinds + gen_kinds + [NONE] + [frame_kind] * G)
        all_nodes.append([0] * pad + nodes + [0] * (R + 1) + a_nodes + [0] * (tail + 1 + G))
        actions.append(e.decision.action)

    next_codes = torch.stack([e.decision.codes for e in examples]).to(dev).long()  # (B, G)
    zeros = torch.zeros(B, L, device=dev)
    act = ActOutput(
        actions=tensor(actions, torch.int64),
        action_texts=[policy.codec.vocab[a] for a in actions],
        prompt_ids=tensor(prompt_ids, torch.int64),
        prompt_mask=tensor(prompt_mask, torch.bool),
        prompt_codes=tensor(prompt_codes, torch.bool),
        frames=torch.stack([e.frame for e in examples]).to(dev),
        history_frames=history.frames.to(dev),
        history_mask=history.mask.to(dev),
        history_actions=history.actions.to(dev),
        tokens=tensor(tokens, torch.int64),
        attention_mask=tensor(attn, torch.bool),
        log_probs=zeros,
        reasoning_mask=tensor(reason_mask, torch.bool),
        action_mask=tensor(action_mask, torch.bool),
        values=torch.zeros(B, device=dev),
        lookahead_actions=torch.zeros(B, 0, dtype=torch.int64, device=dev),
        imagined_frames=torch.zeros(B, 0, size, size, 3, dtype=torch.uint8, device=dev),
        prompt_length=P,
        temperature=1.0,
    )
    marker = torch.full((B, 1), p.imagine, device=dev)
    ids = torch.cat([act.prompt_ids, act.tokens, marker, next_codes], 1)
    rows_, actions_ = zip(*frames, strict=True) if frames else ((), ())
    return SftBatch(act, next_codes, ids, tensor(all_kinds, torch.int64),
                    tensor(all_nodes, torch.int64), tensor(list(rows_), torch.int64),
                    tensor(list(actions_), torch.int64))  # fmt: skip


# -- the loss -------------------------------------------------------------------------------------


def token_log_probs(policy: RigPolicy, batch: SftBatch) -> dict[int, tuple[Tensor, Tensor]]:
    """One forward (``forward_sequence``); for each kind, the log-prob of every supervised token
    (N,) under the distribution act samples it from, and whether it is that distribution's
    argmax (N,) bool. Column j is predicted by the hidden state at column j - 1."""
    import torch

    from rl.imagine import code_logits
    hidden, _, _ = policy.forward_sequence(batch.act, batch.next_codes)  # (B, T, D)
    state = policy.decision_state(hidden, batch.act)  # (B, D) what the action head reads
    pred, target = hidden[:, :-1], batch.ids[:, 1:]
    kinds, nodes = batch.kinds[:, 1:], batch.nodes[:, 1:]
    out = {}
    for kind in SEGMENTS:
        sel = kinds == kind  # (B, T - 1)
        h = pred[sel]  # (N, D)
        if kind == REASONING:
            logp = policy.reasoning_log_softmax(policy.logits(h), 1.0)
        elif kind == ACTION:  # as act samples it: the action head reads the step's state
            rows = sel.nonzero()[:, 0]
            logp = policy.action_log_softmax(policy.logits(h), nodes[sel], state[rows], 1.0)
        else:  # as act and imagine sample them: the frame head reads the step's state and
            # the action the frame follows; G codes per frame, frames in the order of ``sel``
            logits = code_logits(policy, h)
            offsets = policy.frame_offsets(state[batch.frame_rows], batch.frame_actions)
            if offsets is not None:
                logits = logits + offsets.flatten(0, 1)
            logp = torch.log_softmax(logits, -1)
        t = target[sel]
        out[kind] = (logp.gather(1, t[:, None]).squeeze(1), logp.detach().argmax(-1) == t)
    return out


def sft_loss(policy: RigPolicy, batch: SftBatch) -> tuple[Tensor, dict[str, float]]:
    """Mean cross-entropy over every supervised token, and per-segment CE and accuracy."""
    import torch

    scored = token_log_probs(policy, batch)
    logps = torch.cat([lp for lp, _ in scored.values()])
    loss = -logps.mean() if logps.numel() else logps.sum()
    metrics = {"loss/sft": float(loss.detach())}
    for kind, (lp, correct) in scored.items():
        name = SEGMENTS[kind]
        if lp.numel():
            metrics[f"ce/{name}"] = float(-lp.detach().mean())
            metrics[f"accuracy/{name}"] = float(correct.float().mean())
        metrics[f"tokens/{name}"] = float(lp.numel())
    return loss, metrics


# -- the data -------------------------------------------------------------------------------------


class SftData:
    """A dataset in memory: frames, their VQ codes, per-step fields, train/held-out split.

    Held out: the last ``max(1, round(holdout * E))`` of E episodes when E >= 2, none
    otherwise (the held-out metrics are then taken on training steps)."""

    def __init__(self, path: str | Path, holdout: float = 0.1):
        import torch

        from supervised import open_dataset

        reader = open_dataset(path)
        self.path = Path(path)
        self.card = reader.card
        if reader.num_steps == 0:
            raise UserError(f"--dataset {path}: the dataset holds no steps")
        frames, step_rows = [], []
        fields: dict[str, list[Any]] = {}
        episode_of, first_step = [], []
        for e, ep in enumerate(reader.episodes()):
            frames.append(ep["frames"])
            for key in ("action", "action_text", "reasoning", "review", "review_text",
                        "review_loss", "review_right_action", "chain_frames", "chain_steps",
                        "chain_len"):  # fmt: skip
                if key in ep:
                    fields.setdefault(key, []).append(ep[key])
            n = int(ep["length"])
            step_rows.append(ep["frame_offset"] + np.arange(n))
            episode_of.append(np.full(n, e))
            first_step.append(np.full(n, ep["step_offset"]))
        self.frames = torch.as_tensor(np.concatenate(frames))  # (F, H, W, 3) uint8
        self.frame_of = np.concatenate(step_rows)  # (S,) global frame index of each step
        self.episode_of = np.concatenate(episode_of)
        self.first_step = np.concatenate(first_step)  # (S,) the episode's first global step
        self.fields = {k: np.concatenate(v) for k, v in fields.items()}
        self.num_steps = len(self.frame_of)
        self.codes: Tensor | None = None
        episodes = int(self.episode_of.max()) + 1
        held = max(1, round(holdout * episodes)) if episodes >= 2 and holdout > 0 else 0
        is_held = self.episode_of >= episodes - held
        self.train_steps = np.flatnonzero(~is_held)
        self.heldout_steps = np.flatnonzero(is_held) if held else self.train_steps
        self.has_reasoning = "reasoning" in self.fields
        self.has_chains = "chain_frames" in self.fields
        self.has_review = "review" in self.fields

    @property
    def size(self) -> int:
        return int(self.frames.shape[1])

    def check(self, policy: RigPolicy, stage: str) -> None:
        """UserError (one line) when the data does not fit the policy or the stage."""
        if self.frames.shape[1] != policy.image_size or self.frames.shape[2] != policy.image_size:
            raise UserError(
                f"--dataset {self.path}: frames are {self.frames.shape[1]}x{self.frames.shape[2]} "
                f"but the policy sees {policy.image_size}x{policy.image_size}; collect with "
                f"env.size={policy.image_size} or choose a preset of that size"
            )
        vocab = policy.codec.vocab
        actions, texts = self.fields["action"], self.fields["action_text"]
        if int(actions.max()) >= len(vocab) or any(
            vocab[int(a)] != str(t) for a, t in zip(actions, texts, strict=True)
        ):
            raise UserError(
                f"--dataset {self.path}: its actions do not match the action codec of "
                f"{self.card.get('env_id')} (another env or codec version)"
            )
        if stage == "lookahead" and not self.has_chains:
            raise UserError(
                f"--dataset {self.path}: --stage lookahead needs S4 lookahead chains; run "
                f"`rig data imagine {self.path} OUT` first"
            )

    def encode(self, policy: RigPolicy, chunk: int = 256) -> None:
        """VQ codes of every frame (the VQ is frozen: the targets never move)."""
        import torch

        from rl.imagine import frame_codes

        out = []
        with torch.no_grad():
            for i in range(0, len(self.frames), chunk):
                out.append(frame_codes(policy, self.frames[i : i + chunk]).cpu())
        self.codes = torch.cat(out)  # (F, G)

    # -- examples ---------------------------------------------------------------------------------

    def _reasoning(self, policy, step: int, cache) -> list[tuple[list[int], bool]]:
        if not self.has_reasoning:
            return []
        return [(text_ids(policy, str(self.fields["reasoning"][step]), cache), True)]

    def example(
        self, policy: RigPolicy, step: int, lookahead: int, history: int, cache: dict
    ) -> Example:
        """Step ``step`` (global) as an example with a chain of ``lookahead`` proposals (capped
        by the steps left in its episode) and ``history`` past steps."""
        import torch

        f = int(self.frame_of[step])
        action = int(self.fields["action"][step])
        decision = Decision(self._reasoning(policy, step, cache), action, self.codes[f + 1])
        if self.has_review and bool(self.fields["review"][step]):
            texts, trained = self.fields["review_text"][step], self.fields["review_loss"][step]
            segments = [(text_ids(policy, ("" if i == 0 else " ") + str(t), cache), bool(m))
                        for i, (t, m) in enumerate(zip(texts, trained, strict=True))]  # fmt: skip
            right = policy.codec.vocab.index(str(self.fields["review_right_action"][step]))
            decision = Decision(segments, right, self.codes[f + 1], codes_loss=right == action)
        proposals = []
        if lookahead > 0:
            n = min(lookahead, int(self.fields["chain_len"][step]))
            for i in range(n):
                s, frame = (int(self.fields[k][step][i]) for k in ("chain_steps", "chain_frames"))
                a = int(self.fields["action"][s])
                proposals.append(Decision(self._reasoning(policy, s, cache), a, self.codes[frame]))
        past = [s for s in range(step - history, step) if s >= self.first_step[step]]
        pad = history - len(past)
        size = self.size
        hist_frames = torch.zeros(history, size, size, 3, dtype=torch.uint8)
        if past:
            hist_frames[pad:] = self.frames[torch.as_tensor(self.frame_of[past])]
        return Example(
            frame=self.frames[f],
            history_frames=hist_frames,
            history_actions=[0] * pad + [int(self.fields["action"][s]) for s in past],
            history_mask=[False] * pad + [True] * len(past),
            proposals=proposals,
            decision=decision,
        )


# -- training -------------------------------------------------------------------------------------


@dataclass
class SftSettings:
    stage: str = "basic"
    steps: int = 300
    batch_size: int = 8
    lr: float = 3e-4
    warmup_steps: int = 20
    seed: int = 0
    eval_every: int = 50
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    lookahead: int | None = None  # lookahead stage: longest chain (None: the dataset's S4 n)
    history: int = 0
    max_reasoning_tokens: int = 64
    task: str = "survive and unlock as many achievements as you can"
    holdout: float = 0.1
    eval_rows: int = 32
    images: int = 6
    max_seconds: float | None = None


@dataclass
class SftState:
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    first_loss: float | None = None
    heldout: dict[str, float] = field(default_factory=dict)


def chain_length(data: SftData, settings: SftSettings) -> int:
    """Longest lookahead chain of a stage: 0 for basic; the dataset's S4 n unless given."""
    if settings.stage == "basic":
        return 0
    n = ((data.card.get("options") or {}).get("lookahead")
         or int(data.fields["chain_len"].max()))  # fmt: skip
    return min(int(n), settings.lookahead) if settings.lookahead is not None else int(n)


class SftTrainer:
    """SFT of ``policy`` on ``data`` with the RL learner's engine (``learner.DeepSpeedEngine``,
    or any engine with the same API). ``run`` trains, evaluates every ``eval_every`` steps and
    writes HF checkpoints into ``out``; ``tracker`` (``rig.tracking.Tracker``) is optional."""

    def __init__(self, policy: RigPolicy, data: SftData, settings: SftSettings, engine,
                 out: Path, tracker=None):  # fmt: skip
        import torch

        self.policy, self.data, self.s, self.engine = policy, data, settings, engine
        self.out, self.tracker = Path(out), tracker
        self.rng = np.random.default_rng(settings.seed)
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.cache: dict[str, list[int]] = {}
        self.n = chain_length(data, settings)
        self.state = SftState()
        heldout = data.heldout_steps
        pick = np.random.default_rng(settings.seed + 1).permutation(len(heldout))
        self.eval_steps = heldout[np.sort(pick[: settings.eval_rows])]

    def sample(self, steps: np.ndarray, lookahead: int | None = None) -> SftBatch:
        """A batch of these steps; the lookahead stage draws each row's chain length in 0..n."""
        s = self.s
        ks = (self.rng.integers(0, self.n + 1, len(steps)) if lookahead is None
              else np.full(len(steps), lookahead))  # fmt: skip
        examples = [self.data.example(self.policy, int(t), int(k), s.history, self.cache)
                    for t, k in zip(steps, ks, strict=True)]  # fmt: skip
        return build_batch(self.policy, examples, s.task, s.max_reasoning_tokens)

    def train_step(self) -> dict[str, float]:
        steps = self.rng.choice(self.data.train_steps, self.s.batch_size)
        batch = self.sample(steps)
        self.engine.train()
        loss, metrics = sft_loss(self.policy, batch)
        stats = self.engine.backward_step(loss)
        metrics["learner/grad_norm"] = stats["grad_norm"]
        metrics["learner/lr"] = stats["lr"]
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Held-out CE and accuracy (at lookahead 0 and, for the lookahead stage, at n), and
        imagined next frames against the real ones: PSNR, and an image artifact."""
        import torch

        from rl.imagine import decode_codes, psnr

        self.engine.eval()
        out: dict[str, float] = {}
        for k in sorted({0, self.n}):
            totals: dict[str, list[float]] = {}
            for i in range(0, len(self.eval_steps), self.s.batch_size):
                batch = self.sample(self.eval_steps[i : i + self.s.batch_size], lookahead=k)
                with torch.no_grad():
                    _, m = sft_loss(self.policy, batch)
                for key, v in m.items():
                    totals.setdefault(key, []).append(v)
            tag = "heldout" if k == 0 else f"heldout_lookahead{k}"
            out.update({f"{tag}/{key}": float(np.mean(v)) for key, v in totals.items()})
        rows = self.eval_steps[: self.s.images]
        batch = self.sample(rows, lookahead=0)
        with torch.no_grad():
            imagined = self.policy.imagine(batch.act, 1.0, self.generator).frames.cpu()
            real = self.data.frames[torch.as_tensor(self.data.frame_of[rows] + 1)]
            recon = decode_codes(self.policy, batch.next_codes).cpu()  # what the VQ can show
        out["heldout/imagined_psnr"] = float(psnr(imagined.numpy(), real.numpy()).mean())
        out["heldout/vq_psnr"] = float(psnr(recon.numpy(), real.numpy()).mean())
        if self.tracker is not None:
            from rig.tracking import side_by_side

            image = side_by_side(real.numpy(), imagined.numpy())
            self.tracker.log_image(image, f"imagination/step_{self.state.step:06d}.png")
        return out

    def save(self, path: Path) -> Path:
        return self.policy.save(path, extra={"sft": self.record()})

    def record(self) -> dict[str, Any]:
        """What a checkpoint says about its SFT (``rig eval`` reads task and reasoning cap)."""
        c = self.data.card
        return {
            **asdict(self.s), "lookahead": self.n, "step": self.state.step,
            "dataset": str(self.data.path.resolve()), "env_id": c.get("env_id"),
            "env_kwargs": c.get("env_kwargs") or {}, "size": self.data.size,
            "stages": c.get("stages") or [c.get("stage")], "metrics": self.state.metrics,
            "heldout": self.state.heldout,
        }  # fmt: skip

    def run(self, progress: Callable[[int, dict[str, float]], None] | None = None) -> SftState:
        s, st = self.s, self.state
        start = time.perf_counter()
        while st.step < s.steps:
            t0 = time.perf_counter()
            metrics = self.train_step()
            st.step += 1
            metrics["time/step_s"] = time.perf_counter() - t0
            if st.first_loss is None:
                st.first_loss = metrics["loss/sft"]
            out_of_time = s.max_seconds is not None and time.perf_counter() - start > s.max_seconds
            last = st.step == s.steps or out_of_time
            if st.step % s.eval_every == 0 or last or st.step == 1:
                st.heldout = self.evaluate()
                metrics.update(st.heldout)
            st.metrics = metrics
            if self.tracker is not None:
                self.tracker.log_metrics(metrics, st.step)
            if s.save_every and st.step % s.save_every == 0 and not last:
                self._save_rotating()
            if progress is not None:
                progress(st.step, metrics)
            if out_of_time:
                break
        self.save(self.out / FINAL)
        return st

    def _save_rotating(self) -> None:
        folder = self.out / CHECKPOINTS
        self.save(folder / f"step_{self.state.step:06d}")
        old = sorted(p for p in folder.iterdir() if p.name.startswith("step_"))
        for path in old[: max(0, len(old) - self.s.keep_checkpoints)]:
            shutil.rmtree(path, ignore_errors=True)


def write_report(out: Path, trainer: SftTrainer, seconds: float) -> Path:
    path = Path(out) / REPORT
    report = {"record": trainer.record(), "first_loss": trainer.state.first_loss,
              "seconds": seconds, "checkpoint": str(Path(out) / FINAL)}  # fmt: skip
    path.write_text(json.dumps(report, indent=2, default=_finite) + "\n")
    return path


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


__all__ = [
    "ACTION", "IMAGE", "NONE", "REASONING", "STAGES", "Decision", "Example", "SftBatch",
    "SftData", "SftSettings", "SftTrainer", "build_batch", "chain_length", "sft_loss",
    "text_ids", "token_log_probs", "write_report",
]  # fmt: skip
