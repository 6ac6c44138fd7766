"""Probe 27 (meta27): metamorphic testing of the spec language. One attention pattern written in
several equivalent ways must give the same o, LSE and gradients, each equal to ``attncc.reference``,
and the reference must equal a direct torch float64 computation of the pattern written here (a bug
shared by the kernels and the reference is invisible otherwise).

Each seed draws an equivalence class (a family below with random constants, params of either sign,
offsets, Nq != Nk, GQA, a dtype) and 2-4 of its spellings; every spelling is compiled in process
(``attncc.compile``) and run under the interpreter. Checks per spelling: the reference against the
oracle written here (float64, 1e-9), the kernels against the reference (o, LSE, dq, dk, dv and the
learned tables' gradients; dtype tolerances); across spellings, the kernels' results against each
other.

Each case also runs its first spelling split in two along the queries (q_offset) and along the
keys (k_offset, merged by the LSEs), n_q and n_k passed as the whole call's: the whole call's o
and LSE. A third of the cases force the residue-class and column splits
(ATTNCC_RESIDUE_MIN_ROWS=1, ATTNCC_COLUMN_MIN_ROWS=1).

    TRITON_INTERPRET=1 PYTHONPATH=. python3 tests/probe_meta27.py --cases 40 [--start 0] [--verbose]
    PROBE_FAMILIES=window,floordiv ...   (only those families)

Run in session 27 (meta27): seeds 0-356 and about 200 from 400 on (all families), 1000-1029,
2000-2029, 3000-3029, 4000-4011 (a few families each), 25 families, 3-5 spellings a case. Found
the four defects of tests/test_probe_meta27.py (seeds 3003.. and the where-divisor class at
w = 0); everything else flagged was the probe's own (fixed in the draws: operands rounded to the
dtype before the reference, the oracle's float32 products, offsets of the shifted spelling, a
float32 row term far into a sequence) or documented: a 16-bit table gradient times a distance
(§1), a float32 score of a distance near 2**31, a mod's condition on a sum of conditions
(written-out size), params below -2**31, a square past int64.
"""
from __future__ import annotations

import math
import os
import random
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

import attncc  # noqa: E402
from cases import run_seeds, seed_parser, seeds_of  # noqa: E402
from fuzz_specs import _environment  # noqa: E402

NEG_INF = float("-inf")
TOL = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}


@dataclass
class Variant:
    """One spelling: the spec (a dict of spec keys, without name) and the call's params for it."""
    label: str
    spec: dict
    params: Dict[str, object] = field(default_factory=dict)
    at_zero: bool = False  # called at offsets 0 (the positions written into its params)


@dataclass
class Case:
    family: str
    variants: List[Variant]
    # oracle(G) -> (mask [B, H, Nq, Nk] bool, score_fn(s, X) -> s): G holds b, h, i, j (int64, broadcast),
    # n_q, n_k (ints) and H (the query heads); X the inputs (leaves for learned tables)
    oracle: Callable
    inputs: Dict[str, torch.Tensor] = field(default_factory=dict)
    learned: Tuple[str, ...] = ()
    B: int = 1
    Hq: int = 2
    Hkv: int = 1
    Nq: int = 17
    Nk: int = 17
    D: int = 16
    dtype: torch.dtype = torch.float32
    q_offset: int = 0
    k_offset: int = 0
    n_q: Optional[int] = None
    n_k: Optional[int] = None
    scale: Optional[float] = None
    backward: bool = True
    env: Dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        head = (f"{self.family} B={self.B} Hq={self.Hq} Hkv={self.Hkv} Nq={self.Nq} Nk={self.Nk} D={self.D} "
                f"{str(self.dtype)[6:]} off=({self.q_offset}, {self.k_offset}) n=({self.n_q}, {self.n_k}) env={self.env}")
        return head + "".join(f"\n      {v.label}: {v.spec} {v.params}" for v in self.variants)


def mask_spec(where: str, params=None, inputs=None, score=None) -> dict:
    spec = {"mask": {"where": where}}
    if params:
        spec["params"] = dict(params)
    if inputs:
        spec["inputs"] = dict(inputs)
    if score:
        spec["score"] = dict(score)
    return spec


def as_mod(cond: str) -> str:
    return f"where({cond}, s, -inf)"


def spellings_of_mask(rng, forms: List[str], params: dict, inputs=None, extra_score=None) -> List[Variant]:
    """Each boolean form in [mask].where, and some as a `where(c, s, -inf)` mod."""
    out = []
    for n, f in enumerate(forms):
        out.append(Variant(f"mask{n}", mask_spec(f, params, inputs, extra_score)))
        # (a mod's condition on a sum of conditions is written out case by case: documented limits)
        if rng.random() < 0.25 and not (extra_score and "mod" in extra_score) and "sum(" not in f:
            spec = {"score": dict(extra_score or {}, mod=as_mod(f))}
            if params:
                spec["params"] = dict(params)
            if inputs:
                spec["inputs"] = dict(inputs)
            out.append(Variant(f"mod{n}", spec))
    return out


def fdiv(a, b):
    return torch.div(a, b, rounding_mode="floor")


def fmod(a, b):
    return a - fdiv(a, b) * b


def ident(s, X):
    return s


# ---------------------------------------------------------------------------------------------
# families: each returns (variants, oracle, inputs, learned) for the drawn constants
# ---------------------------------------------------------------------------------------------


def fam_shift(rng, c):
    """j <= i + c written six ways (c a literal or a param of either sign)."""
    lit = rng.random() < 0.5
    cv = rng.choice([-3, -1, 0, 0, 2, 5, 40])
    C = str(cv) if lit else "c"
    params = {} if lit else {"c": rng.choice([0, 7, -2])}
    call = {} if lit else {"c": cv}
    forms = [f"j <= i + {C}", f"i - j >= -({C})", f"not (j > i + {C})", f"j < i + {C} + 1", f"0 <= i + {C} - j",
             f"j - {C} <= i", f"i + {C} >= j", f"not (i + {C} < j)"]
    vs = spellings_of_mask(rng, rng.sample(forms, 3), params)
    for v in vs:
        v.params = dict(call)
    return vs, lambda G: (G["j"] <= G["i"] + cv, ident), {}, ()


def fam_window(rng, c):
    """A causal window of width w, De Morgan'd and chained."""
    w = rng.choice([1, 2, 5, 9, 100])
    forms = ["j <= i and i - j < w", "not (j > i or i - j >= w)", "0 <= i - j < w", "i - w < j <= i",
             "(j <= i) & (i - j < w)", "~((j > i) | (i - j >= w))", "max(j - i, i - j - w + 1) <= 0",
             "i - j < w and not (i < j)", "i >= j > i - w", "all(x for x in [j <= i, i - j < w])"]
    forms = forms[:-1]
    vs = spellings_of_mask(rng, rng.sample(forms, 3), {"w": rng.choice([3, 64])})
    for v in vs:
        v.params = {"w": w}
    return vs, lambda G: ((G["j"] <= G["i"]) & (G["i"] - G["j"] < w), ident), {}, ()


