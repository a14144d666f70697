"""A scripted Crafter expert that plays from privileged information.

It reads the whole world's semantic map, its inventory, achievements, position and facing (the
``info`` of ``envs.crafter_env.CrafterEnv``) and returns one of crafter's 17 action indices. It is
the "existing expert" whose trajectories a supervised stage imitates, so besides acting it says
*why* it acts: :attr:`ScriptedCrafterAgent.goal` is a short text such as
``"drink: drink is 3/9, water 4 steps away"``.

Strategy, in priority order (the first rule that yields an action wins):

1. Asleep: nothing to do (crafter ignores actions while the player sleeps).
2. Fight a zombie or skeleton standing next to the player (running away rarely works: zombies
   are as fast as the player); attack a skeleton two steps away when armed.
3. Needs: drink at water, eat a cow (or a ripe plant), sleep, rest to heal. Each starts below a
   threshold and goes on until the stat is full (hysteresis, so the agent does not leave the
   lake after one sip). Nights are spent in a two-cell pocket sealed with stone, from dusk until
   the morning is bright (zombies swarm in the dark and hit sleepers for 7); before dusk the
   agent tops up food and drink, and prefers pockets with water in a wall (to drink inside) and
   near its plants (they only grow while the player is near).
4. Cheap chances: place a first stone, drink or eat when water or a cow is a few steps away, the
   first drink and cow (achievements) when close.
5. Defeat a nearby zombie (an achievement) when healthy.
6. Farming: collect a sapling (``do`` on grass), plant it, wall it in with stone against cows and
   zombies, come back when it is ripe and eat it; later keep a few plants as food. Crafter only
   grows a plant while the player is within 18 cells, so the agent counts those steps itself.
7. Tech tree: wood, table, wood pickaxe and sword, stone, stone pickaxe and sword, coal,
   furnace, iron, iron pickaxe and sword, diamond; then skeletons in the caves. Amounts and
   recipes are read from ``crafter.constants``; only the recipes that the tools at hand allow
   set the amounts, so the first trip for wood yields a sword and a pickaxe quickly. A table or
   furnace within reach is reused, else a new one is built.
8. Idle: stay by the plants, else rest in a shelter, else walk around.

Movement is a Dijkstra search with small integer costs (bucket queue) on the 64x64 map from the
player to the nearest cell that satisfies the goal, with an early exit. Cells the player can
clear are passable at a higher cost: trees (chop), stone/coal/iron/diamond with the right
pickaxe (tunnel: ``do`` then move) and water once the player has stone to bridge it. Cells next
to zombies and in a skeleton's line of fire cost extra. Lava is never entered: the search never
steps on it and a last check turns any move into lava into a ``noop``.

Walkable cells can only be faced by walking towards them (a move into a blocked cell only
turns the player), which shapes placing things, planting and sealing a shelter.
"""

from __future__ import annotations

import numpy as np
from crafter import constants

# -- ids: all derived from crafter's constants, in one place ------------------------------------

OBJECT_ORDER = ("player", "cow", "zombie", "skeleton", "arrow", "plant")
"""Object classes in the order ``crafter.Env`` passes them to its ``SemanticView``: their ids
follow the material ids (``World._mat_ids``: None=0, then ``constants.materials``)."""

_NAMES = (None, *constants.materials, *OBJECT_ORDER)
ID = {name: i for i, name in enumerate(_NAMES) if name is not None}
"""Semantic id of every material and object name."""

OUTSIDE = 63
"""Id of the padding around the map (off the world): solid and impassable."""
_LUT = 64  # size of the id lookup tables; larger than every id above
assert max(ID.values()) < OUTSIDE < _LUT

ACTION = {name: i for i, name in enumerate(constants.actions)}
_MOVE_NAME = {(-1, 0): "move_left", (1, 0): "move_right", (0, -1): "move_up", (0, 1): "move_down"}
_DIRS = tuple(_MOVE_NAME)
_DIR_WORD = {(-1, 0): "left", (1, 0): "right", (0, -1): "up", (0, 1): "down"}

WALKABLE = frozenset(ID[m] for m in constants.walkable)
"""Materials the player, cows and zombies can stand on (lava is walkable too, but deadly)."""
MAX = {name: info["max"] for name, info in constants.items.items()}

TOOLS = ("wood_pickaxe", "wood_sword", "stone_pickaxe", "stone_sword", "iron_pickaxe", "iron_sword")
"""Tools in crafting order: pickaxes first in each tier, since they unlock the next material."""
SOURCE = {
    item: material
    for material, rule in constants.collect.items()
    for item in rule["receive"]
    if material in ID and item not in ("drink", "sapling")
}
"""Material that yields each collectable item (wood: tree, stone: stone, ...)."""

_PAD = 4  # padding so that shifts of up to 3 cells (the shelter pocket) never wrap into the map
_INF = 1 << 30

# Thresholds (inclusive) at which a need starts; it then lasts until the stat is full.
DRINK_LOW, FOOD_LOW, ENERGY_LOW, HEALTH_LOW = 5, 5, 3, 5
NIGHT_BELOW = 0.5  # daylight under which the agent stays in a shelter
MORNING_ABOVE = 0.9  # in the morning, daylight to wait for before leaving the shelter
DUSK = 30  # steps before the night in which food and drink are topped up
DUSK_LOW = 7  # drink or food at or below this is topped up at dusk
CRITICAL = 2  # a need this low interrupts the one being served
SHELTER_NEAR = 25  # a shelter with natural walls this close beats building walls
FARM_SHELTER_NEAR = 40  # walk this far to sleep where our plants grow
STATION_RANGE = 20  # walk back to a table/furnace up to this far, else build a new one
ZOMBIE_PENALTY = 6  # extra search cost of a cell next to a zombie
SKELETON_RANGE, SKELETON_PENALTY = 5, 4  # a skeleton shoots this far; extra cost in its lanes
SKELETON_CHASE = 2  # attack a skeleton this close rather than stay in its range
NEAR = 12  # keep gathering an item while a source is this close
PLANT_RANGE = 18  # crafter updates objects only within this L1 distance of the player
FARM_SIZE = 2  # plants kept as a food supply once eat_plant is unlocked
RIPE_AFTER = 315  # steps near the plant until it is ripe (crafter: grown > 300), with a margin


