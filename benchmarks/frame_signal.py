"""How much of the frame reaches the value head's input, and how well conditioned it is.

A probe of the tiny policy at initialisation on Catch frames with the ball one row above the
paddle row and the target y = ball column - paddle column (what the value and the policy must
read). It collects the hidden state at the first ``<reasoning>`` (where ``RigPolicy.value``
read until 2026-12-02; it now reads the frame's columns) for ``--train`` frames and reports,
on ``--test`` held-out frames:

* ridge regression on it (closed form): how much of y is linearly in the state at all;
* 300 Adam steps (lr 1e-3, batch 32) of a linear head and of the value head's MLP shape, on the
  raw state and on the state standardised per feature (train-set mean and std): what gradient
  descent can get out of it in a budget like an RL run's;
* the across-frame std of the state per feature against its mean magnitude;
* the explained variance a perfect critic reaches under the uniformly random policy (exact
  values by dynamic programming against the discounted returns of ``--episodes`` random
  episodes of the real env): what ``value/explained_variance`` can show before the policy has
  learned anything; and how much of it a ridge read-out of the standardised state reaches.

docs/benchmarks.md ("Why Catch is hard for the tiny policy") records what it printed.

    python benchmarks/frame_signal.py [--preset tiny] [--train 3000] [--test 500]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def states_at_reasoning(policy, frames: np.ndarray) -> torch.Tensor:
    """(n, D) hidden states at the first <reasoning> (where the heads read until 2026-12-02;
    now ``RigPolicy.state_features``) of (n, H, W, 3) uint8 frames at the policy's image size."""
    from rl.policy import positions

    out = []
    with torch.no_grad():
        for chunk in np.array_split(frames, max(1, len(frames) // 256)):
            ids, mask = policy.prompt("catch the ball", len(chunk))
            embeds = policy.embed(ids, torch.zeros_like(mask), torch.as_tensor(chunk))
            hidden, _ = policy.hidden(None, mask, positions(mask), inputs_embeds=embeds)
            out.append(hidden[:, -1])
    return torch.cat(out)


def catch_states(policy, n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, D) hidden states at the first <reasoning> and (n,) targets for random Catch frames."""
    from envs.catch import decisive_frames

    frames, offsets = decisive_frames(rng, n, policy.image_size)
    return states_at_reasoning(policy, frames), torch.tensor(offsets.astype(np.float64).tolist())


def explained(pred: torch.Tensor, y: torch.Tensor) -> float:
    return 1.0 - float(((pred - y) ** 2).mean() / y.var())


def random_decisions(
    episodes: int, seed: int = 0, gamma: float = 0.99, size: int | None = 64
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Every decision of ``episodes`` episodes of :class:`envs.catch.CatchEnv` played with
    uniformly random actions: its frame ``(n, size, size, 3)`` uint8, its exact random-policy
    value (``envs.catch.random_policy_values``) and its discounted return, ``(n,)`` each
    (``size`` None: no frames)."""
    from envs.catch import CatchEnv, random_policy_values
    from envs.pixel import resize_frame

    env, rng = CatchEnv(), np.random.default_rng(seed)
    table = random_policy_values(env.rows, env.cols, gamma)
    frames, values, returns = [], [], []
    for _ in range(episodes):
        env.reset(seed=int(rng.integers(1 << 30)))
        states, done, reward = [], False, 0.0
        while not done:
            states.append((env._ball[0], env._ball[1], env._paddle))
            if size is not None:
                frames.append(resize_frame(env._frame(), size))
            _, reward, done, _, _ = env.step(int(rng.integers(3)))
        values += [table[s] for s in states]
        returns += [gamma ** (len(states) - 1 - t) * reward for t in range(len(states))]
    return (np.stack(frames) if frames else None), np.asarray(values), np.asarray(returns)


def critic_ceiling(episodes: int = 4000, seed: int = 0, gamma: float = 0.99) -> float:
    """Explained variance of the discounted returns of random play by the exact random-policy
    values: the most ``value/explained_variance`` can show before the policy learns."""
    _, v, g = random_decisions(episodes, seed, gamma, size=None)
    return float(1.0 - np.var(g - v) / np.var(g))


def critic_readout(policy, episodes: int = 900, seed: int = 0) -> tuple[float, float]:
    """Held-out explained variance of random play's returns by a ridge read-out of the policy's
    standardised state at <reasoning> (fit on 70% of the decisions), and that of the exact
    values on the same held-out decisions: how much of the attainable a linear critic of the
    state as it is can reach."""
    frames, v, g = random_decisions(episodes, seed, size=policy.image_size)
    h = states_at_reasoning(policy, frames).double()
    y, tr = torch.as_tensor(g), int(0.7 * len(g))
    z = (h - h[:tr].mean(0)) / (h[:tr].std(0) + 1e-2)
    a = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1)
    w = torch.linalg.solve(a[:tr].T @ a[:tr] + 1e-2 * torch.eye(a.shape[1], dtype=a.dtype),
                           a[:tr].T @ y[:tr])  # fmt: skip
    ridge = explained((a[tr:] @ w).float(), y[tr:].float())
    exact = explained(torch.as_tensor(v[tr:]).float(), y[tr:].float())
    return ridge, exact


def policy_for(preset: str, seed: int):
    """The untrained policy of ``preset`` for Catch."""
    import envs
    from rl.policy import RigPolicy

    torch.manual_seed(seed)
    return RigPolicy.from_preset(preset, envs.get_codec(envs.make("rig/Catch-v0", 64)), seed)


def run(preset: str = "tiny", train: int = 3000, test: int = 500, seed: int = 0) -> dict:
    policy = policy_for(preset, seed)
    rng = np.random.default_rng(seed)
    h, y = catch_states(policy, train, rng)
    h_test, y_test = catch_states(policy, test, rng)
    mu, sd = h.mean(0), h.std(0) + 1e-6
    results = {"state_std_over_mean_abs": float(h.std(0).mean() / h.abs().mean())}

    a = torch.cat([h, torch.ones(len(h), 1)], 1).double()
    w = torch.linalg.solve(a.T @ a + 1e-3 * a.shape[1] * torch.eye(a.shape[1], dtype=a.dtype),
                           a.T @ y.double())  # fmt: skip
    results["ridge"] = explained((torch.cat([h_test, torch.ones(test, 1)], 1).double() @ w).float(),
                                 y_test)  # fmt: skip
    for name, f in (("raw", lambda x: x), ("standardised", lambda x: (x - mu) / sd)):
        for kind in ("linear", "mlp"):
            torch.manual_seed(seed)
            d = h.shape[1]
            head = (torch.nn.Linear(d, 1) if kind == "linear" else torch.nn.Sequential(
                torch.nn.Linear(d, d), torch.nn.Tanh(), torch.nn.Linear(d, 1)))  # fmt: skip
            opt = torch.optim.Adam(head.parameters(), 1e-3)
            gen = torch.Generator().manual_seed(seed)
            for _ in range(300):
                i = torch.randint(0, train, (32,), generator=gen)
                loss = ((head(f(h[i])).squeeze(-1) - y[i]) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                results[f"adam_{kind}_{name}"] = explained(head(f(h_test)).squeeze(-1), y_test)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--episodes", type=int, default=4000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    r = run(args.preset, args.train, args.test, args.seed)
    print(f"state at <reasoning>: across-frame std / mean |value| = "
          f"{r['state_std_over_mean_abs']:.3f}")  # fmt: skip
    print(f"held-out explained variance of y: ridge {r['ridge']:.3f}")
    for kind in ("linear", "mlp"):
        raw, std = r[f"adam_{kind}_raw"], r[f"adam_{kind}_standardised"]
        print(f"  300 Adam steps, {kind} head: raw state {raw:.3f}, standardised state {std:.3f}")
    ridge, exact = critic_readout(policy_for(args.preset, args.seed), 900, args.seed)
    print(f"random play's returns, held-out explained variance: ridge on the standardised "
          f"state {ridge:.3f}, exact values {exact:.3f}")
    print(f"explained variance of a perfect critic under the random policy "
          f"({args.episodes} episodes): {critic_ceiling(args.episodes, args.seed):.3f}")


if __name__ == "__main__":
    main()
