"""Probe 20 generator: [inputs] and [heads] systematically, a handful of specs compiled once and many
seeded calls each: every declared dims shape and dtype, read in masks, biases, transforms, inside
where / min / max, as the index of another table, with computed indices (i - j + c, min/max clamps,
i // p, n_k - 1 - j, a table's value % 4); passed contiguous, permuted, sliced with a step along any
dim, at a storage offset, expanded (stride 0) along any dim, overlapping (as_strided), read-only,
aliasing q's storage, in another dtype than declared; GQA, B > 1, offsets, n_q / n_k, Nq != Nk.

Each call is checked against attncc.reference and against a float64 oracle written here from the
doc (docs/spec-language.md §2 [inputs], §3, §5), forward o, LSE and the gradients of q, k, v and of
every grad = true input (as the leaf the caller made: an expanded input's gradient summed over its
expansion, an aliased one's added to q's).

    python tests/probe_inputs20.py --cases 60 --start 0        # print failures (all specs)
    python tests/probe_inputs20.py --spec S2 --seed 7 --verbose
"""
from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import script_env  # noqa: E402,F401  (the interpreter, this checkout on the path: before the imports below)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import attncc  # noqa: E402
from cases import run_seeds  # noqa: E402

F64 = torch.float64
DT = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
      "int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8,
      "bool": torch.bool}
INTS = ("int8", "int16", "int32", "int64", "uint8")
FLOATS = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class Decl:
    name: str
    dims: Tuple
    dtype: str
    grad: bool = False
    lo: int = 0       # int values drawn from [lo, hi]
    hi: int = 3


class Env:
    """Index grids [B, H, Nq, Nk] (broadcast) and reads of the inputs as the doc defines them."""

    def __init__(self, B, H, Nq, Nk, q_off, k_off, n_q, n_k, vals: Dict[str, torch.Tensor], decls):
        self.b = torch.arange(B).view(B, 1, 1, 1)
        self.h = torch.arange(H).view(1, H, 1, 1)
        self.i = (q_off + torch.arange(Nq)).view(1, 1, Nq, 1)
        self.j = (k_off + torch.arange(Nk)).view(1, 1, 1, Nk)
        self.n_q, self.n_k = n_q, n_k
        self.vals, self.decls = vals, {d.name: d for d in decls}

    def __call__(self, name, *idx):
        """``name[idx...]``: 0 (False) outside the tensor's extent in any dim, no wrap-around."""
        t = self.vals[name]
        if not idx:
            return t
        idx = [torch.as_tensor(x) for x in idx]
        idx = torch.broadcast_tensors(*idx)
        inside = torch.ones(idx[0].shape, dtype=torch.bool)
        clamped = []
        for x, size in zip(idx, t.shape):
            inside &= (x >= 0) & (x < size)
            clamped.append(x.clamp(0, size - 1))
        got = t[tuple(clamped)]
        return torch.where(inside, got, torch.zeros((), dtype=got.dtype))


# (an int64 tensor times a Python float is float32 in torch: every int meets a float as .to(F64))


def fdiv(a, b):
    return torch.div(a, b, rounding_mode="floor")


def values_as_read(decl: Decl, t: torch.Tensor) -> torch.Tensor:
    """The values an input holds as the doc says the kernels read them: ints exact (int64), ints for
    a bool input as != 0, floats rounded to the declared type (differentiably: straight through)."""
    if decl.dtype == "bool":
        return t != 0
    if decl.dtype in INTS:
        return t.to(torch.int64)
    x = t.to(F64)
    r = t.to(DT[decl.dtype]).to(F64)
    return x + (r - x).detach()


@dataclass(frozen=True)
class SpecCase:
    name: str
    text: str
    decls: Tuple[Decl, ...]
    # (s [B,H,Nq,Nk] float64 scaled q.k, env) -> (score after bias and mod, mask or None)
    score: Callable
    softcap: Optional[float] = None
    heads: Optional[Tuple[int, int]] = None
    params: Tuple[Tuple[str, int], ...] = ()


def _s1(s, e, p=3, c=2):
    mask = (e("doc", e.b, fdiv(e.i, p)) == e("doc", e.b, fdiv(e.j, p))) | (e.j < e("lens", e.b))
    bias = e("tab", e("sel", e.h), e.h) + e("rel", e.h, torch.clamp(e.i - e.j + c, 0, 8)) \
        + 0.25 * e("rel", e.h, e.j - e.i + c)
    return s + bias, mask


S1 = SpecCase("S1", """
name = "probe_in20_s1"
[params]
p = 3
c = 2
[inputs]
doc  = { dims = ["b", "n"], dtype = "int8" }
lens = { dims = ["b"], dtype = "uint8" }
sel  = { dims = ["h"], dtype = "int16" }
tab  = { dims = [5, "h"], dtype = "float32", grad = true }
rel  = { dims = ["h", 9], dtype = "bfloat16", grad = true }
[mask]
where = "doc[b, i // p] == doc[b, j // p] or j < lens[b]"
[score]
bias = "tab[sel[h], h] + rel[h, min(max(i - j + c, 0), 8)] + 0.25 * rel[h, j - i + c]"
""", (Decl("doc", ("b", "n"), "int8", lo=-3, hi=2), Decl("lens", ("b",), "uint8", lo=0, hi=12),
      Decl("sel", ("h",), "int16", lo=-1, hi=6), Decl("tab", (5, "h"), "float32", True),
      Decl("rel", ("h", 9), "bfloat16", True)), _s1, params=(("p", 3), ("c", 2)))


