"""Probe 28 (oob): reads of [inputs] outside their extent, on every path that reads input values.

The contract (docs/spec-language.md, [inputs]): an index outside an input's extent reads 0 (False),
in every dim, negative ones included, and passes no gradient. Each spec here reads its inputs at
shifted, negative, per-head, per-batch and position-dependent indices that leave the extent (and,
for the host-side tile classifier, at bare b / h / i / j / constants on fixed dims shorter than
what they index). A seeded case draws a call (B, heads, GQA, lengths, offsets, n_q / n_k, tile
shapes) and input values that are never 0 inside the extent, so a read taken as anything but 0
outside it changes the mask or the score, then compares:

- the module's o, lse, dq, dk, dv and every grad = true table's gradient against
  ``attncc.reference`` in float64 (autograd);
- ``attncc.reference`` against a hand oracle written from the doc (each table read through
  :func:`rd`, which pads with zeros), o, lse and the table gradients;
- ``decode()`` row by row against the reference; ``attncc.distributed.chunk_classes`` (and the
  torch path of the tile classifier, ``tiles.classify_grid``) against the dense pair mask: a tile
  or chunk claimed EMPTY must hold no allowed pair, FULL no removed one.

    python tests/probe_oob28.py --seeds 0-40 [--spec S3] [--what fwd,bwd,decode,classes]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import script_env  # noqa: F401

import torch

import attncc
from attncc import parse_spec


def rd(t: torch.Tensor, *idx):
    """``t`` at the broadcast integer index tensors ``idx``, 0 where any index is outside the extent."""
    idx = torch.broadcast_tensors(*[torch.as_tensor(x, dtype=torch.int64) for x in idx])
    inside = torch.ones(idx[0].shape, dtype=torch.bool)
    for d, x in enumerate(idx):
        inside &= (x >= 0) & (x < t.shape[d])
    safe = [torch.where(inside, x, torch.zeros_like(x)) for x in idx]
    if t.numel() == 0:
        return torch.zeros(inside.shape, dtype=t.dtype)
    val = t[tuple(safe)]
    return torch.where(inside, val, torch.zeros_like(val))


@dataclass(frozen=True)
class Spec:
    name: str
    text: str
    # dims with "B", "H", "N" (positions: n_k + pad), or ints; per input: (dims, dtype, grad)
    inputs: Dict[str, tuple]
    mask: Optional[Callable] = None  # (env) -> bool [B, H, Nq, Nk]
    bias: Optional[Callable] = None  # (env) -> float64 broadcastable
    mod: Optional[Callable] = None  # (s, env) -> float64
    decode: bool = True


def _spec(name, body):
    return f'name = "{name}"\n' + body


SPECS = {}


def _add(s: Spec):
    SPECS[s.name] = s


# S1: a document mask read at shifted positions (past the end and before the start)
_add(Spec("oob28_s1", _spec("oob28_s1", """
[inputs]
doc = { dims = ["b", "n"], dtype = "int32" }
[mask]
where = "(doc[b, i + 3] == doc[b, j + 3] and j <= i + 4) or doc[b, j - 5] == doc[b, i - 5]"
"""), {"doc": (("B", "N"), "int32", False)},
    mask=lambda e: ((rd(e.doc, e.b, e.i + 3) == rd(e.doc, e.b, e.j + 3)) & (e.j <= e.i + 4))
    | (rd(e.doc, e.b, e.j - 5) == rd(e.doc, e.b, e.i - 5))))

# S2: position-dependent indices, a per-batch length read at b + 1 and b - 1
_add(Spec("oob28_s2", _spec("oob28_s2", """
[inputs]
seg = { dims = ["b", "n"], dtype = "int64" }
kv_len = { dims = ["b"], dtype = "int32" }
[mask]
where = "(seg[b, (i * 7) % (n_q + 3)] != seg[b, j] or j == i) and j < kv_len[b + 1] + 6 + kv_len[b - 1]"
"""), {"seg": (("B", "N"), "int64", False), "kv_len": (("B",), "int32", False)},
    mask=lambda e: ((rd(e.seg, e.b, (e.i * 7) % (e.n_q + 3)) != rd(e.seg, e.b, e.j)) | (e.j == e.i))
    & (e.j < rd(e.kv_len, e.b + 1) + 6 + rd(e.kv_len, e.b - 1))))

# S3: per-head flags read at other heads (h + 1, h - 1) and at i // 2
_add(Spec("oob28_s3", _spec("oob28_s3", """
[inputs]
t = { dims = ["h", "n"], dtype = "bool" }
u = { dims = ["h", "n"], dtype = "int16" }
[mask]
where = "t[h + 1, j] or j == i or u[h - 1, i // 2] > 2"
"""), {"t": (("H", "N"), "bool", False), "u": (("H", "N"), "int16", False)},
    mask=lambda e: rd(e.t, e.h + 1, e.j).bool() | (e.j == e.i) | (rd(e.u, e.h - 1, e.i // 2) > 2)))

# S4: bare reads the tile classifier reduces per block, on fixed dims shorter than what they index
_add(Spec("oob28_s4", _spec("oob28_s4", """
[inputs]
flag = { dims = [12], dtype = "bool" }
small = { dims = [2], dtype = "int32" }
one = { dims = [1], dtype = "int32" }
c = { dims = [2], dtype = "int32" }
dd = { dims = ["b", 16], dtype = "int32" }
[mask]
where = "(flag[j] or j <= i - small[h] - one[b] + c[1] * 0) and (dd[b, i] == dd[b, j] or j <= i)"
"""), {"flag": ((12,), "bool", False), "small": ((2,), "int32", False), "one": ((1,), "int32", False),
       "c": ((2,), "int32", False), "dd": (("B", 16), "int32", False)},
    mask=lambda e: (rd(e.flag, e.j).bool() | (e.j <= e.i - rd(e.small, e.h) - rd(e.one, e.b)))
    & ((rd(e.dd, e.b, e.i) == rd(e.dd, e.b, e.j)) | (e.j <= e.i))))

# S5: constants and bare b / h / i / j at fixed dims the tile classifier takes per block: equal 0s
_add(Spec("oob28_s5", _spec("oob28_s5", """
[inputs]
k3 = { dims = [2], dtype = "int32" }
hb = { dims = [3, 2], dtype = "int32" }
col = { dims = [10], dtype = "int32" }
row = { dims = [7], dtype = "int32" }
[mask]
where = "row[i] == col[j] and (k3[3] == 0) and hb[h, b] >= 0 or (j == i and hb[h, b] == 0)"
"""), {"k3": ((2,), "int32", False), "hb": ((3, 2), "int32", False), "col": ((10,), "int32", False),
       "row": ((7,), "int32", False)},
    mask=lambda e: ((rd(e.row, e.i) == rd(e.col, e.j)) & (rd(e.k3, torch.tensor(3)) == 0) & (rd(e.hb, e.h, e.b) >= 0))
    | ((e.j == e.i) & (rd(e.hb, e.h, e.b) == 0))))

# S6: learned tables read at other heads and batch rows (the gradient paths: per-row, per-key,
# per-pair and one-hot)
_add(Spec("oob28_s6", _spec("oob28_s6", """
[inputs]
x = { dims = ["h", "n"], dtype = "float32", grad = true }
y = { dims = ["b", "n"], dtype = "float32", grad = true }
r = { dims = ["h", 7], dtype = "float32", grad = true }
p = { dims = ["b", "h", "n", "n"], dtype = "float32", grad = true }
[mask]
where = "j <= i + 6"
[score]
bias = "x[h + 1, j] + 0.5 * y[b + 1, i - 2] + r[h - 1, (i - j) % 7] + p[b - 1, h + 1, i, j] + 0.3 * r[h + 2, j - i + 2]"
"""), {"x": (("H", "N"), "float32", True), "y": (("B", "N"), "float32", True), "r": (("H", 7), "float32", True),
       "p": (("B", "H", "N", "N"), "float32", True)},
    mask=lambda e: e.j <= e.i + 6,
    bias=lambda e: rd(e.x, e.h + 1, e.j) + 0.5 * rd(e.y, e.b + 1, e.i - 2) + rd(e.r, e.h - 1, (e.i - e.j) % 7)
    + rd(e.p, e.b - 1, e.h + 1, e.i, e.j) + 0.3 * rd(e.r, e.h + 2, e.j - e.i + 2)))

# S7: a transform reading per-head scalars at other heads; a per-row temperature past the end
_add(Spec("oob28_s7", _spec("oob28_s7", """
[inputs]
z = { dims = ["h"], dtype = "float32", grad = true }
tmp = { dims = ["b", "n"], dtype = "float32", grad = true }
[score]
mod = "s * (1 + 0.3 * tmp[b, i + 4]) + z[h + 2] - z[h - 1] * 0.5"
"""), {"z": (("H",), "float32", True), "tmp": (("B", "N"), "float32", True)},
    mod=lambda s, e: s * (1 + 0.3 * rd(e.tmp, e.b, e.i + 4)) + rd(e.z, e.h + 2) - rd(e.z, e.h - 1) * 0.5))

# S8: a lowered dot whose operands are read at shifted heads / positions
_add(Spec("oob28_s8", _spec("oob28_s8", """
[inputs]
qa = { dims = ["b", "h", "n", 4], dtype = "float32", grad = true }
ka = { dims = ["b", "n", 4], dtype = "float32", grad = true }
[score]
bias = "dot(qa[b, h + 1, i, :], ka[b, j - 2, :])"
"""), {"qa": (("B", "H", "N", 4), "float32", True), "ka": (("B", "N", 4), "float32", True)},
    bias=lambda e: _dot8(e)))


def _dot8(e):
    out = 0
    for a in range(4):
        out = out + rd(e.qa, e.b, e.h + 1, e.i, a) * rd(e.ka, e.b, e.j - 2, a)
    return out


# S9: a per-batch table read at b + 1 in the mask and the bias of one spec (data-dependent lists)
_add(Spec("oob28_s9", _spec("oob28_s9", """
[inputs]
doc = { dims = ["b", "n"], dtype = "int32" }
w = { dims = ["b", 3], dtype = "float32", grad = true }
[mask]
where = "doc[b, i] == doc[b, j] or doc[b + 1, j] == doc[b, i]"
[score]
bias = "w[b + 1, 1] - w[b - 1, 2] + w[b, 5]"
"""), {"doc": (("B", "N"), "int32", False), "w": (("B", 3), "float32", True)},
    mask=lambda e: (rd(e.doc, e.b, e.i) == rd(e.doc, e.b, e.j)) | (rd(e.doc, e.b + 1, e.j) == rd(e.doc, e.b, e.i)),
    bias=lambda e: rd(e.w, e.b + 1, 1) - rd(e.w, e.b - 1, 2) + rd(e.w, e.b, 5)))


# S10: inputs whose position dim comes first, read at other heads / batch rows (guards after the
# position's), a learned one per pair
_add(Spec("oob28_s10", _spec("oob28_s10", """
[inputs]
f = { dims = ["n", "b"], dtype = "bool" }
xn = { dims = ["n", "h"], dtype = "float32", grad = true }
pn = { dims = ["n", "n", "h"], dtype = "float32", grad = true }
[mask]
where = "f[j, b + 1] or j <= i"
[score]
bias = "xn[j, h + 1] - xn[i - 1, h - 1] + pn[i, j, h + 1]"
"""), {"f": (("N", "B"), "bool", False), "xn": (("N", "H"), "float32", True), "pn": (("N", "N", "H"), "float32", True)},
    mask=lambda e: rd(e.f, e.j, e.b + 1).bool() | (e.j <= e.i),
    bias=lambda e: rd(e.xn, e.j, e.h + 1) - rd(e.xn, e.i - 1, e.h - 1) + rd(e.pn, e.i, e.j, e.h + 1)))


# ---------------------------------------------------------------------------------------------
# calls
# ---------------------------------------------------------------------------------------------

_BUILT = {}


def built(s: Spec):
    if s.name not in _BUILT:
        _BUILT[s.name] = (attncc.compile(s.text), parse_spec(s.text))
    return _BUILT[s.name]


@dataclass
class Case:
    B: int
    Hq: int
    Hkv: int
    Nq: int
    Nk: int
    D: int
    q_offset: int
    k_offset: int
    n_q: Optional[int]
    n_k: Optional[int]
    tiles: Optional[tuple]
    inputs: Dict[str, torch.Tensor]
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor


def draw(s: Spec, seed: int) -> Case:
    import random
    rng = random.Random(seed * 7919 + sum(s.name.encode()))
    gen = torch.Generator().manual_seed(seed)
    B = rng.choice((1, 2, 3))
    Hkv = rng.choice((1, 2))
    Hq = Hkv * rng.choice((1, 2))
    Nq, Nk = rng.randint(1, 40), rng.randint(1, 40)
    q_offset = rng.choice((0, 0, rng.randint(0, 9)))
    k_offset = rng.choice((0, 0, rng.randint(0, 9)))
    n_q = rng.choice((None, None, q_offset + Nq + rng.randint(0, 5)))
    n_k = rng.choice((None, None, k_offset + Nk + rng.randint(0, 5)))
    tiles = rng.choice((None, (16, 16), (16, 32), (32, 16)))
    D = 8
    N = max(q_offset + Nq, k_offset + Nk)
    inputs = {}
    for name, (dims, dtype, grad) in s.inputs.items():
        shape = [{"B": B, "H": Hq, "N": N}.get(d, d) for d in dims]
        if dtype == "bool":
            t = torch.rand(shape, generator=gen) < 0.5
        elif dtype.startswith("int"):
            lo = 1 if rng.random() < 0.7 else -3
            t = torch.randint(lo, lo + 4, shape, generator=gen).to(getattr(torch, dtype))
            t = torch.where(t == 0, torch.ones_like(t), t)  # never 0 inside: 0 is what outside reads
        else:
            t = (torch.rand(shape, generator=gen) + 0.5).to(getattr(torch, dtype))
        inputs[name] = t
    q = torch.randn(B, Hq, Nq, D, generator=gen)
    k = torch.randn(B, Hkv, Nk, D, generator=gen)
    v = torch.randn(B, Hkv, Nk, D, generator=gen)
    g = torch.randn(B, Hq, Nq, D, generator=gen, dtype=torch.float64)
    return Case(B, Hq, Hkv, Nq, Nk, D, q_offset, k_offset, n_q, n_k, tiles, inputs, q, k, v, g)


class Env:
    pass


def oracle(s: Spec, c: Case, q, k, v, tables):
    """o, lse in float64 from the doc: each read through rd (0 outside the extent)."""
    e = Env()
    e.b = torch.arange(c.B).view(-1, 1, 1, 1)
    e.h = torch.arange(c.Hq).view(1, -1, 1, 1)
    e.i = (c.q_offset + torch.arange(c.Nq)).view(1, 1, -1, 1)
    e.j = (c.k_offset + torch.arange(c.Nk)).view(1, 1, 1, -1)
    e.n_q = c.n_q if c.n_q is not None else c.q_offset + c.Nq
    e.n_k = c.n_k if c.n_k is not None else c.k_offset + c.Nk
    for name, t in tables.items():
        setattr(e, name, t)
    G = c.Hq // c.Hkv
    kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s_ = torch.einsum("bhid,bhjd->bhij", q, kk) / math.sqrt(c.D)
    if s.bias is not None:
        s_ = s_ + s.bias(e)
    if s.mod is not None:
        s_ = s.mod(s_, e)
    if s.mask is not None:
        m = s.mask(e).expand(s_.shape)
        s_ = torch.where(m, s_, torch.tensor(-math.inf, dtype=torch.float64))
    lse = torch.logsumexp(s_, -1)
    p = torch.where(torch.isfinite(lse)[..., None], torch.exp(s_ - lse[..., None]), torch.zeros_like(s_))
    return p @ vv, lse


def _rel(a, b):
    a, b = a.double(), b.double()
    fin = torch.isfinite(b)
    if not torch.equal(fin, torch.isfinite(a)):
        return math.inf
    a, b = torch.where(fin, a, 0.0), torch.where(fin, b, 0.0)
    return float((a - b).norm() / max(float(b.norm()), 1e-3))


def _environment(tiles):
    names = ("ATTNCC_CONFIG", "ATTNCC_CONFIG_DKDV", "ATTNCC_CONFIG_DQ")
    vals = {} if tiles is None else {n: f"BLOCK_M={tiles[0]},BLOCK_N={tiles[1]},num_warps=4,num_stages=1" for n in names}
    saved = {n: os.environ.get(n) for n in names}
    os.environ.update(vals)
    return saved


def _restore(saved):
    for n, v in saved.items():
        if v is None:
            os.environ.pop(n, None)
        else:
            os.environ[n] = v


def check(s: Spec, seed: int, what=("fwd", "bwd", "decode", "classes")) -> list:
    """The failures of one case: (what, label, error, detail)."""
    mod, pat = built(s)
    c = draw(s, seed)
    out = []
    grads = [n for n, (_, _, gr) in s.inputs.items() if gr]
    pos = dict(q_offset=c.q_offset, k_offset=c.k_offset)
    if c.n_q is not None:
        pos["n_q"] = c.n_q
    if c.n_k is not None:
        pos["n_k"] = c.n_k
    # reference (float64, autograd) and the oracle
    rq, rk, rv = (t.double().requires_grad_() for t in (c.q, c.k, c.v))
    rt = {n: (t.double().requires_grad_() if n in grads else t) for n, t in c.inputs.items()}
    ref, ref_lse = attncc.reference(pat, rq, rk, rv, return_lse=True, **pos, **rt)
    oq, ok_, ov = (t.double().requires_grad_() for t in (c.q, c.k, c.v))
    ot = {n: (t.double().requires_grad_() if n in grads else t) for n, t in c.inputs.items()}
    orc, orc_lse = oracle(s, c, oq, ok_, ov, ot)
    for label, a, b in (("o", ref, orc), ("lse", ref_lse, orc_lse)):
        err = _rel(a.detach(), b.detach())
        if err > 1e-9:
            out.append(("reference-vs-oracle", label, err, ""))
    w = torch.linspace(-1, 1, c.Nq, dtype=torch.float64)

    def loss(o, lse):
        return (o.double() * c.g).sum() + (torch.where(torch.isfinite(lse), lse.double(), 0.0) * w).sum()

    ref_g = torch.autograd.grad(loss(ref, ref_lse), [rq, rk, rv] + [rt[n] for n in grads], allow_unused=True)
    orc_g = torch.autograd.grad(loss(orc, orc_lse), [oq, ok_, ov] + [ot[n] for n in grads], allow_unused=True)
    targets = [rq, rk, rv] + [rt[n] for n in grads]
    for label, a, b, t in zip(["dq", "dk", "dv"] + grads, ref_g, orc_g, targets):
        a = torch.zeros_like(t) if a is None else a
        b = torch.zeros_like(t) if b is None else b
        err = _rel(a, b)
        if err > 1e-9:
            out.append(("reference-vs-oracle", "grad " + label, err, ""))
    saved = _environment(c.tiles)
    try:
        if "fwd" in what or "bwd" in what:
            q, k, v = (t.clone().requires_grad_() for t in (c.q, c.k, c.v))
            mt = {n: (t.clone().requires_grad_() if n in grads else t) for n, t in c.inputs.items()}
            try:
                o, lse = mod.attention(q, k, v, return_lse=True, **pos, **mt)
            except Exception as ex:  # noqa: BLE001
                return out + [("fwd", "raise", math.inf, f"{type(ex).__name__}: {str(ex)[:300]}")]
            for label, a, b in (("o", o, ref), ("lse", lse, ref_lse)):
                err = _rel(a.detach(), b.detach())
                if err > 1e-4:
                    out.append(("fwd", label, err, ""))
            if "bwd" in what:
                got = torch.autograd.grad(loss(o, lse), [q, k, v] + [mt[n] for n in grads], allow_unused=True)
                for label, a, b, t in zip(["dq", "dk", "dv"] + grads, got, ref_g, targets):
                    a = torch.zeros_like(t) if a is None else a
                    b = torch.zeros_like(t) if b is None else b
                    err = _rel(a, b)
                    if err > (2e-3 if label in ("dq", "dk", "dv") else 1e-2):  # a table's: sums over pairs
                        out.append(("bwd", label, err, ""))
        if "classes" in what and pat.mask is not None:
            out += _classes(pat, c)
    finally:
        _restore(saved)
    if "decode" in what and s.decode and not grads:
        out += _decode(s, mod, pat, c, seed)
    return out


def _classes(pat, c: Case) -> list:
    """The torch tile classifier and the distributed chunk classes against the dense pair mask."""
    from attncc._reference import pair_mask
    from attncc.analysis import analyze
    from attncc.core import tiles
    from attncc.distributed.classes import chunk_classes

    out = []
    plan = analyze(pat)
    n_q = c.n_q if c.n_q is not None else c.q_offset + c.Nq
    n_k = c.n_k if c.n_k is not None else c.k_offset + c.Nk
    dense = pair_mask(pat, q_rows=c.Nq, k_rows=c.Nk, q_offset=c.q_offset, k_offset=c.k_offset, n_q=n_q, n_k=n_k,
                      batch=c.B, heads=c.Hq, inputs=c.inputs)
    for bm, bn in ((16, 16), (8, 32), (1, 1)):
        grid = tiles.classify_grid(plan.classifier, q_offset=c.q_offset, k_offset=c.k_offset, q_rows=c.Nq,
                                   k_rows=c.Nk, block_m=bm, block_n=bn, n_q=n_q, n_k=n_k, params={}, inputs=c.inputs,
                                   batch=c.B, heads=c.Hq, device="cpu")
        grid = grid.expand(c.B, c.Hq, *grid.shape[2:])
        for qb in range(grid.shape[2]):
            for kb in range(grid.shape[3]):
                tile = dense[:, :, qb * bm:(qb + 1) * bm, kb * bn:(kb + 1) * bn]
                cls = grid[:, :, qb, kb]
                some, every = tile.flatten(2).any(-1), tile.flatten(2).all(-1)
                bad = ((cls == tiles.EMPTY) & some) | ((cls == tiles.FULL) & ~every)
                if bad.any():
                    out.append(("classes", f"tile {bm}x{bn} ({qb},{kb})", math.inf,
                                f"class {cls.tolist()} any {some.tolist()} all {every.tolist()}"))
                    return out
    # the distributed chunk classes: one sequence of n positions (n_q = n_k = n, offsets 0)
    n = max(c.Nq, c.Nk)
    ins = {}
    for name, t in c.inputs.items():
        ins[name] = t
    dims_ok = all(all(d != "n" for d in decl.dims) or t.shape[list(decl.dims).index("n")] >= n
                  for decl in pat.inputs for t in [c.inputs[decl.name]])
    if not dims_ok:
        return out
    bounds = sorted({0, n, *(min(n, x) for x in (3, 7, 16, 21))})
    dense = pair_mask(pat, q_rows=n, k_rows=n, batch=c.B, heads=c.Hq, inputs=ins)
    try:
        classes = chunk_classes(pat, bounds, inputs=ins, batch=c.B, heads=c.Hq)
    except Exception as ex:  # noqa: BLE001
        return out + [("chunks", "raise", math.inf, f"{type(ex).__name__}: {str(ex)[:300]}")]
    for qc in range(len(bounds) - 1):
        for kc in range(len(bounds) - 1):
            blk = dense[:, :, bounds[qc]:bounds[qc + 1], bounds[kc]:bounds[kc + 1]]
            if not blk.numel():
                continue
            cls = int(classes[qc, kc])
            if (cls == tiles.EMPTY and blk.any()) or (cls == tiles.FULL and not blk.all()):
                out.append(("chunks", f"chunk ({qc},{kc})", math.inf, f"class {cls} any {bool(blk.any())}"))
                return out
    return out


def _decode(s: Spec, mod, pat, c: Case, seed: int) -> list:
    import random
    rng = random.Random(seed + 5)
    Nq = min(c.Nq, rng.choice((1, 2, 4)))
    cap = max(c.Nk, 20)
    k = torch.randn(c.B, c.Hkv, cap, c.D, generator=torch.Generator().manual_seed(seed + 1))
    v = torch.randn(c.B, c.Hkv, cap, c.D, generator=torch.Generator().manual_seed(seed + 2))
    q = c.q[:, :, :Nq]
    lens = [rng.randint(0, cap) for _ in range(c.B)]
    ins = {}
    for decl in pat.inputs:
        t = c.inputs[decl.name]
        for ax, d in enumerate(decl.dims):
            if d == "n" and t.shape[ax] < cap:  # cover the cache's positions
                extra = list(t.shape)
                extra[ax] = cap - t.shape[ax]
                t = torch.cat([t, t.new_ones(extra)], ax)
        ins[decl.name] = t
    if "kv_len" in ins:  # the pattern's own kv_len: decode() passes it the cache lengths
        ins["kv_len"] = torch.tensor(lens, dtype=ins["kv_len"].dtype)
    kw = {n: t for n, t in ins.items() if n != "kv_len"}
    try:
        o, lse = mod.decode(q, k, v, kv_len=torch.tensor(lens, dtype=torch.int32), return_lse=True, **kw)
    except Exception as ex:  # noqa: BLE001
        return [("decode", "raise", math.inf, f"{type(ex).__name__}: {str(ex)[:300]}")]
    out = []
    for b, n in enumerate(lens):
        neg = min(Nq, max(0, Nq - n))
        if neg < Nq:
            ref, ref_lse = attncc.reference(pat, q[:, :, neg:].double(), k[:, :, :n].double(), v[:, :, :n].double(),
                                            return_lse=True, q_offset=n - Nq + neg, **ins)
            for label, a, r in (("o", o[b, :, neg:], ref[b]), ("lse", lse[b, :, neg:], ref_lse[b])):
                err = _rel(a, r)
                if err > 1e-4:
                    out.append(("decode", f"{label} row {b} (kv_len {n})", err, ""))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0-10")
    ap.add_argument("--spec", default=None)
    ap.add_argument("--what", default="fwd,bwd,decode,classes")
    args = ap.parse_args(argv)
    a, _, b = args.seeds.partition("-")
    seeds = range(int(a), int(b or a) + 1)
    what = tuple(args.what.split(","))
    bad = 0
    for name, s in SPECS.items():
        if args.spec and args.spec not in name:
            continue
        for seed in seeds:
            fails = check(s, seed, what)
            for f in fails:
                bad += 1
                c = draw(s, seed)
                print(f"{name} seed {seed}: {f} B={c.B} Hq={c.Hq} Hkv={c.Hkv} Nq={c.Nq} Nk={c.Nk} "
                      f"off={c.q_offset},{c.k_offset} n_q={c.n_q} n_k={c.n_k} tiles={c.tiles}", flush=True)
        print(f"{name}: done", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
