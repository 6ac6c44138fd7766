"""Probe combo21 generator: seeded random *combinations* of features, each case one spec and one
call, against attncc.reference (float64), forward and backward.

A spec mixes RoPE (neox / gptj, partial rotary_dim, odd thetas, odd head dims), ALiBi, learned
slopes, T5 buckets, row / column / pair tables, a ``dot`` of two learned inputs, terms of n_q /
n_k, a score transform (a 0-d temperature, a per-head scale, tanh, ``max``, a row table, score
conditions, a mask written in ``where(..., -inf)``), softcap, and a mask of clauses (causal,
bottom-right causal, windows, chunks, head and batch clauses, document ids and key lengths from
inputs) joined by ``and`` under a prefix or global-token ``or``, with fixed head counts now and
then. A call is ``attention`` (GQA / MQA, Nq != Nk, offsets, n_q / n_k, k and v of batch 1,
return_lse, the LSE in the loss), a packed call (cu_seqlens; masks that read inputs must refuse
it), or ``decode`` (contiguous or paged caches, kv_len below Nq, forced splits); q, k, v
contiguous, transposed, strided along the head dim, every other row, batch / heads / rows expanded
(stride 0), odd strides from storage offset 1; inputs contiguous, transposed, strided or expanded
(a learned table too) and passed in another float type; float32 / float16 / bfloat16, backward in
all three; forced tile shapes.

    python tests/probe_combo21.py --cases 40 --start 0      # print failures
    python tests/probe_combo21.py --seed 7 --verbose
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import script_env  # noqa: E402,F401  (the interpreter, this checkout on the path: before the imports below)

import torch  # noqa: E402

import attncc  # noqa: E402
from attncc._reference import rotary  # noqa: E402
from cases import REL_TOL, run_seeds, seed_parser, seeds_of  # noqa: E402
from fuzz_specs import VarlenPlan, _rel, _tile_config, packed_reference  # noqa: E402

DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GRAD_TOL = {torch.float32: 2e-3, torch.float16: 3e-2, torch.bfloat16: 8e-2}
LSE_TOL = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}


@dataclass
class Inp:
    name: str
    dims: Tuple
    dtype: str = "float32"
    grad: bool = False
    kind: str = "float"  # float | slope | doc | len | temp


@dataclass
class Case:
    text: str
    inputs: List[Inp]
    mask_inputs: bool  # the mask reads an input: cu_seqlens are refused
    head_dim: int
    value_dim: int
    heads: Tuple[Optional[int], Optional[int]]
    params: Dict[str, int] = field(default_factory=dict)


class _Spec:
    def __init__(self, rng):
        self.rng, self.inputs, self.params = rng, {}, {}

    def inp(self, prefix, dims, kind="float", dtype="float32", grad=None):
        name = f"{prefix}{len(self.inputs)}"
        grad = (self.rng.random() < 0.7) if grad is None else grad
        if dtype == "float32" and self.rng.random() < 0.15:
            dtype = self.rng.choice(("bfloat16", "float16", "float64"))
        self.inputs[name] = Inp(name, tuple(dims), dtype, grad and dtype.startswith(("float", "bfloat")), kind)
        return name

    def param(self, prefix, value):
        name = f"{prefix}{len(self.params)}"
        self.params[name] = value
        return name


def bias_term(sp: _Spec) -> str:
    rng = sp.rng
    kind = rng.choice(("alibi", "slope", "t5", "row", "col", "pair", "dot", "dist", "lengths"))
    if kind == "alibi":
        return "alibi"
    if kind == "slope":
        return f"{sp.inp('sl', ['h'], 'slope')}[h] * (j - i)"
    if kind == "t5":
        return f"{sp.inp('rel', ['h', 16])}[h, bucket(j - i, num_buckets=16, max_distance=40)]"
    if kind == "row":
        return f"{sp.inp('rb', ['b', 'n'])}[b, i]"
    if kind == "col":
        return f"0.5 * {sp.inp('cb', ['b', 'n'])}[b, j]"
    if kind == "pair":
        return f"{sp.inp('pt', ['n', 'n'])}[i, j]"
    if kind == "dot":
        a, b = sp.inp("qr", ["b", "h", "n", 4]), sp.inp("kr", ["b", "n", 4])
        return f"0.3 * dot({a}[b, h, i, :], {b}[b, j, :])"
    if kind == "lengths":  # per call, per packed sequence, per decode row
        return rng.choice(("0.05 * (n_k - j)", "0.1 * (n_q - i) + 0.02 * (n_k - n_q)"))
    return f"{sp.param('c', rng.choice((0.05, -0.1)))} * abs(i - j)"


def mask_clause(sp: _Spec) -> Tuple[str, bool]:
    """(clause, reads an input)."""
    rng = sp.rng
    kind = rng.choice(("causal", "causal", "br", "window", "absw", "chunk", "doc", "len", "head", "batch"))
    if kind == "causal":
        return "j <= i", False
    if kind == "head":
        return rng.choice(("(h % 2 == 1 or j <= i)", "i - j < 3 * (h + 1)")), False
    if kind == "batch":
        return "(b == 1 or j <= i)", False
    if kind == "br":
        return "j - n_k <= i - n_q", False
    if kind == "window":
        return f"i - j < {sp.param('w', rng.randint(3, 20))}", False
    if kind == "absw":
        return f"abs(i - j) <= {sp.param('w', rng.randint(2, 12))}", False
    if kind == "chunk":
        c = sp.param("ch", rng.choice((5, 7, 8, 13)))
        return f"i // {c} == j // {c}", False
    if kind == "doc":
        d = sp.inp("doc", ["b", "n"], "doc", "int32", grad=False)
        return f"{d}[b, i] == {d}[b, j]", True
    return f"j < {sp.inp('kl', ['b'], 'len', 'int32', grad=False)}[b]", True


def random_mask(sp: _Spec) -> Tuple[Optional[str], bool]:
    rng = sp.rng
    if rng.random() < 0.15:
        return None, False
    clauses = [mask_clause(sp) for _ in range(rng.choice((1, 1, 2, 2, 3)))]
    text = " and ".join(c for c, _ in clauses)
    reads = any(r for _, r in clauses)
    extra = rng.random()
    if extra < 0.2:
        text = f"j < {sp.param('p', rng.randint(1, 9))} or ({text})"
    elif extra < 0.4:
        g = sp.param("g", rng.randint(1, 6))
        text = f"i < {g} or j < {g} or ({text})"
    return text, reads


def random_mod(sp: _Spec) -> Optional[str]:
    rng = sp.rng
    r = rng.random()
    if r < 0.55:
        return None
    core = rng.choice(("s * {temp}", "s * {hs}[h]", "tanh(s / 2.0) * 2.0", "s + 0.2 * {cb}[b, j]", "s",
                       "max(s, -1.0) + {rb}[b, i]", "s * {temp} + 0.1 * (i - j)", "where(s > 0.2, s, -inf)",
                       "where(s > {hs}[h], s * 0.5, s * 2.0)"))
    core = core.format(temp=sp.inp("temp", [], "temp") if "{temp}" in core else "",
                       hs=sp.inp("hs", ["h"], "temp") if "{hs}" in core else "",
                       cb=sp.inp("mb", ["b", "n"]) if "{cb}" in core else "",
                       rb=sp.inp("mr", ["b", "n"]) if "{rb}" in core else "")
    if rng.random() < 0.4:
        clause = rng.choice(("j <= i", "i - j < 9", "j % 3 != 1", "abs(i - j) <= 6"))
        return f"where({clause}, {core}, -inf)"
    return core


def random_case(seed: int) -> Case:
    rng = random.Random(seed)
    sp = _Spec(rng)
    lines = []
    D = rng.choice((16, 16, 32, 24, 20, 17))
    Dv = D if rng.random() < 0.8 else rng.choice((8, 24, 13))
    mask, mask_inputs = random_mask(sp)
    bias = " + ".join(bias_term(sp) for _ in range(rng.choice((0, 1, 1, 2, 3))))
    mod = random_mod(sp)
    rope = None
    if rng.random() < 0.55:
        rd = rng.choice((None, None, 8, 16)) if D % 2 == 0 else rng.choice((8, 16))
        rope = (rng.choice((10000.0, 500.0, 10.0)), rng.choice(("neox", "gptj")), rd)
    hq = hkv = None
    if rng.random() < 0.25:
        hkv = rng.choice((1, 2))
        hq = hkv * rng.choice((1, 2, 3)) if rng.random() < 0.6 else None
    lines.append(f"head_dim = {D}")
    if Dv != D:
        lines.append(f"value_dim = {Dv}")
    if hq or hkv:
        lines.append("[heads]")
        if hq:
            lines.append(f"q = {hq}")
        lines.append(f"kv = {hkv}")
    if sp.params:
        lines.append("[params]")
        lines += [f"{k} = {v!r}" for k, v in sp.params.items()]
    if sp.inputs:
        lines.append("[inputs]")
        for d in sp.inputs.values():
            dims = "[" + ", ".join(f'"{x}"' if isinstance(x, str) else str(x) for x in d.dims) + "]"
            lines.append(f'{d.name} = {{ dims = {dims}, dtype = "{d.dtype}"' + (", grad = true }" if d.grad else " }"))
    if mask:
        lines += ["[mask]", f'where = "{mask}"']
    score = []
    if bias:
        score.append(f'bias = "{bias}"')
    if mod:
        score.append(f'mod = "{mod}"')
    if rng.random() < 0.35:
        score.append(f"softcap = {rng.choice((2.0, 5.0, 30.0))}")
    if rng.random() < 0.2:
        score.append(f"scale = {rng.choice((0.1, 0.3))}")
    if score:
        lines += ["[score]"] + score
    if rope:  # last: a decode reference cuts it off (tests/probe_combo21.py, _run_decode)
        lines += ["[rope]", f"theta = {rope[0]}", f'style = "{rope[1]}"']
        if rope[2]:
            lines.append(f"rotary_dim = {rope[2]}")
    return Case("\n".join(lines) + "\n", list(sp.inputs.values()), mask_inputs, D, Dv, (hq, hkv), dict(sp.params))


# ---------------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------------

QKV_LAYOUTS = ("contiguous", "bnhd", "d_step", "rows_step", "expand_b", "expand_h", "odd_strides", "expand_n")


def qkv_tensor(shape, dtype, how, gen, grad):
    """A float32 leaf holding values of ``dtype`` and ``view(leaf, dtype)``: the [B, H, N, D] tensor in
    layout ``how`` (the reference takes the same view of a float64 copy)."""
    B, H, N, D = shape
    if how == "bnhd":
        leaf = torch.randn(B, N, H, D, generator=gen)
        view = lambda t, dt: t.to(dt).transpose(1, 2)  # noqa: E731
    elif how == "d_step":
        leaf = torch.randn(B, H, N, 2 * D, generator=gen)
        view = lambda t, dt: t.to(dt)[..., ::2]  # noqa: E731
    elif how == "rows_step":
        leaf = torch.randn(B, H, 2 * N + 1, D, generator=gen)
        view = lambda t, dt: t.to(dt)[:, :, 1::2]  # noqa: E731
    elif how == "expand_b":
        leaf = torch.randn(1, H, N, D, generator=gen)
        view = lambda t, dt: t.to(dt).expand(B, H, N, D)  # noqa: E731
    elif how == "odd_strides":  # rows of D + 3 elements from storage offset 1 of a flat buffer
        leaf = torch.randn(B * H * N * (D + 3) + 1, generator=gen)
        strides = (H * N * (D + 3), N * (D + 3), D + 3, 1)
        view = lambda t, dt: t.to(dt).as_strided((B, H, N, D), strides, 1)  # noqa: E731
    elif how == "expand_n":
        leaf = torch.randn(B, H, 1, D, generator=gen)
        view = lambda t, dt: t.to(dt).expand(B, H, N, D)  # noqa: E731
    elif how == "expand_h":
        leaf = torch.randn(B, 1, N, D, generator=gen)
        view = lambda t, dt: t.to(dt).expand(B, H, N, D)  # noqa: E731
    else:
        leaf = torch.randn(B, H, N, D, generator=gen)
        view = lambda t, dt: t.to(dt)  # noqa: E731
    leaf = leaf.to(dtype).float() if dtype != torch.float32 else leaf  # values the dtype holds
    return leaf.requires_grad_(grad), view


def input_tensor(d: Inp, shape, gen, rng, *, lo_len, hi_len):
    """(leaf, view function, layout): values by kind, in a random layout."""
    if d.kind == "doc":
        starts = torch.rand(shape, generator=gen) < 0.2
        vals = starts.long().cumsum(-1)
    elif d.kind == "len":
        vals = torch.randint(lo_len, hi_len + 1, shape, generator=gen)
    elif d.kind == "slope":
        vals = torch.rand(shape, generator=gen) * 0.3
    elif d.kind == "temp":
        vals = 0.5 + torch.rand(shape, generator=gen)
    else:
        vals = torch.randn(shape, generator=gen) * 0.5
    choices = ["contiguous"] + (["step"] if shape else []) + (["transposed"] if len(shape) == 2 else []) + \
              (["expand"] if len(shape) >= 1 and shape[0] > 1 else [])
    how = rng.choice(choices) if rng.random() < 0.5 else "contiguous"
    dt = getattr(torch, d.dtype)
    if how == "expand":
        leaf = vals[:1].clone()
        view = lambda t: t.expand(*shape)  # noqa: E731
    elif how == "transposed":
        leaf = vals.t().contiguous()
        view = lambda t: t.t()  # noqa: E731
    elif how == "step":
        leaf = torch.repeat_interleave(vals, 2, dim=-1)
        view = lambda t: t[..., ::2]  # noqa: E731
    else:
        leaf = vals
        view = lambda t: t  # noqa: E731
    if dt.is_floating_point and rng.random() < 0.2:
        dt = rng.choice((torch.float32, torch.float64, torch.bfloat16))  # converted to the declared type
    leaf = leaf.to(dt)
    if d.grad:
        leaf.requires_grad_()
    return leaf, view, how


# ---------------------------------------------------------------------------------------------
# one case
# ---------------------------------------------------------------------------------------------

_BUILT: Dict[str, object] = {}


def compiled(text):
    if text not in _BUILT:
        _BUILT[text] = (attncc.parse_spec(text), attncc.compile(text))
    return _BUILT[text]


def _cu(lens):
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return out


def draw_call(seed: int, case: Case):
    rng = random.Random(seed * 7 + 3)
    mode = rng.choices(("attention", "packed", "decode"), (0.4, 0.3, 0.3))[0]
    hq_fixed, hkv_fixed = case.heads
    Hkv = hkv_fixed or rng.choice((1, 2))
    Hq = hq_fixed or Hkv * rng.choice((1, 2, 3))
    dtype = rng.choice(("float32", "float32", "float16", "bfloat16"))
    call = dict(mode=mode, Hq=Hq, Hkv=Hkv, dtype=dtype, D=case.head_dim, Dv=case.value_dim, lse_loss=rng.random() < 0.5,
                backward=mode != "decode" and rng.random() < 0.7,
                # (v's rows all equal would make dq, dk 0 in exact arithmetic: a test of rounding only)
                layouts=tuple(rng.choice(QKV_LAYOUTS[:-1] if x == 2 else QKV_LAYOUTS) if rng.random() < 0.5
                              else "contiguous" for x in range(3)),
                overrides={k: (v + rng.randint(-2, 3) if isinstance(v, int) else v)
                           for k, v in case.params.items() if rng.random() < 0.3},
                scale=rng.choice((None, None, None, 0.2)),
                tiles=(tuple((rng.choice((16, 32)), rng.choice((16, 32))) for _ in range(3))
                       if rng.random() < 0.3 else None),
                splits=rng.choice((None, None, "1", "2", "3")))
    call["overrides"] = {k: max(v, 1) if isinstance(v, int) else v for k, v in call["overrides"].items()}
    if mode == "attention":
        call.update(B=rng.choice((1, 2)), Nq=rng.randint(8, 60) | 1, Nk=rng.randint(8, 60) | rng.randint(0, 1),
                    q_offset=rng.choice((0, 0, rng.randint(1, 40))), k_offset=rng.choice((0, 0, rng.randint(1, 40))),
                    n_extra=rng.choice((None, None, rng.randint(0, 9))))
        call["kv_b1"] = call["B"] > 1 and rng.random() < 0.3  # k, v of batch 1 serve every batch row
    elif mode == "packed":
        S = rng.randint(1, 4)
        lq = [rng.choice((0, 1, rng.randint(2, 30))) for _ in range(S)]
        lk = lq if rng.random() < 0.5 else [rng.choice((0, 1, rng.randint(2, 30))) for _ in range(S)]
        call.update(B=1, lens=(tuple(lq), tuple(lk)), pad=(rng.choice((0, 0, 3)), rng.choice((0, 0, 2))),
                    max_given=rng.random() < 0.4)
        call["Nq"], call["Nk"] = sum(lq) + call["pad"][0], sum(lk) + call["pad"][1]
        call["layouts"] = tuple("contiguous" if x in ("expand_b",) else x for x in call["layouts"])
    else:
        B = rng.choice((1, 2, 3))
        Nq = rng.choice((1, 1, 2, 3, 5, 16))
        page = rng.choice((0, 0, 16, 32))
        cap = rng.randint(max(Nq, 8), 64)
        if page:
            cap = -(-cap // page) * page
        lens = [rng.choice((cap, rng.randint(Nq, cap), rng.randint(0, cap))) for _ in range(B)]
        call.update(B=B, Nq=Nq, Nk=cap, page=page, kv_lens=lens)
        call["layouts"] = (call["layouts"][0], "contiguous", "contiguous")
    return call


def run_case(seed: int, case: Optional[Case] = None):
    """(problems, description) of one seeded case: the spec of ``seed`` (or ``case``), a call of it."""
    case = case or random_case(seed)
    call = draw_call(seed, case)
    saved = os.environ.get("ATTNCC_DECODE_SPLITS")
    try:
        if call["splits"]:
            os.environ["ATTNCC_DECODE_SPLITS"] = call["splits"]
        with _tile_config(call["tiles"]):
            return _run(seed, case, call)
    finally:
        os.environ.pop("ATTNCC_DECODE_SPLITS", None)
        if saved is not None:
            os.environ["ATTNCC_DECODE_SPLITS"] = saved


def _run(seed: int, case: Case, call):
    p, m = compiled(case.text)
    desc = dict(call)
    rng = random.Random(seed * 11 + 5)
    gen = torch.Generator().manual_seed(seed)
    dt = DT[call["dtype"]]
    B, Hq, Hkv, Nq, Nk, D, Dv = (call[x] for x in ("B", "Hq", "Hkv", "Nq", "Nk", "D", "Dv"))
    mode = call["mode"]
    grad = call["backward"]
    leaves, views = [], []
    Bkv = 1 if call.get("kv_b1") else B
    for shape, how in zip(((B, Hq, Nq, D), (Bkv, Hkv, Nk, D), (Bkv, Hkv, Nk, Dv)), call["layouts"]):
        leaf, view = qkv_tensor(shape, dt, how, gen, grad)
        leaves.append(leaf)
        views.append(view)
    if mode == "attention":
        n_size = max(call["q_offset"] + Nq, call["k_offset"] + Nk) + (call["n_extra"] or 0) + rng.randint(0, 3)
        batch, lo_len, hi_len = B, call["k_offset"], call["k_offset"] + Nk
    elif mode == "packed":
        lq, lk = call["lens"]
        n_size, batch, lo_len, hi_len = max(max(lq), max(lk), 1) + rng.randint(0, 3), len(lq), 0, max(lk)
    else:
        n_size, batch, lo_len, hi_len = Nk, B, 0, Nk
    sizes = {"b": batch, "h": Hq, "n": n_size}
    in_leaves, in_views, in_layouts = {}, {}, {}
    for d in case.inputs:
        shape = tuple(sizes.get(x, x) for x in d.dims)
        in_leaves[d.name], in_views[d.name], in_layouts[d.name] = input_tensor(d, shape, gen, rng, lo_len=lo_len,
                                                                               hi_len=hi_len)
    desc["input_layouts"] = in_layouts
    extra = dict(call["overrides"])
    if call["scale"] is not None:
        extra["scale"] = call["scale"]
    if mode == "decode":
        return _run_decode(p, m, case, call, leaves, views, in_leaves, in_views, extra, desc)
    kw = dict(extra)
    if mode == "attention":
        nx = call["n_extra"]
        kw.update(q_offset=call["q_offset"], k_offset=call["k_offset"])
        if nx is not None:
            kw.update(n_q=call["q_offset"] + Nq + nx, n_k=call["k_offset"] + Nk + nx)
    else:
        lq, lk = call["lens"]
        kw.update(cu_seqlens_q=torch.tensor(_cu(lq), dtype=torch.int32),
                  cu_seqlens_k=torch.tensor(_cu(lk), dtype=torch.int32))
        if call["max_given"]:
            kw.update(max_seqlen_q=max(lq), max_seqlen_k=max(lk))
    q, k, v = (f(t, dt) for f, t in zip(views, leaves))
    ins = {n: in_views[n](t) for n, t in in_leaves.items()}
    try:
        o, lse = m.attention(q, k, v, return_lse=True, **kw, **ins)
    except NotImplementedError as e:
        if mode == "packed" and case.mask_inputs and "cu_seqlens" in str(e):
            return [], desc
        raise
    if mode == "packed" and case.mask_inputs:
        return ["a mask reading [inputs] took cu_seqlens"], desc
    # reference
    rleaves = [t.detach().double().requires_grad_(grad) for t in leaves]
    rq, rk, rv = (f(t, torch.float64) for f, t in zip(views, rleaves))
    rin_leaves = {n: (t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t)
                  for n, t in in_leaves.items()}
    rins = {n: in_views[n](t) for n, t in rin_leaves.items()}
    if mode == "attention":
        ro, rlse = attncc.reference(p, rq, rk, rv, return_lse=True, **kw, **rins)
    else:
        vp = VarlenPlan(tuple(lq), tuple(lk), pad_q=call["pad"][0], pad_k=call["pad"][1])
        ro, rlse = packed_reference(p, vp, rq, rk, rv, reference=attncc.reference, **extra, **rins)
    problems = compare_forward(o, lse, ro, rlse, dt)
    if grad and not problems:
        problems += compare_backward(o, lse, ro, rlse, leaves, rleaves, in_leaves, rin_leaves, call, gen, dt)
    return problems, desc


def compare_forward(o, lse, ro, rlse, dt, tol_scale=1.0):
    problems = []
    if o.shape != ro.shape or o.dtype != dt:
        return [f"o shape/dtype {tuple(o.shape)} {o.dtype} vs {tuple(ro.shape)} {dt}"]
    if not torch.isfinite(o).all():
        return [f"o has {int((~torch.isfinite(o)).sum())} non-finite values"]
    if not o.is_contiguous():  # docs/spec-language.md §6: o comes back contiguous whatever q, k, v's layout
        problems.append(f"o strides {o.stride()}")
    empty = ~torch.isfinite(rlse)
    if (o.detach()[empty] != 0).any():
        problems.append("rows without keys are not 0")
    err = _rel(o, ro.detach())
    if err > REL_TOL[dt] * tol_scale:
        problems.append(f"o rel {err:.3g}")
    if lse.dtype != torch.float32 or not torch.equal(torch.isfinite(lse), ~empty):
        problems.append(f"lse dtype {lse.dtype} / finiteness differs "
                        f"({int((~torch.isfinite(lse)).sum())} vs {int(empty.sum())})")
    elif (~empty).any():
        diff = float((lse.detach().double() - rlse.detach())[~empty].abs().max())
        if diff > LSE_TOL[dt] * tol_scale + 1e-5 * float(rlse.detach()[~empty].abs().max()):
            problems.append(f"lse max abs {diff:.3g}")
    return problems


def compare_backward(o, lse, ro, rlse, leaves, rleaves, in_leaves, rin_leaves, call, gen, dt):
    names = [n for n, t in in_leaves.items() if t.requires_grad]
    go = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    gl = torch.randn(lse.shape, generator=gen, dtype=torch.float64)

    def loss(o, lse):
        x = (o.double() * go).sum()
        if call["lse_loss"]:
            x = x + (torch.where(torch.isfinite(lse), lse.double(), 0.0) * gl).sum()
        return x

    wrt = leaves + [in_leaves[n] for n in names]
    got = torch.autograd.grad(loss(o, lse), wrt, allow_unused=True, materialize_grads=True)
    rwrt = rleaves + [rin_leaves[n] for n in names]
    rl = loss(ro, rlse)
    want = (torch.autograd.grad(rl, rwrt, allow_unused=True, materialize_grads=True) if rl.requires_grad
            else [torch.zeros_like(t) for t in rwrt])
    # a table gradient that is 0 in exact arithmetic is the rounding of o times dO (probe_grad19)
    o_round = 2.0 * float((go * (ro.detach() - o.detach().double())).sum(-1).nan_to_num().abs().sum())
    problems = []
    for label, x, r, leaf in zip(["q", "k", "v"] + names, got, want, wrt):
        if not torch.isfinite(x).all():
            problems.append(f"d{label} non-finite")
            continue
        # a gradient 0 in exact arithmetic is a sum of roundings: floored by dtype; one that is 0 (a row
        # with one key, every k or v row equal) is all rounding of delta = rowsum(dO * o) against the
        # rounded o (docs/spec-language.md §1, 16-bit calls): 4x that floor (seeds 249, 540, 1463)
        floor = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}[dt]
        if float(r.norm()) < 1e-9:
            floor *= 4
        allow = o_round if label in names else 0.0
        den = max(float(r.norm()), floor * math.sqrt(r.numel()), 1e-30)
        err = max(float((x.double() - r).norm()) - allow, 0.0) / den
        tol = GRAD_TOL[dt] * (3 if label in names and dt != torch.float32 else 1)
        if leaf.dtype in GRAD_TOL:  # a half leaf's gradient is rounded to its dtype
            tol = max(tol, GRAD_TOL[leaf.dtype])
        if err > tol:
            problems.append(f"d{label} rel {err:.3g} (|ref| {float(r.norm()):.3g})")
    return problems


def _run_decode(p, m, case, call, leaves, views, in_leaves, in_views, extra, desc):
    B, Hq, Hkv, Nq, cap, D, Dv = (call[x] for x in ("B", "Hq", "Hkv", "Nq", "Nk", "D", "Dv"))
    dt = DT[call["dtype"]]
    q = views[0](leaves[0], dt).detach()
    k, v = leaves[1].detach().to(dt), leaves[2].detach().to(dt)
    if p.rope is not None:  # the cache holds keys rotated at their positions
        k = rotary(k.double(), torch.arange(cap), p.rope.theta, p.rope.style, p.rope.rotary_dim or D).to(dt)
    lens = call["kv_lens"]
    ins = {n: in_views[n](t).detach() for n, t in in_leaves.items()}
    page = call["page"]
    gen = torch.Generator().manual_seed(len(lens) * 1000 + cap)
    if page:
        per = cap // page
        n_pages = B * per + 1
        table = torch.randperm(n_pages, generator=gen)[:B * per].view(B, per).to(torch.int32)
        caches = []
        for x in (k, v):
            c = torch.full((n_pages, page, Hkv, x.shape[-1]), float("nan"), dtype=dt)
            for b in range(B):
                for s in range(per):
                    c[int(table[b, s])] = x[b, :, s * page:(s + 1) * page].transpose(0, 1)
            caches.append(c)
        kc, vc = caches
    else:
        table = None
        kc, vc = k.clone(), v.clone()
        for b, n in enumerate(lens):
            kc[b, :, n:] = float("nan")
            vc[b, :, n:] = float("nan")
        if call["layouts"][0] == "bnhd":  # a cache laid out [B, N, H, D]
            kc, vc = kc.transpose(1, 2).contiguous().transpose(1, 2), vc.transpose(1, 2).contiguous().transpose(1, 2)
    with torch.no_grad():
        o, lse = m.decode(q, kc, vc, kv_len=torch.tensor(lens, dtype=torch.int32), block_table=table,
                          return_lse=True, **extra, **ins)
    problems = []
    for b, n in enumerate(lens):
        rows = min(n, Nq)  # query rows at positions >= 0
        ro = torch.zeros(1, Hq, Nq, Dv, dtype=torch.float64)
        rlse = torch.full((1, Hq, Nq), -math.inf, dtype=torch.float64)
        if rows:  # every batch row at row b's positions (so b and the "b" inputs are row b's); row b of it
            qr, kr, pr = q[:, :, Nq - rows:].double(), leaves[1][:, :, :n].double(), p
            if p.rope is not None:  # from the keys the cache holds (rotated, then rounded to its dtype):
                # a score condition (s > 0.2) decides on those (fp16 keys flip pairs at the threshold)
                pr = attncc.parse_spec(case.text.split("[rope]")[0])
                qr = rotary(qr, torch.arange(n - rows, n), p.rope.theta, p.rope.style, p.rope.rotary_dim or D)
                kr = k[:, :, :n].double()
            r, rl = attncc.reference(pr, qr, kr, leaves[2][:, :, :n].double(), return_lse=True, q_offset=n - rows,
                                     **extra, **ins)
            ro[:, :, Nq - rows:], rlse[:, :, Nq - rows:] = r[b], rl[b]
        problems += [f"row {b}: {x}" for x in compare_forward(o[b:b + 1], lse[b:b + 1], ro, rlse, dt, 2.0)]
    return problems, desc


def main():
    ap = seed_parser(20)
    a = ap.parse_args()
    seeds = seeds_of(a)
    run_seeds(seeds, run_case, a.verbose, lambda seed: random_case(seed).text)


if __name__ == "__main__":
    main()