def _s2(s, e):
    pad = e("pad", e.b, e.j)
    w = e("w", e.b, e.h, e.j)
    wi = e("w", e.b, e.h, e.i)
    g = e("g", e.h)
    t0 = e("t0")
    a = s * t0 + torch.maximum(w, g)
    bb = torch.minimum(s, wi) - 1.0
    out = torch.where(pad, a, bb) + 0.1 * e("k32", e.j - e.i + 4).to(F64)
    return out, None


S2 = SpecCase("S2", """
name = "probe_in20_s2"
[inputs]
pad = { dims = ["b", "n"], dtype = "bool" }
w   = { dims = ["b", "h", "n"], dtype = "float16", grad = true }
g   = { dims = ["h"], dtype = "float32", grad = true }
t0  = { dims = [], dtype = "float32", grad = true }
k32 = { dims = ["n"], dtype = "int32" }
[score]
mod = "where(pad[b, j], s * t0 + max(w[b, h, j], g[h]), min(s, w[b, h, i]) - 1.0) + 0.1 * k32[j - i + 4]"
""", (Decl("pad", ("b", "n"), "bool", lo=0, hi=1), Decl("w", ("b", "h", "n"), "float16", True),
      Decl("g", ("h",), "float32", True), Decl("t0", (), "float32", True),
      Decl("k32", ("n",), "int32", lo=-5, hi=5)), _s2)


def _s3(s, e):
    mask = e("nn", e.i, e.j) | (e.i == e.j)
    bias = e("bm", e.b, e.i, e.j) + e("hb", e.h, e.b) * (e.i - e.j)
    return s + bias, mask


S3 = SpecCase("S3", """
name = "probe_in20_s3"
[inputs]
bm = { dims = ["b", "n", "n"], dtype = "float32", grad = true }
nn = { dims = ["n", "n"], dtype = "bool" }
hb = { dims = ["h", "b"], dtype = "float64", grad = true }
[mask]
where = "nn[i, j] or i == j"
[score]
bias = "bm[b, i, j] + hb[h, b] * (i - j)"
softcap = 4.0
""", (Decl("bm", ("b", "n", "n"), "float32", True), Decl("nn", ("n", "n"), "bool", lo=0, hi=1),
      Decl("hb", ("h", "b"), "float64", True)), _s3, softcap=4.0)


def _s4(s, e):
    mask = (e.j - e.n_k) <= (e.i - e.n_q + 3)
    lvl = e("lvl", e.h, e.j)
    out = s * e("hs", e.h) + e("tb", e.h, torch.remainder(lvl, 4)) + e("tb", e.h, e.n_k - 1 - e.j)
    return out, mask


S4 = SpecCase("S4", """
name = "probe_in20_s4"
[heads]
q = 4
kv = 2
[inputs]
lvl = { dims = ["h", "n"], dtype = "uint8" }
hs  = { dims = ["h"], dtype = "float32", grad = true }
tb  = { dims = ["h", 4], dtype = "float32", grad = true }
[mask]
where = "j - n_k <= i - n_q + 3"
[score]
mod = "s * hs[h] + tb[h, lvl[h, j] % 4] + tb[h, n_k - 1 - j]"
""", (Decl("lvl", ("h", "n"), "uint8", lo=0, hi=255), Decl("hs", ("h",), "float32", True),
      Decl("tb", ("h", 4), "float32", True)), _s4, heads=(4, 2))


def _s5(s, e):
    x8j, x8i = e("x8", e.b, e.j), e("x8", e.b, e.i)
    u8j, u8i = e("u8", e.j), e("u8", e.i)
    mask = (u8i - u8j >= -100) | (e.j <= e.i)
    qr, kr = e.vals["qr"], e.vals["kr"]  # [B, H, n, 4], [B, n, 4]
    ii = e.i[0, 0, :, 0]
    jj = e.j[0, 0, 0, :]
    qsel = _rows(qr, 2, ii)              # [B, H, Nq, 4]
    ksel = _rows(kr, 1, jj)              # [B, Nk, 4]
    dot = torch.einsum("bhid,bjd->bhij", qsel, ksel)
    bias = 0.001 * (x8j * 1000 + x8i).to(F64) + 0.01 * (u8j - u8i).to(F64) + dot
    return s + bias, mask


def _rows(t, axis, idx):
    inside = (idx >= 0) & (idx < t.shape[axis])
    got = t.index_select(axis, idx.clamp(0, t.shape[axis] - 1))
    shape = [1] * t.dim()
    shape[axis] = -1
    return got * inside.view(shape)


