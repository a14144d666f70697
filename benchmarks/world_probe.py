"""Where Catch's next frame can be predicted from: a probe of the world model's read-out.

Random-play Catch transitions (s, a, s') that do not end an episode; targets are the VQ codes of
s' (``--vq``: a `rig tokenizer train` folder loaded into the tiny preset). Scored on held-out
transitions: the share of codes right, and whether the decoded frame has the ball and the paddle
in the real next frame's cells (8x8 board cells). Predictors:

* copying the current frame's codes (the gate's baseline);
* an MLP (one hidden ReLU layer of 512) from the standardised decision state (the current
  frame's image columns of the untrained trunk, pooled: what the value and action heads read,
  ``RigPolicy.state_features``) and the action, to the 16 codes (each its own softmax);
* a read-out shaped to live in the policy, shared by the code positions: for code g,
  ``relu(W s + C s_g + U a + P_g) -> V`` logits, where ``s_g`` is code g's own frame column
  (the tiny preset's state is its 16 columns) and ``P_g`` a position embedding (2.5M
  parameters against the MLP's 6.3M);
* the same MLP on the 8x8 board itself (a control: everything the next frame depends on).

Compare with what the world model in the sequence reaches (the generation head after
``<Imagine:>``; the gate's ``world/code_accuracy`` and ``--dreams``): if the MLP on the frame
state predicts the next frame and the generation head does not, the information is in the
trunk's frame columns and the read-out after ``<Imagine:>`` is what loses it, as it was for the
value (docs/benchmarks.md, session 43).

    python benchmarks/world_probe.py --vq vq/catch [--transitions 5120] [--steps 600]
    python benchmarks/world_probe.py --vq vq/catch --dreams CHECKPOINT [--png dreams.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TASK = "catch the falling ball with the paddle"


def transitions(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` random-play Catch steps that do not end an episode: frames s (n, 64, 64, 3) uint8,
    actions (n,), next frames s'."""
    import envs

    env = envs.make("rig/Catch-v0", size=64)
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    s, a, s2 = [], [], []
    while len(s) < n:
        act = int(rng.integers(3))
        new, _, term, trunc, _ = env.step(act)
        if not term:
            s.append(obs)
            a.append(act)
            s2.append(new)
        obs = env.reset()[0] if term or trunc else new
    return np.stack(s), np.array(a), np.stack(s2)


def cells(frames: np.ndarray, channel: int) -> np.ndarray:
    """(n,) index of the 8x8-px cell of each 64 px frame where ``channel`` most exceeds the
    other two (red: the ball, blue: the paddle)."""
    f = frames.astype(np.float32)
    score = f[..., channel] - np.delete(f, channel, axis=-1).mean(-1)
    return score.reshape(len(f), 8, 8, 8, 8).mean((2, 4)).reshape(len(f), -1).argmax(1)


def frame_states(policy, frames: np.ndarray, batch: int = 256) -> torch.Tensor:
    """(n, F) the unstandardised features the heads read (``rl.policy.frame_features``) of the
    prompt with each frame and no history."""
    from rl.policy import History, frame_features, positions

    out = []
    with torch.no_grad():
        for i in range(0, len(frames), batch):
            x = torch.as_tensor(frames[i : i + batch])
            ids, mask = policy.prompt(TASK, len(x), History.empty(len(x), 0, policy.image_size))
            embeds = policy.embed(ids, torch.zeros_like(mask), x)
            hidden, _ = policy.hidden(None, mask, positions(mask), inputs_embeds=embeds)
            col = torch.full((len(x),), ids.shape[1] - 1)
            out.append(frame_features(hidden, col, policy.image_tokens, policy.head_grid))
    return torch.cat(out)


def fit(net: torch.nn.Module, predict, codes: torch.Tensor, train: int, steps: int) -> torch.Tensor:
    """Train ``net`` on rows ``[:train]`` (``predict(rows)`` -> (n, G, V) logits of ``codes``
    (n, G)), ``steps`` Adam steps of batch 128; returns its argmax codes on the rest (m, G)."""
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(steps):
        idx = torch.randint(train, (128,))
        logits = predict(idx)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), codes[idx].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return predict(torch.arange(train, len(codes))).argmax(-1)


def fit_codes(inputs: torch.Tensor, codes: torch.Tensor, train: int, steps: int,
              vocab: int, seed: int = 0) -> torch.Tensor:  # fmt: skip
    """An MLP (512 ReLU) from ``inputs`` to ``codes`` (n, G), :func:`fit` on the first
    ``train`` rows; its argmax codes on the rest (m, G)."""
    torch.manual_seed(seed)
    G = codes.shape[1]
    net = torch.nn.Sequential(
        torch.nn.Linear(inputs.shape[1], 512), torch.nn.ReLU(), torch.nn.Linear(512, G * vocab)
    )
    return fit(net, lambda rows: net(inputs[rows]).view(-1, G, vocab), codes, train, steps)


