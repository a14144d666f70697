"""How much of a Crafter frame the heads can read: a probe of the frozen policy's features.

configs/crafter.yaml trains only the value and action heads, on the frozen, randomly initialised
tiny trunk's hidden states at the frame's image columns (``RigPolicy.state_features``). RLlib's
PPO learns its CNN. This probe asks how much of what Crafter shows survives the frozen path: it
plays ``--frames`` steps of Crafter (the scripted expert with ``--eps`` random actions, so the
frames cover trees, water, stone, caves, night and creatures), labels every frame with the
materials and creatures of the 9 x 7 tiles the frame shows (crafter's own semantic map around
the player), the inventory it shows in its bottom two rows (each item's count, 0-9) and the
expert's action, and fits, on frames of other worlds than it tests on:

* for each policy preset given (``--preset``, names or YAML paths): the heads' MLP shape (one
  hidden ReLU layer of 256, on the features standardised as the heads standardise them) on the
  frozen features of that untrained policy;
* the same MLP on a CNN trained end to end on the pixels (RLlib's default encoder for 64 x 64
  frames: 16, 32, 64 channels of 4 x 4 kernels, stride 2, then 256), the peer's representation.

It prints held-out accuracy per tile (mean over the 63 tiles; the majority-class baseline beside
it), on the tiles that are not grass/sand/water/path (what a policy must see to act), of the
inventory counts (mean over items; the count of wood alone, which decides whether a table or a
wood pickaxe can be made), and of the expert's action. Equal steps and batch for every reader.
A probe, not a test: it says which representation a 100k-step run could use, not how a run
goes.

    python -m benchmarks.crafter_features --frames 8000 --preset tiny --preset my-preset.yaml
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

VIEW_W, VIEW_H = 9, 7
"""Crafter's local view: 9 x 9 units of which the top 9 x 7 show the world (the rest is the
inventory), centred on the player."""


ITEMS = ("health", "food", "drink", "energy", "sapling", "wood", "stone", "coal", "iron",
         "diamond", "wood_pickaxe", "stone_pickaxe", "iron_pickaxe", "wood_sword", "stone_sword",
         "iron_sword")  # fmt: skip
"""Crafter's inventory, in the order of ``player.inventory``; the frame shows each non-zero
count (at most 9) as an icon and a digit."""
COUNTS = 10


def collect(frames: int, eps: float, seed: int) -> tuple[np.ndarray, ...]:
    """(n, 64, 64, 3) uint8 frames, (n, 63) int64 tile labels (crafter's semantic ids, row-major
    over the 9 x 7 view; out of the world: 0), (n, len(ITEMS)) int64 inventory counts (clipped
    to 9), (n,) int64 expert actions, from episodes of different worlds (one world per episode,
    seeded from ``seed``)."""
    from envs.crafter_agent import ScriptedCrafterAgent
    from envs.crafter_env import CrafterEnv

    env, rng = CrafterEnv(length=1000), np.random.default_rng(seed)
    agent = ScriptedCrafterAgent(seed)
    xs, tiles, inventory, acts = [], [], [], []
    obs, info = env.reset(seed=int(rng.integers(1 << 30)))
    agent.reset()
    while len(xs) < frames:
        expert = agent.act(info)
        sem, (px, py) = info["semantic"], info["player_pos"]
        pad = np.pad(sem, ((VIEW_W, VIEW_W), (VIEW_H, VIEW_H)))
        view = pad[px + VIEW_W - VIEW_W // 2 : px + VIEW_W + VIEW_W // 2 + 1,
                   py + VIEW_H - VIEW_H // 2 : py + VIEW_H + VIEW_H // 2 + 1]  # fmt: skip
        xs.append(obs), tiles.append(view.T.reshape(-1)), acts.append(expert)
        inventory.append([min(info["inventory"][item], COUNTS - 1) for item in ITEMS])
        action = expert if rng.random() > eps else int(rng.integers(env.action_space.n))
        obs, _, term, trunc, info = env.step(action)
        if term or trunc or rng.random() < 1 / 300:  # ~300-step slices: many worlds
            obs, info = env.reset(seed=int(rng.integers(1 << 30)))
            agent.reset()
    return (np.stack(xs), np.stack(tiles).astype(np.int64), np.asarray(inventory, np.int64),
            np.asarray(acts, dtype=np.int64))  # fmt: skip


def policy_features(preset: str, frames: np.ndarray, seed: int = 0) -> torch.Tensor:
    """(n, F) float32 what the heads of an untrained policy of ``preset`` read before their
    standardisation (``rl.policy.frame_features``), for frames (n, 64, 64, 3) uint8."""
    import envs
    from rl.policy import RigPolicy, frame_features, positions, value_columns

    policy = RigPolicy.from_preset(preset, envs.get_codec(envs.make("rig/Crafter-v0", 64)), seed)
    policy.eval()
    out = []
    with torch.no_grad():
        for chunk in np.array_split(frames, max(1, len(frames) // 256)):
            ids, mask = policy.prompt("survive and unlock as many achievements as you can",
                                      len(chunk))  # fmt: skip
            codes = torch.zeros_like(mask)
            hidden, _ = policy.hidden(None, mask, positions(mask),
                                      inputs_embeds=policy.embed(ids, codes, torch.as_tensor(chunk)))
            col = value_columns(ids, mask, codes, policy.ids.reasoning)
            out.append(frame_features(hidden, col, policy.image_tokens, policy.head_grid))
    return torch.cat(out)


class PixelCNN(nn.Module):
    """RLlib's default encoder for 64 x 64 frames (its ``conv_filters`` for that size), then a
    dense 256: the peer PPO's representation."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 4, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 8 * 8, 256),
            nn.ReLU(),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.permute(0, 3, 1, 2).float() / 255.0)