S5 = SpecCase("S5", """
name = "probe_in20_s5"
[inputs]
x8 = { dims = ["b", "n"], dtype = "int8" }
u8 = { dims = ["n"], dtype = "uint8" }
qr = { dims = ["b", "h", "n", 4], dtype = "float32", grad = true }
kr = { dims = ["b", "n", 4], dtype = "bfloat16", grad = true }
[mask]
where = "u8[i] - u8[j] >= -100 or j <= i"
[score]
bias = "0.001 * (x8[b, j] * 1000 + x8[b, i]) + 0.01 * (u8[j] - u8[i]) + dot(qr[b, h, i, :], kr[b, j, :])"
""", (Decl("x8", ("b", "n"), "int8", lo=-128, hi=127), Decl("u8", ("n",), "uint8", lo=0, hi=255),
      Decl("qr", ("b", "h", "n", 4), "float32", True), Decl("kr", ("b", "n", 4), "bfloat16", True)), _s5)


def _s6(s, e):
    # per-batch lengths and per-(b, h) scalars, guarded shifted reads, an int table as index of a bool one
    mask = (e.j < e("kl", e.b)) & (e("on", e("ix", e.b, e.j)) | (e.j == e.i))
    sh = torch.where(e.j >= 2, e("f", e.b, e.j - 2), torch.zeros((), dtype=F64))
    return s + e("bh", e.b, e.h) + sh * e("bh", e.b, e.h), mask


S6 = SpecCase("S6", """
name = "probe_in20_s6"
[inputs]
kl = { dims = ["b"], dtype = "int64" }
ix = { dims = ["b", "n"], dtype = "int32" }
on = { dims = [6], dtype = "bool" }
f  = { dims = ["b", "n"], dtype = "float32", grad = true }
bh = { dims = ["b", "h"], dtype = "float32", grad = true }
[mask]
where = "j < kl[b] and (on[ix[b, j]] or j == i)"
[score]
bias = "bh[b, h] + where(j >= 2, f[b, j - 2], 0.0) * bh[b, h]"
""", (Decl("kl", ("b",), "int64", lo=0, hi=40), Decl("ix", ("b", "n"), "int32", lo=-2, hi=7),
      Decl("on", (6,), "bool", lo=0, hi=1), Decl("f", ("b", "n"), "float32", True),
      Decl("bh", ("b", "h"), "float32", True)), _s6)


SPECS = {c.name: c for c in (S1, S2, S3, S4, S5, S6)}
_MODULES = {}
VERBOSE = False


def compiled(sc: SpecCase):
    if sc.name not in _MODULES:
        _MODULES[sc.name] = (attncc.compile(sc.text), attncc.parse_spec(sc.text))
    return _MODULES[sc.name]


# ---------------------------------------------------------------------------------------------
# layouts: (leaf made by the caller, view: leaf -> the tensor passed)
# ---------------------------------------------------------------------------------------------

HOWS = ("contiguous", "permute", "step", "offset", "expand", "overlap", "readonly", "dtype")


def make_layout(values: torch.Tensor, how: str, rng: random.Random, gen):
    """(leaf, view, values): ``view(leaf)`` is the tensor passed; ``values`` what it holds (expand and
    overlap change them). ``view`` applies to any leaf of the same layout (the oracle's float64 copy)."""
    shape = tuple(values.shape)
    nd = len(shape)

    def garbage(n, dtype):
        if dtype == torch.bool:
            return torch.rand(n, generator=gen) < 0.5
        if dtype.is_floating_point:
            return (torch.randn(n, generator=gen) * 100).to(dtype)
        info = torch.iinfo(dtype)
        return torch.randint(max(info.min, -100), min(info.max, 100) + 1, (n,), generator=gen).to(dtype)

    if how == "permute" and nd >= 2:
        perm = list(range(nd))
        while perm == list(range(nd)):
            rng.shuffle(perm)
        inv = [perm.index(a) for a in range(nd)]
        leaf = values.permute(*perm).contiguous()
        return leaf, (lambda L: L.permute(*inv)), values
    if how == "step" and nd >= 1:
        d = rng.randrange(nd)
        step, start = rng.choice((2, 3)), rng.randrange(2)
        big = list(shape)
        big[d] = shape[d] * step + start
        leaf = garbage(int(np.prod(big)), values.dtype).view(big).clone()
        sl = [slice(None)] * nd
        sl[d] = slice(start, start + step * shape[d], step)
        leaf[tuple(sl)] = values
        return leaf, (lambda L: L[tuple(sl)]), values
    if how == "offset":
        off = rng.randint(1, 9)
        n = max(values.numel(), 1)
        leaf = garbage(n + off + 3, values.dtype).clone()
        leaf[off:off + values.numel()] = values.reshape(-1)
        return leaf, (lambda L: L[off:off + values.numel()].view(shape)), values
    if how == "expand" and nd >= 1:
        dims = [a for a in range(nd) if shape[a] > 1]
        if dims:
            chosen = rng.sample(dims, rng.randint(1, len(dims)))
            small = values
            for a in chosen:
                small = small.narrow(a, 0, 1)
            leaf = small.contiguous()
            return leaf, (lambda L: L.expand(*shape)), leaf.expand(*shape)
    if how == "overlap" and nd >= 2:
        # element [x0, x1, ...] at sum(x) * 1 + x0 * (something small): overlapping rows
        strides = [1] * nd
        strides[0] = rng.choice((1, 2))
        n = sum((s - 1) * st for s, st in zip(shape, strides)) + 1
        leaf = garbage(n, values.dtype).clone()
        return leaf, (lambda L: L.as_strided(shape, strides)), leaf.as_strided(shape, strides)
    if how == "readonly" and values.dtype not in (torch.bfloat16,):
        arr = values.numpy().copy()
        arr.setflags(write=False)
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            leaf = torch.from_numpy(arr)
        return leaf, (lambda L: L), values
    leaf = values.contiguous()
    return leaf, (lambda L: L), values