class CodeReadout(torch.nn.Module):
    """Next-frame code logits (B, G, V) from the standardised state (B, G * C: G frame columns
    of C features each, in code order) and the action (B,): one hidden ReLU layer shared by the
    code positions, fed by the whole state, the code's own column, the action and the
    position."""

    def __init__(self, features: int, codes: int, actions: int, vocab: int, hidden: int = 512):
        super().__init__()
        self.codes = codes
        self.state = torch.nn.Linear(features, hidden)
        self.own = torch.nn.Linear(features // codes, hidden)
        self.action = torch.nn.Embedding(actions, hidden)
        self.position = torch.nn.Parameter(torch.zeros(codes, hidden))
        self.out = torch.nn.Linear(hidden, vocab)

    def forward(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        h = (self.state(state)[:, None] + self.own(state.view(len(state), self.codes, -1))
             + self.action(action)[:, None] + self.position)  # fmt: skip
        return self.out(torch.relu(h))


def fit_readout(state: torch.Tensor, action: torch.Tensor, codes: torch.Tensor, train: int,
                steps: int, vocab: int, seed: int = 0) -> torch.Tensor:  # fmt: skip
    """:class:`CodeReadout` fitted by :func:`fit`; its argmax codes on the rest."""
    torch.manual_seed(seed)
    net = CodeReadout(state.shape[1], codes.shape[1], 3, vocab)
    return fit(net, lambda rows: net(state[rows], action[rows]), codes, train, steps)


def score(policy, predicted: torch.Tensor, codes: torch.Tensor, real: np.ndarray) -> dict:
    """Code accuracy and the ball's and paddle's cell accuracy of the decoded predictions."""
    from rl.imagine import decode_codes

    frames = decode_codes(policy, predicted).numpy()
    return {
        "code_accuracy": float((predicted == codes).float().mean()),
        "ball_cell": float(np.mean(cells(frames, 0) == cells(real, 0))),
        "paddle_cell": float(np.mean(cells(frames, 2) == cells(real, 2))),
    }


def probe(policy, n: int, steps: int, heldout: int = 1024) -> dict[str, dict]:
    """The four predictors' scores on ``heldout`` of ``n`` transitions."""
    from rl.imagine import frame_codes

    s, a, s2 = transitions(n)
    train = n - heldout
    with torch.no_grad():
        now, target = frame_codes(policy, s), frame_codes(policy, s2)
    state = frame_states(policy, s)
    state = (state - state[:train].mean(0)) / state[:train].std(0).clamp_min(0.1)
    action = torch.nn.functional.one_hot(torch.as_tensor(a), 3).float()
    board = torch.as_tensor(s[:, 4::8, 4::8].reshape(n, -1)).float() / 255.0
    vocab = int(policy.model.config.vq_config.num_embeddings)
    test, real = target[train:], s2[train:]
    return {
        "copy the current codes": score(policy, now[train:], test, real),
        "MLP on the trunk's frame state + action": score(
            policy, fit_codes(torch.cat([state, action], 1), target, train, steps, vocab), test, real
        ),
        "shared read-out, own column + state + action": score(
            policy, fit_readout(state, torch.as_tensor(a), target, train, steps, vocab), test, real
        ),
        "MLP on the 8x8 board + action (control)": score(
            policy, fit_codes(torch.cat([board, action], 1), target, train, steps, vocab), test, real
        ),
    }


def dreams(policy, n: int, temperature: float, png: str | None) -> dict:
    """The generation head's imagined next frames after the policy's own actions on ``n`` steps
    of Catch: ball and paddle cell accuracy; ``png``: s, s', reconstruction of s', dream."""
    import envs
    from rl.policy import ActOutput

    env = envs.make("rig/Catch-v0", size=64)
    gen = torch.Generator().manual_seed(0)
    obs, _ = env.reset(seed=3)
    outs, now, after = [], [], []
    with torch.no_grad():
        while len(outs) < n:
            out = policy.act(obs[None], TASK, 0, 1.0, gen)
            new, _, term, trunc, _ = env.step(int(out.actions[0]))
            outs.append(out)
            now.append(obs)
            after.append(new)
            obs = env.reset()[0] if term or trunc else new
        batch = ActOutput.collate(outs, policy.ids.pad)
        dreamt = policy.imagine(batch, temperature, torch.Generator().manual_seed(1)).frames.numpy()
    real = np.stack(after)
    if png:
        from PIL import Image

        recon = policy.reconstruct(real).numpy()
        rows = [np.concatenate([now[k], real[k], recon[k], dreamt[k]], 1) for k in range(8)]
        Image.fromarray(np.concatenate(rows, 0)).resize((512, 1024), Image.NEAREST).save(png)
    return {"ball_cell": float(np.mean(cells(dreamt, 0) == cells(real, 0))),
            "paddle_cell": float(np.mean(cells(dreamt, 2) == cells(real, 2)))}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    import envs
    from rl.policy import RigPolicy
    from supervised.vq import load_vq_into

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vq", help="a `rig tokenizer train` folder (default: the preset's VQ)")
    ap.add_argument("--transitions", type=int, default=5120)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--dreams", help="instead: a policy checkpoint whose dreams to score")
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--png", help="with --dreams: write 8 of them side by side here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    codec = envs.get_codec(envs.make("rig/Catch-v0", size=64))
    if args.dreams:
        policy = RigPolicy.load(args.dreams, codec).eval()
        print(f"dreams of {args.dreams} at temperature {args.temperature}:",
              dreams(policy, 256, args.temperature, args.png))  # fmt: skip
        return
    policy = RigPolicy.from_preset("tiny", codec, 0).eval()
    if args.vq:
        load_vq_into(policy, args.vq)
    for name, row in probe(policy, args.transitions, args.steps).items():
        print(f"{name:42s} code accuracy {row['code_accuracy']:.3f} | ball cell "
              f"{row['ball_cell']:.2f} | paddle cell {row['paddle_cell']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
