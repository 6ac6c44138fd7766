"""Probe flexreal23 generator: more FlexAttention programs against PyTorch's real
``torch.nn.attention.flex_attention`` on CPU (float64, backward enabled), the machinery of
tests/probe_flexreal22.py (its docstring says how Flex runs here) with atoms from FlexAttention's own
tests and attention-gym's catalogue that flexreal22 did not draw.

Masks: dilated windows, global tokens (a range, or a captured list through ``any(...)``), natten 2D
neighborhoods with the kernel centre clamped at the borders (``max(min(...))`` of ints), a
PagedAttention-like physical-to-logical page table, per-batch query / key lengths, ``//`` and ``%``
by captured divisors (per head, per batch, negative ones), float positions with exact factors,
captured per-key bit sets, booleans compared with ``==`` and ``^``, per-head and per-key group
tables, block causal, strided (sparse transformer), axial, ``~`` of ints, params offsetting
``q_idx - kv_idx`` (negative too), a captured float table against a threshold, chained indexing.

Score mods: times2, ``+ h``, ``+ b``, ``q_idx - kv_idx`` (and ``/ 8``), ALiBi from ``exp2`` of
the head, softcap by a captured scalar (0-d, and a learned [1]), ``//`` / ``%`` by captured
divisors, ``log`` / ``sqrt`` / ``sin`` / ``exp`` of distances, GELU through ``erf``, a learned
sigmoid gate, row terms (``q_idx * c``, large too) and key terms, squares of the score, a threshold
table, a learned table read through captured ids (``emb[ids[b, kv_idx]]``), learned per-query and
per-key head biases, bit terms, ``min`` / ``max`` against constants, a learned divisor, one learned
tensor used twice, float params overridden per call, ``where`` of ints.

    python tests/probe_flexreal23.py --cases 40 --start 0      # print failures
    python tests/probe_flexreal23.py --seed 7 --verbose
"""
from __future__ import annotations

import random
import sys

import script_env  # noqa: E402,F401  (the interpreter, this checkout on the path: before the imports below)

import torch  # noqa: E402

import probe_flexreal22 as P  # noqa: E402


