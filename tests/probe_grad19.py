"""Probe 19 fuzzer: specs with [inputs] (learned tables, scales, ids, lengths, padding) and score
transforms, forward and every gradient, against attncc.reference's float64 autograd.

    python tests/probe_grad19.py --cases 40 --start 0      # print failures
    python tests/probe_grad19.py --seed 7 --verbose
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import script_env  # noqa: E402,F401  (the interpreter, this checkout on the path: before the imports below)

import torch  # noqa: E402

import attncc  # noqa: E402
from cases import run_seeds, seed_parser, seeds_of  # noqa: E402

F64 = torch.float64
DT = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
      "int32": torch.int32, "int64": torch.int64, "int16": torch.int16, "bool": torch.bool}


@dataclass
class Inp:
    name: str
    dims: Tuple  # "b", "h", "n", int
    dtype: str
    grad: bool = False
    kind: str = "float"  # float | len | doc | pad | ninf (a float additive mask: 0 / -inf) | temp
    scale: float = 0.5
    offset: float = 0.0


@dataclass
class Case:
    text: str
    inputs: List[Inp]
    tags: set = field(default_factory=set)


class Spec:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.inputs: Dict[str, Inp] = {}
        self.tags = set()

    def inp(self, dims, kind="float", dtype=None, grad=None, **kw):
        rng = self.rng
        name = f"t{len(self.inputs)}"
        if dtype is None:
            dtype = rng.choice(("float32",) * 5 + ("float64", "bfloat16", "float16"))
        if grad is None:
            grad = kind in ("float", "temp", "ninf") and rng.random() < 0.7
        self.inputs[name] = Inp(name, tuple(dims), dtype, grad, kind, **kw)
        return name


def float_term(sp: Spec) -> str:
    """A float term reading one table, indexed by an expression of i, j, h, b kept in range."""
    rng = sp.rng
    kind = rng.randrange(15)
    if kind == 0:  # clamped abs distance
        K = rng.choice((3, 5, 9))
        t = sp.inp(("h", K))
        return f"{t}[h, min(abs(i - j), {K - 1})]"
    if kind == 1:  # clamped signed distance
        C = rng.choice((2, 4, 7))
        t = sp.inp(("h", 2 * C + 1))
        return f"{t}[h, max(min(j - i, {C}), -{C}) + {C}]"
    if kind == 2:  # floor-divided bucket of a signed distance, clamped
        C = rng.choice((2, 3))
        d = rng.choice((4, 5, 8))
        t = sp.inp((2 * C + 1,))
        return f"{t}[min(max((i - j) // {d}, -{C}), {C}) + {C}]"
    if kind == 3:  # floor-divided abs distance, looks out of range but the min keeps it in
        K = rng.choice((4, 6))
        t = sp.inp(("h", K))
        return f"{t}[h, min(abs(i - j) // 3, {K - 1})]"
    if kind == 4:
        t = sp.inp(("b", "n"))
        return f"{t}[b, {rng.choice('ij')}]"
    if kind == 5:
        t = sp.inp(("b", "h", "n"))
        return f"{t}[b, h, {rng.choice('ij')}]"
    if kind == 6:
        t = sp.inp(("n", "n"))
        return f"{t}[i, j]"
    if kind == 7:
        t = sp.inp(("h", 32))
        return f"{t}[h, bucket(j - i)]"
    if kind == 8:  # a fixed size-1 dim (broadcast-like), indexed by a constant
        t = sp.inp((1, "h"))
        return f"{t}[0, h] * (j - i) * 0.1"
    if kind == 9:  # per-batch, per-head
        t = sp.inp(("b", "h"))
        return f"{t}[b, h]"
    if kind == 10:  # table by key, shifted index guarded by where
        t = sp.inp(("n",))
        return f"where(j >= 2, {t}[j - 2], 0.0)"
    if kind == 11:  # product of two tables
        a = sp.inp(("h",))
        c = sp.inp(("b", "n"))
        return f"{a}[h] * {c}[b, j]"
    if kind == 12:
        t = sp.inp(("h", 8))
        return f"{t}[h, (i + 2 * j) % 8]"
    if kind == 13:
        t = sp.inp(("h",), kind="float")
        return f"{t}[h] * abs(i - j) * 0.1"
    t = sp.inp(("b", "n"))
    return f"tanh({t}[b, i] - {t}[b, j])"


def mask_clause(sp: Spec) -> Optional[str]:
    rng = sp.rng
    kind = rng.randrange(8)
    if kind == 0:
        return None
    if kind == 1:
        return "j <= i"
    if kind == 2:
        return f"abs(i - j) <= {rng.choice((3, 7))}"
    if kind == 3:
        t = sp.inp(("b",), kind="len", dtype=rng.choice(("int32", "int64")), grad=False)
        return f"j < {t}[b]"
    if kind == 4:
        t = sp.inp(("b", "n"), kind="doc", dtype=rng.choice(("int32", "int64", "int16")), grad=False)
        return f"{t}[b, i] == {t}[b, j]"
    if kind == 5:
        t = sp.inp(("b", "n"), kind="pad", dtype="bool", grad=False)
        return f"{t}[b, j]"
    if kind == 6:
        t = sp.inp(("b",), kind="len", dtype="int32", grad=False)
        return f"j < {t}[b] and j <= i"
    return "False" if rng.random() < 0.3 else "i - j < 2 and j - i < 2"


def random_case(seed: int) -> Case:
    rng = random.Random(seed)
    sp = Spec(rng)
    lines = []
    mask = mask_clause(sp)
    terms = [f"{rng.choice(('', '0.5 * ', '-0.7 * '))}{float_term(sp)}" for _ in range(rng.choice((1, 1, 2, 3)))]
    if rng.random() < 0.2:  # an HF-style additive float mask (0 / -inf), maybe learned
        t = sp.inp(("b", "n"), kind="ninf", dtype=rng.choice(("float32", "float16", "bfloat16")))
        terms.append(f"{t}[b, j]")
        sp.tags.add("ninf")
    bias = " + ".join(terms)
    mod = None
    r = rng.random()
    if r < 0.5:
        split = rng.randrange(len(terms) + 1)
        bias_part = " + ".join(terms[:split]) if split else None
        mod_terms = terms[split:]
        form = rng.randrange(6)
        extra = " + ".join(mod_terms) if mod_terms else "0.0"
        if form == 0:
            t = sp.inp(("h",), kind="temp", offset=1.0)
            mod = f"s * {t}[h] + {extra}"
        elif form == 1:
            t = sp.inp((), kind="temp", offset=1.0)
            mod = f"s * {t} + {extra}"
        elif form == 2:
            mod = f"s + ({extra}) * tanh(s)"
        elif form == 3:
            c = mask_clause(sp) or "j <= i + 1"
            mod = f"where({c}, s + {extra}, -inf)"
        elif form == 4:
            mod = f"where(s > -0.5, s + {extra}, -inf)"
            sp.tags.add("score_cond")
        else:
            t = sp.inp(("h",), kind="temp", offset=0.0)
            mod = f"s + {t}[h] * sigmoid(s) + {extra}"
        bias = bias_part
    for d in sp.inputs.values():
        pass
    if sp.inputs:
        lines.append("[inputs]")
        for d in sp.inputs.values():
            dims = ", ".join(f'"{x}"' if isinstance(x, str) else str(x) for x in d.dims)
            g = ", grad = true" if d.grad else ""
            lines.append(f'{d.name} = {{ dims = [{dims}], dtype = "{d.dtype}"{g} }}')
    if mask:
        lines += ["[mask]", f'where = "{mask}"']
    if bias or mod or rng.random() < 0.2:
        lines.append("[score]")
        if bias:
            lines.append(f'bias = "{bias}"')
        if mod:
            lines.append(f'mod = "{mod}"')
        if rng.random() < 0.2:
            lines.append(f"softcap = {rng.choice((3.0, 20.0))}")
    if rng.random() < 0.25:
        hq = rng.choice((2, 3, 4))
        lines = [f"[heads]\nq = {hq}"] + lines
    return Case("\n".join(lines) + "\n", list(sp.inputs.values()), sp.tags)


def _make_table(d: Inp, shape, gen, rng, B, n_q_end, k_off, Nk):
    if d.kind == "len":
        return torch.tensor([rng.randint(0, k_off + Nk + 1) for _ in range(shape[0])], dtype=DT[d.dtype])
    if d.kind == "doc":
        rows = []
        for _ in range(shape[0]):
            ids, doc = [], 0
            while len(ids) < shape[1]:
                ids += [doc] * rng.randint(1, 9)
                doc += 1
            rows.append(ids[:shape[1]])
        return torch.tensor(rows, dtype=DT[d.dtype])
    if d.kind == "pad":
        x = torch.rand(*shape, generator=gen) < 0.75
        if rng.random() < 0.5:
            x[0] = False  # a batch row with every key padded
        return x
    if d.kind == "ninf":
        x = torch.where(torch.rand(*shape, generator=gen) < 0.7, 0.0, -math.inf)
        if rng.random() < 0.5:
            x[0] = -math.inf  # every key of batch row 0 removed
        return x
    return d.scale * torch.randn(shape, generator=gen) + d.offset


def layout(t: torch.Tensor, how: str, dtype, grad: bool):
    """(view passed to the call, leaf whose .grad is compared)."""
    if how == "expand" and t.dim() >= 1:
        base = t[:1].contiguous() if t.shape[0] > 1 else t.contiguous()
        if t.shape[0] > 1:
            t = base.expand_as(t)  # the values change to row 0's: the case's values
        leaf = base.to(dtype).detach().requires_grad_(grad)
        return leaf.expand(*t.shape), leaf
    if how == "offset":
        leaf = torch.randn(t.numel() + 7).to(dtype)
        leaf[5:5 + t.numel()] = t.reshape(-1).to(dtype)
        leaf = leaf.detach().requires_grad_(grad)
        return leaf[5:5 + t.numel()].view(t.shape), leaf
    if how == "transposed" and t.dim() >= 2:
        leaf = t.transpose(0, 1).contiguous().to(dtype).detach().requires_grad_(grad)
        return leaf.transpose(0, 1), leaf
    if how == "step" and t.dim() >= 1:
        leaf = torch.repeat_interleave(t, 2, dim=-1).to(dtype).detach().requires_grad_(grad)
        return leaf[..., ::2], leaf
    leaf = t.to(dtype).detach().requires_grad_(grad)
    return leaf, leaf


def ref_view(view: torch.Tensor, leaf: torch.Tensor, how: str, rleaf: torch.Tensor):
    if how == "expand":
        return rleaf.expand(*view.shape)
    if how == "offset":
        return rleaf[5:5 + view.numel()].view(view.shape)
    if how == "transposed" and view.dim() >= 2:
        return rleaf.transpose(0, 1)
    if how == "step" and view.dim() >= 1:
        return rleaf[..., ::2]
    return rleaf


_MODULES = {}


def labels_all(qkv_grad, grad_names):
    return [x for x, g in zip("qkv", qkv_grad) if g] + list(grad_names)


def compiled(text):
    if text not in _MODULES:
        _MODULES[text] = (attncc.compile(text), attncc.parse_spec(text))
    return _MODULES[text]


def run_case(seed: int, verbose=False, case: Optional[Case] = None):
    case = case or random_case(seed)
    rng = random.Random(seed * 7919 + 1)
    gen = torch.Generator().manual_seed(seed)
    m, p = compiled(case.text)
    hq_fixed = p.heads_q
    Hq = hq_fixed or rng.choice((1, 2, 3, 4))
    Hkv = rng.choice([d for d in (1, 2, 3, 4) if Hq % d == 0])
    B = rng.choice((1, 2))
    Nq, Nk = rng.randint(1, 37), rng.randint(1, 37)
    if rng.random() < 0.3:
        Nk = Nq
    D = rng.choice((4, 8, 16))
    q_off = rng.choice((0, 0, rng.randint(0, 20)))
    k_off = rng.choice((0, 0, 0, rng.randint(0, 10)))
    qdt = rng.choice((torch.float32,) * 6 + (torch.bfloat16, torch.float16))
    n = max(q_off + Nq, k_off + Nk) + rng.randint(0, 3)
    loss_lse = rng.random() < 0.5
    q0 = torch.randn(B, Hq, Nq, D, generator=gen)
    k0 = torch.randn(B, Hkv, Nk, D, generator=gen)
    v0 = torch.randn(B, Hkv, Nk, D, generator=gen)
    qkv_grad = [rng.random() < 0.85 for _ in range(3)]
    kw_views, leaves, hows, grad_names = {}, {}, {}, []
    for d in case.inputs:
        shape = [{"b": B, "h": Hq, "n": n}.get(x, x) for x in d.dims]
        values = _make_table(d, shape, gen, rng, B, q_off + Nq, k_off, Nk)
        how = rng.choice(("contiguous", "contiguous", "expand", "offset", "transposed", "step"))
        if d.kind in ("len", "doc", "pad"):
            dtype = values.dtype
        else:
            dtype = DT[rng.choice((d.dtype, d.dtype, "float16", "bfloat16", "float32", "float64"))]
            if d.kind == "temp":
                how = rng.choice(("contiguous", "expand")) if d.dims else "contiguous"
        want_grad = d.grad and rng.random() < 0.8
        view, leaf = layout(values, how, dtype, want_grad)
        kw_views[d.name], leaves[d.name], hows[d.name] = view, leaf, how
        if want_grad:
            grad_names.append(d.name)
    desc = dict(B=B, Hq=Hq, Hkv=Hkv, Nq=Nq, Nk=Nk, D=D, q_off=q_off, k_off=k_off, qdt=qdt, loss_lse=loss_lse,
                qkv_grad=qkv_grad, hows=hows, dtypes={k: v.dtype for k, v in kw_views.items()}, grads=grad_names)
    if verbose:
        print(case.text)
        print(desc)
    q, k, v = (t.to(qdt).requires_grad_(g) for t, g in zip((q0, k0, v0), qkv_grad))
    pos = dict(q_offset=q_off, k_offset=k_off)
    o, lse = m.attention(q, k, v, return_lse=True, **pos, **kw_views)
    if verbose:
        for nm, t in kw_views.items():
            print(nm, t.dtype, tuple(t.shape), t.stride(), "finite", bool(torch.isfinite(t).all()) if t.is_floating_point() else "-")
        print("o finite", bool(torch.isfinite(o).all()), "lse", lse)
    go = torch.randn(o.shape, generator=gen)
    gl = torch.randn(lse.shape, generator=gen)
    wrt = [t for t, g in zip((q, k, v), qkv_grad) if g] + [leaves[nm] for nm in grad_names]
    loss = (o.float() * go).sum() + ((torch.where(torch.isfinite(lse), lse, 0.0) * gl).sum() if loss_lse else 0.0)
    grads = torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True) if wrt else []
    # reference
    rq, rk, rv = (t.detach().double().requires_grad_(g) for t, g in zip((q, k, v), qkv_grad))
    rleaves = {nm: leaves[nm].detach().double().requires_grad_(nm in grad_names) for nm in leaves}
    rkw = {nm: (ref_view(kw_views[nm], leaves[nm], hows[nm], rleaves[nm])
                if kw_views[nm].is_floating_point() else kw_views[nm]) for nm in kw_views}
    ro, rlse = attncc.reference(p, rq, rk, rv, return_lse=True, **pos, **rkw)
    rwrt = [t for t, g in zip((rq, rk, rv), qkv_grad) if g] + [rleaves[nm] for nm in grad_names]
    rloss = (ro * go.double()).sum() + ((torch.where(torch.isfinite(rlse), rlse, 0.0) * gl.double()).sum()
                                        if loss_lse else 0.0)
    rgrads = torch.autograd.grad(rloss, rwrt, allow_unused=True, materialize_grads=True) if rwrt else []
    tol = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (2e-2, 6e-2), torch.float16: (5e-3, 2e-2)}[qdt]
    half_tab = any(kw_views[nm].dtype in (torch.float16, torch.bfloat16) or
                   next(x for x in case.inputs if x.name == nm).dtype in ("float16", "bfloat16")
                   for nm in kw_views if kw_views[nm].is_floating_point())
    problems = []

    # The kernels' delta (rowsum(dO * o), as FlashAttention's) comes from the o they return, rounded
    # to a half qdt: a table gradient that is zero in exact arithmetic (a per-row or per-head bias,
    # t[b, h, i] without the LSE in the loss: softmax is shift invariant) is then sum_i dO_i . (ro_i - o_i)
    # times the table's coefficient, ~1e-3 in float16 (seeds 753048, 753201; fuzz_specs seed 200061's
    # rule). That rounding's total, twice over (coefficients up to 2), is allowed on table gradients.
    o_round = 2.0 * float((go.double() * (ro.detach() - o.detach().double())).sum(-1).nan_to_num().abs().sum())

    def cmp(label, x, r, t, allow=0.0):
        x, r = x.detach().double(), r.detach().double()
        if x.shape != r.shape:
            problems.append(f"{label}: shape {tuple(x.shape)} vs {tuple(r.shape)}")
            return
        fin_r = torch.isfinite(r)
        if not torch.equal(torch.isfinite(x), fin_r):
            bad = (torch.isfinite(x) != fin_r).nonzero()[:4].tolist()
            problems.append(f"{label}: finiteness differs at {bad} (kernel {[x[tuple(b)].item() for b in bad]} ref {[r[tuple(b)].item() for b in bad]})")
            return
        xf, rf = x[fin_r], r[fin_r]
        if not torch.equal(x[~fin_r].nan_to_num(), r[~fin_r].nan_to_num()):
            problems.append(f"{label}: non-finite values differ: kernel {x[~fin_r][:4].tolist()} ref {r[~fin_r][:4].tolist()}")
        den = rf.norm().clamp_min(1e-2 if label.startswith("d") else 1e-3)
        err = float(((xf - rf).norm() - allow).clamp_min(0.0) / den)
        if err > t:
            problems.append(f"{label}: rel err {err:.3g} (|ref| {float(rf.norm()):.3g})")

    if not torch.isfinite(ro).all():  # +inf / NaN scores: the doc's allowance for rows sharing a tile
        if not torch.isnan(o.detach()[torch.isnan(ro)]).all():
            problems.append("o: a NaN of the reference is not NaN in the kernels")
        fin = torch.isfinite(ro) & torch.isfinite(o.detach())
        if float((o.detach().double() - ro.detach())[fin].abs().amax().nan_to_num() if fin.any() else 0.0) > 5 * tol[0]:
            problems.append("o: finite entries differ")
        for label, x, r in zip(labels_all(qkv_grad, grad_names), grads, rgrads):
            if not torch.isnan(x[torch.isnan(r)]).all():
                problems.append(f"d{label}: a NaN of the reference is not NaN in the kernels")
        return problems, desc
    cmp("o", o, ro, tol[0])
    cmp("lse", lse, rlse, tol[0] * 10)
    labels = [x for x, g in zip("qkv", qkv_grad) if g] + grad_names
    for label, x, r, leaf in zip(labels, grads, rgrads, wrt):
        if x is not None and x.dtype != leaf.dtype:
            problems.append(f"d{label}: dtype {x.dtype} vs leaf {leaf.dtype}")
        gt = tol[1] * (5 if label in grad_names and (half_tab or leaf.dtype in (torch.float16, torch.bfloat16)) else 1)
        cmp(f"d{label}", x, r, gt, o_round if label in grad_names else 0.0)
    if verbose or problems:
        return problems, desc
    return problems, desc


def main():
    ap = seed_parser(20)
    a = ap.parse_args()
    seeds = seeds_of(a)
    run_seeds(seeds, lambda seed: run_case(seed, a.verbose), a.verbose, lambda seed: random_case(seed).text)


if __name__ == "__main__":
    main()
