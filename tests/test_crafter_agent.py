"""The scripted Crafter expert: ids, single decisions on hand-made maps, and short real games."""

from __future__ import annotations

import numpy as np
import pytest

crafter = pytest.importorskip("crafter")

import envs  # noqa: E402
from envs.crafter_agent import ACTION, ID, ScriptedCrafterAgent  # noqa: E402

SEEDS = (1, 2, 3)
STEPS = 300
TARGETS = ("collect_wood", "place_table", "make_wood_pickaxe")


def rollout(seed: int, steps: int, policy: str) -> dict:
    """Play ``steps`` steps of world ``seed``; record what the tests check."""
    wrapper = envs.make("rig/Crafter-v0", length=steps)
    _, info = wrapper.reset(seed=seed)
    env = wrapper.unwrapped._env  # the raw crafter.Env, to look at the world around the player
    agent = ScriptedCrafterAgent(seed=seed)
    rng = np.random.default_rng(seed)
    infos, actions, goals, lava_moves = [], [], [], 0
    done = False
    while not done:
        if policy == "scripted":
            action = agent.act(info)
            goals.append(agent.goal)
        else:
            action = int(rng.integers(len(crafter.constants.actions)))
        name = crafter.constants.actions[action]
        if name.startswith("move_"):
            d = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[name[5:]]
            x, y = env._player.pos[0] + d[0], env._player.pos[1] + d[1]
            if env._world[(x, y)][0] == "lava":
                lava_moves += 1
        infos.append(info)
        actions.append(action)
        _, _, terminated, truncated, info = wrapper.step(action)
        done = terminated or truncated
    unlocked = {k for k, v in env._player.achievements.items() if v > 0}
    on_lava = env._world[env._player.pos][0] == "lava"
    return {
        "infos": infos, "actions": actions, "goals": goals, "unlocked": unlocked,
        "lava_moves": lava_moves, "died_in_lava": on_lava,
    }  # fmt: skip


@pytest.fixture(scope="module")
def games():
    return {
        policy: [rollout(seed, STEPS, policy) for seed in SEEDS]
        for policy in ("scripted", "random")
    }


# -- ids -----------------------------------------------------------------------------------------


def test_ids_match_crafter():
    env = crafter.Env(seed=0)
    for name, i in env._world._mat_ids.items():
        if name is not None:
            assert ID[name] == i, name
    for cls, i in env._sem_view._obj_ids.items():
        assert ID[cls.__name__.lower()] == i, cls
    assert list(ACTION) == list(crafter.constants.actions)
    assert list(ACTION.values()) == list(range(len(crafter.constants.actions)))


# -- real games ----------------------------------------------------------------------------------


def test_unlocks_the_first_tech_tree_steps_far_above_random(games):
    scripted, random = games["scripted"], games["random"]
    for target in TARGETS:
        hits = sum(target in g["unlocked"] for g in scripted)
        assert hits >= len(SEEDS) - 1, f"{target} unlocked in only {hits} of {len(SEEDS)} games"
    scripted_total = sum(len(g["unlocked"]) for g in scripted)
    random_total = sum(len(g["unlocked"]) for g in random)
    # Random gets ~1-3 achievements in 300 steps (sapling, drink, ...); the expert gets ~12.
    assert scripted_total >= 2 * random_total + 4 * len(SEEDS), (scripted_total, random_total)


def test_never_walks_into_lava(games):
    for game in games["scripted"]:
        assert game["lava_moves"] == 0
        assert not game["died_in_lava"]


def test_goal_is_always_explained(games):
    for game in games["scripted"]:
        assert len(game["goals"]) == len(game["actions"])
        for goal in game["goals"]:
            topic, _, why = goal.partition(":")
            assert topic.strip() and why.strip(), goal


def test_same_seed_and_infos_give_the_same_actions(games):
    game = games["scripted"][0]
    replay = ScriptedCrafterAgent(seed=SEEDS[0])
    actions = [replay.act(info) for info in game["infos"]]
    assert actions == game["actions"]
    replay.reset()  # a reset starts the episode's state afresh
    assert replay.act(game["infos"][0]) == game["actions"][0]


# -- single decisions on hand-made maps ----------------------------------------------------------

LEGEND = {
    ".": "grass", "#": "stone", "~": "water", "L": "lava", "T": "tree", "_": "path",
    "t": "table", "Z": "zombie", "S": "skeleton", "C": "cow", "@": "player",
}  # fmt: skip