def fam_band(rng, c):
    """abs(i - j) <= w and its min / max / square identities."""
    w = rng.choice([0, 1, 4, 7, 30])
    forms = ["abs(i - j) <= w", "max(i - j, j - i) <= w", "i - j <= w and j - i <= w", "-w <= i - j <= w",
             "max(i, j) - min(i, j) <= w", "abs(j - i) < w + 1",
             "not (abs(i - j) > w)", "min(w - i + j, w + i - j) >= 0"]
    vs = spellings_of_mask(rng, rng.sample(forms, 3), {"w": 3})
    for v in vs:
        v.params = {"w": w}
    return vs, lambda G: ((G["i"] - G["j"]).abs() <= w, ident), {}, ()


def fam_floordiv(rng, c):
    """Chunks (x + a) // w == (y + a) // w with a and w of either sign, as // and as % forms."""
    w = rng.choice([1, 2, 3, 5, 7, 16, 41, 1000, -3, -5, -16])
    a = rng.choice([0, -7, -30, 5, -1000, 13])
    lit = rng.random() < 0.4
    W, A = (f"({w})", f"({a})") if lit else ("w", "a")
    forms = [f"(i + {A}) // {W} == (j + {A}) // {W}", f"i + {A} - (i + {A}) % {W} == j + {A} - (j + {A}) % {W}",
             f"(i + {A}) // {W} - (j + {A}) // {W} == 0", f"not ((i + {A}) // {W} != (j + {A}) // {W})",
             f"(i + {A}) // {W} * {W} == (j + {A}) // {W} * {W}",
             f"(j + {A}) // {W} == (i + {A}) // {W}", f"(i + {A}) / {W} // 1 == (j + {A}) / {W} // 1"]
    if rng.random() < 0.5:
        extra = " and j <= i"
        forms = [f + extra for f in forms]
        causal = True
    else:
        causal = False
    params = {} if lit else {"w": 4, "a": 0}
    vs = spellings_of_mask(rng, rng.sample(forms, 3), params)
    for v in vs:
        v.params = {} if lit else {"w": w, "a": a}

    def oracle(G):
        m = fdiv(G["i"] + a, w) == fdiv(G["j"] + a, w)
        return (m & (G["j"] <= G["i"]) if causal else m), ident
    return vs, oracle, {}, ()


def fam_mod(rng, c):
    """(i - j + r) % w == 0 (dilation) as %, //, by -w, on (j - i)."""
    w = rng.choice([1, 2, 3, 4, 7, 50])
    r = rng.choice([0, 1, -1, 5, -9])
    wlim = rng.choice([6, 20, 1000])
    forms = [f"(i - j + r) % w == 0", f"(j - i - r) % w == 0", f"(i - j + r) // w * w == i - j + r",
             f"(i - j + r) % nw == 0", f"i - j + r - (i - j + r) // w * w == 0", f"(i + r) % w == j % w",
             f"not ((i - j + r) % w != 0)"]
    causal = rng.random() < 0.6
    tail = " and j <= i and i - j < lim" if causal else ""
    vs = spellings_of_mask(rng, [f + tail for f in rng.sample(forms, 3)], {"w": 2, "r": 0, "nw": -2, "lim": 10})
    for v in vs:
        v.params = {"w": w, "r": r, "nw": -w, "lim": wlim}

    def oracle(G):
        d = G["i"] - G["j"] + r
        m = fmod(d, w) == 0
        if causal:
            m = m & (G["j"] <= G["i"]) & (G["i"] - G["j"] < wlim)
        return m, ident
    return vs, oracle, {}, ()


def fam_bits(rng, c):
    """Same aligned block of 2**k, through ^, >>, //, & -C, & ~(C - 1)."""
    k = rng.choice([0, 1, 3, 4])
    C = 2 ** k
    forms = [f"(i ^ j) >> {k} == 0", f"i >> {k} == j >> {k}", f"i // {C} == j // {C}", f"i & {-C} == j & {-C}",
             f"(i & ~{C - 1}) == (j & ~{C - 1})", f"i - i % {C} == j - j % {C}", f"(i ^ j) < {C}",
             f"((i ^ j) & {-C}) == 0"]
    vs = spellings_of_mask(rng, rng.sample(forms, 3), {})
    return vs, lambda G: (fdiv(G["i"], C) == fdiv(G["j"], C), ident), {}, ()


def fam_floatcmp(rng, c):
    """Integer conditions written with floats: * 1.0, / w, 2.0 * j, float params."""
    w = rng.choice([1, 3, 8, 25])
    forms = ["i - j < w and j <= i", "(i - j) / w < 1 and j * 1.0 <= i", "2.0 * (i - j) < 2 * w and 2.0 * j <= 2 * i",
             "i - j < fw and j <= i + 0.0", "(i - j) * 0.5 < w * 0.5 and j <= i * 1.0", "i - j < fw and not (j > i)",
             "(i - j) / fw < 1.0 and j / 3 <= i / 3"]
    vs = spellings_of_mask(rng, rng.sample(forms, 3), {"w": 2, "fw": 2.0})
    for v in vs:
        v.params = {"w": w, "fw": float(w)}
    return vs, lambda G: ((G["i"] - G["j"] < w) & (G["j"] <= G["i"]), ident), {}, ()