def draw_values(d: Decl, shape, gen, rng) -> torch.Tensor:
    if d.dtype == "bool":
        return torch.rand(shape, generator=gen) < 0.6
    if d.dtype in INTS:
        return torch.randint(d.lo, d.hi + 1, shape, generator=gen, dtype=torch.int64)
    return 0.5 * torch.randn(shape, generator=gen)


def passed_dtype(d: Decl, rng: random.Random, values: torch.Tensor):
    """A dtype the doc accepts for ``d`` that holds ``values``: another int width (narrower only where
    the values fit), an int one for a bool input, any float for a float input."""
    if d.dtype == "bool":
        return rng.choice((torch.bool, torch.bool, torch.int8, torch.uint8, torch.int32, torch.int64))
    if d.dtype in INTS:
        lo, hi = int(values.min()) if values.numel() else 0, int(values.max()) if values.numel() else 0
        ok = [DT[x] for x in INTS if torch.iinfo(DT[x]).min <= lo and hi <= torch.iinfo(DT[x]).max]
        return rng.choice(ok)
    return DT[rng.choice(FLOATS)]


# ---------------------------------------------------------------------------------------------
# one call
# ---------------------------------------------------------------------------------------------

def oracle(sc: SpecCase, q, k, v, vals, B, H, Hkv, Nq, Nk, q_off, k_off, n_q, n_k, decls):
    """float64: o, lse from the spec's own semantics written out here."""
    e = Env(B, H, Nq, Nk, q_off, k_off, n_q, n_k, vals, decls)
    rep = H // Hkv
    kk = k.expand(B, *k.shape[1:]).repeat_interleave(rep, 1)
    vv = v.expand(B, *v.shape[1:]).repeat_interleave(rep, 1)
    s = torch.einsum("bhid,bhjd->bhij", q, kk) / math.sqrt(q.shape[-1])
    s, mask = sc.score(s, e)
    s = s.expand(B, H, Nq, Nk)
    if sc.softcap:
        s = sc.softcap * torch.tanh(s / sc.softcap)
    if mask is not None:
        s = torch.where(mask.expand(B, H, Nq, Nk), s, torch.tensor(-math.inf, dtype=F64))
    lse = torch.logsumexp(s, -1)
    fin = torch.isfinite(lse)
    p = torch.exp(s - torch.where(fin, lse, 0.0)[..., None])
    p = torch.where(torch.isfinite(s), p, 0.0)
    o = torch.einsum("bhij,bhjd->bhid", p, vv)
    return o, lse


@dataclass
class Call:
    B: int
    H: int
    Hkv: int
    Nq: int
    Nk: int
    D: int
    q_off: int
    k_off: int
    n_q: Optional[int]
    n_k: Optional[int]
    qdt: torch.dtype
    hows: Dict[str, str]
    dtypes: Dict[str, torch.dtype]
    grads: List[str]
    alias: Optional[str]
    kv_b1: bool


def draw_call(sc: SpecCase, p, rng: random.Random) -> Call:
    H, Hkv = sc.heads or (None, None)
    if H is None:
        H = rng.choice((1, 2, 3, 4, 6))
        Hkv = rng.choice([d for d in (1, 2, 3, 6) if H % d == 0])
    B = rng.choice((1, 2, 3))
    Nq, Nk = rng.randint(1, 30), rng.randint(1, 30)
    if rng.random() < 0.3:
        Nk = Nq
    D = rng.choice((4, 8, 16))
    q_off = rng.choice((0, 0, rng.randint(0, 12)))
    k_off = rng.choice((0, 0, 0, rng.randint(0, 8)))
    n_q = q_off + Nq + rng.choice((0, 0, 2)) if rng.random() < 0.4 else None
    n_k = k_off + Nk + rng.choice((0, 0, 3)) if rng.random() < 0.4 else None
    qdt = rng.choice((torch.float32,) * 5 + (torch.bfloat16, torch.float16))
    hows = {d.name: rng.choice(HOWS) for d in sc.decls}
    grads = [d.name for d in sc.decls if d.grad and rng.random() < 0.85]
    alias = None
    cands = [d.name for d in sc.decls if d.grad and tuple(d.dims[:2]) == ("b", "h") and d.name in grads]
    if cands and qdt == torch.float32 and rng.random() < 0.3:
        alias = cands[0]
    kv_b1 = B > 1 and rng.random() < 0.2
    return Call(B, H, Hkv, Nq, Nk, D, q_off, k_off, n_q, n_k, qdt, hows, {}, grads, alias, kv_b1)