def _daylight(step: int) -> float:
    """Crafter's daylight at a step (``crafter.Env._update_time``); darkest at step 210 of 300."""
    progress = (step / 300) % 1 + 0.3
    return 1 - abs(float(np.cos(np.pi * progress))) ** 3


def _ids_mask(ids) -> np.ndarray:
    lut = np.zeros(_LUT, bool)
    lut[list(ids)] = True
    return lut


_SOLID = _ids_mask(
    ID[m] for m in ("water", "stone", "tree", "coal", "iron", "diamond", "table", "furnace")
) | _ids_mask([OUTSIDE])
"""Cells that no zombie or cow can enter and that stay put: the walls of a shelter. Lava is left
out on purpose: a shelter beside lava is one wrong move from death."""
_WALK = _ids_mask(WALKABLE)
_CREATURES = _ids_mask(ID[o] for o in ("cow", "zombie", "skeleton", "arrow"))
_ARROW_PASSES = frozenset(ID[m] for m in ("grass", "sand", "path", "water", "lava"))


def _shift(a: np.ndarray, d, k: int = 1) -> np.ndarray:
    """``out[c] = a[c + k*d]`` on a padded grid (the padding absorbs the wrap-around)."""
    return np.roll(a, (-k * d[0], -k * d[1]), axis=(0, 1))


def _near4(mask: np.ndarray) -> np.ndarray:
    """Cells with a 4-neighbour in ``mask``."""
    out = np.zeros_like(mask)
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _near8(mask: np.ndarray) -> np.ndarray:
    """Cells whose 3x3 block (crafter's ``nearby(pos, 1)``) meets ``mask``."""
    rows = mask.copy()
    rows[1:] |= mask[:-1]
    rows[:-1] |= mask[1:]
    out = rows.copy()
    out[:, 1:] |= rows[:, :-1]
    out[:, :-1] |= rows[:, 1:]
    return out


def _bytes(mask: np.ndarray) -> bytes:
    """A flat bool mask as bytes: indexing gives 0/1 and is fast in the search loop."""
    return np.ascontiguousarray(mask, dtype=np.uint8).tobytes()


class _Frame:
    """One step's view of the world on a padded grid with flat cell indices."""

    def __init__(self, info: dict):
        sem = np.asarray(info["semantic"])
        self.grid = np.full((sem.shape[0] + 2 * _PAD, sem.shape[1] + 2 * _PAD), OUTSIDE, np.intp)
        self.grid[_PAD:-_PAD, _PAD:-_PAD] = sem
        self.width = self.grid.shape[1]
        self.cells = self.grid.ravel().tolist()
        self.xy = (int(info["player_pos"][0]), int(info["player_pos"][1]))
        self.pos = self.flat(self.xy)
        self.facing = tuple(int(v) for v in info["facing"])
        self.inv = dict(info["inventory"])
        self.ach = dict(info["achievements"])
        self.offsets = {d: d[0] * self.width + d[1] for d in _DIRS}
        self.dir_of = {o: d for d, o in self.offsets.items()}

    def flat(self, xy) -> int:
        return (xy[0] + _PAD) * self.width + xy[1] + _PAD

    def xy_of(self, i: int) -> tuple[int, int]:
        return i // self.width - _PAD, i % self.width - _PAD

    def mask(self, *names: str) -> np.ndarray:
        return _ids_mask(ID[n] for n in names)[self.grid]

    def l1(self, i: int, j: int) -> int:
        (ax, ay), (bx, by) = self.xy_of(i), self.xy_of(j)
        return abs(ax - bx) + abs(ay - by)