def fam_bias(rng, c):
    """A bias in [score].bias, as `s + g` in mod, split between the two, rearranged."""
    k = rng.choice([0.1, -0.37, 1.5, 0.01])
    kind = rng.choice(["dist", "j", "i", "floor", "sq"])
    if kind == "dist":
        g, forms, fn = "kk * (j - i)", ["kk * (j - i)", "kk * j - kk * i", "-kk * (i - j)", "(j - i) * kk"], lambda I, J: k * (J - I)
    elif kind == "j":
        g, forms, fn = "kk * j", ["kk * j", "j * kk", "kk * (j + 1) - kk", "kk * j + 0 * i"], lambda I, J: k * J
    elif kind == "i":
        g, forms, fn = "kk * i + 2.0", ["kk * i + 2.0", "2 + i * kk", "kk * (i + 2 / kk)"], lambda I, J: k * I + 2.0
    elif kind == "floor":
        g, forms, fn = "(i - j) // 3 * kk", ["(i - j) // 3 * kk", "kk * ((i - j) // 3)", "kk * (-((j - i + 2) // 3))"], \
            lambda I, J: fdiv(I - J, 3) * k
    else:
        g, forms, fn = "kk * (i - j) ** 2 / 64", ["kk * (i - j) ** 2 / 64", "kk * (i - j) * (i - j) / 64",
                                                 "kk / 64 * (j - i) ** 2"], lambda I, J: k * (I - J).double() ** 2 / 64
    params = {"kk": 0.5}
    mask = rng.choice([None, "j <= i", "abs(i - j) < 9"])
    vs = []
    for n, f in enumerate(rng.sample(forms, min(3, len(forms)))):
        shape = rng.choice(["bias", "mod", "modr", "split"])
        score = {"bias": {"bias": f}, "mod": {"mod": f"s + {f}"}, "modr": {"mod": f"({f}) + s"},
                 "split": {"bias": f"({f}) / 2", "mod": f"s + ({f}) / 2"}}[shape]
        spec = {"params": params, "score": score}
        if mask:
            spec["mask"] = {"where": mask}
        vs.append(Variant(f"{shape}{n}", spec, {"kk": k}))

    def oracle(G):
        m = torch.ones_like(G["i"], dtype=torch.bool)
        if mask == "j <= i":
            m = G["j"] <= G["i"]
        elif mask:
            m = (G["i"] - G["j"]).abs() < 9
        bias = fn(G["i"].double(), G["j"].double())
        return m, lambda s, X: s + bias
    return vs, oracle, {}, ()


def fam_softcap(rng, c):
    """[score].softcap against its tanh mod, with a bias and a mask."""
    cap = rng.choice([0.5, 2.0, 20.0])
    bias = rng.choice([None, "0.3 * (j - i)"])
    mask = rng.choice(["j <= i", "abs(i - j) < 7"])
    score_b = {"bias": bias} if bias else {}
    forms = [dict(score_b, softcap=cap), dict(score_b, mod=f"{cap} * tanh(s / {cap})"),
             dict(score_b, mod="cap * tanh(s / cap)"), dict(score_b, mod=f"tanh(s / {cap}) * {cap}")]
    if not bias:
        forms.append({"mod": f"{cap} * tanh((s + 0.0) / {cap})"})
    vs = [Variant(f"f{n}", {"params": {"cap": cap}, "mask": {"where": mask}, "score": f}) for n, f in enumerate(forms)]
    vs = rng.sample(vs, 3)

    def oracle(G):
        m = G["j"] <= G["i"] if mask == "j <= i" else (G["i"] - G["j"]).abs() < 7
        d = (G["j"] - G["i"]).double()

        def score(s, X):
            if bias:
                s = s + 0.3 * d
            return cap * torch.tanh(s / cap)
        return m, score
    return vs, oracle, {}, ()


def fam_alibi(rng, c):
    """The alibi built-in against its slopes written out (per head count) and as a table."""
    H = c["Hq"]
    P = 1 << (H.bit_length() - 1)
    explicit = f"where(h < {P}, exp2(-8.0 * (h + 1) / {P}), exp2(-4.0 * (2 * (h - {P}) + 1) / {P})) * (j - i)"
    explicit2 = f"(j - i) * 2.0 ** where(h < {P}, -8 * (h + 1) / {P}, -4 * (2 * h - {2 * P} + 1) / {P})"
    mask = rng.choice([None, "j <= i"])
    forms = [{"bias": "alibi"}, {"bias": explicit}, {"bias": explicit2}, {"mod": "s + alibi"},
             {"bias": "slopes[h] * (j - i)"}, {"mod": "s - slopes[h] * (i - j)"}]
    inputs = {"slopes": {"dims": ["h"], "dtype": "float64"}}
    vs = []
    for n, f in enumerate(rng.sample(forms, 3)):
        spec = {"score": f}
        if "slopes" in str(f):
            spec["inputs"] = inputs
        if mask:
            spec["mask"] = {"where": mask}
        vs.append(Variant(f"a{n}", spec))
    slopes = torch.tensor([2.0 ** (-8 * (h + 1) / P) if h < P else 2.0 ** (-4 * (2 * (h - P) + 1) / P) for h in range(H)],
                          dtype=torch.float64)

    def oracle(G):
        m = G["j"] <= G["i"] if mask else torch.ones_like(G["i"], dtype=torch.bool)
        bias = slopes[G["h"]] * (G["j"] - G["i"]).double()
        return m, lambda s, X: s + bias
    return vs, oracle, {"slopes": slopes}, ()


def doc_ids(rng, B, n, w, a):
    """(positions + a) // w per batch row, the document id tensor of a chunked mask."""
    pos = torch.arange(n, dtype=torch.int64)
    return torch.stack([fdiv(pos + a + 3 * b, w) for b in range(B)])