def rounded(t, dtype, unless=None):
    """The float64 ``t`` with the values of its ``dtype`` rounding and ``t``'s gradient (``t`` itself where
    ``dtype`` is ``unless``): what a caller's tensor of that dtype holds, differentiable as ``t``."""
    return t if dtype == unless else t.detach().to(dtype).to(F64) + (t - t.detach())


def run(sc: SpecCase, seed: int, verbose=False):
    m, p = compiled(sc)
    rng = random.Random(seed * 7919 + sum(map(ord, sc.name)))
    gen = torch.Generator().manual_seed(seed)
    c = draw_call(sc, p, rng)
    B, H, Hkv, Nq, Nk, D = c.B, c.H, c.Hkv, c.Nq, c.Nk, c.D
    q_end, k_end = c.q_off + Nq, c.k_off + Nk
    n_q = c.n_q if c.n_q is not None else q_end
    n_k = c.n_k if c.n_k is not None else k_end
    axes = {d.name: p.position_axes(d.name) for d in p.inputs}
    leaves, views, vals_passed = {}, {}, {}
    for d in sc.decls:
        shape = []
        for axis, x in enumerate(d.dims):
            if x == "n":
                read_at = axes[d.name][axis] if axes[d.name] else ""
                need = {"i": q_end, "j": k_end}.get(read_at, max(q_end, k_end))
                shape.append(need + rng.choice((0, 0, 0, 1, 4)))
            else:
                shape.append({"b": B, "h": H}.get(x, x))
        values = draw_values(d, shape, gen, rng)
        how = c.hows[d.name]
        dt = DT[d.dtype]
        if how == "dtype":
            dt = passed_dtype(d, rng, values)
        elif d.dtype in FLOATS and rng.random() < 0.3:
            dt = DT[rng.choice(FLOATS)]
        values = values.to(dt)
        if how == "overlap" and d.dtype not in FLOATS and d.dtype != "bool":
            pass
        leaf, view, held = make_layout(values, how, rng, gen)
        if d.dtype in INTS and how == "overlap":  # garbage may not fit the declared range: keep it small
            pass
        leaves[d.name], views[d.name], vals_passed[d.name] = leaf, view, held
        c.dtypes[d.name] = dt
    q0 = torch.randn(B, H, Nq, D, generator=gen)
    kb = 1 if c.kv_b1 else B
    k0 = torch.randn(kb, Hkv, Nk, D, generator=gen)
    v0 = torch.randn(kb, Hkv, Nk, D, generator=gen)
    base = None
    if c.alias:  # q and a float [b, h, n] input share one storage (and one leaf)
        d = next(x for x in sc.decls if x.name == c.alias)
        shp = list(vals_passed[c.alias].shape)
        n = max(shp[2] if len(shp) > 2 else 1, Nq)
        base = torch.randn(B, H, n, D + 1 + (shp[3] if len(shp) > 3 else 1), generator=gen) * 0.5
        base[:, :, :Nq, :D] = q0
        rest = shp[3] if len(shp) > 3 else None
        if len(shp) == 2:
            aview = (lambda L: L[:, :, 0, D])
        elif rest is None:
            aview = (lambda L, shp=shp: L[:, :, :shp[2], D])
        else:
            aview = (lambda L, shp=shp: L[:, :, :shp[2], D:D + shp[3]])
        leaves[c.alias], views[c.alias] = None, aview
        c.dtypes[c.alias] = torch.float32
        c.hows[c.alias] = "alias-q"
    desc = {k: getattr(c, k) for k in ("B", "H", "Hkv", "Nq", "Nk", "D", "q_off", "k_off", "n_q", "n_k", "qdt",
                                        "hows", "dtypes", "grads", "alias", "kv_b1")}
    if verbose:
        print(sc.name, desc)

    def build(dtype_q, to64):
        """The call's tensors from fresh leaves: (q, k, v, kwargs, wrt leaves, labels)."""
        wrt, labels = [], []
        if base is not None:
            bl = (base.to(F64) if to64 else base).clone().requires_grad_(True)
            q = bl[:, :, :Nq, :D]
            q = q if to64 else q.to(dtype_q) if dtype_q != torch.float32 else q
            wrt.append(bl)
            labels.append("base(q+" + c.alias + ")")
        else:
            ql = (q0.to(F64) if to64 else q0.to(dtype_q)).requires_grad_(True)
            q = ql
            wrt.append(ql)
            labels.append("q")
        kl = (k0.to(F64) if to64 else k0.to(dtype_q)).requires_grad_(True)
        vl = (v0.to(F64) if to64 else v0.to(dtype_q)).requires_grad_(True)
        wrt += [kl, vl]
        labels += ["k", "v"]
        kw = {}
        for d in sc.decls:
            if d.name == c.alias:
                kw[d.name] = views[d.name](bl)
                continue
            leaf = leaves[d.name]
            if leaf.is_floating_point():
                leaf = (leaf.to(F64) if to64 else leaf).detach().clone() if to64 else leaf.detach()
                if d.name in c.grads:
                    leaf.requires_grad_(True)
                    wrt.append(leaf)
                    labels.append(d.name)
            kw[d.name] = views[d.name](leaf)
        return q, kl, vl, kw, wrt, labels

    pos = dict(q_offset=c.q_off, k_offset=c.k_off)
    if c.n_q is not None:
        pos["n_q"] = c.n_q
    if c.n_k is not None:
        pos["n_k"] = c.n_k
    go = torch.randn(B, H, Nq, D, generator=gen)
    gl = torch.randn(B, H, Nq, generator=gen)

    def loss_of(o, lse):
        lse = torch.where(torch.isfinite(lse), lse, torch.zeros((), dtype=lse.dtype))
        return (o.to(F64) * go.to(F64)).sum() + (lse.to(F64) * gl.to(F64)).sum()

    # kernels
    q, kk, vv, kw, wrt, labels = build(c.qdt, False)
    o, lse = m.attention(q, kk, vv, return_lse=True, **pos, **kw)
    grads = torch.autograd.grad(loss_of(o, lse), wrt, allow_unused=True, materialize_grads=True)
    # attncc.reference
    rq, rk, rv, rkw, rwrt, _ = build(c.qdt, True)
    rq2, rk2, rv2 = (rounded(t, c.qdt, torch.float32) for t in (rq, rk, rv))
    # attncc.reference reads float inputs at their declared type: pass the kernel call's dtypes
    rkw_ref = {}
    for d in sc.decls:
        t = rkw[d.name]
        if t.is_floating_point():
            rkw_ref[d.name] = rounded(t, c.dtypes[d.name], F64)
        else:
            rkw_ref[d.name] = t
    ro, rlse = attncc.reference(p, rq2, rk2, rv2, return_lse=True, **pos, **rkw_ref)
    rgrads = torch.autograd.grad(loss_of(ro, rlse), rwrt, allow_unused=True, materialize_grads=True)
    # the oracle
    oq, ok_, ov, okw, owrt, _ = build(c.qdt, True)
    oq2, ok2, ov2 = (rounded(t, c.qdt, torch.float32) for t in (oq, ok_, ov))
    vals = {}
    for d in sc.decls:
        t = okw[d.name]
        if t.is_floating_point():
            t = rounded(t, c.dtypes[d.name])  # what the caller's tensor holds
        vals[d.name] = values_as_read(d, t)
    xo, xlse = oracle(sc, oq2, ok2, ov2, vals, B, H, Hkv, Nq, Nk, c.q_off, c.k_off, n_q, n_k, sc.decls)
    xgrads = torch.autograd.grad(loss_of(xo, xlse), owrt, allow_unused=True, materialize_grads=True)

    tol = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (2e-2, 6e-2), torch.float16: (5e-3, 2e-2)}[c.qdt]
    half = any(dt in (torch.float16, torch.bfloat16) for dt in c.dtypes.values()) or \
        any(d.dtype in ("float16", "bfloat16") for d in sc.decls)
    problems = []

    def cmp(label, x, r, t):
        x, r = x.detach().double(), r.detach().double()
        if x.shape != r.shape:
            problems.append(f"{label}: shape {tuple(x.shape)} vs {tuple(r.shape)}")
            return
        fr, fx = torch.isfinite(r), torch.isfinite(x)
        if not torch.equal(fr, fx):
            bad = (fr != fx).nonzero()[:3].tolist()
            problems.append(f"{label}: finiteness differs at {bad}")
            return
        if not torch.equal(x[~fr], r[~fr]):
            problems.append(f"{label}: non-finite values differ")
        den = r[fr].norm().clamp_min(1e-2)
        err = float((x[fr] - r[fr]).norm() / den)
        if err > t:
            problems.append(f"{label}: rel err {err:.3g} (|ref| {float(r[fr].norm()):.3g})")
            if VERBOSE:
                print(label, x.flatten()[:6].tolist(), r.flatten()[:6].tolist())

    for who, (ao, alse, agr) in (("ref", (ro, rlse, rgrads)), ("oracle", (xo, xlse, xgrads))):
        cmp(f"o/{who}", o, ao, tol[0])
        cmp(f"lse/{who}", lse, alse, tol[0] * 10)
        for label, x, r, leaf in zip(labels, grads, agr, wrt):
            if x.dtype != leaf.dtype or x.shape != leaf.shape:
                problems.append(f"d{label}: {x.dtype}{tuple(x.shape)} vs leaf {leaf.dtype}{tuple(leaf.shape)}")
                continue
            gt = tol[1] * (5 if label not in "qkv" and (half or leaf.dtype in (torch.float16, torch.bfloat16)) else 1)
            if leaf.dtype in (torch.float16, torch.bfloat16) and c.hows.get(label) in ("expand", "overlap"):
                gt = 4e-2  # each entry of the view's gradient rounded to the leaf's 16 bits before the sum
            if label == "hb" and c.qdt != torch.float32:
                continue  # a table times a distance in a 16-bit call: docs/spec-language.md §1 (train in float32)
            cmp(f"d{label}/{who}", x, r, gt)
    # the reference against the oracle (both float64): tight
    if VERBOSE:
        dd = (ro - xo).abs()
        print("ref-vs-oracle o max diff", float(dd.max()), "at", (dd == dd.max()).nonzero()[:3].tolist())
    cmp("o/ref-vs-oracle", ro, xo, 1e-9)
    cmp("lse/ref-vs-oracle", rlse, xlse, 1e-9)
    for label, r, x in zip(labels, rgrads, xgrads):
        cmp(f"d{label}/ref-vs-oracle", r, x, 1e-8)
    return problems, desc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=10)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--spec", action="append")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args()
    global VERBOSE
    VERBOSE = a.verbose
    specs = [SPECS[s] for s in a.spec] if a.spec else list(SPECS.values())
    seeds = [a.seed] if a.seed is not None else range(a.start, a.start + a.cases)
    run_seeds([(sc.name, seed) for sc in specs for seed in seeds], lambda case: run(SPECS[case[0]], case[1], a.verbose),
              a.verbose)