def make_info(rows: list[str], facing=(0, 1), sleeping=False, unlocked=(), **inventory) -> dict:
    """An ``info`` whose map is ``rows`` (row = y, column = x) drawn on a grass world."""
    sem = np.full((64, 64), ID["grass"], np.uint8)
    pos = None
    for y, row in enumerate(rows):
        for x, ch in enumerate(row):
            sem[x + 10, y + 10] = ID[LEGEND[ch]]
            if ch == "@":
                pos = (x + 10, y + 10)
    items = {name: info["initial"] for name, info in crafter.constants.items.items()}
    items.update(inventory)
    achievements = dict.fromkeys(crafter.constants.achievements, 0)
    achievements.update(dict.fromkeys(unlocked, 1))
    return {
        "inventory": items,
        "achievements": achievements,
        "semantic": sem,
        "player_pos": np.array(pos),
        "facing": facing,
        "sleeping": sleeping,
    }


def test_asleep_does_nothing():
    agent = ScriptedCrafterAgent()
    assert agent.act(make_info(["@"], sleeping=True, energy=3)) == ACTION["noop"]
    assert agent.goal.startswith("sleep")


def test_fights_an_adjacent_zombie():
    agent = ScriptedCrafterAgent()
    assert agent.act(make_info(["@Z"], facing=(0, 1))) == ACTION["move_right"]  # turn to it
    assert agent.act(make_info(["@Z"], facing=(1, 0))) == ACTION["do"]
    assert agent.goal.startswith("fight")


def test_drinks_when_thirsty():
    agent = ScriptedCrafterAgent()
    info = make_info(["...", "@.~"], facing=(0, 1), drink=2)
    assert agent.act(info) == ACTION["move_right"]
    assert agent.goal.startswith("drink") and "water 1 steps away" in agent.goal
    assert agent.act(make_info(["@~"], facing=(1, 0), drink=2)) == ACTION["do"]


def test_farms_a_sapling_first():
    agent = ScriptedCrafterAgent()
    assert agent.act(make_info(["@."], facing=(1, 0))) == ACTION["do"]
    assert agent.goal.startswith("farm: collect a sapling")
    assert agent.act(make_info(["@."], facing=(1, 0), sapling=1)) == ACTION["place_plant"]


def test_collects_wood_then_places_a_table_and_crafts():
    farmed = ("eat_plant",)  # past the farming rule
    agent = ScriptedCrafterAgent()
    assert agent.act(make_info(["@T"], facing=(1, 0), unlocked=farmed)) == ACTION["do"]
    assert agent.goal.startswith("collect wood")
    info = make_info(["@."], facing=(1, 0), unlocked=farmed, wood=4)
    assert ScriptedCrafterAgent().act(info) == ACTION["place_table"]
    info = make_info(["@t"], facing=(1, 0), unlocked=farmed, wood=3)
    assert ScriptedCrafterAgent().act(info) == ACTION["make_wood_pickaxe"]


def test_seals_itself_in_before_sleeping():
    """Tired next to a stone wall with a pickaxe: tunnel a pocket, close it, then sleep."""
    rows = ["#####", "#####", "..@..", "....."]
    agent = ScriptedCrafterAgent()
    info = make_info(rows, facing=(0, -1), energy=2, wood_pickaxe=1, stone=2)
    assert agent.act(info) == ACTION["do"]
    assert agent.goal.startswith("sleep") and "tunnelling" in agent.goal
    sealed = make_info(["###", "#@#", "#_#", "###"], facing=(0, 1), energy=2, wood_pickaxe=1)
    assert agent.act(sealed) == ACTION["sleep"]
    assert "sealed" in agent.goal


@pytest.mark.parametrize("seed", range(200))
def test_no_move_into_lava_on_random_maps(seed):
    """Whatever the map, a move never targets lava (the one action that kills at once)."""
    rng = np.random.default_rng(seed)
    names = ["grass", "sand", "path", "stone", "water", "tree", "lava", "lava", "zombie", "cow"]
    sem = np.array([ID[n] for n in names])[rng.integers(len(names), size=(64, 64))]
    x, y = rng.integers(1, 63, size=2)
    sem[x, y] = ID["player"]
    inventory = {k: int(rng.integers(0, 10)) for k in ("food", "drink", "energy", "health")}
    inventory.update(wood_pickaxe=int(rng.integers(2)), stone=int(rng.integers(3)))
    info = make_info(["@"], facing=((1, 0), (-1, 0), (0, 1), (0, -1))[seed % 4], **inventory)
    info["semantic"], info["player_pos"] = sem, np.array((x, y))
    moves = {"move_left": (-1, 0), "move_right": (1, 0), "move_up": (0, -1), "move_down": (0, 1)}
    agent = ScriptedCrafterAgent(seed=seed)
    for _ in range(3):
        action = agent.act(info)
        name = crafter.constants.actions[action]
        if name in moves:
            dx, dy = moves[name]
            assert sem[x + dx, y + dy] != ID["lava"], agent.goal