def layout(rng, t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in an odd layout: transposed storage, a strided slice or an offset."""
    kind = rng.choice(["contig", "trans", "step", "offset"])
    if kind == "trans" and t.dim() == 2:
        return t.t().contiguous().t()
    if kind == "step":
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if kind == "offset":
        flat = torch.zeros(t.numel() + 3, dtype=t.dtype)
        flat[3:] = t.reshape(-1)
        return flat[3:].view(t.shape)
    return t


def fam_inputs(rng, c):
    """A document mask from an input tensor against the closed form it was built from (int widths,
    layouts), flags as bool inputs against their conditions, per-head / per-batch tables vs params."""
    B, n = c["B"], c["n"]
    kind = rng.choice(["doc", "flag", "head", "batch"])
    if kind == "doc":
        w, a = rng.choice([3, 5, 8]), rng.choice([0, 2, -4])
        ids = doc_ids(rng, B, n, w, a)
        dt = rng.choice(["int32", "int64", "int16"])
        tdt = rng.choice([torch.int32, torch.int64, torch.int16, torch.int8]) if ids.abs().max() < 100 else torch.int64
        inputs = {"doc": layout(rng, ids.to(tdt))}
        decl = {"doc": {"dims": ["b", "n"], "dtype": dt}}
        forms = [("doc[b, i] == doc[b, j]", decl), (f"(i + {a} + 3 * b) // {w} == (j + {a} + 3 * b) // {w}", None),
                 ("not (doc[b, j] != doc[b, i])", decl), (f"doc[b, j] == (i + {a} + 3 * b) // {w}", decl)]
        causal = rng.random() < 0.5

        def oracle(G):
            m = fdiv(G["i"] + a + 3 * G["b"], w) == fdiv(G["j"] + a + 3 * G["b"], w)
            return (m & (G["j"] <= G["i"]) if causal else m), ident
        forms = [(f + " and j <= i" if causal else f, d) for f, d in forms]
    elif kind == "flag":
        r = rng.choice([2, 3, 5])
        flags = (torch.arange(n) % r == 0)
        tdt = rng.choice([torch.bool, torch.uint8, torch.int32])
        inputs = {"flag": layout(rng, flags.to(tdt))}
        decl = {"flag": {"dims": ["n"], "dtype": rng.choice(["bool", "int32"]) if tdt != torch.bool else "bool"}}
        as_bool = decl["flag"]["dtype"] == "bool"
        fl = "flag[j]" if as_bool else "flag[j] != 0"
        forms = [(f"{fl} or j <= i", decl), (f"j % {r} == 0 or j <= i", None), (f"not (not {fl} and j > i)", decl),
                 (f"j <= i or j - j // {r} * {r} == 0", None)]

        def oracle(G):
            return (fmod(G["j"], r) == 0) | (G["j"] <= G["i"]), ident
    elif kind == "head":
        H = c["Hq"]
        hp = rng.randrange(0, H + 1)
        inputs = {"bi": layout(rng, (torch.arange(H) < hp))}
        decl = {"bi": {"dims": ["h"], "dtype": "bool"}}
        forms = [("bi[h] or j <= i", decl), ("h < hp or j <= i", None), ("where(bi[h], True, j <= i)", decl),
                 ("j <= i + where(h < hp, 10**6, 0)", None)]

        def oracle(G):
            return (G["h"] < hp) | (G["j"] <= G["i"]), ident
    else:
        lens = torch.tensor([rng.randrange(0, n + 1) for _ in range(B)], dtype=torch.int64)
        inputs = {"kv_len": lens.to(rng.choice([torch.int32, torch.int64])),
                  "pad": layout(rng, (torch.arange(n)[None, :] >= lens[:, None]))}
        forms = [("j < kv_len[b]", {"kv_len": {"dims": ["b"], "dtype": "int32"}}),
                 ("not pad[b, j]", {"pad": {"dims": ["b", "n"], "dtype": "bool"}}),
                 ("not (j >= kv_len[b])", {"kv_len": {"dims": ["b"], "dtype": "int64"}}),
                 ("pad[b, j] == False", {"pad": {"dims": ["b", "n"], "dtype": "bool"}})]

        def oracle(G):
            return G["j"] < lens[G["b"]], ident
        hp = None
    vs = []
    for n_, (f, decl) in enumerate(rng.sample(forms, 3)):
        spec = {"mask": {"where": f}}
        params = {}
        if kind == "head" and "hp" in f:
            spec["params"] = {"hp": 1}
            params = {"hp": hp}
        if decl:
            spec["inputs"] = decl
        vs.append(Variant(f"in{n_}", spec, params))
    return vs, oracle, inputs, ()


def fam_table(rng, c):
    """A learned table in the score, written as bias, mod and rearranged: the same gradients."""
    H = c["Hq"]
    tab = torch.randn(H, dtype=torch.float64) * 0.3
    forms = [{"bias": "tab[h] * (j - i)"}, {"bias": "(j - i) * tab[h]"}, {"bias": "tab[h] * j - tab[h] * i"},
             {"mod": "s - tab[h] * (i - j)"}, {"mod": "s + tab[h] * (j - i)"}, {"bias": "-tab[h] * (i - j)"}]
    mask = rng.choice([None, "j <= i", "i - j < 6"])
    decl = {"tab": {"dims": ["h"], "dtype": "float32", "grad": True}}
    vs = []
    for n, f in enumerate(rng.sample(forms, 3)):
        spec = {"inputs": decl, "score": f}
        if mask:
            spec["mask"] = {"where": mask}
        vs.append(Variant(f"t{n}", spec))

    def oracle(G):
        if mask == "j <= i":
            m = G["j"] <= G["i"]
        elif mask:
            m = G["i"] - G["j"] < 6
        else:
            m = torch.ones_like(G["i"], dtype=torch.bool)
        d = (G["j"] - G["i"]).double()
        return m, lambda s, X: s + X["tab"][G["h"]] * d
    return vs, oracle, {"tab": tab.float()}, ("tab",)


def fam_offsets(rng, c):
    """f(i, j) at offsets (qa, kb) against f(i + qa, j + kb) at offsets 0 (params qa, kb)."""
    qa, kb = c["qa"], c["kb"]
    body = rng.choice(["J <= I", "I - J < 7 and J <= I", "I // 5 == J // 5", "(I - J) % 3 == 0 and J <= I",
                       "abs(I - J) <= 4 or J < 2"])
    at_offsets = body.replace("I", "i").replace("J", "j")
    shifted = body.replace("I", "(i + qa)").replace("J", "(j + kb)")
    vs = [Variant("offsets", {"mask": {"where": at_offsets}}),
          Variant("shifted", {"params": {"qa": 0, "kb": 0}, "mask": {"where": shifted}}, {"qa": qa, "kb": kb}, True)]

    def oracle(G):
        I, J = G["i"], G["j"]
        if body == "J <= I":
            m = J <= I
        elif body.startswith("I - J < 7"):
            m = (I - J < 7) & (J <= I)
        elif body.startswith("I // 5"):
            m = fdiv(I, 5) == fdiv(J, 5)
        elif body.startswith("(I - J) % 3"):
            m = (fmod(I - J, 3) == 0) & (J <= I)
        else:
            m = ((I - J).abs() <= 4) | (J < 2)
        return m, ident
    return vs, oracle, {}, ()


def fam_scorecond(rng, c):
    """Conditions on the score: where(s > t, s, -inf) and its rewrites, with a position mask."""
    t = rng.choice([-0.5, 0.0, 0.3])
    forms = ["where(s > t and j <= i, s, -inf)", "where(s <= t, -inf, where(j <= i, s, -inf))",
             "where(not (s <= t), where(j > i, -inf, s), -inf)", "where(j <= i, where(s > t, s, -inf), -inf)",
             "where(s > t, where(j <= i, s, -inf), -inf)"]
    vs = [Variant(f"c{n}", {"params": {"t": 1.0}, "score": {"mod": f}}, {"t": t}) for n, f in enumerate(rng.sample(forms, 3))]
    if rng.random() < 0.4:
        vs[0] = Variant("cm", {"params": {"t": 1.0}, "mask": {"where": "j <= i"}, "score": {"mod": "where(s > t, s, -inf)"}},
                        {"t": t})

    def oracle(G):
        return G["j"] <= G["i"], lambda s, X: torch.where(s > t, s, torch.full_like(s, NEG_INF))
    return vs, oracle, {}, ()


def fam_reduce(rng, c):
    """Reductions against closed forms: any(j == i - t ...) is a window of K, sum(...) >= 1."""
    K = rng.choice([0, 1, 3, 5])
    forms = ["any(j == i - t for t in range(K))", "0 <= i - j < K", "sum(j == i - t for t in range(K)) >= 1",
             "not all(j != i - t for t in range(K))", "j <= i and i - j < K"]
    vs = spellings_of_mask(rng, rng.sample(forms, 3), {"K": 6})
    for v in vs:
        v.params = {"K": K}
    return vs, lambda G: ((G["i"] - G["j"] >= 0) & (G["i"] - G["j"] < K), ident), {}, ()


def fam_corner(rng, c):
    """Bottom-right causal through n_q / n_k, rearranged."""
    forms = ["j - n_k <= i - n_q", "j + n_q <= i + n_k", "i - j >= n_q - n_k", "not (j - i > n_k - n_q)",
             "n_q - n_k <= i - j"]
    vs = spellings_of_mask(rng, rng.sample(forms, 3), {})
    return vs, lambda G: (G["j"] - G["n_k"] <= G["i"] - G["n_q"], ident), {}, ()


def fam_bigparam(rng, c):
    """Int params near 2**31 and 2**53, and their float spellings, in bands."""
    big = rng.choice([2 ** 31 - 1, 2 ** 31, 2 ** 31 + 3, 2 ** 40 + 5, 2 ** 52])
    d = rng.choice([0, 3, 11])
    forms = ["i - j < w - z and j <= i", "i + z < w + j and not (j > i)", "j > i - (w - z) and j <= i",
             "i - j - w + z < 0 and j <= i"]
    vs = spellings_of_mask(rng, rng.sample(forms, 3), {"w": 5, "z": 1})
    for v in vs:
        v.params = {"w": big, "z": big - d}
    return vs, lambda G: ((G["i"] - G["j"] < d) & (G["j"] <= G["i"]), ident), {}, ()


def fam_mixedcond(rng, c):
    """A disjunction of a position condition and a score condition (no conjunct is a mask), De Morgan'd
    and nested, with a softcap or a bias beside it."""
    t = rng.choice([-0.5, 0.0, 0.4])
    forms = ["where(j <= i or s > t, s, -inf)", "where(j > i and s <= t, -inf, s)",
             "where(j <= i, s, where(s > t, s, -inf))", "where(not (j > i) or not (s <= t), s, -inf)",
             "where(s > t, s, where(j <= i, s, -inf))", "where(s <= t, where(j <= i, s, -inf), s)",
             "s + where(j <= i or s > t, 0.0, -inf)"]
    extra = rng.choice([{}, {"softcap": 3.0}, {"bias": "0.25 * (j - i)"}])
    window = rng.random() < 0.5
    vs = []
    for n, f in enumerate(rng.sample(forms, 3)):
        spec = {"params": {"t": 1.0}, "score": dict(extra, mod=f)}
        if window:
            spec["mask"] = {"where": "abs(i - j) < 12"}
        vs.append(Variant(f"x{n}", spec, {"t": t}))

    def oracle(G):
        m = (G["i"] - G["j"]).abs() < 12 if window else torch.ones_like(G["i"], dtype=torch.bool)
        d = (G["j"] - G["i"]).double()

        def score(s, X):
            if "bias" in extra:
                s = s + 0.25 * d
            s = torch.where((G["j"] <= G["i"]) | (s > t), s, torch.full_like(s, NEG_INF))
            if "softcap" in extra:
                s = torch.where(s == NEG_INF, s, 3.0 * torch.tanh(s / 3.0))
            return s
        return m, score
    return vs, oracle, {}, ()


def fam_scale(rng, c):
    """The softmax scale in the spec, in the call, and as a factor in the mod."""
    a = rng.choice([0.125, 0.3, 1.0, 2.5])
    forms = [({"scale": a}, None), ({}, a), ({"scale": a / 2, "mod": "s * 2"}, None), ({"scale": 1.0, "mod": f"s * {a}"}, None),
             ({"scale": 1.0, "mod": "s * fa"}, None), ({"scale": 2 * a, "mod": "s / 2"}, None)]
    mask = rng.choice(["j <= i", "i - j < 5 and j <= i"])
    vs = []
    for n, (score, call) in enumerate(rng.sample(forms, 3)):
        spec = {"mask": {"where": mask}, "score": score}
        params = {}
        if "fa" in str(score):
            spec["params"] = {"fa": 1.0}
            params = {"fa": a}
        if call is not None:
            params["scale"] = call
        vs.append(Variant(f"sc{n}", spec, params))

    def oracle(G):
        m = G["j"] <= G["i"]
        if mask != "j <= i":
            m = m & (G["i"] - G["j"] < 5)
        return m, lambda s, X: s * a * math.sqrt(G["D"])  # the oracle's s has the default 1/sqrt(D)
    return vs, oracle, {}, ()


def fam_boolarith(rng, c):
    """Booleans as numbers: sums, products, min / max of conditions, where of ints."""
    w = rng.choice([1, 4, 9])
    forms = ["(j <= i) + (i - j < w) == 2", "(j <= i) * (i - j < w) == 1", "min(j <= i, i - j < w) >= 1",
             "where(j <= i, i - j, w) < w", "(j <= i) & (i - j < w)", "max(j > i, i - j >= w) == 0",
             "(j <= i) == (i - j < w) and j <= i", "sum(c for c in [j <= i]) >= 1 and i - j < w"]
    forms = forms[:-1]
    vs = spellings_of_mask(rng, rng.sample(forms, 3), {"w": 2})
    for v in vs:
        v.params = {"w": w}
    return vs, lambda G: ((G["j"] <= G["i"]) & (G["i"] - G["j"] < w), ident), {}, ()


def fam_maskmod(rng, c):
    """A mask written through the mod's arithmetic: a -inf added, a min with +-inf, a where scaled
    after, negated twice, beside a [mask] that says the same (or part of it)."""
    C, oracle_mask = rng.choice([
        ("j <= i", lambda G: G["j"] <= G["i"]),
        ("i - j < 6 and j <= i", lambda G: (G["i"] - G["j"] < 6) & (G["j"] <= G["i"])),
        ("(i - j) % 3 == 0", lambda G: fmod(G["i"] - G["j"], 3) == 0),
        ("i // 8 == j // 8 or j < 2", lambda G: (fdiv(G["i"], 8) == fdiv(G["j"], 8)) | (G["j"] < 2))])
    f = rng.choice([1.5, 0.5])
    forms = [({"where": C}, f"s * {f}"), (None, f"where({C}, s * {f}, -inf)"), (None, f"where({C}, s, -inf) * {f}"),
             (None, f"{f} * s + where({C}, 0.0, -inf)"), (None, f"min({f} * s, where({C}, inf, -inf))"),
             (None, f"where(not ({C}), -inf, s * {f})"), (None, f"-where(not ({C}), inf, -{f} * s)"),
             ({"where": C}, f"where({C}, s * {f}, -inf)"), (None, f"where({C}, s, -inf) + s * {f - 1}"),
             (None, f"max(where({C}, s * {f}, -inf), -inf)")]
    vs = []
    for n, (mask, mod) in enumerate(rng.sample(forms, 3)):
        spec = {"score": {"mod": mod}}
        if mask:
            spec["mask"] = mask
        vs.append(Variant(f"mm{n}", spec))
    return vs, lambda G: (oracle_mask(G), lambda s, X: s * f), {}, ()


def fam_strided(rng, c):
    """Strided attention's summary columns (the column split's shape), its clause written with %,
    //, a residue param, distributed over `or`, De Morgan'd."""
    S = rng.choice([2, 3, 4, 7])
    forms = ["j <= i and (i - j < st or j % st == st - 1)", "j <= i and (i - j < st or (j + 1) % st == 0)",
             "(j <= i and i - j < st) or (j <= i and j % st == r)", "j <= i and not (i - j >= st and j % st != st - 1)",
             "j <= i and (i - j < st or (j - r) % st == 0)", "j <= i and (i - j < st or j // st * st + st - 1 == j)",
             "(i - j < st or j % st == st - 1) and not (j > i)"]
    vs = spellings_of_mask(rng, rng.sample(forms, 3), {"st": 4, "r": 3})
    for v in vs:
        v.params = {"st": S, "r": S - 1}

    def oracle(G):
        I, J = G["i"], G["j"]
        return (J <= I) & ((I - J < S) | (fmod(J, S) == S - 1)), ident
    return vs, oracle, {}, ()