# ---------------------------------------------------------------------------------------------
# refusals: what the doc says a call must not take, the kernels and the reference alike
# ---------------------------------------------------------------------------------------------

def valid_call(sc: SpecCase, B=2, H=None, Hkv=None, Nq=7, Nk=9, D=8, seed=0):
    """(module, pattern, q, k, v, kwargs, sizes): a call every check passes."""
    m, p = compiled(sc)
    H, Hkv = sc.heads or (H or 4, Hkv or 2)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    axes = {d.name: p.position_axes(d.name) for d in p.inputs}
    kw = {}
    for d in sc.decls:
        shape = []
        for axis, x in enumerate(d.dims):
            if x == "n":
                read_at = axes[d.name][axis] if axes[d.name] else ""
                shape.append({"i": Nq, "j": Nk}.get(read_at, max(Nq, Nk)))
            else:
                shape.append({"b": B, "h": H}.get(x, x))
        kw[d.name] = draw_values(d, shape, gen, rng).to(DT[d.dtype])
    q = torch.randn(B, H, Nq, D, generator=gen)
    k = torch.randn(B, Hkv, Nk, D, generator=gen)
    v = torch.randn(B, Hkv, Nk, D, generator=gen)
    return m, p, q, k, v, kw


def refusal_variants(sc: SpecCase, kw, B, H, Hkv):
    """(label, name, tensor, expected exception type) for each input."""
    out = []
    for d in sc.decls:
        t = kw[d.name]
        for axis, x in enumerate(d.dims):
            if x == "b" and B > 1:
                out.append((f"{d.name}: 'b' of size 1", d.name, t.narrow(axis, 0, 1), ValueError))
            if x == "h" and Hkv != H:
                out.append((f"{d.name}: 'h' of the kv heads", d.name, t.narrow(axis, 0, Hkv), ValueError))
            if x == "n":
                out.append((f"{d.name}: 'n' one short", d.name, t.narrow(axis, 0, t.shape[axis] - 1), ValueError))
            if isinstance(x, int):
                out.append((f"{d.name}: fixed {x} + 1", d.name,
                            torch.cat([t, t.narrow(axis, 0, 1)], axis), ValueError))
        out.append((f"{d.name}: an extra dim", d.name, t.unsqueeze(0), ValueError))
        if t.dim():
            out.append((f"{d.name}: a dim less", d.name, t.select(0, 0), ValueError))
        if d.dtype in INTS:
            out += [(f"{d.name}: float for int", d.name, t.float(), TypeError),
                    (f"{d.name}: bool for int", d.name, t != 0, TypeError)]
        elif d.dtype == "bool":
            out.append((f"{d.name}: float for bool", d.name, t.float(), TypeError))
        else:
            out += [(f"{d.name}: int for float", d.name, t.to(torch.int32), TypeError),
                    (f"{d.name}: bool for float", d.name, t != 0, TypeError),
                    (f"{d.name}: complex for float", d.name, t.to(torch.complex64), TypeError)]
        out.append((f"{d.name}: on meta", d.name, t.to("meta"), ValueError))
        out.append((f"{d.name}: a list", d.name, t.tolist(), TypeError))
    return out