class Gen(P._Gen):
    """flexreal22's generator, its atoms drawn now and then, with the atoms listed above."""

    MASK_KINDS = ("dilated", "global", "globlist", "natten", "paged", "lens", "capdiv", "capnegdiv",
                  "capmod", "floatpos", "capbits", "boolcmp", "xor", "floatcap", "grp", "offparam",
                  "notint", "gqa", "stride", "blockcausal", "chain", "axial", "njt", "bidir", "seqbool",
                  "densebool", "nattendiv", "disk")
    MOD_KINDS = ("times2", "plush", "plusb", "rel", "relscaled", "alibih", "capscalar", "caplearned",
                 "capdiv", "capmod", "logdist", "sqrtdist", "sin", "expdist", "gelu", "gate", "rowterm",
                 "bigrow", "keyterm", "square", "thr", "emb", "bqh", "bits", "clamp", "divlearned",
                 "twice", "tparam", "whereint", "posfactor", "qdivkv", "silu", "trig", "iscale", "chainsub",
                 "weird", "weird2", "padded", "boolterm", "bias2d", "rel2s")

    def _int_table(self, name, dims, shape, lo, hi, dtype="int32", gen=None):
        t = torch.randint(lo, hi, shape, generator=gen).to(getattr(torch, dtype))
        return self.captured(name, {"dims": dims, "dtype": dtype}, t)

    def mask_atom(self, kind=None) -> str:
        r, p = self.rng, self.p
        if kind is None and r.random() < 0.2:
            return super().mask_atom()
        gen = torch.Generator().manual_seed(r.randrange(2**31))
        N = max(p.Nq, p.Nk)
        kind = kind or r.choice(self.MASK_KINDS)
        if kind == "dilated":
            w, d = self.param("W", r.randint(2, 12)), self.param("DIL", r.randint(2, 4))
            return f"(abs(q_idx - kv_idx) <= {w}) & ((q_idx - kv_idx) % {d} == 0)"
        if kind == "global":
            g = self.param("G", r.randint(1, 5))
            return f"(q_idx < {g}) | (kv_idx < {g})"
        if kind == "globlist":
            t = self._int_table("gtok", [4], (4,), 0, N, r.choice(("int32", "int64")), gen)
            return f"any(kv_idx == {t}[t] for t in range(4)) | (q_idx >= kv_idx)"
        if kind == "natten":
            g, rad = r.randint(3, 9), r.randint(0, 2)
            g = max(g, 2 * rad + 1)
            gp = self.param("GW", g)
            return (f"(abs(max(min(q_idx % {gp}, {gp} - 1 - {rad}), {rad}) - kv_idx % {gp}) <= {rad}) & "
                    f"(abs(q_idx // {gp} - kv_idx // {gp}) <= {rad})")
        if kind == "paged":
            ps = r.choice((2, 4, 8, 16))
            npg = -(-p.Nk // ps)
            rows = []
            for _ in range(p.B):
                perm = torch.randperm(npg, generator=gen).to(torch.int32)
                perm[torch.rand(npg, generator=gen) < 0.2] = -1  # a physical page holding no logical one
                rows.append(perm)
            t = self.captured("p2l", {"dims": ["b", npg], "dtype": "int32"}, torch.stack(rows))
            pg = self.param("PS", ps)
            return (f"({t}[b, kv_idx // {pg}] >= 0) & "
                    f"({t}[b, kv_idx // {pg}] * {pg} + kv_idx % {pg} <= q_idx)")
        if kind == "lens":
            dt = r.choice(("int32", "int64", "int16"))
            kl = self._int_table("kvlen", ["b"], (p.B,), 0, p.Nk + 1, dt, gen)
            if r.random() < 0.5:
                return f"kv_idx < {kl}[b]"
            ql = self._int_table("qlen", ["b"], (p.B,), 0, p.Nq + 1, dt, gen)
            return f"(kv_idx < {kl}[b]) & (q_idx < {ql}[b])"
        if kind == "capdiv":
            c = self._int_table("cw", ["h"], (p.Hq,), 0, 10, "int32", gen)
            return f"q_idx // max({c}[h], 1) == kv_idx // max({c}[h], 1)"
        if kind == "capnegdiv":
            c = self._int_table("nd", ["b"], (p.B,), -7, 0, "int64", gen)
            return f"(q_idx - kv_idx) // min({c}[b], -1) <= {r.randint(-1, 2)}"
        if kind == "capmod":
            c = self._int_table("cm", ["h"], (p.Hq,), -5, 6, "int32", gen)
            return f"(kv_idx - q_idx) % where({c}[h] == 0, 3, {c}[h]) == 0"
        if kind == "floatpos":
            return r.choice(("q_idx * 0.5 >= kv_idx * 0.25", "(q_idx - kv_idx) / 4 < 2.5",
                             "kv_idx <= q_idx * 1.5 - 2.0", "(kv_idx + 1) / (q_idx + 1) <= 1.0"))
        if kind == "capbits":
            c = self._int_table("kbits", ["n"], (p.Nk,), 0, 8, r.choice(("int32", "uint8", "int64")), gen)
            return f"(({c}[kv_idx] >> (h % 3)) & 1) == 1"
        if kind == "boolcmp":
            a = self.param("A", r.randint(0, 20))
            return f"(q_idx < {a}) == (kv_idx < {a})"
        if kind == "xor":
            return f"(q_idx < {self.param('A', r.randint(0, 20))}) ^ (kv_idx >= {r.randint(0, 20)})"
        if kind == "floatcap":
            t = torch.randn(p.B, p.Nk, generator=gen)
            return f"{self.captured('imp', {'dims': ['b', 'n']}, t)}[b, kv_idx] > {r.choice((0.0, -0.5))}"
        if kind == "grp":
            qg = self._int_table("qgrp", ["h"], (p.Hq,), 0, 3, "int32", gen)
            kg = self._int_table("kgrp", ["n"], (p.Nk,), 0, 3, "int32", gen)
            return f"({qg}[h] == {kg}[kv_idx]) | (q_idx == kv_idx)"
        if kind == "offparam":
            return f"q_idx + {self.param('OFF', r.randint(-10, 10))} >= kv_idx"
        if kind == "notint":
            return "(~q_idx & 3) == (~kv_idx & 3)"
        if kind == "gqa":
            return f"(h // {max(p.Hq // p.Hkv, 1)}) % 2 == kv_idx % 2"
        if kind == "stride":
            s = self.param("S", r.randint(2, 8))
            return f"(q_idx >= kv_idx) & ((kv_idx % {s} == {s} - 1) | (q_idx - kv_idx < {s}))"
        if kind == "blockcausal":
            bs = self.param("BS", r.randint(2, 16))
            return f"q_idx // {bs} >= kv_idx // {bs}"
        if kind == "chain":
            ids = torch.randint(0, 3, (p.B, N), generator=gen).to(torch.int32)
            perm = torch.randperm(N, generator=gen)[: p.Nk].to(torch.int64)
            d = self.captured("cid", {"dims": ["b", "n"], "dtype": "int32"}, ids)
            pm = self.captured("perm", {"dims": ["n"], "dtype": "int64"}, perm)
            return f"{d}[b, q_idx] == {d}[b, {pm}[kv_idx]]"
        if kind == "njt":  # causal in each nested sequence's own coordinates (its start read through its id)
            starts = sorted(r.sample(range(1, N), min(3, N - 1))) if N > 1 else []
            offs = torch.tensor([0] + starts, dtype=torch.int32)
            sidx = torch.searchsorted(offs[1:], torch.arange(N), right=True).to(torch.int32)
            o = self.captured("offs", {"dims": [len(offs)], "dtype": "int32"}, offs)
            si = self.captured("sidx", {"dims": ["n"], "dtype": "int32"}, sidx)
            c = f"q_idx - {o}[{si}[q_idx]] >= kv_idx - {o}[{si}[kv_idx]]"
            return c if r.random() < 0.5 else f"({c}) & ({si}[q_idx] == {si}[kv_idx])"
        if kind == "bidir":  # bidirectional over a per-batch prefix, causal after it
            nb = self._int_table("nbid", ["b"], (p.B,), 0, N, "int32", gen)
            return f"((q_idx <= {nb}[b]) & (kv_idx <= {nb}[b])) | (q_idx >= kv_idx)"
        if kind == "seqbool":
            sb = torch.arange(N) >= r.randint(0, N)
            return f"{self.captured('sbool', {'dims': ['n'], 'dtype': 'bool'}, sb)}[q_idx] == sbool[kv_idx]"
        if kind == "densebool":
            am = torch.rand(p.B, 1, p.Nq, p.Nk, generator=gen) < 0.7
            return f"{self.captured('am', {'dims': ['b', 1, 'n', 'n'], 'dtype': 'bool'}, am)}[b, 0, q_idx, kv_idx]"
        if kind == "nattendiv":  # FlexAttention's test: x, y by true division (exact for a power-of-two width)
            w, win = r.choice((2, 4, 8)), r.randint(0, 3)
            return (f"(abs(q_idx / {w} - kv_idx / {w}) <= {win}) | "
                    f"(abs(q_idx % {w} - kv_idx % {w}) <= {win})")
        if kind == "disk":  # a Euclidean neighborhood on a G-wide grid, squares of ints
            g, r2 = self.param("G", r.randint(3, 8)), r.randint(1, 10)
            return f"(q_idx // {g} - kv_idx // {g}) ** 2 + (q_idx % {g} - kv_idx % {g}) ** 2 <= {r2}"
        g = self.param("G", r.randint(2, 9))  # axial: same column or same row of a G-wide grid
        return f"((q_idx - kv_idx) % {g} == 0) | (q_idx // {g} == kv_idx // {g})"

    def transform(self, x: str, kind=None) -> str:
        r, p = self.rng, self.p
        if kind is None and r.random() < 0.2:
            return super().transform(x)
        gen = torch.Generator().manual_seed(r.randrange(2**31))
        kind = kind or r.choice(self.MOD_KINDS)
        if kind == "times2":
            return f"({x}) * 2"
        if kind == "plush":
            return f"{x} + h"
        if kind == "plusb":
            return f"{x} + b * 0.5"
        if kind == "rel":
            return f"{x} + (q_idx - kv_idx) * 0.125"
        if kind == "relscaled":
            return f"{x} + (q_idx - kv_idx) / 8"
        if kind == "alibih":
            return f"{x} + exp2(-(h + 1) * 8.0 / {p.Hq}) * (kv_idx - q_idx)"
        if kind == "capscalar":
            c = self.captured("cap", {"dims": []}, torch.tensor(r.choice((1.5, 4.0, 30.0))))
            return f"{c} * tanh(({x}) / {c})"
        if kind == "caplearned":
            c = self.captured("capl", {"dims": [1]}, torch.tensor([r.choice((1.5, 4.0))]), learned=True)
            return f"{c}[0] * tanh(({x}) / {c}[0])"
        if kind == "capdiv":
            c = self._int_table("sw", ["h"], (p.Hq,), -2, 9, "int32", gen)
            return f"{x} + (q_idx // max({c}[h], 1)) * 0.125"
        if kind == "capmod":
            c = self._int_table("sm", ["b"], (p.B,), -6, 0, "int64", gen)
            return f"{x} + ((q_idx - kv_idx - {self.param('OFF', r.randint(-5, 5))}) % min({c}[b], -1)) * 0.125"
        if kind == "logdist":
            return f"{x} + 0.1 * log(1 + abs(q_idx - kv_idx))"
        if kind == "sqrtdist":
            return f"{x} - 0.1 * sqrt(abs(q_idx - kv_idx))"
        if kind == "sin":
            return f"{x} + 0.25 * sin(q_idx - kv_idx) + 0.25 * cos(kv_idx * 0.5)"
        if kind == "expdist":
            return f"{x} + exp(-abs(q_idx - kv_idx) * 0.5)"
        if kind == "gelu" and "-inf" not in x:  # GELU of -inf is -inf * 0: NaN in both
            return f"0.5 * ({x}) * (1 + erf(({x}) / 1.4142135623730951))"
        if kind == "gate":
            g = self.captured("gate", {"dims": ["h"]}, torch.randn(p.Hq, generator=gen), learned=True)
            return f"({x}) * sigmoid({g}[h])"
        if kind == "rowterm":
            return f"{x} + q_idx * 0.01"
        if kind == "bigrow":
            return f"{x} + q_idx * 1000.0 + {r.choice((0.0, 1e5))}"
        if kind == "keyterm":
            return f"{x} - kv_idx * 0.05"
        if kind == "square":
            return f"{x} - ({x}) ** 2 * 0.05"
        if kind == "thr":
            t = self.captured("thr", {"dims": ["h"]}, torch.randn(p.Hq, generator=gen) * 0.5)
            return f"where({x} > {t}[h], {x}, ({x}) * 0.5)"
        if kind == "emb":
            ids = torch.randint(0, 5, (p.B, p.Nk), generator=gen).to(torch.int32)
            e = self.captured("emb", {"dims": [5]}, torch.randn(5, generator=gen) * 0.5, learned=True)
            return f"{x} + {e}[{self.captured('tok', {'dims': ['b', 'n'], 'dtype': 'int32'}, ids)}[b, kv_idx]]"
        if kind == "bqh":
            bq = self.captured("bqh", {"dims": ["b", "h", "n"]}, torch.randn(p.B, p.Hq, p.Nq, generator=gen) * 0.5,
                               learned=True)
            bk = self.captured("bkh", {"dims": ["h", "n"]}, torch.randn(p.Hq, p.Nk, generator=gen) * 0.5,
                               learned=True)
            return f"{x} + {bq}[b, h, q_idx] + {bk}[h, kv_idx]"
        if kind == "bits":
            return r.choice((f"{x} + ((q_idx & kv_idx) == 0) * 0.5", f"{x} + ((q_idx ^ kv_idx) % 4) * 0.125",
                             f"{x} + ((q_idx | kv_idx) >> 2) * 0.0625"))
        if kind == "clamp":
            return r.choice((f"max({x}, -1.0)", f"min({x}, 1.5)", f"min(max({x}, -2.0), 2.0)"))
        if kind == "divlearned":
            t = self.captured("tdiv", {"dims": [1]}, torch.tensor([0.5 + r.random()]), learned=True)
            return f"({x}) / {t}[0]"
        if kind == "twice":
            hs = self.captured("hs2", {"dims": ["h"]}, 0.5 + torch.rand(p.Hq, generator=gen), learned=True)
            return f"({x}) * {hs}[h] + {hs}[h] * 0.5"
        if kind == "tparam":
            return f"({x}) * {self.param('T', r.choice((0.5, 1.25, 2.0)))}"
        if kind == "whereint":
            return f"{x} + where(q_idx > kv_idx, 1, -1) * 0.25"
        if kind == "qdivkv":
            return f"{x} - q_idx // (1 + kv_idx)"
        if kind == "silu":
            return f"({x}) * sigmoid({x})"
        if kind == "trig" and "-inf" not in x:  # cos(-inf) is NaN; compared in a where it is refused (§8)
            return f"sin(cos({x})) + tan(b)"
        if kind == "iscale":  # a captured 0-d int tensor added to the score
            return f"{x} + {self.captured('isc', {'dims': [], 'dtype': 'int32'}, torch.tensor(r.randint(-2, 2)))}"
        if kind == "chainsub":
            # chained reads are not learned: Flex's backward fails on them ("idx shape ... must match value shape")
            t = self.captured("bcs", {"dims": ["b", "n"]}, torch.randn(p.B, p.Nq, generator=gen))
            return f"{x} + {t}[b][q_idx]"
        if kind == "weird":  # FlexAttention's index_weird1: a constant, then two, then one index
            t = self.captured("bw", {"dims": [2, "b", "h", "n"]}, torch.randn(2, p.B, p.Hq, p.Nq, generator=gen))
            return f"{x} + {t}[{r.randint(0, 1)}][b, h][q_idx]"
        if kind == "weird2":  # index_weird2: a captured 0-d int tensor as an index
            t = self.captured("bw2", {"dims": ["b", "h", 3, "n"]}, torch.randn(p.B, p.Hq, 3, p.Nq, generator=gen))
            wb = self.captured("which", {"dims": [], "dtype": "int64"}, torch.tensor(r.randint(0, 2)))
            return f"{x} + {t}[b][h][{wb}, q_idx]"
        if kind == "padded":  # FlexAttention's padded dense causal: the score against a per-batch length
            sl = self._int_table("slen", ["b"], (p.B,), -1, 3, "int32", gen)
            return f"where({x} <= {sl}[b], {x}, -inf)"
        if kind == "boolterm":
            am = torch.rand(p.B, 1, p.Nq, p.Nk, generator=gen) < 0.5
            return f"{x} + {self.captured('am2', {'dims': ['b', 1, 'n', 'n'], 'dtype': 'bool'}, am)}[b, 0, q_idx, kv_idx]"
        if kind == "bias2d":
            t = self.captured("bqk", {"dims": ["n", "n"]}, torch.randn(p.Nq, p.Nk, generator=gen) * 0.5, learned=True)
            return f"{x} + {t}[q_idx, kv_idx]"
        if kind == "rel2s":  # FlexAttention's load_rel_bias: a 2S table read at (q - kv) + S
            S = max(p.Nq, p.Nk)
            t = self.captured("rb", {"dims": [2 * S]}, torch.randn(2 * S, generator=gen) * 0.5, learned=True)
            return f"{x} + {t}[(q_idx - kv_idx) + {S}]"
        return f"({x}) * (1.0 + (q_idx % 3) * 0.5)"


def draw(seed: int) -> P.Program:
    r = random.Random(seed)
    Hkv = r.choice((1, 1, 2))
    Hq = Hkv * r.choice((1, 2, 2, 4))
    B = r.choice((1, 2))
    D = r.choice((8, 16))
    p = P.Program(B=B, Bkv=r.choice((B, 1)), Hq=Hq, Hkv=Hkv, Nq=r.choice((1, r.randint(2, 70))),
                  Nk=r.randint(1, 70), D=D, Dv=r.choice((D, D, 8, 16)),
                  dtype=r.choice((torch.float32,) * 6 + (torch.bfloat16, torch.float16)))
    Gen(r, p).mask_and_mod(0.8, 0.75, 0.2)
    p.scale = r.choice((None, None, 0.3, 1.0))
    p.head_dim = r.choice((None, D, D))
    return p


def check_seed(seed: int, grad: bool = True):
    p = draw(seed)
    return P.compare(p, seed, grad), p.describe()


def main(argv=None):
    return P.main(argv, check_seed)


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