def fam_pshift(rng, c):
    """Aligned blocks of 2**p with p an int param of either sign: >>, << by -p, // of a float power,
    // of 1 << p, ^."""
    p = rng.choice([0, 1, 3, 5, 31, 40, -1, -2])
    forms = ["i >> p == j >> p", "(i ^ j) >> p == 0", "i // 2 ** p == j // 2 ** p", "i << np == j << np",
             "not (i >> p != j >> p)", "i // 2.0 ** p == j // 2.0 ** p"]
    if p >= 0:
        forms += ["i // (1 << p) == j // (1 << p)", "i - i % (1 << p) == j - j % (1 << p)"]
    tail = rng.choice(["", " and j <= i", " or j <= i"])
    vs = spellings_of_mask(rng, [f"({f}){tail}" if tail else f for f in rng.sample(forms, 3)], {"p": 2, "np": -2})
    for v in vs:
        v.params = {"p": p, "np": -p}

    def oracle(G):
        I, J = G["i"], G["j"]
        m = (I >> p == J >> p) if p >= 0 else (I == J)
        if tail == " and j <= i":
            m = m & (J <= I)
        elif tail:
            m = m | (J <= I)
        return m, ident
    return vs, oracle, {}, ()


def fam_bigdiv(rng, c):
    """// and % by params near and past 2**31 of positions shifted near 2**31 (the int32 / int64 reach)."""
    w = rng.choice([2 ** 31 - 1, 2 ** 31, 2 ** 31 + 1, 2 ** 33, -(2 ** 31), 3 * 2 ** 30, 7, 2 ** 30])
    a = rng.choice([-(2 ** 31), 2 ** 31 - 3, 2 ** 40, 0, 2 ** 31 - 20])
    forms = ["(i + a) // w == (j + a) // w", "(i + a) - (i + a) % w == (j + a) - (j + a) % w",
             "(i + a) // w - (j + a) // w == 0", "((j + a) // w) * w == ((i + a) // w) * w"]
    tail = rng.choice(["", " and j <= i + 2"])
    vs = spellings_of_mask(rng, [f + tail for f in rng.sample(forms, 3)], {"w": 5, "a": 0})
    for v in vs:
        v.params = {"w": w, "a": a}

    def oracle(G):
        I, J = G["i"], G["j"]
        m = fdiv(I + a, w) == fdiv(J + a, w)
        return (m & (J <= I + 2) if tail else m), ident
    return vs, oracle, {}, ()