def check_refusals(sc: SpecCase, B=2):
    m, p, q, k, v, kw = valid_call(sc, B=B)
    H, Hkv = q.shape[1], k.shape[1]
    problems = []
    m.attention(q, k, v, **kw)  # valid
    for label, name, bad, want in refusal_variants(sc, kw, B, H, Hkv):
        args = {**kw, name: bad}
        for who, fn in (("kernels", lambda: m.attention(q, k, v, **args)),
                        ("reference", lambda: attncc.reference(p, q.double(), k.double(), v.double(), **args))):
            if who == "reference" and "meta" in label:
                continue
            try:
                fn()
                problems.append(f"{sc.name} {label}: {who} accepted it")
            except Exception as ex:  # noqa: BLE001
                if not isinstance(ex, want):
                    problems.append(f"{sc.name} {label}: {who} raised {type(ex).__name__}: {str(ex)[:160]}")
    missing = dict(kw)
    missing.pop(sc.decls[0].name)
    for who, fn in (("kernels", lambda: m.attention(q, k, v, **missing)),
                    ("reference", lambda: attncc.reference(p, q.double(), k.double(), v.double(), **missing))):
        try:
            fn()
            problems.append(f"{sc.name} missing input: {who} accepted it")
        except ValueError:
            pass
        except Exception as ex:  # noqa: BLE001
            problems.append(f"{sc.name} missing input: {who} raised {type(ex).__name__}: {str(ex)[:160]}")
    return problems


