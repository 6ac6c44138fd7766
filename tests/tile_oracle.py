"""The brute-force truth about tiles, and a seeded generator of random static masks.

:func:`tile_classes` classifies every tile of a problem by evaluating the mask on every pair
(``attncc._reference.pair_mask``, which shares no code with the analysis): the classes each of
the kernels' three walks must use.

- forward and dQ (per query block, its key blocks): EMPTY when no pair of the tile is allowed,
  FULL when every pair (existing query row, existing key) is allowed and the key block is whole
  (its last key exists: a kernel runs a FULL tile without any mask, key tail included), else
  PARTIAL;
- dK/dV (per key block, its query blocks): the same with the roles swapped: FULL needs the
  query block whole.

:func:`random_mask` draws a union of 1-3 clauses, each a conjunction of 1-3 atoms of the families
the analysis knows (bands, chunks, strides, dilations, 2D neighborhoods, global rows and columns,
sinks), with constants or int params; :func:`random_problem` draws lengths, offsets and a tile.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from attncc._reference import pair_mask
from attncc.core import tiles

TILE_SHAPES = [(16, 16), (16, 32), (32, 16), (64, 32), (32, 64), (128, 64)]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tile_classes(truth: torch.Tensor, block_m: int, block_n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(forward ``[nqb, nkb]``, dK/dV ``[nkb, nqb]``) int8 tile classes of one ``[Nq, Nk]`` bool mask."""
    nq, nk = truth.shape
    nqb, nkb = _cdiv(nq, block_m), _cdiv(nk, block_n)
    pad = (0, nkb * block_n - nk, 0, nqb * block_m - nq)
    some = torch.nn.functional.pad(truth, pad, value=False).view(nqb, block_m, nkb, block_n).any(3).any(1)
    every = torch.nn.functional.pad(truth, pad, value=True).view(nqb, block_m, nkb, block_n).all(3).all(1)
    key_whole = ((torch.arange(nkb) + 1) * block_n <= nk).view(1, nkb)
    query_whole = ((torch.arange(nqb) + 1) * block_m <= nq).view(nqb, 1)

    def classes(full):
        return torch.where(some, torch.where(full, tiles.FULL, tiles.PARTIAL), tiles.EMPTY).to(torch.int8)

    return classes(every & key_whole), classes(every & query_whole).transpose(0, 1).contiguous()


@dataclass(frozen=True)
class Problem:
    q_rows: int
    k_rows: int
    q_offset: int = 0
    k_offset: int = 0
    n_q: Optional[int] = None
    n_k: Optional[int] = None
    block_m: int = 16
    block_n: int = 16

    @property
    def positions(self) -> dict:
        return dict(q_rows=self.q_rows, k_rows=self.k_rows, q_offset=self.q_offset, k_offset=self.k_offset,
                    n_q=self.n_q, n_k=self.n_k)


def truth_classes(pattern, problem: Problem, params: Optional[Dict[str, object]] = None, *, b: int = 0, h: int = 0):
    """:func:`tile_classes` of ``pattern`` on ``problem`` (batch row ``b``, head ``h``)."""
    truth = pair_mask(pattern, **problem.positions, batch=b + 1, heads=h + 1, params=params)[b, h]
    return tile_classes(truth, problem.block_m, problem.block_n)


def random_problem(rng: random.Random, shapes=TILE_SHAPES) -> Problem:
    """Lengths 1..130 (Nq != Nk mostly), offsets half the time, explicit n_q / n_k sometimes."""
    q_rows, k_rows = rng.randint(1, 130), rng.randint(1, 130)
    q_offset = rng.choice([0, 0, rng.randint(1, 60)])
    k_offset = rng.choice([0, 0, rng.randint(1, 60)])
    n_q = q_offset + q_rows + rng.randint(0, 40) if rng.random() < 0.25 else None
    n_k = k_offset + k_rows + rng.randint(0, 40) if rng.random() < 0.25 else None
    block_m, block_n = rng.choice(shapes)
    return Problem(q_rows, k_rows, q_offset, k_offset, n_q, n_k, block_m, block_n)


# ---------------------------------------------------------------------------------------------
# random static masks
# ---------------------------------------------------------------------------------------------