def fam_fthresh(rng, c):
    """Integer conditions against non-integer floats: i - j < 2.5 is i - j <= 2."""
    d = rng.choice([0, 1, 2, 6])
    fr = rng.choice([0.5, 0.25, 0.999])
    forms = ["i - j < fw and j <= i", "i - j <= w and j <= i", "2 * (i - j) < 2 * fw and j <= i",
             "j > i - fw and j <= i", "i - fw < j and j < i + 0.5", "(i - j) / fw < 1 and j - i < 0.5"]
    vs = spellings_of_mask(rng, rng.sample(forms, 3), {"w": 1, "fw": 1.5})
    for v in vs:
        v.params = {"w": d, "fw": d + fr}
    return vs, lambda G: ((G["i"] - G["j"] <= d) & (G["j"] <= G["i"]), ident), {}, ()


def fam_wherediv(rng, c):
    """A divisor kept nonzero by max / where of a param of any sign, and per-head block sizes
    1 << h through //, >>, a float power, ^ (found: the first two refused, tests/test_probe_meta27.py)."""
    if rng.random() < 0.5:
        w = rng.choice([-5, 0, 1, 3, 7])
        forms = ["i // where(w > 0, w, 1) == j // where(w > 0, w, 1)", "i // max(w, 1) == j // max(w, 1)",
                 "i // where(w <= 0, 1, w) == j // where(not (w <= 0), w, 1)", "(i - j) // max(w, 1) == 0 and j <= i or "
                 "i // max(w, 1) == j // max(w, 1)"]
        forms = forms[:3]
        vs = spellings_of_mask(rng, rng.sample(forms, 3), {"w": 2})
        for v in vs:
            v.params = {"w": w}
        wv = max(w, 1)
        return vs, lambda G: (fdiv(G["i"], wv) == fdiv(G["j"], wv), ident), {}, ()
    forms = ["i // (1 << h) == j // (1 << h)", "i >> h == j >> h", "i // 2 ** h == j // 2 ** h", "(i ^ j) >> h == 0",
             "i - i % (1 << h) == j - j % (1 << h)"]
    vs = spellings_of_mask(rng, rng.sample(forms, 3), {})
    return vs, lambda G: ((G["i"] >> G["h"]) == (G["j"] >> G["h"]), ident), {}, ()