# ---------------------------------------------------------------------------------------------
# decode: the same inputs and layouts, each batch row against attncc.reference on that row alone
# ---------------------------------------------------------------------------------------------

def run_decode(sc: SpecCase, seed: int, verbose=False):
    m, p = compiled(sc)
    rng = random.Random(seed * 131 + sum(map(ord, sc.name)))
    gen = torch.Generator().manual_seed(seed)
    H, Hkv = sc.heads or (None, None)
    if H is None:
        H = rng.choice((1, 2, 4, 6))
        Hkv = rng.choice([d for d in (1, 2, 3) if H % d == 0])
    B = rng.choice((1, 2, 3))
    Nq = rng.choice((1, 1, 2, 4))
    Nmax = rng.randint(4, 40)
    D = rng.choice((8, 16))
    paged = rng.random() < 0.4
    kv_len = [rng.randint(0, Nmax) for _ in range(B)]
    hows, kw, dtypes = {}, {}, {}
    for d in sc.decls:
        cap = Nmax if not paged else None
        shape = [{"b": B, "h": H}.get(x, x) if x != "n" else -1 for x in d.dims]
        hows[d.name] = rng.choice(HOWS)
        kw[d.name] = (d, shape)
    page = 16
    if paged:
        pages_per_row = -(-Nmax // page)
        Nmax = pages_per_row * page
    for name, (d, shape) in list(kw.items()):
        shape = [Nmax + rng.choice((0, 0, 3)) if x == -1 else x for x in shape]
        values = draw_values(d, shape, gen, rng)
        dt = DT[d.dtype]
        if hows[name] == "dtype":
            dt = passed_dtype(d, rng, values)
        values = values.to(dt)
        leaf, view, held = make_layout(values, hows[name], rng, gen)
        kw[name] = view(leaf)
        dtypes[name] = dt
    q = torch.randn(B, H, Nq, D, generator=gen)
    kc = torch.randn(B, Hkv, Nmax, D, generator=gen)
    vc = torch.randn(B, Hkv, Nmax, D, generator=gen)
    args = dict(kv_len=torch.tensor(kv_len, dtype=torch.int32))
    if paged:
        n_pages = B * (Nmax // page) + 2
        perm = torch.randperm(n_pages, generator=gen)[:B * (Nmax // page)].view(B, Nmax // page).to(torch.int32)
        kp = torch.zeros(n_pages, page, Hkv, D)
        vp = torch.zeros(n_pages, page, Hkv, D)
        for b in range(B):
            for pg in range(Nmax // page):
                kp[perm[b, pg]] = kc[b, :, pg * page:(pg + 1) * page].transpose(0, 1)
                vp[perm[b, pg]] = vc[b, :, pg * page:(pg + 1) * page].transpose(0, 1)
        o, lse = m.decode(q, kp, vp, block_table=perm, return_lse=True, **args, **kw)
    else:
        o, lse = m.decode(q, kc, vc, return_lse=True, **args, **kw)
    desc = dict(B=B, H=H, Hkv=Hkv, Nq=Nq, Nmax=Nmax, D=D, paged=paged, kv_len=kv_len, hows=hows, dtypes=dtypes)
    problems = []
    for b in range(B):
        n = kv_len[b]
        rkw = {}
        for d in sc.decls:
            t = kw[d.name]
            for axis, x in enumerate(d.dims):
                if x == "b":
                    t = t.narrow(axis, b, 1)
            rkw[d.name] = t.double() if t.is_floating_point() else t
        neg = max(Nq - n, 0)  # query rows at negative positions see no key: o = 0, lse = -inf
        ro = torch.zeros(1, H, Nq, D, dtype=F64)
        rlse = torch.full((1, H, Nq), -math.inf, dtype=F64)
        if n > 0 and neg < Nq:
            ro[:, :, neg:], rlse[:, :, neg:] = attncc.reference(
                p, q[b:b + 1, :, neg:].double(), kc[b:b + 1, :, :n].double(), vc[b:b + 1, :, :n].double(),
                q_offset=n - Nq + neg, return_lse=True, **rkw)
        err = float((o[b:b + 1].double() - ro).norm() / ro.norm().clamp_min(1e-3))
        fin = torch.isfinite(rlse)
        if err > 1e-4 or not torch.equal(torch.isfinite(lse[b:b + 1]), fin) or \
                (fin.any() and float(((lse[b:b + 1].double()[fin] - rlse[fin]).abs() / rlse[fin].abs().clamp_min(1)).max()) > 1e-5):
            problems.append(f"row {b}: o rel err {err:.3g}, lse {lse[b].tolist()} vs {rlse[0].tolist()}")
    return problems, desc


if __name__ == "__main__":
    main()