def fit(encoder: nn.Module | None, x: torch.Tensor, tiles: torch.Tensor, inventory: torch.Tensor,
        acts: torch.Tensor, train: int, steps: int, classes: int, seed: int) -> dict[str, float]:  # fmt: skip
    """Train (encoder, if any, and) the heads' MLP shape on rows [:train]; held-out accuracies
    on the rest: per tile, on the tiles that are not ground (grass, sand, water, path), of each
    inventory count (mean over items, and wood's), of the expert's action."""
    torch.manual_seed(seed)
    if encoder is None:  # frozen features: standardise as rl/heads.py does (train statistics)
        mu, sd = x[:train].mean(0), x[:train].var(0).add(1e-2).sqrt()
        x = (x - mu) / sd
        encoder, width = nn.Identity(), x.shape[1]
    else:
        width = 256
    heads = nn.Sequential(nn.Linear(width, 256), nn.ReLU(),
                          nn.Linear(256, VIEW_W * VIEW_H * classes + len(ITEMS) * COUNTS + 17))  # fmt: skip
    n_tiles, n_items = VIEW_W * VIEW_H * classes, len(ITEMS) * COUNTS
    opt = torch.optim.Adam([*encoder.parameters(), *heads.parameters()], lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(train, (128,), generator=gen)
        out = heads(encoder(x[i]))
        tile_logits = out[:, :n_tiles].reshape(len(i), VIEW_W * VIEW_H, classes)
        item_logits = out[:, n_tiles : n_tiles + n_items].reshape(len(i), len(ITEMS), COUNTS)
        loss = nn.functional.cross_entropy(tile_logits.flatten(0, 1), tiles[i].flatten())
        loss = loss + nn.functional.cross_entropy(item_logits.flatten(0, 1), inventory[i].flatten())
        loss = loss + nn.functional.cross_entropy(out[:, -17:], acts[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = torch.cat([heads(encoder(c)) for c in x[train:].split(512)])
    pred = out[:, :n_tiles].reshape(len(out), VIEW_W * VIEW_H, classes).argmax(-1)
    items = out[:, n_tiles : n_tiles + n_items].reshape(len(out), len(ITEMS), COUNTS).argmax(-1)
    items_hit = items == inventory[train:]
    truth = tiles[train:]
    hit = pred == truth
    ground = torch.isin(truth, torch.tensor(GROUND))
    return {
        "tiles": float(hit.float().mean()),
        "objects": float(hit[~ground].float().mean()),
        "inventory": float(items_hit.float().mean()),
        "wood": float(items_hit[:, ITEMS.index("wood")].float().mean()),
        "action": float((out[:, -17:].argmax(-1) == acts[train:]).float().mean()),
    }


GROUND: list[int] = []


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=8000)
    p.add_argument("--test", type=float, default=0.2, help="share of frames held out (last)")
    p.add_argument("--eps", type=float, default=0.25)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--preset", action="append", default=None)
    p.add_argument("--no-cnn", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    import crafter

    world_ids = crafter.Env()._world._mat_ids  # material -> semantic id (objects follow them)
    GROUND[:] = [world_ids[m] for m in ("grass", "sand", "water", "path")]
    t0 = time.time()
    frames, tiles, inventory, acts = collect(a.frames, a.eps, a.seed)
    classes = int(tiles.max()) + 1
    train = int(len(frames) * (1 - a.test))
    tiles_t, acts_t, inv_t = torch.as_tensor(tiles), torch.as_tensor(acts), torch.as_tensor(inventory)
    wood = inventory[:, ITEMS.index("wood")]
    majority = np.mean([np.mean(tiles[train:, j] == np.bincount(tiles[:train, j]).argmax())
                        for j in range(tiles.shape[1])])  # fmt: skip
    majority_items = np.mean([np.mean(inventory[train:, j] == np.bincount(inventory[:train, j]).argmax())
                              for j in range(len(ITEMS))])  # fmt: skip
    majority_wood = np.mean(wood[train:] == np.bincount(wood[:train]).argmax())
    print(f"{len(frames)} frames ({train} train) in {time.time() - t0:.0f} s; "
          f"per-tile majority baseline {majority:.3f}; inventory {majority_items:.3f}, "
          f"wood {majority_wood:.3f} (held-out wood counts 0-9: "
          f"{np.bincount(wood[train:], minlength=COUNTS).tolist()}); expert's majority action "
          f"{np.mean(acts[train:] == np.bincount(acts[:train]).argmax()):.3f}")  # fmt: skip
    results = {"majority_tiles": float(majority), "majority_inventory": float(majority_items),
               "majority_wood": float(majority_wood)}  # fmt: skip
    for preset in a.preset or ["tiny"]:
        t0 = time.time()
        feats = policy_features(preset, frames, a.seed)
        r = fit(None, feats, tiles_t, inv_t, acts_t, train, a.steps, classes, a.seed)
        results[preset] = r
        print(f"frozen {preset:>24} ({feats.shape[1]} features): tiles {r['tiles']:.3f}  "
              f"objects {r['objects']:.3f}  inventory {r['inventory']:.3f}  wood {r['wood']:.3f}  "
              f"action {r['action']:.3f}  ({time.time() - t0:.0f} s)")  # fmt: skip
    if not a.no_cnn:
        t0 = time.time()
        r = fit(PixelCNN(), torch.as_tensor(frames), tiles_t, inv_t, acts_t, train, a.steps,
                classes, a.seed)  # fmt: skip
        results["cnn"] = r
        print(f"{'CNN on pixels (learned)':>31}: tiles {r['tiles']:.3f}  objects "
              f"{r['objects']:.3f}  inventory {r['inventory']:.3f}  wood {r['wood']:.3f}  "
              f"action {r['action']:.3f}  ({time.time() - t0:.0f} s)")
    return results


if __name__ == "__main__":
    main()