FAMILIES = {"shift": fam_shift, "window": fam_window, "band": fam_band, "floordiv": fam_floordiv, "mod": fam_mod,
            "bits": fam_bits, "floatcmp": fam_floatcmp, "bias": fam_bias, "softcap": fam_softcap, "alibi": fam_alibi,
            "inputs": fam_inputs, "table": fam_table, "offsets": fam_offsets, "scorecond": fam_scorecond,
            "reduce": fam_reduce, "corner": fam_corner, "bigparam": fam_bigparam,
            "mixedcond": fam_mixedcond, "scale": fam_scale, "boolarith": fam_boolarith,
            "maskmod": fam_maskmod, "strided": fam_strided,
            "pshift": fam_pshift, "bigdiv": fam_bigdiv, "fthresh": fam_fthresh,
            "wherediv": fam_wherediv}
if os.environ.get("PROBE_FAMILIES"):
    FAMILIES = {k: FAMILIES[k] for k in os.environ["PROBE_FAMILIES"].split(",")}


def draw_case(seed: int) -> Case:
    rng = random.Random(seed)
    family = sorted(FAMILIES)[seed % len(FAMILIES)] if rng.random() < 0.5 else rng.choice(sorted(FAMILIES))
    Hkv = rng.choice([1, 1, 2])
    Hq = Hkv * rng.choice([1, 2, 3])
    Nq = rng.choice([1, 5, 17, 23, 33])
    Nk = Nq if rng.random() < 0.5 else rng.choice([1, 7, 19, 40])
    q_offset = rng.choice([0, 0, 0, 3, 21, 2 ** 20 + 1, 2 ** 31 - 10, 2 ** 40])
    k_offset = q_offset if rng.random() < 0.5 else rng.choice([0, 5, q_offset + 4, max(q_offset - 9, 0)])
    if family in FLOAT_SCORES and abs(q_offset - k_offset) > 9:
        # a float32 score of a distance near 2**31 (alibi with k_offset 0) has a spacing of 8 in any kernel
        k_offset = q_offset + rng.choice([0, 5, -3])
    if family in ("inputs",):
        q_offset = k_offset = rng.choice([0, 0, 4])
    c = dict(Hq=Hq, B=rng.choice([1, 2]), n=max(q_offset + Nq, k_offset + Nk))
    if family == "offsets":
        c.update(qa=q_offset, kb=k_offset)
    variants, oracle, inputs, learned = FAMILIES[family](rng, c)
    case = Case(family, variants, oracle, inputs, learned, B=c["B"], Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk,
                D=rng.choice([8, 16]), dtype=rng.choice([torch.float32, torch.float32, torch.float16, torch.bfloat16]),
                q_offset=q_offset, k_offset=k_offset, backward=rng.random() < 0.6,
                scale=rng.choice([None, None, 0.3, 1.0]))
    if family == "scale":
        case.scale = None
    if family == "table":  # a 16-bit table gradient times a distance is documented as far off (§1)
        case.dtype = torch.float32
    if family == "corner":
        if rng.random() < 0.5:
            case.n_q, case.n_k = q_offset + Nq + rng.choice([0, 4]), k_offset + Nk + rng.choice([0, 9])
    if rng.random() < 0.3:
        case.env = {"ATTNCC_RESIDUE_MIN_ROWS": "1", "ATTNCC_COLUMN_MIN_ROWS": "1"}
    return case


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------

_MODULES: Dict[str, tuple] = {}


def compiled(spec: dict):
    import json

    key = json.dumps(spec, sort_keys=True)
    if key not in _MODULES:
        import hashlib

        name = "m27_" + hashlib.sha1(key.encode()).hexdigest()[:10]
        spec = dict(spec, name=name)
        _MODULES[key] = (attncc.compile(spec), _pattern(spec))
    return _MODULES[key]


def _pattern(spec: dict):
    from attncc.module_cache import toml_text

    return attncc.parse_spec(toml_text(spec))