# atom templates: {name: value-kind} placeholders are filled with a constant or an int param
ATOMS = {
    "band": ["j <= i", "i - j < {w}", "abs(i - j) <= {w}", "j - n_k <= i - n_q", "j - i < {w}", "j >= i"],
    "chunk": ["i // {C} == j // {C}", "j >= i - i % {C}", "j // {C} <= i // {C}"],
    "stride": ["j % {S} == {S} - 1"],
    "dilation": ["(i - j) % {d} == 0"],
    "grid2d": ["abs(i // {W} - j // {W}) <= {r} and abs(i % {W} - j % {W}) <= {r}"],
    "global": ["i < {g}", "j < {g}", "j < {s}", "i >= {g}"],
}
# param name prefix per value kind (call-time overrides change windows, sinks, rows and radii only)
PREFIX = {"w": "w", "C": "c", "S": "st", "d": "d", "W": "ww", "r": "r", "g": "g", "s": "s"}
OVERRIDABLE = ("w", "g", "s", "r")
FAMILY_WEIGHTS = {"band": 6, "chunk": 3, "stride": 1, "dilation": 1, "grid2d": 1, "global": 3}
VALUES = {
    "w": lambda r: r.randint(1, 40),
    "C": lambda r: r.choice([3, 5, 7, 9, 11, 13, 17, 4, 8, 16, 32]),
    "S": lambda r: r.choice([3, 5, 7, 9, 8, 16]),
    "d": lambda r: r.choice([2, 3, 5, 7]),
    "W": lambda r: r.choice([5, 7, 8, 9, 12]),
    "r": lambda r: r.randint(0, 2),
    "g": lambda r: r.randint(1, 24),
    "s": lambda r: r.randint(1, 8),
}


def _fill(template: str, rng: random.Random, params: Dict[str, int], named: float) -> str:
    """``template`` with each ``{kind}`` (:data:`VALUES`) replaced by a random value of its kind,
    or, with probability ``named``, by a new int param holding it (added to ``params``)."""
    out = template
    for kind in VALUES:
        key = "{" + kind + "}"
        if key in out:
            value = VALUES[kind](rng)
            if rng.random() < named:
                name = f"{PREFIX[kind]}{len(params)}"
                params[name] = value
                out = out.replace(key, name)
            else:
                out = out.replace(key, str(value))
    return out


def random_mask(rng: random.Random) -> Tuple[str, Dict[str, int]]:
    """(mask text, int params {name: value}): a union of 1-3 clauses of 1-3 atoms."""
    params: Dict[str, int] = {}
    families = list(FAMILY_WEIGHTS)
    weights = [FAMILY_WEIGHTS[f] for f in families]

    def fill(template: str) -> str:
        return _fill(template, rng, params, 0.3)

    clauses = []
    for _ in range(rng.choice([1, 1, 2, 2, 3])):
        atoms = [fill(rng.choice(ATOMS[rng.choices(families, weights)[0]])) for _ in range(rng.choice([1, 2, 2, 3]))]
        clauses.append(" and ".join(f"({a})" for a in atoms))
    return " or ".join(f"({c})" for c in clauses), params


def random_cover_mask(rng: random.Random) -> Tuple[str, Dict[str, int]]:
    """A mask of the shapes closed forms cover: one clause of 1-3 band / chunk / row atoms, with
    (sometimes) sinks or global columns, a column range, and global rows around it."""
    params: Dict[str, int] = {}

    def fill(template: str) -> str:
        return _fill(template, rng, params, 0.4)

    atoms = ATOMS["band"] + ATOMS["chunk"] + ["i >= {g}", "i < {g}", "j >= {s}"]
    band = " and ".join(f"({fill(rng.choice(atoms))})" for _ in range(rng.choice([1, 2, 2, 3])))
    clauses = [band]
    if rng.random() < 0.5:
        clauses.append(fill(rng.choice(["j < {s}", "j < {g}", "j >= {g} and j < {g} + {w}"])))
        if rng.random() < 0.2:
            clauses.append(fill("j < {s}"))
    if rng.random() < 0.4:
        clauses.append(fill(rng.choice(["i < {g}", "i >= {g}", "i >= n_q - {s}"])))
    rng.shuffle(clauses)
    return " or ".join(f"({c})" for c in clauses), params


def random_overrides(rng: random.Random, params: Dict[str, int]) -> Dict[str, int]:
    """Call-time values for some params: windows, sinks and rows (not divisors), 0 included, so
    that closed forms meet their preconditions' edges."""
    return {k: rng.randint(0, 45) for k in params if k.rstrip("0123456789") in OVERRIDABLE and rng.random() < 0.5}


def mask_spec(name: str, mask: str, params: Dict[str, int]) -> str:
    """The TOML text of a spec with this mask and params."""
    lines = [f'name = "{name}"']
    if params:
        lines.append("[params]")
        lines += [f"{k} = {v}" for k, v in params.items()]
    lines += ["[mask]", f'where = "{mask}"']
    return "\n".join(lines) + "\n"