class ScriptedCrafterAgent:
    """Scripted Crafter expert playing from privileged information (see the module docstring).

    Call :meth:`reset` at every episode start and :meth:`act` with every ``info`` (the one from
    ``reset`` first); :attr:`goal` then says what the last action pursued and why. Given the seed
    and the same infos the actions are the same: the only randomness (the idle walk) comes from
    the agent's own generator, re-seeded from ``(seed, episode)`` on every reset.
    """

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self._episodes = 0
        self.reset()

    # -- public API -----------------------------------------------------------------------------

    def reset(self) -> None:
        self._rng = np.random.default_rng([self.seed, self._episodes])
        self._episodes += 1
        self._t = 0  # steps this episode: crafter's day/night cycle is a function of it
        self._need: str | None = None  # drink / food / sleep, kept until the stat is full
        self._shelter: tuple[int, tuple[int, int]] | None = None  # (approach cell, direction)
        self._bad_shelters: set[tuple[int, tuple[int, int]]] = set()  # found unbuildable
        self._plants: dict[int, int] = {}  # our plants: cell -> steps the player was near it
        self._eaten = 0  # eat_plant count when last seen, to notice a successful meal
        self._wander: int | None = None  # idle walk target
        self._bridge: int | None = None  # water cell being bridged with a stone
        self._goal = "start: nothing decided yet"
        self.f: _Frame | None = None

    @property
    def goal(self) -> str:
        """What the last :meth:`act` pursued and why, e.g. ``"drink: drink is 3/9, ..."``."""
        return self._goal

    def act(self, info: dict) -> int:
        self.f = _Frame(info)
        self._t += 1
        self._track_plants()
        self._costs = self._cost_table(guard_plant=True)
        self._station_cache: dict[tuple[str, ...], bool] = {}
        decision = None
        if info.get("sleeping", False):
            decision = ACTION["noop"], f"sleep: asleep, energy {self._stat('energy')}"
        for rule in (
            self._fight, self._cross_bridge, self._needs, self._chances, self._hunt_zombie,
            self._farm, self._tech, self._idle,
        ):  # fmt: skip
            if decision is not None:
                break
            decision = rule()
        action, self._goal = decision
        return self._never_into_lava(action)

    # -- helpers: state -------------------------------------------------------------------------

    def _stat(self, name: str) -> str:
        return f"{self.f.inv[name]}/{MAX[name]}"

    def _is_night(self, ahead: int = 0) -> bool:
        """Is it (or will it be in ``ahead`` steps) a time to be in a shelter?

        Crafter wants up to ``3.5 - 3 * daylight`` zombies per grass chunk: two or more below
        daylight 0.5 (steps 150 to 270 of every 300). The zombies of the night only despawn once
        the day is bright, so the shelter is left late in the morning.
        """
        step = self._t + ahead
        light = _daylight(step)
        phase = step % 300
        rising = phase >= 210 or phase < 60  # darkest at 210, brightest at 60
        return light < NIGHT_BELOW or (rising and light < MORNING_ABOVE)

    def _cost_table(self, guard_plant: bool) -> list[int]:
        """Per-cell step cost for the search (0 = impassable), from the map and current tools.

        With ``guard_plant`` the stone around our plants is not mined through (it is their wall).
        """
        inv = self.f.inv
        lut = np.zeros(_LUT, np.intp)
        lut[list(WALKABLE)] = 1
        lut[ID["player"]] = 1
        for material, rule in constants.collect.items():
            if material in ("water", "grass") or material not in ID:
                continue
            if all(inv[k] >= v for k, v in rule["require"].items()):
                lut[ID[material]] = 2  # do, then move
        if lut[ID["stone"]] and inv["stone"] >= 1:
            lut[ID["water"]] = 3  # place stone on it, mine it, step on the path it leaves
        costs = lut[self.f.grid]
        # Walking next to a zombie costs a hit (2 health): go around when that is cheap.
        costs += (costs > 0) * _near4(self.f.grid == ID["zombie"]) * ZOMBIE_PENALTY
        costs = costs.ravel().tolist()
        self._avoid_arrows(costs)
        if guard_plant:
            for c in self._plant_wall():
                if costs[c] > 1:
                    costs[c] = 0
        return costs

    def _avoid_arrows(self, costs: list[int]) -> None:
        """Make the cells a skeleton can shoot along (its row and column) dearer to walk.

        Skeletons shoot along the axis towards the player when it is within 5 cells, and an
        arrow hits for 2; off those lanes the player is safe from them.
        """
        f = self.f
        for s in np.flatnonzero(f.grid.ravel() == ID["skeleton"]).tolist():
            for off in f.dir_of:
                c = s
                for _ in range(SKELETON_RANGE):
                    c += off
                    if not costs[c] or not (f.cells[c] in _ARROW_PASSES or _CREATURES[f.cells[c]]):
                        break
                    costs[c] += SKELETON_PENALTY

    def _plant_wall(self) -> list[int]:
        """Cells around our plants: mining them (or chopping a tree there) exposes them."""
        return [c + off for c in self._plants for off in self.f.dir_of]

    def _never_into_lava(self, action: int) -> int:
        """Last line of defence: a move whose target is lava is the one action that kills."""
        f = self.f
        for d, name in _MOVE_NAME.items():
            if action == ACTION[name] and f.cells[f.pos + f.offsets[d]] == ID["lava"]:
                self._goal += " (move into lava refused)"
                return ACTION["noop"]
        return action

    # -- helpers: search and movement -----------------------------------------------------------

    def _search(self, goal=None, ahead=None, stand=None, limit=_INF):
        """Cheapest path (list of cells, player first) to a cell that satisfies the goal.

        A cell satisfies it if ``goal[cell]``, or if ``ahead[cell + heading]`` where heading is
        the direction the player faces on arriving there (and, when given, ``stand[cell]``).
        Returns ``(path, cost)`` or ``None``.
        """
        f, cost = self.f, self._costs
        start = f.pos
        dist = {start: 0}
        parent = {start: start}
        heading = {start: f.offsets[f.facing]}
        buckets = [[start]]
        c = 0
        while c < len(buckets):
            for i in buckets[c]:
                if dist[i] != c:
                    continue  # reached more cheaply later
                if (goal is not None and goal[i]) or (
                    ahead is not None and ahead[i + heading[i]] and (stand is None or stand[i])
                ):
                    path = [i]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return path[::-1], c
                for off in f.dir_of:
                    j = i + off
                    w = cost[j]
                    if w and c + w < dist.get(j, _INF) and c + w <= limit:
                        dist[j] = c + w
                        parent[j] = i
                        heading[j] = off
                        while len(buckets) <= c + w:
                            buckets.append([])
                        buckets[c + w].append(j)
            c += 1
        return None

    def _move(self, d) -> int:
        return ACTION[_MOVE_NAME[d]]

    def _step(self, path) -> int:
        """Action that makes progress along ``path``: walk, or clear the next cell first."""
        f = self.f
        d = f.dir_of[path[1] - path[0]]
        cell = f.cells[path[1]]
        if cell in WALKABLE:
            return self._move(d)
        if f.facing != d:
            return self._move(d)  # the next cell is blocked, so this only turns the player
        if cell == ID["water"]:
            self._bridge = path[1]
            return ACTION["place_stone"]  # bridge: mine the stone next, then step on the path
        return ACTION["do"]

    def _cross_bridge(self):
        """Finish a water crossing that was started, whatever rule comes first now.

        Without this commitment, the rule that asked for the crossing may no longer apply once
        the stone is spent (for example one that needs a stone) and another would mine the bridge
        stone back, forever.
        """
        f = self.f
        bridge, self._bridge = self._bridge, None
        if bridge is None or f.pos + f.offsets[f.facing] != bridge:
            return None
        if f.cells[bridge] == ID["stone"] and self._costs[bridge]:
            self._bridge = bridge
            return ACTION["do"], f"{self._goal.split(' (')[0]} (crossing water: mine the bridge)"
        if f.cells[bridge] in WALKABLE:
            return self._move(f.facing), f"{self._goal.split(' (')[0]} (crossing water)"
        return None

    def _reach(self, mask: np.ndarray, action: str, limit=_INF):
        """Go next to a non-walkable target cell in ``mask``, face it and apply ``action``.

        Returns ``(action, steps)`` or ``None`` when no target is reachable within ``limit``.
        """
        f = self.f
        found = self._search(goal=_bytes(_near4(mask)), limit=limit)
        if found is None:
            return None
        path, steps = found
        if len(path) > 1:
            return self._step(path), steps
        flat = mask.ravel()
        targets = [d for d in _DIRS if flat[f.pos + f.offsets[d]]]
        d = f.facing if f.facing in targets else targets[0]
        # Targets are blocked cells (materials or creatures), so moving towards one only turns.
        return (ACTION[action] if f.facing == d else self._move(d)), 0

    def _reach_facing(self, mask: np.ndarray, action: str, stand=None, limit=_INF):
        """Face a cell in ``mask`` (walkable ones too, by arriving towards it) and ``action``.

        ``stand`` optionally restricts the cells the player may act from. Returns
        ``(action, steps)`` or ``None``.
        """
        f = self.f
        flat = mask.ravel()
        if flat[f.pos + f.offsets[f.facing]] and (stand is None or stand.ravel()[f.pos]):
            return ACTION[action], 0
        stand_bytes = None if stand is None else _bytes(stand)
        found = self._search(ahead=_bytes(mask), stand=stand_bytes, limit=limit)
        if found is not None and len(found[0]) > 1:
            return self._step(found[0]), found[1]
        return self._approach_facing(mask, stand, limit)

    def _approach_facing(self, mask: np.ndarray, stand, limit):
        """Fallback of :meth:`_reach_facing`: go two cells short of a target, then walk at it.

        An open cell can only be faced by walking towards it, so acting on target ``t`` in
        direction ``d`` means standing on ``s = t - d`` having come from ``u = t - 2d``. The
        search keeps one heading per cell and can miss that; planning to ``u`` cannot.
        """
        f = self.f
        passable = np.asarray(self._costs, bool).reshape(f.grid.shape)
        if stand is not None:
            passable &= stand
        starts = np.zeros(f.grid.shape, bool)
        for d in _DIRS:
            starts |= _shift(mask, d, 2) & _shift(passable, d, 1)
        found = self._search(goal=_bytes(starts), limit=limit)
        if found is None:
            return None
        path, steps = found
        if len(path) > 1:
            return self._step(path), steps + 2
        flat, ok = mask.ravel(), passable.ravel()
        for d in _DIRS:
            s = f.pos + f.offsets[d]
            if ok[s] and flat[s + f.offsets[d]]:
                return self._step([f.pos, s]), 2
        return None

    # -- rule 2: fight what stands next to the player -------------------------------------------

    def _fight(self):
        f = self.f
        for d in (f.facing,) + _DIRS:
            cell = f.cells[f.pos + f.offsets[d]]
            for enemy in ("zombie", "skeleton"):
                if cell == ID[enemy]:
                    act = ACTION["do"] if f.facing == d else self._move(d)
                    return act, (
                        f"fight: {enemy} adjacent ({_DIR_WORD[d]}), health {self._stat('health')}"
                    )
        # A skeleton close by keeps shooting (2 per arrow) and has only 3 health: go for it.
        armed = f.inv["wood_sword"] or f.inv["stone_sword"] or f.inv["iron_sword"]
        if armed and f.inv["health"] >= 4 and self._creature_within("skeleton", SKELETON_CHASE):
            found = self._reach(f.mask("skeleton"), "do", limit=SKELETON_CHASE + 1)
            if found is not None:
                return found[0], f"fight: skeleton shooting from {found[1] + 1} steps away"
        return None

    def _skeleton_lanes(self, cell: int) -> list[tuple[int, int]]:
        """Directions from ``cell`` in which a skeleton can shoot at it (clear line, in range)."""
        f = self.f
        lanes = []
        for d, off in f.offsets.items():
            c = cell
            for _ in range(SKELETON_RANGE):
                c += off
                if f.cells[c] == ID["skeleton"]:
                    lanes.append(d)
                    break
                if not (f.cells[c] in _ARROW_PASSES or f.cells[c] in (ID["arrow"], ID["player"])):
                    break
        return lanes

    def _block_arrows(self):
        """In a shelter, stone the water wall that a skeleton could shoot through.

        Arrows fly over water, so a water wall keeps zombies out but not arrows.
        """
        f = self.f
        if f.inv["stone"] < 1:
            return None
        for d in self._skeleton_lanes(f.pos):
            if f.cells[f.pos + f.offsets[d]] == ID["water"]:
                act = ACTION["place_stone"] if f.facing == d else self._move(d)
                return act, f"shelter: a skeleton can shoot from the {_DIR_WORD[d]} over water"
        return None

    # -- rule 3: needs --------------------------------------------------------------------------

    def _needs(self):
        self._need = self._choose_need()
        if self._need == "sleep" and self._is_night(DUSK) and not self._is_night():
            dusk = self._dusk_supplies()
            if dusk:
                return dusk
        if self._need == "drink":
            return self._drink()
        if self._need == "food":
            return self._eat()
        if self._need in ("sleep", "rest"):
            return self._sleep()
        return None

    def _choose_need(self) -> str | None:
        """The need to serve: kept until its stat is full, unless another one becomes critical.

        Nights are spent in a shelter (zombies spawn in numbers in the dark), so at night only
        a critical thirst or hunger is worth going out for, and only until it is bearable.
        """
        inv = self.f.inv
        night = self._is_night(DUSK)
        full = {
            "drink": inv["drink"] >= (DUSK_LOW + 1 if night else MAX["drink"]),
            "food": inv["food"] >= (DUSK_LOW + 1 if night else MAX["food"] - 1),
            "sleep": inv["energy"] >= MAX["energy"] and not night,
            "rest": inv["health"] >= MAX["health"] - 1,
        }  # food stops one short of full: a cow gives 6, not worth chasing for 1
        need = None if self._need is None or full[self._need] else self._need
        low = []
        if inv["drink"] <= (CRITICAL if night else DRINK_LOW):
            low.append((inv["drink"], 0, "drink"))
        if inv["food"] <= (CRITICAL if night else FOOD_LOW):
            low.append((inv["food"], 1, "food"))
        if inv["energy"] <= ENERGY_LOW or night:
            low.append((inv["energy"], 2, "sleep"))
        if inv["health"] <= HEALTH_LOW:
            low.append((inv["health"], 3, "rest"))
        if not low:
            return need
        urgent = min(low)
        if need is None or (urgent[0] <= CRITICAL and urgent[2] != need):
            return urgent[2]
        return need

    def _dusk_supplies(self):
        """Before a night in the shelter, drink and eat if it is cheap: nights are long."""
        inv = self.f.inv
        if inv["drink"] <= DUSK_LOW:
            found = self._drink(limit=30, why=f"night is coming and drink is {self._stat('drink')}")
            if found:
                return found
        if inv["food"] <= DUSK_LOW:
            return self._eat(limit=30, why=f"night is coming and food is {self._stat('food')}")
        return None

    def _drink(self, limit=_INF, why=None):
        found = self._reach(self.f.mask("water"), "do", limit)
        if found is None:
            return None
        why = why or f"drink is {self._stat('drink')}"
        return found[0], f"drink: {why}, water {found[1]} steps away"

    def _eat(self, limit=_INF, why=None):
        f = self.f
        why = why or f"food is {self._stat('food')}"
        ripe = self._ripe_plants()
        if ripe:
            guarded, self._costs = self._costs, self._cost_table(guard_plant=False)
            found = self._reach(self._plant_mask(ripe), "do")
            self._costs = guarded
            if found is not None:
                return found[0], f"eat: {why}, ripe plant {found[1]} steps away"
        found = self._reach(f.mask("cow"), "do", limit)
        if found is None:
            return None
        return found[0], f"eat: {why}, cow {found[1]} steps away"

    # -- sleeping in a sealed pocket ------------------------------------------------------------

    def _sleep(self):
        """Sleep (or, at full energy, rest to heal) inside a sealed shelter."""
        f = self.f
        if self._need == "rest":
            why = f"rest: health is {self._stat('health')}"
        elif f.inv["energy"] >= MAX["energy"]:
            why = "sleep: it is night, waiting for the day in a shelter"
        else:
            why = f"sleep: energy is {self._stat('energy')}"
            if self._is_night():
                why += " and it is night"
        can_sleep = f.inv["energy"] < MAX["energy"]  # crafter refuses to sleep at full energy
        final = ACTION["sleep"] if can_sleep else ACTION["noop"]
        found = self._take_shelter(why, final)
        if found is not None:
            return found
        # In the open a zombie hits a sleeper for 7: only sleep there when exhausted.
        if f.inv["energy"] > 1 or self._creature_within("zombie", 8):
            return None
        return final, f"{why}, no shelter reachable so sleeping in the open"

    def _take_shelter(self, why: str, final: int, limit=_INF):
        """Go into a sealed pocket (building it if needed), then ``final``; None if none."""
        if self._sealed():
            self._bad_shelters.clear()
            blocked = self._block_arrows()
            if blocked:
                return blocked
            if self.f.inv["drink"] <= MAX["drink"] - 2:
                found = self._drink(limit=1, why=f"drink is {self._stat('drink')}, in the shelter")
                if found:
                    return found
            return final, f"{why}, shelter sealed"
        if self._shelter is None or not self._pocket_ok(*self._shelter):
            self._shelter = self._find_shelter(limit)
        for _ in range(3):  # a pocket can turn out unbuildable: then try the next nearest
            if self._shelter is None:
                return None
            found = self._build_shelter(why)
            if found is not None:
                return found
            self._bad_shelters.add(self._shelter)
            self._shelter = self._find_shelter(limit)
        return None

    def _sealed(self) -> bool:
        """Is the player in a pocket of at most 3 cells that no creature can walk into?"""
        f = self.f
        seen, todo = {f.pos}, [f.pos]
        while todo:
            i = todo.pop()
            for off in f.dir_of:
                j = i + off
                cell = f.cells[j]
                if j in seen or not (cell in WALKABLE or _CREATURES[cell]):
                    continue
                if cell == ID["zombie"] or len(seen) >= 3:
                    return False
                seen.add(j)
                todo.append(j)
        return True

    def _creature_within(self, name: str, radius: int) -> bool:
        xs, ys = np.nonzero(self.f.grid == ID[name])
        x, y = self.f.xy
        return bool(np.any(np.abs(xs - _PAD - x) + np.abs(ys - _PAD - y) <= radius))

    def _pocket_parts(self, q: int, d):
        off = self.f.offsets[d]
        side = self.f.offsets[(d[1], d[0])]
        p, x = q + off, q + 2 * off
        return p, x, q + 3 * off, (p + side, p - side, x + side, x - side)

    def _pocket_ok(self, q: int, d) -> bool:
        """Can the pocket approached from ``q`` in direction ``d`` still be built?

        Pocket: cells ``p = q+d`` and ``x = q+2d`` (walkable, or stone to tunnel into). Its four
        side cells are walled with stone first where open (from wherever they can be faced), then
        the player walks in to ``x`` (stoning the front ``q+3d`` if open), steps back to ``p``,
        now facing ``q``, and stones it. A single cell cannot be sealed: an open cell can only be
        faced by walking towards it, so the cell the player came from would stay open.
        """
        f, cells = self.f, self.f.cells
        p, x, front, sides = self._pocket_parts(q, d)
        if not (cells[q] in WALKABLE or cells[q] == ID["player"]):
            return False
        stone = ID["stone"] if self._costs_stone() else -1
        if not all(cells[c] in WALKABLE or cells[c] in (stone, ID["player"]) for c in (p, x)):
            return False
        if {p, x} & set(self._plant_wall()):
            return False
        walls = (front, *sides)
        if not all(_SOLID[cells[c]] or self._sealable(c) or _CREATURES[cells[c]] for c in walls):
            return False  # a creature passing by only delays the wall
        open_sides = sum(not _SOLID[cells[c]] for c in sides)
        needed = 1 + open_sides + self._sealable(front)
        gained = sum(cells[c] == ID["stone"] for c in (p, x))
        return f.inv["stone"] >= open_sides and f.inv["stone"] + gained >= needed

    def _sealable(self, c: int) -> bool:
        """Open cell that a stone can be placed on (the player's own cell counts: it moves)."""
        return self.f.cells[c] in WALKABLE or self.f.cells[c] == ID["player"]

    def _costs_stone(self) -> bool:
        return all(self.f.inv[k] >= v for k, v in constants.collect["stone"]["require"].items())

    def _find_shelter(self, limit=_INF):
        """Nearest approach cell of a buildable pocket, preferring natural walls.

        Every cell is tested at once with shifted copies of the map; pockets that need side walls
        placed are a fallback, since each costs a stone and several steps.
        """
        if not self._costs_stone():
            return None  # without a pickaxe the player could not dig itself out again
        f = self.f
        g = f.grid
        walk = _WALK[g] | (g == ID["player"])
        stone = g == ID["stone"]
        enter = walk | stone
        if self._plants:
            enter &= ~_near4(self._plant_mask())  # never dig into a plant's wall
        solid = _SOLID[g]
        water = g == ID["water"]
        inv = f.inv["stone"]
        by_open_sides = [np.zeros(g.shape, bool) for _ in range(5)]
        by_water = np.zeros(g.shape, bool)
        for d in _DIRS:
            side = (d[1], d[0])
            front_walk = _shift(walk, d, 3)
            ok = walk & _shift(enter, d, 1) & _shift(enter, d, 2)
            ok &= front_walk | _shift(solid, d, 3)
            open_sides = np.zeros(g.shape, int)
            near_water = _shift(water, d, 3)
            for k in (1, 2):
                for sign in (1, -1):
                    along_solid = _shift(_shift(solid, d, k), side, sign)
                    along_walk = _shift(_shift(walk, d, k), side, sign)
                    ok &= along_solid | along_walk
                    open_sides += along_walk
                    near_water |= _shift(_shift(water, d, k), side, sign)
            gained = _shift(stone, d, 1).astype(int) + _shift(stone, d, 2)
            ok &= (inv >= open_sides) & (inv + gained >= 1 + open_sides + front_walk)
            for n in range(5):
                by_open_sides[n] |= ok & (open_sides == n)
            by_water |= ok & near_water & (open_sides <= 2)
        # Preference: near our plants (they grow while the player sleeps nearby), water in a
        # wall (drink without going out), natural walls, then any.
        farm = self._near_plants(PLANT_RANGE - 6)
        choices = (
            (by_water & farm, FARM_SHELTER_NEAR), (by_open_sides[0] & farm, FARM_SHELTER_NEAR),
            (by_water, SHELTER_NEAR), (by_open_sides[0], SHELTER_NEAR),
            (np.logical_or.reduce(by_open_sides), limit),
        )  # fmt: skip
        for mask, most in choices:
            for q, _ in self._bad_shelters:
                mask.ravel()[q] = False
            found = self._search(goal=_bytes(mask), limit=min(limit, most))
            if found is not None:
                break
        if found is None:
            return None
        q = found[0][-1]
        for d in _DIRS:
            if (q, d) not in self._bad_shelters and self._pocket_ok(q, d):
                return q, d
        return None

    def _build_shelter(self, why: str):
        """Walk the steps of building the planned pocket (see :meth:`_pocket_ok`)."""
        _, _, front, sides = self._pocket_parts(*self._shelter)
        # Searches must not mine through the walls just placed.
        unguarded = self._costs
        self._costs = list(unguarded)
        for c in (front, *sides):
            self._costs[c] = 0
        try:
            return self._shelter_step(why)
        finally:
            self._costs = unguarded

    def _shelter_step(self, why: str):
        f = self.f
        q, d = self._shelter
        back = (-d[0], -d[1])
        p, x, front, sides = self._pocket_parts(q, d)
        cells = f.cells
        gaps = [c for c in sides if not _SOLID[cells[c]]]
        if gaps:
            mask = np.zeros(f.grid.size, bool)
            mask[gaps] = True
            found = self._reach_facing(mask.reshape(f.grid.shape), "place_stone", limit=30)
            if found is None:
                return None
            return found[0], f"{why}, walling a shelter ({len(gaps)} side gaps left)"
        if f.pos == x:
            if cells[front] in WALKABLE and f.facing == d:
                return ACTION["place_stone"], f"{why}, walling the front of the shelter"
            return self._move(back), f"{why}, stepping back to close the entrance"
        if f.pos == p and f.facing == back:
            if cells[q] in WALKABLE:
                return ACTION["place_stone"], f"{why}, closing the shelter entrance"
            return ACTION["noop"], f"{why}, waiting for the entrance to clear"
        if f.pos in (p, q):
            nxt = x if f.pos == p else p
            if cells[nxt] in WALKABLE or f.facing != d:
                return self._move(d), f"{why}, entering the shelter"
            return ACTION["do"], f"{why}, tunnelling into the shelter"
        found = self._search(goal=_bytes(np.arange(f.grid.size) == q))
        if found is None:
            return None
        return self._step(found[0]), f"{why}, shelter {found[1]} steps away"

    # -- rule 4 and 5: chances and zombies ------------------------------------------------------

    def _chances(self):
        f = self.f
        inv, ach = f.inv, f.ach
        if inv["stone"] >= 1 and not ach["place_stone"]:
            where = f.mask(*constants.place["stone"]["where"]) & ~f.mask("lava")
            found = self._reach_facing(where, "place_stone", limit=4)
            if found:
                return found[0], "place stone: never placed one yet (achievement)"
        if inv["drink"] <= MAX["drink"] - 2:
            found = self._drink(limit=2, why=f"water is close and drink is {self._stat('drink')}")
            if found:
                return found
        if inv["food"] <= MAX["food"] - 3:
            found = self._eat(limit=4, why=f"a cow is close and food is {self._stat('food')}")
            if found:
                return found
        # Unarmed, a zombie hits twice before it dies: stay closer to home until there is a sword.
        limit = 10 if inv["wood_sword"] or inv["stone_sword"] or inv["iron_sword"] else 5
        if not ach["collect_drink"]:
            found = self._drink(limit=limit, why="never drunk yet (achievement)")
            if found:
                return found
        if not ach["eat_cow"]:
            found = self._eat(limit=limit, why="never eaten a cow yet (achievement)")
            if found:
                return found
        return None

    def _hunt_zombie(self):
        """Go for a zombie: a near one for the achievement, later only one about to arrive."""
        f = self.f
        health = f.inv["health"]
        first = not f.ach["defeat_zombie"]
        radius = 8 if first else 2
        if health < (5 if first else 3) or not self._creature_within("zombie", radius):
            return None
        found = self._reach(f.mask("zombie"), "do", limit=radius + 4)
        if found is None:
            return None
        why = "defeat a zombie (achievement)" if first else "zombie closing in"
        return found[0], f"fight: {why}, zombie {found[1]} steps away"

    # -- rule 6: farming ------------------------------------------------------------------------

    def _track_plants(self):
        """Keep the growth count of our plants; forget the ones that are gone."""
        f = self.f
        if f.ach["eat_plant"] > self._eaten:
            self._eaten = f.ach["eat_plant"]
            eaten = f.pos + f.offsets[f.facing]
            if eaten in self._plants:
                self._plants[eaten] = 0  # eating resets the plant's growth
        for cell in list(self._plants):
            if f.cells[cell] != ID["plant"]:
                del self._plants[cell]  # trampled or hit by a cow or a zombie
            elif f.l1(f.pos, cell) < PLANT_RANGE:
                self._plants[cell] += 1

    def _near_plants(self, radius: int) -> np.ndarray:
        """Cells within L1 ``radius`` of one of our plants."""
        f = self.f
        xs = np.arange(f.grid.shape[0])[:, None] - _PAD
        ys = np.arange(f.grid.shape[1])[None, :] - _PAD
        near = np.zeros(f.grid.shape, bool)
        for cell in self._plants:
            px, py = f.xy_of(cell)
            near |= np.abs(xs - px) + np.abs(ys - py) <= radius
        return near

    def _ripe_plants(self) -> list[int]:
        return [c for c, age in self._plants.items() if age > RIPE_AFTER]

    def _plant_mask(self, cells=None) -> np.ndarray:
        mask = np.zeros(self.f.grid.size, bool)
        mask[list(self._plants if cells is None else cells)] = True
        return mask.reshape(self.f.grid.shape)

    def _farm(self):
        """Plant saplings, wall them in and eat them when ripe: food that comes back.

        One plant until ``eat_plant`` is unlocked, then ``FARM_SIZE`` as a food supply (cows
        get scarce: they respawn slowly), planted only with the stone to wall them in at once.
        """
        f = self.f
        inv = f.inv
        first = not f.ach["eat_plant"]
        if self._ripe_plants() and (first or inv["food"] <= MAX["food"] - 4):
            why = (
                "a plant is ripe (achievement)" if first else f"a plant is ripe, food {inv['food']}"
            )
            found = self._eat(why=why)
            if found:
                return found
        for plant in self._plants:
            found = self._protect_plant(plant)
            if found:
                return found
        if len(self._plants) >= (1 if first else FARM_SIZE):
            return None
        if not first and inv["stone"] < len(_DIRS):
            return None
        grass = f.mask("grass")
        if inv["sapling"] < 1:
            found = self._reach_facing(grass, "do", limit=NEAR)
            if found is None:
                return None
            return found[0], "farm: collect a sapling from grass (10% chance per try)"
        found = self._reach_facing(grass, "place_plant", limit=NEAR)
        if found is None:
            return None
        if found[0] == ACTION["place_plant"]:
            self._plants[f.pos + f.offsets[f.facing]] = 0
        return found[0], "farm: plant the sapling, it is ripe to eat after a while"

    def _protect_plant(self, plant: int):
        """Wall a plant in with stone: a cow or zombie next to it destroys it."""
        f = self.f
        gaps = np.zeros(f.grid.shape, bool)
        for off in f.dir_of:
            if f.cells[plant + off] in WALKABLE:
                gaps.ravel()[plant + off] = True
        if not gaps.any() or f.inv["stone"] < gaps.sum():
            return None  # wall it in one go rather than one stone per trip
        found = self._reach_facing(gaps, "place_stone", limit=30)
        if found is None:
            return None
        left = int(gaps.sum())
        return found[0], f"farm: wall in the plant against cows and zombies, {left} gaps left"

    # -- rule 7: tech tree ----------------------------------------------------------------------

    def _todo(self) -> list[str]:
        return [t for t in TOOLS if self.f.inv[t] < 1]

    def _can_collect(self, item: str) -> bool:
        rule = constants.collect[SOURCE[item]]
        return all(self.f.inv[k] >= v for k, v in rule["require"].items())

    def _station(self, names) -> np.ndarray:
        """Cells from which crafting with all of ``names`` nearby works."""
        mask = np.ones(self.f.grid.shape, bool)
        for name in names:
            mask &= _near8(self.f.mask(name))
        return mask

    def _target(self, item: str) -> int:
        """How many of ``item`` to hold: what the remaining recipes and buildings use.

        Only recipes whose ingredients can all be had with the tools at hand count, so that
        the first trip for wood yields a sword and a pickaxe quickly rather than wood for all.
        """
        f = self.f
        todo = [t for t in self._todo() if self._within_reach(t)]
        amount = sum(constants.make[t]["uses"].get(item, 0) for t in todo)
        if todo and not self._station_near(("table",)):
            amount += constants.place["table"]["uses"].get(item, 0)
        furnace_needed = any("furnace" in constants.make[t]["nearby"] for t in todo)
        if furnace_needed and not self._station_near(("table", "furnace")):
            amount += constants.place["furnace"]["uses"].get(item, 0)
        if item == "stone":
            amount += 0 if f.ach["place_stone"] else 1
            amount += 4  # spare for shelters and the plant's wall
        if not f.ach[f"collect_{item}"]:
            amount = max(amount, 1)  # one unlocks the achievement, whatever the recipes need
        return min(amount, MAX[item])

    def _within_reach(self, tool: str) -> bool:
        """Can every ingredient of ``tool`` be had with the tools at hand?"""
        uses = constants.make[tool]["uses"]
        return all(self.f.inv[k] >= v or self._can_collect(k) for k, v in uses.items())

    def _station_near(self, names) -> bool:
        """Is a crafting spot with all of ``names`` nearby within reach? (cached per step)"""
        key = tuple(names)
        if key not in self._station_cache:
            found = self._search(goal=_bytes(self._station(names)), limit=STATION_RANGE)
            self._station_cache[key] = found is not None
        return self._station_cache[key]

    def _gather(self, item: str, limit=_INF):
        """Go to the nearest source of ``item`` (never a plant's wall) and collect it."""
        f = self.f
        mask = f.mask(SOURCE[item])
        if self._plants:
            mask &= ~_near4(self._plant_mask())  # the plants' wall
        found = self._reach(mask, "do", limit)
        if found is None:
            return None
        have, want = f.inv[item], self._target(item)
        return found[0], (
            f"collect {item}: have {have}, want {want}, {SOURCE[item]} {found[1]} steps away"
        )

    def _tech(self):
        """Next step up the tech tree: craft, top up nearby items, build, gather, diamond."""
        f = self.f
        inv = f.inv
        todo = self._todo()
        makeable = [
            t for t in todo if all(inv[k] >= v for k, v in constants.make[t]["uses"].items())
        ]
        for tool in makeable:
            if self._station_near(constants.make[tool]["nearby"]):
                return self._craft(tool)
        # Top up items whose source is close by, so that one trip serves several recipes.
        for item in ("wood", "stone", "coal", "iron", "diamond"):
            if self._can_collect(item) and inv[item] < self._target(item):
                found = self._gather(item, limit=NEAR)
                if found:
                    return found
        for tool in makeable:
            found = self._craft(tool)
            if found:
                return found
        # The furnace is an achievement of its own (and the iron tools need it): build it early.
        furnace_cost = constants.place["furnace"]["uses"]
        can_build = all(inv[k] >= v for k, v in furnace_cost.items())
        if not f.ach["place_furnace"] and can_build and self._station_near(("table",)):
            found = self._build("furnace", "next to the table (achievement)")
            if found:
                return found
        for tool in todo:
            missing = [k for k, v in constants.make[tool]["uses"].items() if inv[k] < v]
            for item in missing:
                if self._can_collect(item):
                    found = self._gather(item)
                    if found:
                        return found[0], found[1] + f" (for {tool})"
            if missing:
                break  # later tools need this one first
        if inv["iron_pickaxe"] and not f.ach["collect_diamond"]:
            found = self._gather("diamond")
            if found:
                return found
        return self._hunt_skeleton()

    def _craft(self, tool: str):
        """Walk to a spot with the stations ``tool`` needs and make it; build them if none."""
        nearby = constants.make[tool]["nearby"]
        found = self._search(goal=_bytes(self._station(nearby)), limit=STATION_RANGE)
        if found is not None:
            path, steps = found
            if len(path) == 1:
                return ACTION[f"make_{tool}"], f"craft {tool}: at the {' and '.join(nearby)}"
            return self._step(path), f"craft {tool}: {' and '.join(nearby)} {steps} steps away"
        if not self._station_near(("table",)):
            return self._build("table", f"for {tool}")
        return self._build("furnace", f"for {tool}")

    def _build(self, name: str, why: str):
        """Place a table, or a furnace where one can stand next to it and the table."""
        f = self.f
        uses = constants.place[name]["uses"]
        missing = [k for k, v in uses.items() if f.inv[k] < v]
        if missing:
            item = missing[0]
            found = self._gather(item) if self._can_collect(item) else None
            if found is None:
                return None
            return found[0], f"{found[1]} (to build a {name} {why})"
        where = f.mask(*constants.place[name]["where"])
        stand = self._station(("table",)) if name == "furnace" else None
        found = self._reach_facing(where, f"place_{name}", stand=stand, limit=STATION_RANGE)
        if found is None:
            return None
        return found[0], f"place {name}: none within {STATION_RANGE} steps, needed {why}"

    def _hunt_skeleton(self):
        """Go into the caves for a skeleton (an achievement) once a stone sword kills in one hit."""
        f = self.f
        if f.ach["defeat_skeleton"] or f.inv["health"] < 6:
            return None
        if not (f.inv["stone_sword"] or f.inv["iron_sword"]):
            return None
        found = self._reach(f.mask("skeleton"), "do", limit=80)
        if found is None:
            return None
        return found[0], f"fight: defeat a skeleton (achievement), skeleton {found[1]} steps away"

    # -- rule 8: idle ---------------------------------------------------------------------------

    def _idle(self):
        """Nothing to do: stay by the plants, else rest in a shelter, else walk around."""
        f = self.f
        if self._plants and min(f.l1(f.pos, c) for c in self._plants) > 5:
            found = self._search(goal=_bytes(_near8(self._plant_mask())), limit=60)
            if found and len(found[0]) > 1:
                return self._step(found[0]), "idle: go back to the plants, they only grow nearby"
        why = "idle: nothing left to do"
        found = self._take_shelter(why, ACTION["noop"], limit=30)
        return found if found is not None else self._wander_step(why)

    def _wander_step(self, why: str):
        """Walk to a random walkable cell close by (the agent's only use of randomness)."""
        f = self.f
        if self._wander is None or self._wander == f.pos or self._costs[self._wander] != 1:
            x, y = f.xy
            sub = _WALK[f.grid[x : x + 2 * _PAD + 1, y : y + 2 * _PAD + 1]]
            xs, ys = np.nonzero(sub)
            if len(xs) == 0:
                return ACTION["noop"], f"{why}, waiting"
            k = int(self._rng.integers(len(xs)))
            self._wander = f.flat((x + xs[k] - _PAD, y + ys[k] - _PAD))
        goal = np.zeros(f.grid.size, bool)
        goal[self._wander] = True
        found = self._search(goal=_bytes(goal), limit=30)
        if found is None or len(found[0]) < 2:
            self._wander = None
            return ACTION["noop"], f"{why}, waiting"
        return self._step(found[0]), f"{why}, wandering"