def operands(case: Case, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(case.B, case.Hq, case.Nq, case.D, generator=gen)
    k = torch.randn(case.B, case.Hkv, case.Nk, case.D, generator=gen)
    v = torch.randn(case.B, case.Hkv, case.Nk, case.D, generator=gen)
    go = torch.randn(case.B, case.Hq, case.Nq, case.D, generator=gen)
    gl = torch.randn(case.B, case.Hq, case.Nq, generator=gen)
    # the operands the kernels read: the reference and the oracle take the same rounded values
    return tuple(t.to(case.dtype).float() for t in (q, k, v, go, gl))


def positions_kw(case: Case, at_zero: bool = False) -> dict:
    kw = dict(q_offset=0, k_offset=0) if at_zero else dict(q_offset=case.q_offset, k_offset=case.k_offset)
    if case.n_q is not None:
        kw.update(n_q=case.n_q, n_k=case.n_k)
    if case.scale is not None:
        kw["scale"] = case.scale
    return kw


def grads(fn, case: Case, ops, cast, inputs, params, at_zero=False):
    q, k, v, go, gl = ops
    leaves = [cast(t).detach().clone().requires_grad_(case.backward) for t in (q, k, v)]
    ins = {n: (cast(t).detach().clone().requires_grad_(case.backward) if n in case.learned else t)
           for n, t in inputs.items()}
    o, lse = fn(*leaves, return_lse=True, **positions_kw(case, at_zero), **params, **ins)
    out = [o.detach(), lse.detach()]
    if case.backward:
        wrt = leaves + [ins[n] for n in case.learned]
        # rows without keys: lse -inf, their LSE cotangent must pass nothing
        out += list(torch.autograd.grad([o, lse], wrt, [cast(go), cast(gl)], allow_unused=True, materialize_grads=True))
    return out


def oracle_run(case: Case, ops):
    """The float64 attention of the case's pattern, computed here from its oracle."""
    q, k, v, go, gl = ops
    B, Hq, Nq, Nk = case.B, case.Hq, case.Nq, case.Nk
    group = Hq // case.Hkv
    leaves = [t.double().detach().clone().requires_grad_(case.backward) for t in (q, k, v)]
    X = {n: (t.double().detach().clone().requires_grad_(case.backward) if n in case.learned else t)
         for n, t in case.inputs.items()}
    qf, kf, vf = leaves
    kf, vf = kf.repeat_interleave(group, 1), vf.repeat_interleave(group, 1)
    I = torch.arange(case.q_offset, case.q_offset + Nq, dtype=torch.int64).view(1, 1, Nq, 1)
    J = torch.arange(case.k_offset, case.k_offset + Nk, dtype=torch.int64).view(1, 1, 1, Nk)
    G = dict(b=torch.arange(B).view(B, 1, 1, 1), h=torch.arange(Hq).view(1, Hq, 1, 1), i=I, j=J,
             D=case.D, n_q=case.n_q if case.n_q is not None else case.q_offset + Nq,
             n_k=case.n_k if case.n_k is not None else case.k_offset + Nk)
    mask, score_fn = case.oracle(G)
    mask = mask.expand(B, Hq, Nq, Nk)
    scale = case.scale if case.scale is not None else 1 / math.sqrt(case.D)
    s = scale * (qf @ kf.transpose(-1, -2))
    s = score_fn(s, X).expand(B, Hq, Nq, Nk)
    s = torch.where(mask, s, torch.full_like(s, NEG_INF))
    empty = (s == NEG_INF).all(-1)
    s0 = torch.where(empty[..., None], torch.zeros_like(s), s)
    p = torch.where(empty[..., None] | (s == NEG_INF), 0.0, torch.softmax(s0, -1))
    lse = torch.where(empty, NEG_INF, torch.logsumexp(s0, -1))
    o = p @ vf
    out = [o.detach(), lse.detach()]
    if case.backward:
        wrt = leaves + [X[n] for n in case.learned]
        out += list(torch.autograd.grad([o, lse], wrt, [go.double(), gl.double()], allow_unused=True,
                                        materialize_grads=True))
    return out


FLOAT_SCORES = ("bias", "table", "alibi", "softcap", "scorecond", "mixedcond", "scale", "maskmod")
LABELS = ["o", "lse", "dq", "dk", "dv"]


def compare(a, b, tol) -> Optional[str]:
    for n, (x, y) in enumerate(zip(a, b)):
        label = LABELS[n] if n < len(LABELS) else f"dtab{n - 5}"
        x, y = x.double(), y.double()
        if x.shape != y.shape:
            return f"{label}: shape {tuple(x.shape)} vs {tuple(y.shape)}"
        fx, fy = torch.isfinite(x), torch.isfinite(y)
        if not torch.equal(fx, fy) or not torch.equal(x[~fx], y[~fy]):
            return f"{label}: non-finite entries differ ({int((fx != fy).sum())} places)"
        err = float((x[fx] - y[fy]).norm() / y[fy].norm().clamp_min(1e-6)) if fx.any() else 0.0
        if err > tol:
            return f"{label}: rel err {err:.3g}"
    return None


def run(seed: int, verbose: bool = False):
    case = draw_case(seed)
    with _environment(dict(case.env)):
        return check(case, seed), {}


def check(case: Case, seed: int) -> List[str]:
    problems = []
    ops = operands(case, seed)
    want = oracle_run(case, ops)
    dtype = case.dtype
    results = {}
    for var in case.variants:
        module, pattern = compiled(var.spec)
        inputs = {n: t for n, t in case.inputs.items() if n in (var.spec.get("inputs") or {})}
        learned = case.learned
        ref = grads(lambda *a, **kw: attncc.reference(pattern, *a, **kw), case, ops, lambda t: t.double(), inputs,
                    var.params, var.at_zero)
        # float scores as written (tab * j - tab * i at 2**40) round in float64 in the reference
        far = max(case.q_offset, case.k_offset) >= 2 ** 30
        bad = compare(ref, want, (1e-4 if far else 1e-5) if case.family in FLOAT_SCORES else 1e-9)
        if bad:
            problems.append(f"{var.label}: reference vs oracle: {bad}")
        got = grads(module.attention, case, ops, lambda t: t.to(dtype) if t.is_floating_point() else t, inputs,
                    var.params, var.at_zero)
        bad = compare(got, ref, TOL[dtype])
        if bad:
            problems.append(f"{var.label}: kernels vs reference: {bad}")
        results[var.label] = got
        if var is case.variants[0]:
            problems += split_checks(case, var, module, inputs, got[0], got[1], seed)
    labels = list(results)
    for other in labels[1:]:
        bad = compare(results[other], results[labels[0]], TOL[dtype])
        if bad:
            problems.append(f"{other} vs {labels[0]} (kernels): {bad}")
    return problems


def merged(a, b):
    """(o, lse) of the keys of two parts merged through their log-sum-exps."""
    (o1, l1), (o2, l2) = a, b
    lse = torch.logaddexp(l1, l2)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w1 = torch.where(l1 == NEG_INF, 0.0, torch.exp(l1 - safe))
    w2 = torch.where(l2 == NEG_INF, 0.0, torch.exp(l2 - safe))
    return w1[..., None] * o1.double() + w2[..., None] * o2.double(), lse


def split_checks(case: Case, var: Variant, module, inputs, o, lse, seed: int) -> List[str]:
    """The call split in two along the queries (q_offset) and along the keys (k_offset, merged by
    the LSE), n_q and n_k passed as the whole call's: the whole call's o and LSE."""
    rng = random.Random(seed * 7 + 1)
    q, k, v = (t.to(case.dtype) for t in operands(case, seed)[:3])
    kw = positions_kw(case, var.at_zero)
    qo, ko = kw.pop("q_offset"), kw.pop("k_offset")
    kw.setdefault("n_q", qo + case.Nq)
    kw.setdefault("n_k", ko + case.Nk)
    kw.update(var.params, **inputs)
    problems = []
    with torch.no_grad():
        if case.Nq > 1:
            m = rng.randrange(1, case.Nq)
            a = module.attention(q[:, :, :m], k, v, return_lse=True, q_offset=qo, k_offset=ko, **kw)
            b = module.attention(q[:, :, m:], k, v, return_lse=True, q_offset=qo + m, k_offset=ko, **kw)
            bad = compare([torch.cat([a[0], b[0]], 2), torch.cat([a[1], b[1]], 2)], [o, lse], TOL[case.dtype])
            if bad:
                problems.append(f"{var.label}: split queries at {m}: {bad}")
        # (a row term far into a sequence, 0.1 * i at 2**40, rounds the parts' float32 LSEs apart: §3.3)
        if case.Nk > 1 and not (case.family in FLOAT_SCORES and max(qo, ko) >= 2 ** 20):
            m = rng.randrange(1, case.Nk)
            a = module.attention(q, k[:, :, :m], v[:, :, :m], return_lse=True, q_offset=qo, k_offset=ko, **kw)
            b = module.attention(q, k[:, :, m:], v[:, :, m:], return_lse=True, q_offset=qo, k_offset=ko + m, **kw)
            bad = compare(list(merged(a, b)), [o, lse], TOL[case.dtype])
            if bad:
                problems.append(f"{var.label}: split keys at {m}: {bad}")
    return problems


def main():
    ap = seed_parser(40, __doc__)
    args = ap.parse_args()
    cases = seeds_of(args)
    fails = run_seeds(cases, lambda s: run(s, args.verbose), args.verbose,
                      describe=lambda s: draw_case(s).describe())
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
