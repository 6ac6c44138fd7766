"""Randomized differential testing: seeded random specs and calls, generated kernels against
``attncc.reference`` (float64), forward and backward.

A seed fixes everything: :func:`random_spec` draws a well-typed spec (masks mixing bands, ``//``
and ``%`` by literals and by int params with odd divisors, chunks, sinks beside a window, 2D
neighborhoods, unions and intersections, global rows and columns, ``n_q``/``n_k``, inputs with look-alike names, biases, softcap, score transforms, rope,
fixed head counts), :func:`random_call` draws a call of it (odd lengths, Nq != Nk, offsets, GQA/MQA,
non-contiguous q/k/v and inputs, param overrides, half precision now and then; packed
variable-length calls with cu_seqlens from a Random of their own, :func:`random_varlen`), and
:func:`check_case` builds the spec (cached per text), runs it under the Triton interpreter and
compares o and lse (and dq, dk, dv and the gradients of ``grad = true`` tables for backward cases,
half of them with the LSE in the loss too)
with the reference. A failing case shrinks (:func:`minimize`) to a small spec and call.

Extensions (:func:`extend_draft`, :func:`extend_call`, from a Random of their own, ``extend_rng``)
add what those draws never make: integer bitwise operators and shifts (by params, negative ones),
``^``/``==`` of booleans, booleans as numbers, true division and float ``//``/``%`` in masks,
divisors of either sign, divisors made of params (zero: a refusal both sides must agree on), of
``n_q``/``n_k``/``h`` and of input values kept nonzero by ``max``/``where``/a conjunct, nested
``where`` masks, ``sum``/``any``/``all`` (counts by params), ``dot``, 3-argument ``min``/``max``,
int params near and past 2**31 and negative ones, chained comparisons, ``True``/``False``, 0-d
inputs (learned scalars with grad), ``[n, n]`` tables, exp/exp2/log2/erf/tan terms, ``score``,
GELU, ``-inf`` inside a transform; and in the call: params as numpy scalars and 0-d/one-element
tensors, inputs passed in another dtype, grad tables as expanded views, head dims the spec does
not list, a zero-length side, one query row, larger q and k, 5 to 8 query heads, a param or input
named ``scale``, bitwise operators on input values of every width, q/k/v whose head dim is not
unit-stride, rows of stride 0, sequence-first storage, decode rows with ``kv_len`` 0 or below Nq.
``draw_case(extend=False)`` (the default there, and ``--extend no``) draws the cases seeds drew
before them.

A second layer (:func:`extend2_draft`, :func:`extend2_call`, ``extend2_rng``, ``--extend2``; off in
``draw_case`` unless asked) adds what neither makes: dropout (the kernels' keep mask handed to the
reference; packed, backward, ``dropout_p``/``training`` overrides), input reads outside the input's
extent (negative indices, past the end, ``t[h + 2, j % 5]`` past the last head), inputs of dims
``["n", "b"]``, ``["h", "n", "n"]``, ``["b", "h", "n"]`` in masks, ``["h", "b"]``, tables shorter than
the heads, the residue-class and column-split clauses with the splits forced on
(``ATTNCC_*_MIN_ROWS=1``), ``n_q``/``n_k``/``alibi``/aliases in biases and transforms, conditions on the
score beside tables and positions with a softcap, int params in float scores, RoPE of rotary dims
2-16 and thetas 1.5-1e6 (far into a sequence too: 2**20 to 2**32), and in the call: offsets,
``n_q``, ``n_k`` and ``scale=`` as numpy scalars and tensors, k and v of batch 1 beside q's batch,
a forward without the LSE, Nq far from Nk, decode pages of 17, 24 or 48 rows, ``kv_len`` as a list
or int64, int64 block tables with garbage past each row's pages. ``--poison`` fills what
``torch.empty`` allocates, so a read of memory nothing wrote fails every run.

A third layer (``--extend3``, ``extend3_rng``; off unless asked) draws for half the seeds a
linear-attention case (:func:`random_linear`, :class:`LinearPlan`, which no draw above makes:
every feature map, causal or not, normalized or not, performer features and seeds in the spec and
the call, fixed heads, Dv != D, GQA/MQA, Nq != Nk and offsets, n_q/n_k, strided and stride-0 q/k/v,
k and v of batch 1, half precision, the state returned, given (with gradient), carried across two
calls and through ``step``, backward) and for the others extends the softmax case
(:func:`extend3_draft`, :func:`extend3_call`): value dims other than the head dim, GQA groups of 5-8
fixed in [heads], float params overridden by ints, decode of up to 16 rows against caches of up
to 300 rows with the key splits and tile forced.

Both halves are plain data (:class:`Draft`, :class:`CallPlan`, frozen), so a failure can be
shrunk by replacing fields and re-run. Every case carries *tags*: the features it exercises that
are tied to a known bug of attncc (:data:`KNOWN_BUG_TAGS`); ``avoid=`` keeps the generator away
from tagged features, which is how one hunts for new bugs while known ones are still open.

    python tests/fuzz_specs.py --cases 200 --start 0          # print failures, shrunk
    python tests/fuzz_specs.py --seed 17 --verbose            # one case: spec, call, result
    python tests/fuzz_specs.py --cases 500 --avoid div_param,score_cond_inf
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, FrozenSet, Optional, Tuple, Union

import script_env  # noqa: E402,F401  (the interpreter, this checkout on the path: before the imports below)

import torch  # noqa: E402

import attncc  # noqa: E402
from attncc.spec import SpecError  # noqa: E402
from cases import REL_TOL, build_inline  # noqa: E402

# ---------------------------------------------------------------------------------------------
# vocabulary
# ---------------------------------------------------------------------------------------------

# Divisors for // and %: small ones, and odd ones whose float32 reciprocal is inexact enough that
# floor(x * (1 / d)) misses exact multiples of d below 110 (41, 47, 55, 61, 82, ...).
DIVISORS = (2, 3, 4, 5, 7, 8, 13, 16, 41, 47, 55, 61, 82)
# Look-alike names: classifier leaves (in_<name>_<index vars>), kernel arguments (<name>_ptr,
# <name>_stride0, <name>_size0) and hoisted values (row0, col0) of one input can spell another's.
INPUT_FAMILIES = (("x", "x_b", "xb", "x_ptr", "x_i", "x_b_i", "x_stride0", "x_size0"),
                  ("doc", "doc_b", "docb", "doc_ptr", "doc_i"),
                  ("t", "t_h", "tab", "t_ptr", "row0"))
# Param names: plain ones, look-alikes, and names of the generated kernels' own locals and arguments.
PARAM_NAMES = ("w", "w_b", "wb", "g", "c", "dd", "stride", "blk", "width", "w_ptr",
               "acc", "qk", "m_i", "l_i", "offs_n", "offs_m", "pid", "lse", "start_n", "row", "H", "Nk",
               "GROUP", "keep", "col0", "hk")
INT_ROLES = {  # int param role -> the values a default or a per-call override is drawn from
    "div": DIVISORS,
    "win": tuple(range(0, 25)),
    "glob": tuple(range(0, 13)),
    "prefix": tuple(range(0, 41)),
}
BIG_BASES = (2**20, 2**31 - 37, 2**32 + 3)  # positions of a far-away chunk (the last two cross 2**31)

# Features tied to known bugs of attncc (issue 15). A failing case that carries one of these tags
# is probably that bug; a failing case without any is new.
KNOWN_BUG_TAGS = {
    "div_param": "`//` by a runtime int param computed in float32 (wrong quotients for 41, 47, 55, ...)",
    "score_cond_inf": "where(c(s), e, -inf) in [score].mod with a condition on s",
    "leaf_collision": "classifier leaf names collide (x[b, i] and x_b[i] are both in_x_b_i)",
    "noncontig_int": "strides of small int tensors ignored (decode's kv_len and block_table)",
    "int64": "int64 values narrowed to int32 without a word",
    "pos_2_31": "positions past 2**31 wrap",
    "nan": "NaN in q/k: the reference zeros rows the contract says are NaN",
    "half_query_table": "a bf16/fp16 table in a query-only score term breaks the backward",
    "float_mask": "float arithmetic in masks disagrees with the reference",
}
# Bugs this fuzzer found beyond issue 15 (each has a test in tests/test_fuzz_regressions.py; all fixed).
FOUND_BUG_TAGS = {
    "table_dtype": "float input values enter the score arithmetic in their own dtype: fp16 products lose "
                   "digits and overflow past 65504 (NaN), bf16 ones crash the interpreter (get_bf16), float64 "
                   "scores reach p.to(bfloat16), which the interpreter converts wrongly",
    "input_divmod": "`//` and `%` of an int input's value are printed as float floor arithmetic (sympy cannot "
                    "tell the input is an integer): wrong past 2**24, a crash inside an input index",
    "mod_never": "a score transform that is -inf everywhere (where(c, e, -inf) with a c sympy proves false, "
                 "such as i < 0) is dropped as a term constant along j: plain attention instead of o = 0",
    "big_linear_pos": "float terms linear in the positions (alibi, c * (i - j): sympy expands it to c*i - c*j) "
                      "are evaluated from absolute positions in float32: imprecise past ~2**16",
    "bh_index": "an input's \"b\" or \"h\" dim read at another index than b or h (t[h + 2, j % 5]) had no bounds "
                "check: memory past the tensor was read (and a grad table's gradient added there)",
}
BUG_TAGS = {**KNOWN_BUG_TAGS, **FOUND_BUG_TAGS}


# ---------------------------------------------------------------------------------------------
# the spec draft
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Atom:
    """One expression fragment (a mask clause, a bias term, a score transform) and its tags."""

    text: str
    tags: FrozenSet[str] = frozenset()


@dataclass(frozen=True)
class Node:
    """``and``/``or`` of 2-3 children, or ``not`` of one; ``symbol`` is how it is written."""

    op: str  # "and", "or", "not"
    kids: Tuple["Mask", ...]
    symbol: str = ""  # "and"/"&" or "or"/"|"; "" for not


Mask = Union[Atom, Node]


@dataclass(frozen=True)
class ParamPlan:
    name: str
    default: Union[int, float]
    role: str  # an INT_ROLES key, or "coef" / "thresh" for floats


@dataclass(frozen=True)
class InputPlan:
    """A declared input and how its values are drawn (``role``: float, slope, doc, len, small, flag)."""

    name: str
    dims: Tuple[Union[str, int], ...]
    dtype: str
    role: str
    grad: bool = False


@dataclass(frozen=True)
class Draft:
    """A random spec as data: rendered by :attr:`text`, shrunk by :func:`dataclasses.replace`."""

    head_dims: Tuple[int, ...] = (16,)
    dtypes: Tuple[str, ...] = ("float32",)
    heads_q: Optional[int] = None
    heads_kv: Optional[int] = None
    value_dim: Optional[int] = None
    params: Tuple[ParamPlan, ...] = ()
    inputs: Tuple[InputPlan, ...] = ()
    mask: Optional[Mask] = None
    bias: Tuple[Atom, ...] = ()
    mod: Optional[Atom] = None
    softcap: Optional[float] = None
    scale: Optional[float] = None
    rope: Optional[Tuple[float, str, Optional[int]]] = None  # theta, style, rotary_dim
    dropout: Optional[float] = None  # [score].dropout (extend2_draft only)

    # -- what the text uses ---------------------------------------------------------------
    def expressions(self) -> Dict[str, str]:
        out = {}
        if self.mask is not None:
            out["mask"] = render_mask(self.mask)
        if self.bias:
            out["bias"] = " + ".join(a.text for a in self.bias)
        if self.mod is not None:
            out["mod"] = self.mod.text
        return out

    def _uses(self, name: str) -> bool:
        return any(re.search(rf"\b{re.escape(name)}\b", e) for e in self.expressions().values())

    @property
    def used_params(self) -> Tuple[ParamPlan, ...]:
        return tuple(p for p in self.params if self._uses(p.name))

    @property
    def used_inputs(self) -> Tuple[InputPlan, ...]:
        return tuple(d for d in self.inputs if self._uses(d.name))

    @property
    def tags(self) -> FrozenSet[str]:
        atoms = list(self.bias) + ([self.mod] if self.mod else []) + list(_mask_atoms(self.mask))
        tags = set().union(*(a.tags for a in atoms)) if atoms else set()
        if self.rope is not None:
            tags.add("abspos")
        if leaf_collisions(self):
            tags.add("leaf_collision")
        if any("n" in d.dims for d in self.used_inputs):
            tags.add("n_input")
        dims = {d.name: d.dims for d in self.used_inputs}
        for name, index in _ACCESS.findall(" ".join(self.expressions().values())):
            parts = [x.strip() for x in index.split(",")]
            if name in dims and any(x in ("b", "h") and p != x for x, p in zip(dims[name], parts)):
                tags.add("bh_index")
        # tables of other float dtypes in the score (bias, mod); query-only ones (no j in the index)
        dtypes = {d.name: d.dtype for d in self.used_inputs}
        ex = self.expressions()
        for name, index in _ACCESS.findall(ex.get("bias", "") + " " + ex.get("mod", "")):
            if dtypes.get(name) in ("bfloat16", "float16"):
                tags.add("half_table")
                if "j" not in re.findall(r"[A-Za-z_]\w*", index):
                    tags.add("half_query_table")
            elif dtypes.get(name) == "float64":
                tags.add("f64_table")
        return frozenset(tags)

    @property
    def text(self) -> str:
        """The TOML spec (no ``name``: the module is named after the file)."""
        lines = [f"head_dim = {_toml_list(self.head_dims)}", f"dtypes = {_toml_list(self.dtypes)}"]
        if self.value_dim is not None:
            lines.append(f"value_dim = {self.value_dim}")
        if self.heads_q is not None or self.heads_kv is not None:
            lines.append("[heads]")
            lines += [f"{k} = {v}" for k, v in (("q", self.heads_q), ("kv", self.heads_kv)) if v is not None]
        if self.used_params:
            lines.append("[params]")
            lines += [f"{p.name} = {p.default!r}" for p in self.used_params]
        if self.used_inputs:
            lines.append("[inputs]")
            for d in self.used_inputs:
                dims = ", ".join(f'"{x}"' if isinstance(x, str) else str(x) for x in d.dims)
                grad = ", grad = true" if d.grad else ""
                lines.append(f'{d.name} = {{ dims = [{dims}], dtype = "{d.dtype}"{grad} }}')
        ex = self.expressions()
        if "mask" in ex:
            lines += ["[mask]", f"where = {_toml_str(ex['mask'])}"]
        score = []
        if self.scale is not None:
            score.append(f"scale = {self.scale!r}")
        if "bias" in ex:
            score.append(f"bias = {_toml_str(ex['bias'])}")
        if "mod" in ex:
            score.append(f"mod = {_toml_str(ex['mod'])}")
        if self.softcap is not None:
            score.append(f"softcap = {self.softcap!r}")
        if self.dropout is not None:
            score.append(f"dropout = {self.dropout!r}")
        if score:
            lines += ["[score]"] + score
        if self.rope is not None:
            theta, style, rd = self.rope
            lines += ["[rope]", f"theta = {theta!r}", f'style = "{style}"']
            if rd is not None:
                lines.append(f"rotary_dim = {rd}")
        return "\n".join(lines) + "\n"


def _toml_list(xs) -> str:
    return "[" + ", ".join(f'"{x}"' if isinstance(x, str) else str(x) for x in xs) + "]"


def _toml_str(s: str) -> str:
    return f"'{s}'" if "'" not in s else '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_mask(m: Mask) -> str:
    if isinstance(m, Atom):
        return m.text
    if m.op == "not":
        return f"not ({render_mask(m.kids[0])})"
    # every child in parentheses: & and | bind tighter than comparisons
    return f" {m.symbol} ".join(f"({render_mask(k)})" for k in m.kids)


def _mask_atoms(m: Optional[Mask]):
    if m is None:
        return
    if isinstance(m, Atom):
        yield m
    else:
        for k in m.kids:
            yield from _mask_atoms(k)


_ACCESS = re.compile(r"\b([A-Za-z_]\w*)\[([^\[\]]*)\]")


def leaf_collisions(d: Draft) -> bool:
    """Whether two different input accesses of the mask would get one classifier leaf name
    (``in_<input>_<index variables>``: ``x[b, i]`` and ``x_b[i]`` are both ``in_x_b_i``)."""
    text = (render_mask(d.mask) if d.mask is not None else "") + " " + (d.mod.text if d.mod is not None else "")
    leaves = {}
    for name, index in _ACCESS.findall(text):  # the mod's where(c, e, -inf) is a mask too
        leaf = "in_" + "_".join([name] + re.findall(r"[A-Za-z_]\w*", index))
        leaves.setdefault(leaf, set()).add((name, index.replace(" ", "")))
    return any(len(v) > 1 for v in leaves.values())


# ---------------------------------------------------------------------------------------------
# drawing a spec
# ---------------------------------------------------------------------------------------------

class _Avoided(Exception):
    """The drawn fragment has a tag the caller asked to avoid: draw another."""


@dataclass
class _Pool:
    """Params and inputs declared while a spec is drawn (names shared by params and inputs)."""

    rng: random.Random
    avoid: FrozenSet[str]
    params: Dict[str, ParamPlan] = field(default_factory=dict)
    inputs: Dict[str, InputPlan] = field(default_factory=dict)

    def _fresh(self, names) -> Optional[str]:
        free = [n for n in names if n not in self.params and n not in self.inputs]
        return self.rng.choice(free) if free else None

    def int_operand(self, role: str) -> Tuple[str, bool]:
        """A literal or an int param of ``role``: (text, is_param)."""
        rng = self.rng
        if rng.random() < 0.5:
            return str(rng.choice(INT_ROLES[role])), False
        same = [p for p in self.params.values() if p.role == role]
        if same and rng.random() < 0.5:
            return rng.choice(same).name, True
        name = self._fresh(PARAM_NAMES)
        if name is None:
            return str(rng.choice(INT_ROLES[role])), False
        self.params[name] = ParamPlan(name, rng.choice(INT_ROLES[role]), role)
        return name, True

    def float_param(self, role: str) -> str:
        name = self._fresh(PARAM_NAMES)
        value = round(self.rng.uniform(-0.3, 0.3), 3) if role == "coef" else self.rng.choice((0.5, 2.5, 7.5, 15.5))
        if name is None:
            return repr(value)
        self.params[name] = ParamPlan(name, value, role)
        return name

    def input(self, dims, role: str, dtype: str, grad: bool = False) -> str:
        dims = tuple(dims)
        same = [d for d in self.inputs.values() if d.dims == dims and d.role == role]
        if same and self.rng.random() < 0.5:
            return self.rng.choice(same).name
        name = self._fresh(self.rng.choice(INPUT_FAMILIES))
        if name is None:
            name = self._fresh([f"in{k}" for k in range(64)])
        self.inputs[name] = InputPlan(name, dims, dtype, role, grad)
        return name

    def lookalike_pair(self, role: str, dtype: str) -> Optional[Tuple[str, str]]:
        """Two fresh inputs named ``x`` ([b, n]) and ``x_b`` ([n]) of one family, or None."""
        for family in self.rng.sample(INPUT_FAMILIES, len(INPUT_FAMILIES)):
            a, b = family[0], family[0] + "_b"
            if all(n not in self.params and n not in self.inputs for n in (a, b)):
                self.inputs[a] = InputPlan(a, ("b", "n"), dtype, role)
                self.inputs[b] = InputPlan(b, ("n",), dtype, role)
                return a, b
        return None

    def float_table(self, dims, role="float") -> str:
        r = self.rng.random()
        dtype = "float32" if r < 0.75 else "float64" if r < 0.85 else self.rng.choice(("bfloat16", "float16"))
        return self.input(dims, role, dtype, grad=self.rng.random() < 0.5)

    def int_input(self, dims, role: str) -> str:
        r = self.rng.random()
        dtype = "int32" if r < 0.6 else "int64" if r < 0.8 else self.rng.choice(("int16", "int8", "uint8"))
        if role in ("len", "big") and dtype not in ("int32", "int64"):
            dtype = "int32"  # lengths near positions of 2**20 need 32 bits
        return self.input(dims, role, dtype)


def _divisor(pool: _Pool) -> Tuple[str, FrozenSet[str]]:
    d, is_param = pool.int_operand("div")
    return d, frozenset({"div_param"}) if is_param else frozenset()


def _mask_leaf(pool: _Pool) -> Atom:
    """One clause of a mask."""
    rng = pool.rng
    kind = rng.choice(("causal", "causal", "window", "window", "chunk", "modulo", "global", "prefix",
                       "bottom_right", "head", "batch", "doc", "len", "flag", "float_table", "random_blocks",
                       "float_bound", "power", "lookalike", "minmax", "input_divmod", "int_product", "sinks",
                       "grid2d"))
    if kind in ("input_divmod", "random_blocks", "float_bound") and rng.random() < 0.5:
        kind = "causal"  # rarer clauses
    if kind == "causal":
        return Atom(rng.choice(("j <= i", "causal", "j < i + 1", "i >= j", "kv_idx <= q_idx", "j >= i")))
    if kind == "window":
        w, _ = pool.int_operand("win")
        return Atom(rng.choice((f"abs(i - j) <= {w}", f"i - j < {w}", f"0 <= i - j < {w}", f"j - i <= {w}",
                                f"-{w} < j - i <= {w}")))
    if kind == "chunk":
        c, tags = _divisor(pool)
        text = rng.choice((f"i // {c} == j // {c}", f"abs(i // {c} - j // {c}) <= 1", f"(j - i) // {c} <= 0",
                           f"(i - j) // {c} == 0", f"j // {c} <= i // {c}", f"j >= i - i % {c}",
                           f"j <= i and i // {c} == j // {c}"))
        return Atom(text, tags)
    if kind == "sinks":  # StreamingLLM: a causal window plus the first tokens (two key intervals per row)
        s, _ = pool.int_operand("glob")
        w, _ = pool.int_operand("win")
        return Atom(rng.choice((f"j < {s} or (j <= i and i - j < {w})", f"j < {s} or abs(i - j) <= {w}",
                                f"j < {s} or i < {s} or (j <= i and i - j < {w})")))
    if kind == "grid2d":  # 2D neighborhood on a flattened image of rows of c pixels (exact block lists)
        c, is_param = pool.int_operand("div")
        r, _ = pool.int_operand("win")
        text = rng.choice((f"abs(i // {c} - j // {c}) <= {r} and abs(i % {c} - j % {c}) <= {r}",
                           f"abs(i // {c} - j // {c}) <= 1 and abs(i % {c} - j % {c}) <= {r} and j <= i"))
        return Atom(text, frozenset({"mod_param"}) if is_param else frozenset())
    if kind == "modulo":
        c, is_param = pool.int_operand("div")
        last = f"{c} - 1" if is_param else str(int(c) - 1)
        text = rng.choice((f"(i - j) % {c} == 0", f"j % {c} == {last}", f"(i + j) % {c} != 1", f"j % {c} < 2",
                           f"(j - i) % {c} == 0"))
        return Atom(text, frozenset({"mod_param"}) if is_param else frozenset())
    if kind == "global":
        g, _ = pool.int_operand("glob")
        return Atom(rng.choice((f"i < {g}", f"j < {g}", f"i < {g} or j < {g}", f"(i < {g}) | (j < {g})")))
    if kind == "prefix":
        p, _ = pool.int_operand("prefix")
        return Atom(rng.choice((f"j < {p}", f"j <= {p}")))
    if kind == "bottom_right":
        w, _ = pool.int_operand("win")
        return Atom(rng.choice(("j - n_k <= i - n_q", f"j - n_k <= i - n_q - {w}", f"n_k - j <= {w}",
                                f"i - n_q >= -{w}")))
    if kind == "head":
        w, _ = pool.int_operand("win")
        return Atom(rng.choice((f"i - j < {w} + h", f"(j + h) % 3 == 0", f"h % 2 == 0", f"abs(i - j) <= 2 * h + 1")))
    if kind == "batch":
        return Atom(rng.choice(("b == 0", "j < n_k - 3 * b", "(i + b) % 2 == 0")))
    if kind == "doc":
        if rng.random() < 0.7:
            d = pool.int_input(("b", "n"), "doc")
            ix = rng.choice((("b, i", "b, j"), ("b, i // 2", "b, j // 2")))
        else:
            d = pool.int_input(("n",), "doc")
            ix = ("i", "j")
        return Atom(f"{d}[{ix[0]}] == {d}[{ix[1]}]")
    if kind == "len":
        if rng.random() < 0.7:
            n = pool.int_input(("b",), "len")
            return Atom(rng.choice((f"j < {n}[b]", f"i < {n}[b] + 5", f"j <= {n}[b]")))
        n = pool.int_input(("h",), "small")
        return Atom(rng.choice((f"i - j < {n}[h]", f"abs(i - j) <= {n}[h]")))
    if kind == "flag":
        if rng.random() < 0.6:
            f = pool.input(("b", "n"), "flag", "bool")
            return Atom(rng.choice((f"{f}[b, j]", f"{f}[b, i]", f"not {f}[b, j]")))
        f = pool.input(("n",), "flag", "bool")
        return Atom(rng.choice((f"{f}[j]", f"{f}[i]")))
    if kind == "float_table":  # a comparison of one loaded float: exact in both
        x = pool.float_table(rng.choice((("b", "n"), ("n",))))
        ix = "b, j" if len(pool.inputs[x].dims) == 2 else "j"
        return Atom(f"{x}[{ix}] > 0.0")
    if kind == "random_blocks":
        r, block, seed = rng.randint(0, 3), rng.choice((8, 16, 32)), rng.randint(0, 5)
        return Atom(f"random_blocks({r}, block={block}, seed={seed})", frozenset({"abspos", "random_blocks"}))
    if kind == "float_bound":
        c = pool.float_param("thresh")
        return Atom(rng.choice((f"i - j < {c}", f"abs(i - j) * 0.5 <= {c}")), frozenset({"float_mask"}))
    if kind == "int_product":  # integer arithmetic past int32 far into a sequence (the host's WIDE guard)
        c = rng.choice((3, 5, 7))
        return Atom(rng.choice((f"(i * j) % {c} != 0 or i == j", f"((i + j) // 2) % {c} != 1",
                                f"(i * 3 + j * 100000) % {c} != 0 or j == 0")))
    if kind == "input_divmod":  # hashes, ids: int32 values of any size
        d = pool.int_input(("b", "n"), "big")
        c = rng.choice(DIVISORS)
        return Atom(rng.choice((f"{d}[b, j] % {c} == 0", f"{d}[b, i] % {c} == {d}[b, j] % {c}",
                                f"{d}[b, i] // {c} == {d}[b, j] // {c}")), INPUT_DIVMOD)
    if kind == "lookalike":  # x[b, i] and x_b[i]: one classifier leaf name for two accesses
        pair = pool.lookalike_pair("doc", rng.choice(("int32", "int64")))
        if pair is not None:
            a, b = pair
            v = rng.choice("ij")
            return Atom(rng.choice((f"{a}[b, i] == {a}[b, j] or {b}[{v}] == 0",
                                    f"{a}[b, {v}] == {b}[{v}]", f"{a}[b, i] == {a}[b, j] and {b}[i] == {b}[j]")))
        kind = "minmax"
    w, _ = pool.int_operand("win")
    if kind == "minmax":
        return Atom(rng.choice((f"j >= max(i - {w}, 0)", f"j <= min(i + {w}, n_k - 1)", f"min(i, j) + {w} >= max(i, j)")))
    return Atom(rng.choice((f"(i - j) ** 2 <= {w} ** 2", f"(j - i) ** 5 >= -{w} ** 5")))  # power


def _random_mask(pool: _Pool) -> Mask:
    rng = pool.rng
    leaves = [_draw(pool, _mask_leaf) for _ in range(rng.choice((1, 1, 2, 2, 3)))]
    if len(leaves) == 1:
        return Node("not", (leaves[0],)) if rng.random() < 0.08 else leaves[0]

    def join(op, kids):
        sym = ("&" if op == "and" else "|") if rng.random() < 0.25 else op
        return Node(op, tuple(kids), sym)

    if len(leaves) == 2:
        return join(rng.choice(("and", "or")), leaves)
    shape = rng.randrange(4)
    if shape == 0:
        return join("and", leaves)
    if shape == 1:
        return join("or", leaves)
    inner = join("or" if shape == 2 else "and", leaves[1:])
    return join("and" if shape == 2 else "or", [leaves[0], inner])


def _bias_term(pool: _Pool) -> Atom:
    rng = pool.rng
    kind = rng.choice(("alibi", "bucket", "bucket", "row", "row", "head", "batch", "slope", "linear", "log",
                       "abspos", "int_ops", "mod_table", "gather", "flag_where"))
    if kind == "gather" and rng.random() < 0.5:
        kind = "bucket"  # rarer terms
    if kind == "alibi":
        return Atom("alibi", LINEAR_POS)
    if kind == "bucket":
        if rng.random() < 0.6:
            t = pool.float_table(("h", 32))
            return Atom(f"{t}[h, bucket(j - i)]")
        nb, md, bidir = rng.choice(((16, 40, False), (8, 20, True), (12, 33, False)))
        t = pool.float_table(("h", nb))
        d = rng.choice(("i - j", "j - i"))
        return Atom(f"{t}[h, bucket({d}, num_buckets={nb}, max_distance={md}, bidirectional={bidir})]")
    if kind == "row":
        dims, index = rng.choice(((("b", "n"), "b, i"), (("b", "n"), "b, j"), (("n",), "i"), (("n",), "j"),
                                  (("b", "n"), "b, i // 3")))
        x = pool.float_table(dims)
        return Atom(rng.choice((f"{x}[{index}]", f"0.5 * {x}[{index}]")))
    if kind in ("head", "batch"):
        x = pool.float_table(("h",) if kind == "head" else ("b",))
        return Atom(f"{x}[{kind[0]}]")
    if kind == "slope":
        x = pool.float_table(("h",), role="slope")
        return Atom(f"{x}[h] * (j - i)", LINEAR_POS)
    if kind == "linear":
        c = pool.float_param("coef") if rng.random() < 0.5 else "0.05"
        text = rng.choice((f"{c} * (i - j)", f"{c} * (n_k - j)", f"{c} * abs(i - j)", f"{c} * j"))
        return Atom(text, LINEAR_POS if "abs" not in text else frozenset())
    if kind == "log":
        text = rng.choice(("log(1 + abs(i - j))", "0.1 * sqrt(abs(i - j) + 1)", "tanh(0.1 * (i - j))"))
        return Atom(text, LINEAR_POS if "tanh" in text else frozenset())
    if kind == "abspos":  # float functions of absolute positions: exact only at small positions
        return Atom(rng.choice(("0.3 * sin(0.2 * j)", "0.2 * cos(0.5 * i)", "0.001 * i * j")), frozenset({"abspos"}))
    if kind == "int_ops":
        c, tags = _divisor(pool)
        text = rng.choice((f"where(j % {c} == 0, 0.5, -0.5)", f"0.1 * (i % {c})", f"0.2 * (i // {c} - j // {c})"))
        return Atom(text, tags | (LINEAR_POS if "-" in text else frozenset()))
    if kind == "gather":  # a table indexed by another input's value
        d = pool.int_input(("b", "n"), "doc")
        t = pool.float_table(("h", 5))
        return Atom(f"{t}[h, {d}[b, {rng.choice('ij')}] % 5]", INPUT_DIVMOD)
    if kind == "flag_where":
        f = pool.input(("b", "n"), "flag", "bool")
        x = pool.float_table(("b", "h", "n"))
        return Atom(rng.choice((f"where({f}[b, j], 0.5, -0.5)", f"where({f}[b, j], {x}[b, h, j], 0.0)")))
    k = rng.choice((5, 7, 3))  # mod_table
    t = pool.float_table(("h", k) if rng.random() < 0.6 else (k,))
    ix = rng.choice((f"(i - j) % {k}", f"j % {k}", f"(j // 2) % {k}"))
    return Atom(f"{t}[h, {ix}]" if len(pool.inputs[t].dims) == 2 else f"{t}[{ix}]")


INPUT_DIVMOD = frozenset({"input_divmod"})
# A float term linear in the positions (alibi, c * (i - j), which sympy expands to c*i - c*j): small
# where i - j is small, as long as the kernel does not evaluate it from the absolute positions.
LINEAR_POS = frozenset({"linear_pos"})


def _transform(pool: _Pool) -> Atom:
    """A score transform without -inf."""
    rng = pool.rng
    kind = rng.randrange(14)
    if kind == 0:
        return Atom("s * 0.5 + h")
    if kind == 1:
        return Atom("3.0 * tanh(s / 3.0)")
    if kind == 2:
        return Atom("tanh(s) * 2.0")
    if kind == 3:
        return Atom("sigmoid(s) * 4.0 - 2.0")
    if kind == 4:
        x = pool.float_table(("h",))
        return Atom(f"s * {x}[h]")
    if kind == 5:
        return Atom("s + 0.1 * (i - j)", LINEAR_POS)
    if kind == 6:
        return Atom("max(s, -1.0)")
    if kind == 7:
        return Atom("where(s > 0.5, 2 * s - 0.5, 0.5 * s)", frozenset({"score_cond"}))
    if kind == 8:
        x = pool.float_table(("b", "n"))
        return Atom(f"s + {x}[b, j]")
    if kind == 9:
        c = pool.float_param("coef")
        return Atom(f"s * (1.0 + {c})")
    if kind == 10:
        return Atom("cos(s) + s")
    if kind == 11:
        return Atom("s * (1.0 + 0.1 * b)")
    if kind == 12:
        return Atom("min(s, 2.0) - 0.05 * abs(i - j)")
    return Atom("s")


def _score_mod(pool: _Pool) -> Atom:
    rng = pool.rng
    r = rng.random()
    t = _draw(pool, _transform)
    if r < 0.45:
        return t
    if r < 0.7:  # a mask written in the transform
        m = _draw(pool, _mask_leaf)
        never = re.fullmatch(r"[\s()ijor|<]*< 0[\s()ijor|<0]*", m.text)  # i < 0, i < 0 or j < 0: never true
        return Atom(f"where({m.text}, {t.text}, -inf)", m.tags | t.tags | ({"mod_never"} if never else set()))
    if r < 0.78:
        m = _draw(pool, _mask_leaf)
        return Atom(f"where({m.text}, -inf, {t.text})", m.tags | t.tags)
    cond = rng.choice(("s > 0", "s <= 0.5", "s > -1.0", "abs(s) < 2.0"))
    if r < 0.9:
        return Atom(f"where({cond}, {t.text}, -inf)", t.tags | {"score_cond", "score_cond_inf"})
    m = _draw(pool, _mask_leaf)  # nested: a score condition under a position mask
    return Atom(f"where({m.text}, where({cond}, {t.text}, -inf), -inf)", m.tags | t.tags | {"score_cond", "score_cond_inf"})


def _draw(pool: _Pool, fn, tries: int = 50):
    """``fn(pool)`` redrawn until it has no avoided tag (declarations of a rejected draw are undone)."""
    for _ in range(tries):
        saved = dict(pool.params), dict(pool.inputs)
        atom = fn(pool)
        if not (atom.tags if isinstance(atom, Atom) else frozenset()) & pool.avoid:
            return atom
        pool.params, pool.inputs = saved
    raise _Avoided(fn.__name__)


def random_spec(rng: random.Random, avoid=frozenset()) -> Tuple[str, Draft]:
    """A random well-typed softmax spec: ``(toml_text, draft)``; ``avoid``: tags not to produce."""
    avoid = frozenset(avoid)
    if "table_dtype" in avoid:  # a call-level tag: keep its spec-level causes out
        avoid |= {"half_table", "f64_table"}
    for _ in range(100):
        try:
            draft = _random_draft(rng, avoid)
        except _Avoided:
            continue
        if not draft.tags & avoid:
            return draft.text, draft
    raise RuntimeError(f"could not draw a spec avoiding {sorted(avoid)}")


def _random_draft(rng: random.Random, avoid: FrozenSet[str]) -> Draft:
    pool = _Pool(rng, avoid)
    mask = _random_mask(pool) if rng.random() < 0.85 else None
    bias = tuple(_draw(pool, _bias_term) for _ in range(rng.choice((0, 0, 1, 1, 2, 3))))
    mod = _score_mod(pool) if rng.random() < 0.4 else None
    if mod is not None and mod.tags & avoid:
        raise _Avoided("mod")
    head_dims = rng.choice(((16,), (32,), (16, 32)))
    rope = None
    if rng.random() < 0.15:
        rd = rng.choice((None, None, 8))
        rope = (rng.choice((10000.0, 500.0)), rng.choice(("neox", "gptj")), rd)
    heads_q = heads_kv = None
    if rng.random() < 0.3:
        hq = rng.choice((1, 2, 3, 4))
        hkv = rng.choice([d for d in (1, 2, 3, 4) if hq % d == 0])
        heads_q, heads_kv = rng.choice(((hq, hkv), (hq, None), (None, hkv)))
    return Draft(
        head_dims=head_dims,
        dtypes=rng.choice((("float32",), ("float32", "bfloat16"), ("float16", "float32", "bfloat16"))),
        heads_q=heads_q, heads_kv=heads_kv,
        value_dim=16 if rng.random() < 0.08 else None,
        params=tuple(pool.params.values()), inputs=tuple(pool.inputs.values()),
        mask=mask, bias=bias, mod=mod,
        softcap=rng.choice((2.0, 5.0, 20.0, 50.0)) if rng.random() < 0.25 else None,
        scale=rng.choice((0.05, 0.125, 0.3, 0.5)) if rng.random() < 0.3 else None,
        rope=rope,
    )


# ---------------------------------------------------------------------------------------------
# drawing a call
# ---------------------------------------------------------------------------------------------

QKV_LAYOUTS = ("contiguous", "bnhd", "rows_step", "padded_d", "heads_step", "batch_broadcast")
INPUT_LAYOUTS = ("contiguous", "transposed", "step", "broadcast")


@dataclass(frozen=True)
class DecodePlan:
    """``decode(q, k_cache, v_cache, kv_len=..., block_table=...)``: Nq new rows per batch row at
    the end of ``kv_lens[b]`` cached positions, in a contiguous cache of ``capacity`` rows or in
    pages of ``page_size`` rows; kv_len and block_table contiguous or strided views."""

    kv_lens: Tuple[int, ...]
    capacity: int
    page_size: int = 0  # 0: contiguous cache
    kv_len_layout: str = "contiguous"  # or "strided"
    table_layout: str = "contiguous"  # or "strided"
    kv_len_form: str = "tensor"  # (extend2_call) "list": a list of ints, "int64": an int64 tensor
    table_form: str = "int32"  # (extend2_call) "int64_wide": int64 with two spare columns past the pages


@dataclass(frozen=True)
class VarlenPlan:
    """A packed variable-length call (``cu_seqlens_q``/``cu_seqlens_k``): S sequences of
    ``lens_q[s]`` query and ``lens_k[s]`` key rows back to back in q [1, Hq, total_q, D] and k, v
    [1, Hkv, total_k, D], ``pad_q``/``pad_k`` packed rows past ``cu[-1]`` that no sequence uses;
    ``max_q``/``max_k``: the ``max_seqlen_*`` passed (None: the runtime computes them), the
    cu_seqlens as int32 or int64, contiguous or every other element of a wider tensor."""

    lens_q: Tuple[int, ...]
    lens_k: Tuple[int, ...]
    max_q: Optional[int] = None
    max_k: Optional[int] = None
    pad_q: int = 0
    pad_k: int = 0
    cu_dtype: str = "int32"
    cu_layout: str = "contiguous"  # or "strided"

    @property
    def totals(self) -> Tuple[int, int]:
        """The packed rows of q and of k."""
        return sum(self.lens_q) + self.pad_q, sum(self.lens_k) + self.pad_k

    @property
    def max_rows(self) -> Tuple[int, int]:
        """max_seqlen_q, max_seqlen_k as the call takes them (a bound past the packed rows counts as
        the packed rows): an input's "n" dim covers the larger."""
        out = []
        for given, lens, total in ((self.max_q, self.lens_q, self.totals[0]), (self.max_k, self.lens_k, self.totals[1])):
            out.append(max(lens) if given is None else min(given, total))
        return out[0], out[1]

    def describe(self) -> str:
        parts = [f"varlen S={len(self.lens_q)} lens_q={list(self.lens_q)} lens_k={list(self.lens_k)}"]
        if self.pad_q or self.pad_k:
            parts.append(f"unused packed rows q+{self.pad_q} k+{self.pad_k}")
        if self.max_q is not None or self.max_k is not None:
            parts.append(f"max_seqlen_q={self.max_q} max_seqlen_k={self.max_k}")
        parts.append(f"cu_seqlens {self.cu_dtype} {self.cu_layout}")
        return ", ".join(parts)


@dataclass(frozen=True)
class CallPlan:
    """A call of a drafted spec as data; :func:`call_arguments` makes the tensors (from ``seed``)."""

    seed: int
    B: int = 1
    Hq: int = 1
    Hkv: int = 1
    Nq: int = 16
    Nk: int = 16
    D: int = 16
    Dv: int = 16
    dtype: str = "float32"
    q_offset: int = 0
    k_offset: int = 0
    n_q_extra: Optional[int] = None  # n_q = q_offset + Nq + extra when passed
    n_k_extra: Optional[int] = None
    overrides: Tuple[Tuple[str, Union[int, float]], ...] = ()
    layouts: Tuple[str, str, str] = ("contiguous",) * 3
    input_layouts: Tuple[Tuple[str, str], ...] = ()  # (input, layout); contiguous when absent
    int64_values: bool = False  # int inputs passed as int64 holding values past 2**31
    nan: Optional[str] = None  # "q" or "k": one NaN planted there
    backward: bool = False
    scale: Optional[float] = None  # attention(..., scale=)
    # forced tile shapes (BLOCK_M, BLOCK_N) of the forward, dK/dV and dQ kernels; None: the default
    tiles: Optional[Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]] = None
    decode: Optional[DecodePlan] = None  # a call of decode() (Nq rows; Nk: the cache's capacity)
    # a packed call (B = 1, Nq and Nk the packed rows, offsets 0, no n_q/n_k; "b" is the sequence)
    varlen: Optional[VarlenPlan] = None
    # drawn by :func:`extend_call` only (the blind spots of the draws above; defaults: as before)
    param_forms: Tuple[Tuple[str, str], ...] = ()  # (param, "numpy" / "tensor0" / "tensor1"): how it is passed
    input_casts: Tuple[Tuple[str, str], ...] = ()  # (input, dtype): passed as a tensor of another dtype
    magnitude: float = 1.0  # q and k drawn this many times larger (float16 scores near overflow)
    # drawn by :func:`extend2_call` only (defaults: as before)
    number_forms: Tuple[Tuple[str, str], ...] = ()  # (q_offset/k_offset/n_q/n_k/scale, NUMBER_FORMS/SCALE_FORMS)
    kv_batch1: bool = False  # k and v of batch 1 (not an expanded view) beside q's batch B
    splits: bool = False  # the residue-class and column splits forced on (ATTNCC_*_MIN_ROWS=1)
    no_lse: bool = False  # a forward without return_lse
    dropout: Optional[Tuple[int, Optional[float], bool]] = None  # (seed, dropout_p or None: the spec's, training)
    # drawn by :func:`extend3_call` only (defaults: as before)
    environment: Tuple[Tuple[str, str], ...] = ()  # environment variables set for the case (decode's splits, tile)

    @property
    def tags(self) -> FrozenSet[str]:
        tags = set()
        last = max(self.q_offset + self.Nq + (self.n_q_extra or 0), self.k_offset + self.Nk + (self.n_k_extra or 0))
        if last + 256 >= 2**31:  # a tile's positions (offset + block start + arange) reach 2**31
            tags.add("pos_2_31")
        if self.int64_values:
            tags.add("int64")
        if self.nan:
            tags.add("nan")
        if self.varlen is not None:
            tags.add("varlen")
        return frozenset(tags)

    def describe(self) -> str:
        parts = [f"B={self.B} Hq={self.Hq} Hkv={self.Hkv} Nq={self.Nq} Nk={self.Nk} D={self.D} Dv={self.Dv}",
                 self.dtype, f"q_offset={self.q_offset} k_offset={self.k_offset}"]
        if self.n_q_extra is not None:
            parts.append(f"n_q={self.q_offset + self.Nq + self.n_q_extra}")
        if self.n_k_extra is not None:
            parts.append(f"n_k={self.k_offset + self.Nk + self.n_k_extra}")
        if self.overrides:
            parts.append("overrides " + ", ".join(f"{k}={v!r}" for k, v in self.overrides))
        if self.layouts != ("contiguous",) * 3:
            parts.append("q/k/v layouts " + "/".join(self.layouts))
        if self.input_layouts:
            parts.append("input layouts " + ", ".join(f"{k}:{v}" for k, v in self.input_layouts))
        if self.int64_values:
            parts.append("int inputs as int64 past 2**31")
        if self.nan:
            parts.append(f"NaN in {self.nan}")
        if self.scale is not None:
            parts.append(f"scale={self.scale}")
        if self.tiles is not None:
            parts.append("tiles fwd/dkdv/dq " + " ".join(f"{m}x{n}" for m, n in self.tiles))
        if self.decode is not None:
            dp = self.decode
            parts[0] = (f"decode B={self.B} Hq={self.Hq} Hkv={self.Hkv} Nq={self.Nq} kv_len={list(dp.kv_lens)} "
                        f"capacity={dp.capacity} D={self.D} Dv={self.Dv}")
            parts[2] = (f"paged, page_size={dp.page_size}" if dp.page_size else "contiguous cache") + \
                f", kv_len {dp.kv_len_layout}, block_table {dp.table_layout}"
        if self.param_forms:
            parts.append("params passed as " + ", ".join(f"{k}:{v}" for k, v in self.param_forms))
        if self.input_casts:
            parts.append("inputs passed as " + ", ".join(f"{k}:{v}" for k, v in self.input_casts))
        if self.magnitude != 1.0:
            parts.append(f"q, k x{self.magnitude}")
        if self.number_forms:
            parts.append("numbers passed as " + ", ".join(f"{k}:{v}" for k, v in self.number_forms))
        if self.kv_batch1:
            parts.append("k, v of batch 1")
        if self.splits:
            parts.append("residue/column splits forced")
        if self.no_lse:
            parts.append("no return_lse")
        if self.dropout is not None:
            parts.append(f"dropout seed={self.dropout[0]} dropout_p={self.dropout[1]} training={self.dropout[2]}")
        if self.decode is not None and (self.decode.kv_len_form != "tensor" or self.decode.table_form != "int32"):
            parts.append(f"kv_len as {self.decode.kv_len_form}, block_table {self.decode.table_form}")
        if self.environment:
            parts.append("environment " + " ".join(f"{k}={v}" for k, v in self.environment))
        if self.varlen is not None:
            parts[0] = f"packed Hq={self.Hq} Hkv={self.Hkv} total_q={self.Nq} total_k={self.Nk} D={self.D} Dv={self.Dv}"
            parts[2] = self.varlen.describe()
        parts.append(f"tensor seed {self.seed}" + (", backward" if self.backward else ""))
        return "; ".join(parts)


def random_call(rng: random.Random, draft: Draft, backward: Optional[bool] = None, avoid=frozenset()) -> CallPlan:
    """A random call of ``draft`` (``backward``: None lets ``rng`` decide)."""
    avoid = frozenset(avoid)
    backward = rng.random() < 0.3 if backward is None else backward
    hq = draft.heads_q or rng.choice((1, 2, 3, 4))
    if draft.heads_kv is not None:
        hkv = draft.heads_kv
        if draft.heads_q is None:
            hq = hkv * rng.choice((1, 2))
    else:
        hkv = rng.choice([d for d in (1, 2, 3, 4) if hq % d == 0])
    D = rng.choice(draft.head_dims)
    Dv = draft.value_dim or (16 if rng.random() < 0.08 else D)
    if backward:
        dtype = "float32" if rng.random() < 0.9 else "float16"
    else:
        dtype = "float32" if rng.random() < 0.85 else rng.choice(("bfloat16", "float16"))

    def length():
        return rng.choice((1, 2, 3, 7)) if rng.random() < 0.12 else rng.randint(1, 70)

    Nq = length()
    Nk = Nq if rng.random() < 0.3 else length()
    tags = draft.tags
    base = 0
    if rng.random() < 0.15 and "abspos" not in tags and not ("linear_pos" in tags and "big_linear_pos" in avoid):
        bases = [b for b in BIG_BASES if b < 2**21 or ("n_input" not in tags and "pos_2_31" not in avoid)]
        base = rng.choice(bases)
    small = lambda: 0 if rng.random() < 0.4 else rng.randint(0, 40)  # noqa: E731
    q_offset, k_offset = base + small(), base + small()
    n_q_extra = rng.randint(0, 30) if rng.random() < 0.25 else None
    n_k_extra = rng.randint(0, 30) if rng.random() < 0.25 else None

    overrides = []
    for p in draft.used_params:
        if rng.random() < 0.4:
            if p.role in INT_ROLES:
                overrides.append((p.name, rng.choice(INT_ROLES[p.role])))
            else:
                overrides.append((p.name, round(p.default * rng.uniform(0.5, 2.0) + rng.uniform(-0.1, 0.1), 3)))
    layouts = tuple(rng.choice(QKV_LAYOUTS) if rng.random() < 0.35 else "contiguous" for _ in range(3))
    input_layouts = []
    for d in draft.used_inputs:
        if rng.random() < 0.3:
            choices = [lay for lay in INPUT_LAYOUTS if _input_layout_fits(d, lay)]
            input_layouts.append((d.name, rng.choice(choices)))
    has_ints = any(_is_int(d) and d.role != "flag" for d in draft.used_inputs)
    int64_values = has_ints and rng.random() < 0.2 and "int64" not in avoid
    nan = None
    if (not backward and "nan" not in avoid and rng.random() < 0.05
            and draft.mod is None):  # the contract's NaN rows come from the mask, not from scores
        nan = rng.choice(("q", "k"))
    decode = None
    # decode() refuses random_blocks (their blocks depend on n_k, which differs per row)
    if not backward and nan is None and "random_blocks" not in tags and rng.random() < 0.15:
        Nq = rng.choice((1, 1, 2, 3, 5, 16))
        capacity = rng.randint(Nq, 70)
        strided = lambda: "strided" if rng.random() < 0.3 and "noncontig_int" not in avoid else "contiguous"  # noqa: E731
        page_size = rng.choice((0, 16, 32))
        if page_size:  # whole pages: the cache's positions (and "n" inputs) reach the last page's end
            capacity = -(-capacity // page_size) * page_size
        decode = DecodePlan(kv_lens=(), capacity=capacity, page_size=page_size, kv_len_layout=strided(),
                            table_layout=strided() if page_size else "contiguous")
        q_offset = k_offset = 0
        n_q_extra = n_k_extra = None
        Nk = capacity
    named_scale = any(x.name == "scale" for x in (*draft.used_params, *draft.used_inputs))
    scale = rng.choice((0.1, 0.25, 0.7)) if rng.random() < 0.15 and not named_scale else None
    tiles = None
    if rng.random() < 0.3:
        tiles = tuple((rng.choice((16, 32, 64)), rng.choice((16, 32, 64))) for _ in range(3))
    B = rng.choice((1, 2))
    if decode is not None:
        decode = replace(decode, kv_lens=tuple(rng.randint(Nq, decode.capacity) for _ in range(B)))
    return CallPlan(seed=rng.randrange(2**31), B=B, Hq=hq, Hkv=hkv, Nq=Nq, Nk=Nk, D=D, Dv=Dv,
                    dtype=dtype, q_offset=q_offset, k_offset=k_offset, n_q_extra=n_q_extra, n_k_extra=n_k_extra,
                    overrides=tuple(overrides), layouts=layouts, input_layouts=tuple(input_layouts),
                    int64_values=int64_values, nan=nan, backward=backward, scale=scale, tiles=tiles, decode=decode)


# How often a call is a packed one (drawn from a Random of its own: the other draws of a seed stay
# as they were before varlen calls existed).
VARLEN_RATE = 0.2
VARLEN_REFUSAL_RATE = 0.03


def varlen_allowed(draft: Draft) -> bool:
    """Whether the contract lets ``draft`` take cu_seqlens: no [inputs] read and no random_blocks()
    in its mask, nor in a ``where`` of its mod (conservatively: nowhere in the mod)."""
    text = " ".join(e for k, e in draft.expressions().items() if k in ("mask", "mod"))
    return "random_blocks" not in text and not any(name in {d.name for d in draft.used_inputs}
                                                   for name, _ in _ACCESS.findall(text))


def varlen_rng(seed: int) -> random.Random:
    return random.Random(seed * 7919 + 1)


def random_varlen(rng: random.Random, plan: CallPlan) -> CallPlan:
    """``plan`` as a packed call: 1-4 sequences of 0-40 rows each (Nq != Nk per sequence now and
    then), max_seqlen_* passed or not (exact, larger, or far past the packed rows), unused packed
    rows past the last sequence, int32/int64 cu_seqlens, strided views of them."""
    S = rng.randint(1, 4)

    def lens():
        return tuple(0 if rng.random() < 0.12 else rng.choice((1, 2, 3)) if rng.random() < 0.15
                     else rng.randint(1, 40) for _ in range(S))

    def bound(longest):
        r = rng.random()
        return None if r < 0.5 else longest if r < 0.75 else longest + rng.randint(1, 20) if r < 0.95 else 2**31

    lens_q = lens()
    lens_k = lens_q if rng.random() < 0.4 else lens()
    pad = lambda: rng.randint(1, 9) if rng.random() < 0.25 else 0  # noqa: E731
    vp = VarlenPlan(lens_q, lens_k, max_q=bound(max(lens_q)), max_k=bound(max(lens_k)), pad_q=pad(), pad_k=pad(),
                    cu_dtype="int64" if rng.random() < 0.3 else "int32",
                    cu_layout="strided" if rng.random() < 0.2 else "contiguous")
    return with_varlen(plan, vp)


def with_varlen(plan: CallPlan, vp: VarlenPlan) -> CallPlan:
    """``plan`` packed as ``vp`` says (what a packed call cannot have is dropped: offsets, n_q/n_k,
    a batch, a NaN)."""
    total_q, total_k = vp.totals
    return replace(plan, varlen=vp, B=1, Nq=total_q, Nk=total_k, q_offset=0, k_offset=0, n_q_extra=None,
                   n_k_extra=None, nan=None, decode=None)


# ---------------------------------------------------------------------------------------------
# extensions: what the draws above never make (a Random of its own, as varlen's)
# ---------------------------------------------------------------------------------------------

# How often a case is extended (draw_case(extend=None), the command line's default). Everything
# below comes from extend_rng(seed), after the draws above, so those stay what they were.
EXTEND_RATE = 0.6
EXTEND_ROLES = {  # int param roles of the extensions -> their values
    "sdiv": (-7, -3, -2, 2, 3, 5, 41),  # divisors of either sign (// rounds down, % takes the divisor's sign)
    "div1": (0, 2, 3, 4, 9, 1),  # p - 1 as a divisor: 1 makes it 0 (a ValueError, from the reference too)
    "shift": (-2, -1, 0, 1, 2, 3, 5),  # shift amounts (negative: the other way)
    "huge": (2**31 - 1, 2**31, 2**40 + 7, -(2**31)),  # int params near and past 2**31
    "neg": (-(2**31), -100, -5, -1),
    "red": (0, 1, 2, 3, 4),  # the count of a reduction's range (the spec's value 4 is the most)
    "pow": (0, 1, 2, 3),  # an integer's power
}


def extend_rng(seed: int) -> random.Random:
    return random.Random(seed * 104729 + 2)


def _ext_param(pool: _Pool, role: str, default=None) -> str:
    """A fresh int param of an :data:`EXTEND_ROLES` role (a literal where no name is left)."""
    value = pool.rng.choice(EXTEND_ROLES[role]) if default is None else default
    name = pool._fresh(PARAM_NAMES)
    if name is None:
        return str(value) if value >= 0 else f"({value})"
    pool.params[name] = ParamPlan(name, value, role)
    return name


def _ext_mask_leaf(pool: _Pool) -> Atom:
    """A mask clause of a construct :func:`_mask_leaf` never draws."""
    rng = pool.rng
    kind = rng.choice(("bitwise", "shift_param", "bool_ops", "bool_number", "true_div", "signed_div", "div_expr",
                       "div_input", "nested_where", "reduction", "minmax3", "huge", "negative", "chain", "literal",
                       "scalar_input", "pair_table", "sel_table", "input_bits"))
    g = rng.randint(0, 12)
    if kind == "input_bits":  # bitwise operators on input values of every sign and width
        r = rng.random()
        dtype = "int32" if r < 0.4 else "int64" if r < 0.55 else rng.choice(("int16", "int8", "uint8"))
        d = pool.input(("b", "n"), "signed", dtype)
        return Atom(rng.choice((f"~{d}[b, j] < ~{d}[b, i]", f"({d}[b, i] | 1) % 4 == 1", f"({d}[b, i] ^ {d}[b, j]) % 3 == 0",
                                f"({d}[b, j] >> 1) <= ({d}[b, i] & 7) * 20", f"({d}[b, j] << 4) > {d}[b, i] * 3",
                                f"(~{d}[b, j] & 3) != 0 or j == i")))
    w = rng.randint(0, 24)
    if kind == "bitwise":
        m = rng.choice((1, 3, 7))
        return Atom(rng.choice((f"(i ^ j) & {m} == 0", f"(i >> 2) == (j >> 2)", f"(i & {m}) >= (j & {m})",
                                f"((i - 20) & 7) < 4", f"(~j & 3) != 0", f"(j << 1) <= i + {w}",
                                f"(i | j) % 5 != 1", f"((i - j) >> 3) == 0")))
    if kind == "shift_param":
        k = _ext_param(pool, "shift")
        return Atom(rng.choice((f"(i >> {k}) == (j >> {k})", f"(j << {k}) <= i + {w}", f"(i - j) >> {k} <= 1")))
    if kind == "bool_ops":
        return Atom(rng.choice((f"(i < {g}) ^ (j < {g})", f"(i < {g}) == (j < {g})", f"(i < {g}) != (j >= {g})",
                                f"~(j > i)", f"(j <= i) ^ (i - j > {w})")))
    if kind == "bool_number":
        return Atom(rng.choice((f"(j <= i) + (j < {g}) >= 1", f"(i < j) * 2 <= 1", f"min(j <= i, 3) == 1",
                                f"(i < j) < (j < {g})", f"sum(j < i - u for u in range(3)) >= 1")))
    if kind == "true_div":
        return Atom(rng.choice(("i / 2 == j", "i / 3 < j", "i * 0.37 < j", "(i + 1) / (j + 1) < 1.5",
                                "i ** 0.5 > j - 3", "sqrt(i + 1) >= j / 4", f"(i - j) * 0.7 // 1.3 <= {w}",
                                "(i * 0.5) % 2.5 < 1.25")))
    if kind == "signed_div":
        c = _ext_param(pool, "sdiv") if rng.random() < 0.6 else str(rng.choice((-7, -3, -2)))
        c = f"({c})" if c.startswith("-") else c
        return Atom(rng.choice((f"i // {c} == j // {c}", f"(i - j) % {c} == 0", f"(j - i) // {c} <= 1",
                                f"j % {c} != i % {c}")))
    if kind == "div_expr":  # divisors made of params, n_q, n_k, heads: checked per call or nonzero by form
        if rng.random() < 0.5:
            c = _ext_param(pool, "div1")
            return Atom(rng.choice((f"j % ({c} - 1) == 0", f"i // ({c} - 1) == j // ({c} - 1)")))
        return Atom(rng.choice(("j % n_k <= i % n_k", "(i + j) % n_q != 1", "i // (h + 1) >= j // (h + 1)",
                                "j % (abs(i - j) + 1) == 0", f"(i - j) // (abs(i - j) + {w} + 1) == 0")))
    if kind == "div_input":  # a divisor read from an input, kept nonzero by its form
        d = pool.int_input(("b",), "tiny")
        return Atom(rng.choice((f"i // max({d}[b], 1) == j // max({d}[b], 1)", f"j % where({d}[b] == 0, 3, {d}[b]) == 0",
                                f"{d}[b] > 0 and j % {d}[b] == 0", f"(j - i) % where({d}[b] > 0, {d}[b], -1) == 0")))
    if kind == "nested_where":
        return Atom(rng.choice((f"where(j < {g}, True, where(j <= i, i - j < {w}, False))",
                                f"where(i < {g}, j <= i, where(j > i, False, i - j <= {w}))",
                                f"where(h % 2 == 0, j <= i, j >= i)")))
    if kind == "reduction":
        K = _ext_param(pool, "red", default=4) if rng.random() < 0.5 else str(rng.randint(1, 5))
        return Atom(rng.choice((f"any(j == i - 3 * u for u in range({K}))", f"all(j != i + u for u in range({K}))",
                                f"sum(j <= i - u for u in range({K})) >= 2", f"j <= i and any(i - j == u * u for u in range({K}))")))
    if kind == "minmax3":
        return Atom(rng.choice((f"j >= max(i - {w}, 0, n_k - 40)", f"min(i, j, {g} + 5) == min(i, j)",
                                f"max(i, j, {g}) - min(i, j) <= {w}")))
    if kind == "huge":
        c = _ext_param(pool, "huge")
        return Atom(rng.choice((f"(i + {c}) % 13 == (j + {c}) % 13", f"j - {c} <= i - {c}", f"(j + {c}) // 8 <= (i + {c}) // 8",
                                f"i - j < {c} // 2**26")))
    if kind == "negative":
        c = _ext_param(pool, "neg")
        return Atom(rng.choice((f"i - j < {c} + {w + 20}", f"j > {c}", f"abs(i - j) <= max({c}, {w})")))
    if kind == "chain":
        return Atom(rng.choice((f"j <= i < j + {w}", f"0 <= i - j <= {w} < 30", f"{g} <= j < i + 1 <= n_q")))
    if kind == "literal":
        return Atom(rng.choice(("True", "j <= i or False", "not False and j <= i")))
    if kind == "scalar_input":  # a 0-d int input, by its name alone
        t = pool.input((), "small", rng.choice(("int32", "int64", "int16")))
        return Atom(rng.choice((f"i - j < {t}", f"abs(i - j) <= {t}", f"j < {t} or j <= i")))
    if kind == "pair_table":  # a FlexAttention bias ported as [n, n]
        x = pool.input(("n", "n"), "flag", "bool")
        return Atom(rng.choice((f"{x}[i, j]", f"{x}[i, j] or j == i")))
    x = pool.input(("b", 2), "sel", rng.choice(("int32", "int64")))  # sel_table: selected key blocks
    return Atom(f"any(j // 8 == {x}[b, u] for u in range(2)) or j // 8 == i // 8")


def _ext_bias_term(pool: _Pool) -> Atom:
    """A bias term of a construct :func:`_bias_term` never draws."""
    rng = pool.rng
    kind = rng.choice(("functions", "functions", "nested_where", "bool_number", "scalar_grad", "sum_table", "dot",
                       "int_power", "bitwise_table", "pair_table", "int_value", "float_floor", "signed_div"))
    w = rng.randint(1, 24)
    if kind == "functions":
        return Atom(rng.choice(("0.3 * exp(-abs(i - j) / 8)", "0.2 * erf(0.1 * (j - i))", "0.1 * log2(1 + abs(i - j))",
                                "0.5 * exp2(-abs(i - j) / 4)", "0.1 * tan(0.01 * (i - j))", "sigmoid(0.1 * (i - j))",
                                "0.3 * (i - j) / (abs(i - j) + 1)", "0.01 * (i - j) ** 2 / (1 + (i - j) ** 2)")))
    if kind == "nested_where":
        return Atom(rng.choice((f"where(j < i, where(i - j < {w}, 0.5, -0.5), 0.0)",
                                f"where(j <= i, 0.1 * (i - j), where(j - i < {w}, 0.3, -1.0))")))
    if kind == "bool_number":
        f = pool.input(("b", "n"), "flag", "bool")
        return Atom(rng.choice(("0.3 * (j <= i)", f"0.5 * {f}[b, j]", f"(j < {w}) - 0.5 * {f}[b, i]")))
    if kind == "scalar_grad":  # a 0-d learned scalar
        t = pool.input((), "temp", rng.choice(("float32", "float32", "float64", "bfloat16")), grad=rng.random() < 0.7)
        return Atom(rng.choice((f"-0.05 * {t} * abs(i - j)", f"{t} * where(j <= i, 0.2, -0.2)", f"0.1 * {t} ** 2 * (j < {w})")))
    if kind == "sum_table":  # an unrolled reduction reading a table
        x = pool.float_table(("h", 4))
        return Atom(rng.choice((f"sum({x}[h, u] * (i - j == u) for u in range(4))", f"sum({x}[h, u] * (j % 4 == u) for u in range(4))")))
    if kind == "dot":  # a per-query vector against a per-key vector (one tile product)
        a = pool.float_table(("b", "n", 8))
        c = pool.float_table(("b", "n", 8))
        return Atom(rng.choice((f"0.5 * dot({a}[b, i, :], {c}[b, j, :])", f"dot({a}[b, i, :], {a}[b, j, :]) / 4",
                                f"0.3 * dot({a}[b, i, :], {c}[b, i, :])")))
    if kind == "int_power":
        k = _ext_param(pool, "pow")
        return Atom(rng.choice((f"0.0001 * (i - j) ** {k}", f"0.1 * (-1) ** j", f"0.01 * 2 ** {k} * (j < i)")))
    if kind == "bitwise_table":
        t = pool.float_table(("h", 8))
        return Atom(rng.choice((f"{t}[h, (j - i) & 7]", f"{t}[h, (i ^ j) % 8]", f"{t}[h, (j >> 2) & 7]")))
    if kind == "pair_table":
        x = pool.float_table(("n", "n"))
        return Atom(f"{x}[i, j]")
    if kind == "int_value":  # an integer input's value as a number
        d = pool.int_input(("b", "n"), "value")  # (never past 2**31: a float32 score of 4e8 is not exact)
        return Atom(rng.choice((f"0.1 * {d}[b, j]", f"0.05 * ({d}[b, i] - {d}[b, j])", f"0.2 * ({d}[b, j] % 3)")))
    if kind == "float_floor":
        return Atom(rng.choice(("0.1 * ((i - j) * 0.7 // 1.3)", "0.2 * ((j * 0.3) % 1.1)")))
    c = _ext_param(pool, "sdiv")  # signed_div
    c = f"({c})" if c.startswith("-") else c
    return Atom(rng.choice((f"0.1 * ((i - j) // {c})", f"0.2 * (j % {c})")))


def _named_scale(pool: _Pool) -> Optional[str]:
    """A float param or 0-d input named ``scale`` (it takes the call's ``scale=``), or None where
    the name is taken."""
    if "scale" in pool.params or "scale" in pool.inputs:
        return None
    if pool.rng.random() < 0.5:
        pool.params["scale"] = ParamPlan("scale", pool.rng.choice((0.5, 1.5)), "coef")
    else:
        pool.inputs["scale"] = InputPlan("scale", (), "float32", "temp", grad=pool.rng.random() < 0.5)
    return "scale"


def _ext_mod(pool: _Pool) -> Atom:
    """A score transform of a construct :func:`_score_mod` never draws."""
    rng = pool.rng
    kind = rng.choice(("alias", "scalar", "table_where", "gelu", "inner_inf", "min3", "leaky", "softplus",
                       "bool_number", "float_branch", "param_div", "square", "int_param", "named_scale"))
    if kind == "named_scale":
        c = _named_scale(pool)
        if c is not None:
            return Atom(rng.choice((f"s * {c}", f"where(j <= i, s * {c}, -inf)")))
        kind = "alias"
    if kind == "alias":
        return Atom(rng.choice(("score * 0.5", "where(score > 0, score, 0.5 * score)")))
    if kind == "scalar":
        t = pool.input((), "temp", rng.choice(("float32", "float64", "float16")), grad=rng.random() < 0.7)
        return Atom(rng.choice((f"s * {t}", f"s / {t}", f"{t} * tanh(s / {t})")))
    if kind == "table_where":
        x = pool.float_table(("h",))
        return Atom(rng.choice((f"where(s > {x}[h], s, {x}[h])", f"max(s, {x}[h])")))
    if kind == "gelu":
        return Atom("0.5 * s * (1 + erf(s / sqrt(2)))")
    if kind == "inner_inf":  # a -inf that is not the whole transform's branch
        return Atom(rng.choice(("s + where(j > i, -inf, 0.0)", "where(j <= i, s, -inf) * 0.5", "max(where(j <= i, s, -inf), -2.0)")))
    if kind == "min3":
        return Atom(rng.choice(("min(s, 2.0, 0.5 * s + 1.0)", "max(s, -1.0, -0.5 * s)")))
    if kind == "leaky":
        return Atom("where(s > 0, s, 0.1 * s)")
    if kind == "softplus":
        return Atom("log(1 + exp(s))")
    if kind == "bool_number":
        return Atom(rng.choice(("s * (1 + (j <= i))", "s - 2.0 * (j > i)")))
    if kind == "float_branch":
        w = rng.randint(1, 24)
        return Atom(rng.choice((f"where(i - j < {w}, s, s - 5.0)", f"where(i * 0.1 > j * 0.3, s, s - 5.0)")))
    if kind == "param_div":
        c = pool.float_param("thresh")
        return Atom(f"s / {c}")
    if kind == "square":
        return Atom(rng.choice(("0.1 * s ** 2 + s", "s ** 3 * 0.05")))
    c = _ext_param(pool, "pow")  # int_param: an int param in float arithmetic
    return Atom(f"s * (1 + {c}) / 2")


def extend_draft(rng: random.Random, draft: Draft, avoid=frozenset()) -> Draft:
    """``draft`` with one to three constructs the spec draws never make: a mask clause joined to
    its mask, a bias term, a transform where it has none."""
    pool = _Pool(rng, frozenset(avoid), {p.name: p for p in draft.params}, {d.name: d for d in draft.inputs})
    mask, bias, mod = draft.mask, draft.bias, draft.mod
    for _ in range(rng.choice((1, 1, 2, 3))):
        r = rng.random()
        if r < 0.5:
            leaf = _draw(pool, _ext_mask_leaf)
            if mask is None:
                mask = leaf
            else:
                op = rng.choice(("and", "and", "or"))
                mask = Node(op, (mask, leaf), op)
        elif r < 0.8 or mod is not None:
            bias = bias + (_draw(pool, _ext_bias_term),)
        else:
            mod = _draw(pool, _ext_mod)
    return replace(draft, params=tuple(pool.params.values()), inputs=tuple(pool.inputs.values()),
                   mask=mask, bias=bias, mod=mod)


EXTEND_DIMS = (1, 3, 4, 8, 12, 24, 40, 64)
EXTEND_QKV_LAYOUTS = ("d_strided", "rows_expand", "n_first")


def extend_call(rng: random.Random, old: Draft, draft: Draft, plan: CallPlan) -> CallPlan:
    """``plan`` for the extended ``draft``: overrides of the new params (values near 2**31,
    negative, zero divisors), params passed as numpy scalars and tensors, inputs passed in another
    dtype, grad tables as expanded views, head dims the spec does not list, a zero-length side,
    one query row, larger q and k."""
    old_params = {p.name for p in old.used_params}
    overrides = list(plan.overrides)
    for p in draft.used_params:
        if p.name not in old_params and rng.random() < 0.4:
            if p.role == "red":  # up to the spec's value (above it: a ValueError)
                overrides.append((p.name, rng.randint(-1, p.default)))
            elif p.role in EXTEND_ROLES:
                overrides.append((p.name, rng.choice(EXTEND_ROLES[p.role])))
            else:  # a float param (thresh)
                overrides.append((p.name, round(p.default * rng.uniform(0.5, 2.0), 3)))
    forms = tuple((p.name, rng.choice(("numpy", "tensor0", "tensor1"))) for p in draft.used_params if rng.random() < 0.3)
    casts = []
    for d in draft.used_inputs:
        if rng.random() < 0.25 and not plan.int64_values:
            if d.dtype.startswith(("float", "bfloat")):
                casts.append((d.name, rng.choice([t for t in ("float64", "float32", "float16", "bfloat16") if t != d.dtype])))
            elif d.dtype != "bool" and d.role in ("doc", "small", "tiny", "sel", "value"):  # values below 100 fit every int
                casts.append((d.name, rng.choice([t for t in ("int8", "int16", "int32", "int64", "uint8") if t != d.dtype])))
    layouts = dict(plan.input_layouts)
    for d in draft.used_inputs:
        if d.grad and rng.random() < 0.3:
            choices = [lay for lay in INPUT_LAYOUTS if _input_layout_fits(d, lay, grad_views=True)]
            layouts[d.name] = rng.choice(choices)
    out = replace(plan, overrides=tuple(overrides), param_forms=forms, input_casts=tuple(casts),
                  input_layouts=tuple((k, v) for k, v in layouts.items() if any(d.name == k for d in draft.used_inputs)))
    if draft.mod is not None:  # as random_call: a transform decides what a NaN score becomes (where(s > x, s, x))
        out = replace(out, nan=None)
    if any(x.name == "scale" for x in (*draft.used_params, *draft.used_inputs)):
        out = replace(out, scale=None)  # scale= is that param's or input's now (an override or the tensor)
    n_dims = max((d.dims.count("n") for d in draft.used_inputs), default=0)
    far = 2**21 if n_dims == 1 else 256 if n_dims else None  # an "n" input covers the positions
    if far is not None and max(out.q_offset, out.k_offset) >= far:
        out = replace(out, q_offset=out.q_offset % 64, k_offset=out.k_offset % 64)
    if rng.random() < 0.25:  # a head dim the spec does not list (the kernels take any from 1 to 256)
        rd = draft.rope[2] if draft.rope is not None else None
        dims = [x for x in EXTEND_DIMS if draft.rope is None or (x % 2 == 0 and x >= (rd or 2))]
        D = rng.choice(dims)
        out = replace(out, D=D, Dv=draft.value_dim or (D if plan.Dv == plan.D else plan.Dv))
    if out.decode is not None and rng.random() < 0.2:  # a row without keys, or with fewer than Nq
        lens = list(out.decode.kv_lens)
        lens[rng.randrange(len(lens))] = rng.choice((0, rng.randint(0, max(0, out.Nq - 1))))
        out = replace(out, decode=replace(out.decode, kv_lens=tuple(lens)))
    if out.decode is None and out.varlen is None:
        r = rng.random()
        if r < 0.08 and out.nan is None:  # (a NaN is planted in q or k: neither may be empty)
            out = replace(out, **{rng.choice(("Nq", "Nk")): 0})
        elif r < 0.2:
            out = replace(out, Nq=1)
    if rng.random() < 0.2 and out.nan is None:  # q, k or v in a layout the draws above never make
        n = rng.randrange(3)
        out = replace(out, layouts=out.layouts[:n] + (rng.choice(EXTEND_QKV_LAYOUTS),) + out.layouts[n + 1:])
    if draft.heads_q is None and draft.heads_kv is None and rng.random() < 0.1:  # more heads than 4
        hq = rng.choice((5, 6, 8))
        out = replace(out, Hq=hq, Hkv=rng.choice([x for x in (1, 2, 3, 4, hq) if hq % x == 0]))
    if rng.random() < 0.1 and not out.backward and draft.mod is None:  # (exp(s) of large s overflows float32)
        out = replace(out, magnitude=rng.choice((4.0, 8.0)))
    return out


# ---------------------------------------------------------------------------------------------
# extensions, second layer (session 28): what neither the draws above nor extend_draft/extend_call
# make (a Random of its own, extend2_rng, drawn after both: every earlier draw stays as it was)
# ---------------------------------------------------------------------------------------------

EXTEND2_RATE = 0.6
FAR_BASES = (2**20, 2**24 + 3, 2**31 - 37, 2**32 + 5)  # far positions for RoPE (angles reduced in float64)


def extend2_rng(seed: int) -> random.Random:
    return random.Random(seed * 15485863 + 3)


def _x2_mask_leaf(pool: _Pool) -> Atom:
    """A mask clause of a construct neither :func:`_mask_leaf` nor :func:`_ext_mask_leaf` draws:
    input reads outside the input's extent (negative, past the end, heads past a short table),
    inputs whose dims are not in the order (b, h, n), per-head pair tables, clauses the residue-class
    and column splits take, sizes beside the aliases."""
    rng = pool.rng
    kind = rng.choice(("oob_doc", "oob_flag", "short_head", "n_first", "head_pair", "bhn_flag", "hb", "sizes"))
    w = rng.randint(0, 12)
    if kind == "oob_doc":
        d = pool.int_input(("b", "n"), "doc")
        return Atom(rng.choice((f"{d}[b, j - 3] == {d}[b, i - 3]", f"j >= 2 and {d}[b, j - 2] == {d}[b, i]",
                                f"{d}[b, i + 5] == {d}[b, j + 5]", f"{d}[b, i - j] == 0")))
    if kind == "oob_flag":
        f = pool.input(("n",), "flag", "bool")
        return Atom(rng.choice((f"{f}[j - 4] or j == i", f"not {f}[i + 2] or j <= i", f"{f}[i - j] or j >= i")))
    if kind == "short_head":  # a per-head table shorter than the heads: heads past it read 0
        t = pool.input((rng.choice((1, 2, 3)),), "small", rng.choice(("int32", "int64")))
        return Atom(rng.choice((f"i - j < {t}[h] + 2", f"abs(i - j) <= {t}[h]", f"j <= i + {t}[h + 1]")))
    if kind == "n_first":
        if rng.random() < 0.5:
            f = pool.input(("n", "b"), "flag", "bool")
            return Atom(rng.choice((f"{f}[j, b]", f"{f}[i, b] or j <= i")))
        d = pool.int_input(("n", "b"), "doc")
        return Atom(f"{d}[i, b] == {d}[j, b]")
    if kind == "head_pair":
        f = pool.input(("h", "n", "n"), "flag", "bool")
        return Atom(rng.choice((f"{f}[h, i, j] or j == i", f"{f}[h, j, i]")))
    if kind == "bhn_flag":  # a per-query-head key flag (GQA: several query heads on one key head)
        f = pool.input(("b", "h", "n"), "flag", "bool")
        return Atom(rng.choice((f"{f}[b, h, j] or j == i", f"{f}[b, h, i] and j <= i")))
    if kind == "hb":
        t = pool.input(("h", "b"), "small", "int32")
        return Atom(rng.choice((f"i - j <= {t}[h, b]", f"abs(i - j) <= {t}[h, b] + 1")))
    return Atom(rng.choice((f"j - n_k <= i - n_q + {w}", f"i < n_q - {w} or j < {w}", f"kv_idx <= q_idx + {w}",
                            f"n_k - j > n_q - i - {w}")))


def _x2_split_leaf(pool: _Pool) -> Atom:
    """A clause of the masks ``attncc`` runs split: a residue class ``(i - j) % m == 0`` (rows and keys
    of one class as strided views) or summary columns ``j % m == m - 1`` beside a band (two parts
    merged by their LSE); a call with ``splits`` forces both on at any size."""
    rng = pool.rng
    c, is_param = pool.int_operand("div")
    last = f"{c} - 1" if is_param else str(int(c) - 1)
    w, _ = pool.int_operand("win")
    return Atom(rng.choice((f"(i - j) % {c} == 0", f"(j - i) % {c} == 0 and j <= i",
                            f"j <= i and (i - j < {w} or j % {c} == {last})",
                            f"i - j < {w} or j % {c} == {last}")))


def _x2_bias_term(pool: _Pool) -> Atom:
    """A bias term of a construct neither :func:`_bias_term` nor :func:`_ext_bias_term` draws."""
    rng = pool.rng
    kind = rng.choice(("oob_row", "oob_head", "oob_mod", "n_first", "head_pair", "sizes", "int_param"))
    if kind == "oob_row":
        x = pool.float_table(("b", "n"))
        return Atom(rng.choice((f"{x}[b, j - 2]", f"0.5 * {x}[b, i + 3]", f"{x}[b, i - j]")))
    if kind == "oob_head":
        x = pool.float_table((rng.choice((1, 2, 3)),))
        return Atom(rng.choice((f"{x}[h]", f"{x}[h + 1]", f"{x}[h - 1] * where(j <= i, 1.0, -1.0)")))
    if kind == "oob_mod":
        x = pool.float_table(("h", 5))
        return Atom(rng.choice((f"{x}[h, (i - j) % 7]", f"{x}[h, j - i + 2]", f"{x}[h + 2, j % 5]")))
    if kind == "n_first":
        x = pool.float_table(("n", "b"))
        return Atom(rng.choice((f"{x}[j, b]", f"{x}[i, b] - {x}[j, b]")))
    if kind == "head_pair":
        x = pool.float_table(("h", "n", "n"))
        return Atom(f"{x}[h, i, j]")
    if kind == "sizes":
        return Atom(rng.choice(("0.01 * (n_k - n_q)", "0.02 * (n_q - q_idx)", "0.5 * alibi", "alibi * 2.0 + 0.1",
                                "0.1 * (kv_idx - q_idx) / n_k")), LINEAR_POS)
    w, _ = pool.int_operand("win")  # int_param: an int param in float arithmetic
    return Atom(rng.choice((f"0.05 * {w} * (j <= i)", f"where(i - j < {w}, 0.0, -0.05 * {w})", f"0.5 / (1 + {w})")))


def _x2_mod(pool: _Pool) -> Atom:
    """A transform of a construct neither :func:`_score_mod` nor :func:`_ext_mod` draws: conditions
    on the score beside tables, positions and sizes; sizes, ``alibi`` and the aliases in a transform;
    an int param in its float arithmetic."""
    rng = pool.rng
    kind = rng.choice(("cond_table", "cond_pos", "cond_keep", "sizes", "int_param"))
    if kind == "cond_table":
        x = pool.float_table(("h",))
        return Atom(rng.choice((f"where(s > {x}[h], tanh(s) * 2.0, -inf)", f"where(s + {x}[h] > 0, s, -inf)",
                                f"where(score > -0.5, score * {x}[h], -inf)")), frozenset({"score_cond", "score_cond_inf"}))
    if kind == "cond_pos":
        w = rng.randint(0, 12)
        return Atom(rng.choice((f"where(s > 0.2 and j <= i + {w}, s * 2.0, -inf)",
                                f"where(s > -1.0 or j == i, s + 0.1 * (j - i), -inf)",
                                f"where(j <= i, where(s < 1.5, s, -inf), s - 2.0)")), frozenset({"score_cond", "score_cond_inf"}))
    if kind == "cond_keep":  # a condition on s that keeps the pair either way
        return Atom(rng.choice(("where(abs(s) < 1.5, s, s - 3.0)", "where(s > 0.0, sigmoid(s) * 3.0, s)",
                                "max(where(s > 1.0, 1.0 + 0.5 * s, s), -3.0)")), frozenset({"score_cond"}))
    if kind == "sizes":
        return Atom(rng.choice(("s + 0.5 * alibi", "where(kv_idx - n_k <= q_idx - n_q, score, -inf)",
                                "s * n_k / (n_k + 1.0)", "s - 0.01 * (n_q - i)")), LINEAR_POS)
    w, _ = pool.int_operand("win")
    return Atom(rng.choice((f"where(j <= i, s * (1 + {w}) / 8, s)", f"s / (1 + {w})", f"s + 0.01 * {w} * h")))


def extend2_draft(rng: random.Random, draft: Draft, avoid=frozenset()) -> Draft:
    """``draft`` with one or two constructs of the second layer (a mask clause, a split clause, a
    bias term, a transform), and now and then dropout, RoPE of another rotary dim or theta, a softcap
    beside a transform."""
    pool = _Pool(rng, frozenset(avoid), {p.name: p for p in draft.params}, {d.name: d for d in draft.inputs})
    mask, bias, mod = draft.mask, draft.bias, draft.mod
    for _ in range(rng.choice((1, 1, 2))):
        r = rng.random()
        if r < 0.3:
            leaf = _draw(pool, _x2_mask_leaf)
            op = rng.choice(("and", "and", "or"))
            mask = leaf if mask is None else Node(op, (mask, leaf), op)
        elif r < 0.45:
            leaf = _draw(pool, _x2_split_leaf)  # (and: a residue class must hold for the whole mask)
            mask = leaf if mask is None else Node("and", (mask, leaf), "and")
        elif r < 0.75 or mod is not None:
            bias = bias + (_draw(pool, _x2_bias_term),)
        else:
            mod = _draw(pool, _x2_mod)
    softcap, rope, dropout = draft.softcap, draft.rope, None
    if mod is not None and softcap is None and rng.random() < 0.3:
        softcap = rng.choice((1.0, 3.0, 30.0))
    if rng.random() < 0.25:  # RoPE of other thetas and rotary dims (the draws above: 10000 / 500, 8 or all)
        rd = rng.choice((None, 2, 4, 6, 16))
        theta = rng.choice((1.5, 100.0, 10000.0, 1e6)) if rope is None or rng.random() < 0.5 else rope[0]
        rope = (theta, rng.choice(("neox", "gptj")) if rope is None else rope[1], rd)
    if rng.random() < 0.15:
        dropout = rng.choice((0.1, 0.25, 0.5))
    return replace(draft, params=tuple(pool.params.values()), inputs=tuple(pool.inputs.values()),
                   mask=mask, bias=bias, mod=mod, softcap=softcap, rope=rope, dropout=dropout)


NUMBER_FORMS = ("np_int32", "np_int64", "tensor0", "tensor1", "tensor_int32")
SCALE_FORMS = ("np_float32", "np_float64", "tensor0", "tensor1")


def extend2_call(rng: random.Random, old: Draft, draft: Draft, plan: CallPlan) -> CallPlan:
    """``plan`` for the ``draft`` of :func:`extend2_draft`: overrides of its new params; offsets,
    ``n_q``, ``n_k`` and ``scale=`` as numpy scalars and tensors; k and v of batch 1 beside q's
    batch; the residue-class and column splits forced on; a forward without the LSE; dropout
    (seed, ``dropout_p``, ``training``); RoPE far into a sequence; Nq far from Nk; decode caches of
    pages of 17, 24 or 48 rows, kv_len as a list or int64, int64 block tables with spare columns."""
    old_params = {p.name for p in old.used_params}
    overrides = list(plan.overrides)
    for p in draft.used_params:
        if p.name not in old_params and rng.random() < 0.4 and p.role in INT_ROLES:
            overrides.append((p.name, rng.choice(INT_ROLES[p.role])))
    out = replace(plan, overrides=tuple(overrides))
    plain = out.decode is None and out.varlen is None
    n_dims = max((d.dims.count("n") for d in draft.used_inputs), default=0)
    far = 2**21 if n_dims == 1 else 256 if n_dims else None  # (as extend_call: an "n" input covers the positions)
    if far is not None and max(out.q_offset, out.k_offset) >= far:
        out = replace(out, q_offset=out.q_offset % 64, k_offset=out.k_offset % 64)
    if draft.rope is not None:  # an even head dim that holds the rotary dim
        rd = draft.rope[2] or 2
        if out.D % 2 or out.D < rd:
            D = rng.choice([x for x in EXTEND_DIMS if x % 2 == 0 and x >= rd])
            out = replace(out, D=D, Dv=draft.value_dim or (D if plan.Dv == plan.D else plan.Dv))
    if draft.dropout is not None:
        out = replace(out, nan=None, dropout=(rng.randrange(2**62), rng.choice((None, None, 0.0, 0.3, 0.75)),
                                              rng.random() < 0.85))
    if plain and rng.random() < 0.15:  # one side much longer than the other
        long_, short = rng.randint(40, 90), rng.randint(1, 6)
        out = replace(out, **(dict(Nq=long_, Nk=short) if rng.random() < 0.5 else dict(Nq=short, Nk=long_)))
        if rng.random() < 0.5:
            out = replace(out, k_offset=out.q_offset + rng.randint(0, 40))
    atoms = list(draft.bias) + ([draft.mod] if draft.mod else []) + list(_mask_atoms(draft.mask))
    far_ok = (draft.rope is not None and not any(a.tags & {"abspos", "linear_pos"} for a in atoms)
              and not any("n" in d.dims for d in draft.used_inputs))
    if plain and far_ok and rng.random() < 0.4:  # RoPE far into a sequence (exact angles, the docs say)
        base = rng.choice(FAR_BASES)
        out = replace(out, q_offset=base + rng.randint(0, 40), k_offset=base + rng.randint(0, 40))
    if plain and out.B == 2 and rng.random() < 0.25:
        out = replace(out, kv_batch1=True)
    if plain and rng.random() < 0.3:
        n_q = None if out.n_q_extra is None else out.q_offset + out.Nq + out.n_q_extra
        n_k = None if out.n_k_extra is None else out.k_offset + out.Nk + out.n_k_extra
        forms = []
        for key, value in (("q_offset", out.q_offset), ("k_offset", out.k_offset), ("n_q", n_q), ("n_k", n_k)):
            if value is not None and rng.random() < 0.6:
                choices = [f for f in NUMBER_FORMS if value < 2**31 or "int32" not in f]
                forms.append((key, rng.choice(choices)))
        if out.scale is not None and rng.random() < 0.6:
            forms.append(("scale", rng.choice(SCALE_FORMS)))
        out = replace(out, number_forms=tuple(forms))
    if out.varlen is None and out.decode is None and rng.random() < 0.25:
        out = replace(out, splits=True)
    if not out.backward and out.decode is None and rng.random() < 0.2:
        out = replace(out, no_lse=True)
    if out.decode is not None and rng.random() < 0.5:
        dp = out.decode
        if rng.random() < 0.4:  # pages not aligned to any tile
            ps = rng.choice((17, 24, 48))
            cap = -(-dp.capacity // ps) * ps
            dp = replace(dp, page_size=ps, capacity=cap)
            out = replace(out, Nk=cap)
        dp = replace(dp, kv_len_form=rng.choice(("tensor", "list", "int64")),
                     table_form=rng.choice(("int32", "int64_wide")) if dp.page_size else "int32")
        out = replace(out, decode=dp)
    return out


def extend2_features(draft: Draft, plan: CallPlan) -> FrozenSet[str]:
    """The second layer's features a case has (what :func:`extend2_draft` and :func:`extend2_call`
    are there to draw): tests/test_fuzz.py checks that seeds draw each of them."""
    out = set()
    ex = " ".join(draft.expressions().values())
    dims = {d.name: d.dims for d in draft.used_inputs}
    for name, index in _ACCESS.findall(ex):
        parts = [p.strip() for p in index.split(",")]
        if name in dims:
            d = dims[name]
            if any(re.search(r"[ij] [-+] \d|i - j|j - i", p) for p in parts):
                out.add("oob_index")
            if any(isinstance(x, int) for x in d) and "h" in parts and "h" not in d:
                out.add("short_head_table")
            if d[:1] == ("n",) and len(d) > 1:
                out.add("n_first_input")
            if d == ("h", "n", "n"):
                out.add("head_pair_table")
            if d == ("b", "h", "n") and "mask" in draft.expressions() and name in draft.expressions()["mask"]:
                out.add("per_head_mask_input")
            if d == ("h", "b"):
                out.add("head_batch_input")
    for needle, feature in (("% ", "modulo"), ("alibi", "alibi_expr"), ("n_k", "sizes"), ("kv_idx", "aliases")):
        if needle in ex:
            out.add(feature)
    if draft.mod is not None and re.search(r"\b(s|score)\b[^,]*[<>]", draft.mod.text):
        out.add("score_cond")
        if draft.softcap is not None:
            out.add("score_cond_softcap")
    if draft.mod is not None and re.search(r"\b(alibi|n_q|n_k)\b", draft.mod.text):
        out.add("sizes_in_mod")
    if draft.rope is not None and (draft.rope[2] not in (None, 8) or draft.rope[0] not in (10000.0, 500.0)):
        out.add("rope_variant")
    if draft.dropout is not None:
        out.add("dropout")
        if plan.dropout is not None and plan.varlen is not None:
            out.add("dropout_varlen")
        if plan.dropout is not None and plan.backward:
            out.add("dropout_backward")
    if draft.rope is not None and min(plan.q_offset, plan.k_offset) >= 2**20:
        out.add("rope_far")
    for fld in ("kv_batch1", "splits", "no_lse"):
        if getattr(plan, fld):
            out.add(fld)
    out |= {f"form_{f}" for _, f in plan.number_forms}
    if plan.decode is not None:
        if plan.decode.page_size % 16:
            out.add("odd_pages")
        if plan.decode.kv_len_form != "tensor":
            out.add(f"kv_len_{plan.decode.kv_len_form}")
        if plan.decode.table_form != "int32":
            out.add("table_int64_wide")
    if plan.varlen is None and plan.decode is None and max(plan.Nq, plan.Nk) >= 40 and min(plan.Nq, plan.Nk) <= 6:
        out.add("skewed")
    return frozenset(out)


def _is_int(d: InputPlan) -> bool:
    return not d.dtype.startswith(("float", "bfloat"))


def _input_layout_fits(d: InputPlan, layout: str, grad_views: bool = False) -> bool:
    """Whether ``layout`` applies to ``d`` (``grad_views``: a ``grad = true`` table may be an
    expanded view too, whose gradient autograd sums; drawn by :func:`extend_call` only)."""
    if layout == "transposed":
        return len(d.dims) == 2
    if layout == "broadcast":  # stride 0 along the first dim: one value per batch row / head
        return bool(d.dims) and d.dims[0] in ("b", "h") and (grad_views or not d.grad)
    return layout == "contiguous" or bool(d.dims)  # a 0-d input has one layout


def call_tags(draft: Draft, plan: CallPlan) -> FrozenSet[str]:
    """The known-bug tags of a case: the spec's, the call's, and those of the pair."""
    tags = set(draft.tags | plan.tags)
    if not plan.backward:
        tags.discard("half_query_table")
    # (strided int inputs of attention() are fine: their strides reach the kernels)
    if plan.decode is not None and "strided" in (plan.decode.kv_len_layout, plan.decode.table_layout):
        tags.add("noncontig_int")
    if "half_table" in tags or ("f64_table" in tags and plan.dtype == "bfloat16"):
        tags.add("table_dtype")
    if "linear_pos" in tags and min(plan.q_offset, plan.k_offset) >= 2**16:
        tags.add("big_linear_pos")
        if draft.mod is not None and any(a.text.endswith(" * j") for a in draft.bias):
            tags.add(F32_SCORE)
    return frozenset(tags)


# A bias term of the absolute key position (``0.05 * j``) far into a sequence under a score
# transform: the transform sees the score itself (``where(s > 0.5, ...)``, ``max(s, -1.0)``: no
# row constant can leave it), ~5e4 at j = 2**20, whose float32 ulp (2**-8) moves o by ~4e-3. The
# contract computes scores in float32 (docs/spec-language.md, "Float arithmetic"): such a case is
# past what any float32 kernel can match the float64 reference to, and is not compared (fuzz seed
# 28364, drawn by random_call before this tag existed).
F32_SCORE = "f32_abs_score"


# ---------------------------------------------------------------------------------------------
# tensors of a call
# ---------------------------------------------------------------------------------------------

_DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
       "int32": torch.int32, "int64": torch.int64, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
       "bool": torch.bool}


def _qkv(gen, shape, dtype, layout, grad, magnitude=1.0):
    """A [B, H, N, D] tensor in ``layout`` (a view of a leaf that may require grad): (view, leaf)."""
    B, H, N, D = shape

    def _randn(*size, generator):
        return torch.randn(*size, generator=generator) * magnitude  # (x 1.0: the values as before)

    if layout == "bnhd":  # as a fused projection lays it out
        leaf = _randn(B, N, H, D, generator=gen).to(dtype).requires_grad_(grad)
        return leaf.transpose(1, 2), leaf
    if layout == "rows_step":
        leaf = _randn(B, H, 2 * N + 1, D, generator=gen).to(dtype).requires_grad_(grad)
        return leaf[:, :, 1::2], leaf
    if layout == "padded_d":
        leaf = _randn(B, H, N, D + 8, generator=gen).to(dtype).requires_grad_(grad)
        return leaf[..., :D], leaf
    if layout == "heads_step":
        leaf = _randn(B, 2 * H, N, D, generator=gen).to(dtype).requires_grad_(grad)
        return leaf[:, ::2], leaf
    if layout == "batch_broadcast":
        leaf = _randn(1, H, N, D, generator=gen).to(dtype).requires_grad_(grad)
        return leaf.expand(B, H, N, D), leaf
    if layout == "d_strided":  # the head dim not unit-stride (extend_call's layouts from here on)
        leaf = _randn(B, H, D, N, generator=gen).to(dtype).requires_grad_(grad)
        return leaf.transpose(-1, -2), leaf
    if layout == "rows_expand":  # every row the same (stride 0 along the positions)
        leaf = _randn(B, H, 1, D, generator=gen).to(dtype).requires_grad_(grad)
        return leaf.expand(B, H, N, D), leaf
    if layout == "n_first":  # [N, B, H, D] storage (a sequence-first model)
        leaf = _randn(N, B, H, D, generator=gen).to(dtype).requires_grad_(grad)
        return leaf.permute(1, 2, 0, 3), leaf
    leaf = _randn(B, H, N, D, generator=gen).to(dtype).requires_grad_(grad)
    return leaf, leaf


def _input_values(d: InputPlan, shape, gen, plan: CallPlan) -> torch.Tensor:
    """Values of an input by its role (int roles as int64; the caller casts)."""
    if d.role == "float":
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.5
    if d.role == "slope":
        return torch.rand(*shape, generator=gen, dtype=torch.float64) * 0.3
    if d.role == "flag":
        return torch.rand(*shape, generator=gen) < 0.7
    if d.role == "doc":
        if shape and d.dims[-1] == "n" and torch.rand(1, generator=gen).item() < 0.7:
            # packed documents: segments of random lengths (some of length 1)
            starts = torch.rand(*shape, generator=gen) < 0.15
            ids = starts.to(torch.int64).cumsum(-1)
        else:
            ids = torch.randint(0, 4, shape, generator=gen)
        return ids % 100  # fits every int dtype
    if d.role == "big":
        return torch.randint(0, 2**31 - 1, shape, generator=gen)
    if d.role == "len":
        lo, hi = max(0, plan.k_offset - 3), plan.k_offset + plan.Nk + 3
        return torch.randint(lo, hi + 1, shape, generator=gen)
    if d.role == "temp":  # a learned temperature or gate: positive, near 1
        return torch.rand(tuple(shape), generator=gen, dtype=torch.float64) * 0.5 + 0.75
    if d.role == "signed":  # any value of the declared width (the extensions' bitwise operators)
        info = torch.iinfo(_DT[d.dtype])
        return torch.randint(max(info.min, -2**40), min(info.max, 2**40) + 1, shape, generator=gen)
    if d.role == "tiny":  # divisors that may be 0 (guarded: max(d, 1), where(d == 0, 3, d))
        return torch.randint(0, 5, shape, generator=gen)
    if d.role == "sel":  # selected key blocks of 8 positions
        return torch.randint(0, max(1, (plan.k_offset + plan.Nk) // 8 + 1), shape, generator=gen)
    return torch.randint(0, 21, shape, generator=gen)  # small: per-head windows


def _input_tensor(d: InputPlan, shape, gen, plan: CallPlan, layout: str, grad: bool) -> torch.Tensor:
    """The tensor a call passes for ``d``: in ``layout``, a view of a leaf that may require grad."""
    values = _input_values(d, shape, gen, plan)
    dtype = _DT[dict(plan.input_casts).get(d.name, d.dtype)]
    if _is_int(d) and d.role not in ("flag", "value") and plan.int64_values:
        # values past int32: ids that agree modulo 2**32 are different documents, lengths are large
        values = values + (values % 2) * 2**32 if d.role == "doc" else values + 2**32
        dtype = torch.int64
    if layout == "transposed":
        return values.t().contiguous().to(dtype).requires_grad_(grad).t()
    if layout == "step":
        return torch.repeat_interleave(values, 2, dim=-1).to(dtype).requires_grad_(grad)[..., ::2]
    if layout == "broadcast":
        return values[:1].contiguous().to(dtype).requires_grad_(grad).expand(*shape)
    return values.to(dtype).requires_grad_(grad)


@dataclass
class Arguments:
    """The tensors and keywords of one call (q, k, v may be views of leaves that require grad)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    positions: Dict[str, Optional[int]]
    params: Dict[str, Union[int, float]]
    inputs: Dict[str, torch.Tensor]
    grad_tables: Tuple[str, ...]  # inputs whose gradients are compared
    g: torch.Tensor  # the output gradient (backward)
    packed: Dict[str, object] = field(default_factory=dict)  # cu_seqlens_*, max_seqlen_* of a packed call


def call_arguments(draft: Draft, plan: CallPlan) -> Arguments:
    """The tensors and keywords of ``plan``: deterministic in ``plan.seed``."""
    gen = torch.Generator().manual_seed(plan.seed)
    dt = _DT[plan.dtype]
    Bk = 1 if plan.kv_batch1 else plan.B
    shapes = ((plan.B, plan.Hq, plan.Nq, plan.D), (Bk, plan.Hkv, plan.Nk, plan.D), (Bk, plan.Hkv, plan.Nk, plan.Dv))
    (q, ql), (k, kl), (v, _) = (_qkv(gen, s, dt, lay, plan.backward, m) for s, lay, m
                                in zip(shapes, plan.layouts, (plan.magnitude, plan.magnitude, 1.0)))
    if plan.nan:
        with torch.no_grad():
            target = ql if plan.nan == "q" else kl
            flat = target.view(-1)
            flat[int(torch.randint(0, flat.numel(), (1,), generator=gen))] = math.nan
    n_max = max(plan.q_offset + plan.Nq, plan.k_offset + plan.Nk)
    batch = plan.B
    if plan.varlen is not None:  # "b" is the sequence, "n" covers max_seqlen
        n_max, batch = max(plan.varlen.max_rows), len(plan.varlen.lens_q)
    n_size = n_max + int(torch.randint(0, 4, (1,), generator=gen))
    sizes = {"b": batch, "h": plan.Hq, "n": n_size}
    layouts = dict(plan.input_layouts)
    inputs, grad_tables = {}, []
    for d in draft.used_inputs:
        shape = tuple(sizes.get(x, x) for x in d.dims)
        grad = plan.backward and d.grad
        inputs[d.name] = _input_tensor(d, shape, gen, plan, layouts.get(d.name, "contiguous"), grad)
        if grad:
            grad_tables.append(d.name)
    used = {p.name for p in draft.used_params}
    params = {k: v for k, v in plan.overrides if k in used}
    for name, form in plan.param_forms:
        if name in used:
            params[name] = _param_form(params.get(name, next(p.default for p in draft.params if p.name == name)), form)
    positions = dict(q_offset=plan.q_offset, k_offset=plan.k_offset,
                     n_q=None if plan.n_q_extra is None else plan.q_offset + plan.Nq + plan.n_q_extra,
                     n_k=None if plan.n_k_extra is None else plan.k_offset + plan.Nk + plan.n_k_extra)
    g = torch.randn(plan.B, plan.Hq, plan.Nq, plan.Dv, generator=gen, dtype=torch.float64)
    packed = {} if plan.varlen is None else _packed_keywords(plan.varlen)
    return Arguments(q, k, v, positions, params, inputs, tuple(grad_tables), g, packed)


def _param_form(value, form: str):
    """A param's value as a numpy scalar or a 0-d / one-element tensor (read on the host)."""
    import numpy as np

    if form == "numpy":
        return np.int64(value) if isinstance(value, int) else np.float64(value)
    return torch.tensor(value) if form == "tensor0" else torch.tensor([value])


def _cumulative(lens) -> list:
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return out


def _packed_keywords(vp: VarlenPlan) -> Dict[str, object]:
    """cu_seqlens_q/k (and max_seqlen_q/k when passed) of a packed call; a strided cu_seqlens is
    every other element of a wider tensor whose other elements are wrong values."""
    out = {}
    for side, lens, given in (("q", vp.lens_q, vp.max_q), ("k", vp.lens_k, vp.max_k)):
        cu = torch.tensor(_cumulative(lens), dtype=_DT[vp.cu_dtype])
        if vp.cu_layout == "strided":
            cu = torch.stack([cu, cu * 3 + 7], 1)[:, 0]
        out[f"cu_seqlens_{side}"] = cu
        if given is not None:
            out[f"max_seqlen_{side}"] = given
    return out


# ---------------------------------------------------------------------------------------------
# building and comparing
# ---------------------------------------------------------------------------------------------

_BUILT: Dict[str, object] = {}  # spec text -> (pattern, module), or the exception its build raised
_BUILD_DIR: Optional[tempfile.TemporaryDirectory] = None


def build_spec(text: str):
    """(pattern, module) of a spec text, built once per text in this process."""
    global _BUILD_DIR
    if text not in _BUILT:
        if _BUILD_DIR is None:
            _BUILD_DIR = tempfile.TemporaryDirectory(prefix="attncc_fuzz_")
        name = "fz_" + hashlib.sha256(text.encode()).hexdigest()[:12]
        try:
            _BUILT[text] = build_inline({name: text}, Path(_BUILD_DIR.name), prefix="_attncc_fuzz")[name]
        except Exception as e:  # noqa: BLE001 - a spec the generator drew that does not build is a finding
            _BUILT[text] = e
    return _BUILT[text]


@dataclass(frozen=True)
class Failure:
    """What went wrong in one case, with everything needed to run it again."""

    kind: str  # "build", "raise" (the kernel's call), "reference" (it raised), "mismatch", "nan"
    what: str  # "o", "lse", "dq", "grad x", ...
    error: float
    detail: str
    draft: Draft
    plan: CallPlan
    seed: Optional[int] = None

    @property
    def tags(self) -> FrozenSet[str]:
        return call_tags(self.draft, self.plan)

    @property
    def signature(self) -> Tuple[str, str, str]:
        """What a smaller case must still show to count as the same failure."""
        what = self.what if self.what in ("o", "lse", "reference", "spec") else self.what.split(" ")[0]
        message = ""
        if self.kind in ("raise", "reference", "build"):  # the exception and its words, not its numbers
            message = re.sub(r"fz_[0-9a-f]+|\d+", "", self.detail)[:50]
        return self.kind, what, message

    @property
    def suspects(self) -> Tuple[str, ...]:
        return tuple(sorted(self.tags & set(BUG_TAGS)))

    def __str__(self) -> str:
        head = f"seed {self.seed}: " if self.seed is not None else ""
        known = ", ".join(f"{t} ({'issue 15' if t in KNOWN_BUG_TAGS else 'found here'})" for t in self.suspects)
        known = known or "NEW (no known-bug feature)"
        return (f"{head}{self.kind} in {self.what}: error {self.error:.3g} ({self.detail})\n"
                f"  suspects: {known}\n  call: {self.plan.describe()}\n"
                + "".join(f"  | {line}\n" for line in self.draft.text.splitlines()))


# tolerances: ||x - ref|| / ||ref|| for o (REL_TOL of the dtype), gradients, and lse's absolute error
GRAD_TOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}
TABLE_GRAD_TOL = {torch.float32: 1e-3, torch.float64: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}
LSE_TOL = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}


def _rel(x: torch.Tensor, ref: torch.Tensor, terms: Optional[int] = None, floor: float = 1e-3) -> float:
    """||x - ref|| / ||ref||, the norm of ref floored at ``floor * sqrt(terms)`` (default: its size):
    a gradient that is zero in exact arithmetic (one key per row, a bias constant along the row) is
    rounding noise in a kernel, a sum of ``terms`` roundings, and must not count as a 100% error."""
    x, ref = x.detach().double(), ref.detach().double()
    terms = ref.numel() if terms is None else terms
    return float((x - ref).norm() / max(float(ref.norm()), floor * math.sqrt(max(terms, 1))))


Reference = Callable[..., object]


def run_case(draft: Draft, plan: CallPlan, reference: Optional[Reference] = None) -> Optional[Failure]:
    """Build, call and compare one case; None when the kernel agrees with the reference."""
    reference = reference or attncc.reference
    fail = lambda kind, what, err, detail: Failure(kind, what, err, detail, draft, plan)  # noqa: E731
    if F32_SCORE in call_tags(draft, plan):
        return None  # nothing a float32 score can be compared on (F32_SCORE)
    built = build_spec(draft.text)
    if isinstance(built, Exception):
        if isinstance(built, SpecError) and "allows no pair" in str(built):
            return None  # contract v0 refuses a mask that is never true; nothing to compare
        return fail("build", "spec", math.inf, f"{type(built).__name__}: {str(built)[:300]}")
    pattern, mod = built
    with _tile_config(plan.tiles), _split_config(plan.splits), _environment(dict(plan.environment)):
        return _run_built(pattern, mod, draft, plan, reference, fail)


@contextlib.contextmanager
def _environment(values: dict):
    """These environment variables set for the block, each restored (or removed) after it."""
    saved = {n: os.environ.get(n) for n in values}
    try:
        os.environ.update(values)
        yield
    finally:
        for n, value in saved.items():
            if value is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = value


def _split_config(on: bool):
    """The residue-class and column splits (attncc.runtime.residue) forced on at any size."""
    return _environment({n: "1" for n in ("ATTNCC_RESIDUE_MIN_ROWS", "ATTNCC_COLUMN_MIN_ROWS")} if on else {})


def _number_form(value, form: str):
    """An offset, n_q, n_k or scale= as a numpy scalar or a tensor (extend2_call's number_forms)."""
    import numpy as np

    return {"np_int32": lambda: np.int32(value), "np_int64": lambda: np.int64(value),
            "tensor0": lambda: torch.tensor(value), "tensor1": lambda: torch.tensor([value]),
            "tensor_int32": lambda: torch.tensor(value, dtype=torch.int32),
            "np_float32": lambda: np.float32(value), "np_float64": lambda: np.float64(value)}[form]()


def _dropout_call(mod, plan: CallPlan, q, k, v, q_offset=0, k_offset=0):
    """(the call's dropout keywords, the reference's: keep_mask and dropout_p, or none when no pair
    is dropped) of a plan with dropout; ({}, {}) without."""
    if plan.dropout is None:
        return {}, {}
    seed, p, training = plan.dropout
    kw = {"seed": seed, "training": training}
    if p is not None:
        kw["dropout_p"] = p
    effective = (p if p is not None else mod.SPEC.dropout) if training else 0.0
    if not effective:
        return kw, {}
    keep = mod.dropout_keep_mask(q, k, v, seed=seed, dropout_p=effective, q_offset=q_offset, k_offset=k_offset)
    return kw, {"keep_mask": keep, "dropout_p": effective}


def _tile_config(tiles):
    """Force the kernels' tile shapes through ATTNCC_CONFIG* (attncc.runtime.configs) for one case."""
    names = ("ATTNCC_CONFIG", "ATTNCC_CONFIG_DKDV", "ATTNCC_CONFIG_DQ")
    return _environment({} if tiles is None else {
        n: f"BLOCK_M={bm},BLOCK_N={bn},num_warps=4,num_stages=1" for n, (bm, bn) in zip(names, tiles)})


def _run_built(pattern, mod, draft: Draft, plan: CallPlan, reference: Reference, fail) -> Optional[Failure]:
    if plan.decode is not None:
        return _run_decode(pattern, mod, draft, plan, reference, fail)
    if plan.varlen is not None:
        return _run_packed(pattern, mod, draft, plan, reference, fail)
    a = call_arguments(draft, plan)
    kw = dict(**a.positions, **a.params, **a.inputs)
    if plan.scale is not None:
        kw["scale"] = plan.scale
    for key, form in plan.number_forms:
        if kw.get(key) is not None:
            kw[key] = _number_form(kw[key], form)
    try:
        drop_kw, drop_ref = _dropout_call(mod, plan, a.q, a.k, a.v, plan.q_offset, plan.k_offset)
        kw.update(drop_kw)
        if (plan.backward and not lse_in_loss(plan)) or plan.no_lse:
            o, lse = mod.attention(a.q, a.k, a.v, **kw), None
        else:
            o, lse = mod.attention(a.q, a.k, a.v, return_lse=True, **kw)
    except (ValueError, TypeError) as e:
        if _refuses_wide_ints(draft, plan, e) or _refused_alike(pattern, a, plan, reference, e):
            return None
        return fail("raise", "attention()", math.inf, f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 - every crash is a finding
        return fail("raise", "attention()", math.inf, f"{type(e).__name__}: {str(e)[:300]}")

    ref_in = [t.detach().to(torch.float64).requires_grad_(plan.backward) for t in (a.q, a.k, a.v)]
    ref_inputs = {n: (t.detach().double().requires_grad_() if n in a.grad_tables else t) for n, t in a.inputs.items()}
    try:
        extra = {} if plan.scale is None else {"scale": plan.scale}
        ref, ref_lse = reference(pattern, *ref_in, return_lse=True, **a.positions, **a.params, **ref_inputs, **extra,
                                 **drop_ref)
    except Exception as e:  # noqa: BLE001 - the generator only draws what the contract allows
        return fail("reference", "reference()", math.inf, f"{type(e).__name__}: {str(e)[:300]}")
    dt = _DT[plan.dtype]
    if tuple(o.shape) != tuple(ref.shape) or o.dtype != dt:
        return fail("mismatch", "o", math.inf, f"shape/dtype {tuple(o.shape)} {o.dtype}, expected {tuple(ref.shape)} {dt}")
    if plan.nan:
        return _check_nan(pattern, plan, a, o, ref, ref_lse, fail)
    failure = _compare_forward(o, lse, ref, ref_lse, dt, fail)
    if failure is None and plan.backward:
        return _check_backward(plan, a, o, ref, ref_in, ref_inputs, fail, lse, ref_lse)
    return failure


def _refused_alike(pattern, a: Arguments, plan: CallPlan, reference: Reference, error: Exception) -> bool:
    """Whether the reference refuses the call too, for the same reason: a divisor of params and
    sizes that is 0 at this call (a ValueError saying "division by zero" from both; their words
    differ: the module's names the expression as written and the values)."""
    extra = {} if plan.scale is None else {"scale": plan.scale}
    reason = "division by zero: the divisor of"
    if not (isinstance(error, ValueError) and reason in str(error)):
        return False
    try:
        reference(pattern, *(t.detach().double() for t in (a.q, a.k, a.v)), **a.positions, **a.params, **a.inputs, **extra)
    except ValueError as e:
        return reason in str(e)
    return False


def refuses_varlen(pattern) -> bool:
    """Whether the contract has ``pattern`` refuse cu_seqlens: its mask reads [inputs] (tiles
    classified from the inputs per call) or draws random_blocks() (blocks that depend on n_k)."""
    from attncc.analysis import analyze
    from attncc.spec.builtins import RandomBlocks

    return analyze(pattern).dynamic or (pattern.mask is not None and bool(pattern.mask.atoms(RandomBlocks)))


def _run_packed(pattern, mod, draft: Draft, plan: CallPlan, reference: Reference, fail) -> Optional[Failure]:
    """A packed call against the reference run per sequence (positions from 0, the sequence's own
    lengths, batch row s of the "b" inputs as ``b``), concatenated, unused packed rows o = 0 and
    lse = -inf; or, for a pattern that refuses cu_seqlens, a clear error naming them."""
    a = call_arguments(draft, plan)
    kw = dict(**a.packed, **a.params, **a.inputs)
    extra = {} if plan.scale is None else {"scale": plan.scale}
    refuse = refuses_varlen(pattern)
    try:
        vp = plan.varlen  # dropout: the padded batch's keep mask, sequence s reading row s (docs: Dropout)
        pad = lambda t, rows: t.new_zeros(len(vp.lens_q), t.shape[1], max(rows), t.shape[3])  # noqa: E731
        drop_kw, drop_ref = _dropout_call(mod, plan, pad(a.q, vp.lens_q + (1,)), pad(a.k, vp.lens_k + (1,)),
                                          pad(a.v, vp.lens_k + (1,)))
        kw.update(drop_kw)
        if (plan.backward and not lse_in_loss(plan)) or plan.no_lse:
            o, lse = mod.attention(a.q, a.k, a.v, **kw, **extra), None
        else:
            o, lse = mod.attention(a.q, a.k, a.v, return_lse=True, **kw, **extra)
    except (ValueError, TypeError, NotImplementedError) as e:
        if refuse and "cu_seqlens" in str(e):
            return None  # the contract's refusal, with words that say why
        if _refuses_wide_ints(draft, plan, e):
            return None
        if isinstance(e, ValueError) and "division by zero: the divisor of" in str(e):
            try:  # a divisor of params and a sequence's n_q / n_k that is 0: the reference must refuse too
                packed_reference(pattern, plan.varlen, *(t.detach().double() for t in (a.q, a.k, a.v)),
                                 reference=reference, **a.params, **a.inputs, **extra)
            except ValueError as r:
                if "division by zero: the divisor of" in str(r):
                    return None
        return fail("raise", "attention()", math.inf, f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 - every crash is a finding
        return fail("raise", "attention()", math.inf, f"{type(e).__name__}: {str(e)[:300]}")
    if refuse:
        return fail("accept", "attention()", math.inf, "a mask reading [inputs] or random_blocks() took cu_seqlens "
                                                       "(the contract refuses them)")
    ref_in = [t.detach().to(torch.float64).requires_grad_(plan.backward) for t in (a.q, a.k, a.v)]
    ref_inputs = {n: (t.detach().double().requires_grad_() if n in a.grad_tables else t) for n, t in a.inputs.items()}
    try:
        ref, ref_lse = packed_reference(pattern, plan.varlen, *ref_in, reference=reference,
                                        **a.params, **ref_inputs, **extra, **drop_ref)
    except Exception as e:  # noqa: BLE001
        return fail("reference", "reference()", math.inf, f"{type(e).__name__}: {str(e)[:300]}")
    dt = _DT[plan.dtype]
    if tuple(o.shape) != tuple(ref.shape) or o.dtype != dt:
        return fail("mismatch", "o", math.inf, f"shape/dtype {tuple(o.shape)} {o.dtype}, expected {tuple(ref.shape)} {dt}")
    failure = _compare_forward(o, lse, ref, ref_lse, dt, fail)
    if failure is None and plan.backward:
        return _check_backward(plan, a, o, ref, ref_in, ref_inputs, fail, lse, ref_lse)
    return failure


def packed_reference(pattern, vp: VarlenPlan, q, k, v, *, reference: Reference, **kw):
    """(o, lse) of a packed call from the reference, one call per sequence: sequence s is batch row
    s of a call whose q, k, v are that sequence's rows repeated over S batch rows (so ``b`` = s
    and the "b" inputs are passed whole), at positions from 0; differentiable in q, k, v and kw."""
    S = len(vp.lens_q)
    cq, ck = _cumulative(vp.lens_q), _cumulative(vp.lens_k)
    Hq, Dv = q.shape[1], v.shape[-1]
    outs, lses = [], []
    for s in range(S):
        nq, nk = vp.lens_q[s], vp.lens_k[s]
        if nq == 0:
            continue
        if nk == 0:  # no keys: o = 0, lse = -inf
            outs.append(q.new_zeros(1, Hq, nq, Dv))
            lses.append(q.new_full((1, Hq, nq), -math.inf))
            continue
        qs, ks, vs = (t[:, :, c[s]:c[s + 1]].expand(S, -1, -1, -1) for t, c in ((q, cq), (k, ck), (v, ck)))
        keep = {} if kw.get("keep_mask") is None else {"keep_mask": kw["keep_mask"][:, :, :nq, :nk]}
        o, lse = reference(pattern, qs, ks, vs, return_lse=True, **{**kw, **keep})
        outs.append(o[s:s + 1])
        lses.append(lse[s:s + 1])
    pad_q = q.shape[2] - cq[-1]
    outs.append(q.new_zeros(1, Hq, pad_q, Dv))
    lses.append(q.new_full((1, Hq, pad_q), -math.inf))
    return torch.cat(outs, 2), torch.cat(lses, 2)


def _refuses_wide_ints(draft: Draft, plan: CallPlan, error: Exception) -> bool:
    """An error naming an input declared narrower than int64 that got int64 values past 2**31:
    refusing them is as good as computing with them (narrowing them silently is the bug)."""
    narrow = [d.name for d in draft.used_inputs if _is_int(d) and d.dtype not in ("int64", "bool")]
    return plan.int64_values and any(re.search(rf"\b{n}\b", str(error)) for n in narrow)


def _compare_forward(o, lse, ref, ref_lse, dt, fail) -> Optional[Failure]:
    """o against the reference (rows without keys exactly 0), and lse when there is one."""
    if not torch.isfinite(o).all():
        return fail("nan", "o", math.inf, f"{int((~torch.isfinite(o)).sum())} non-finite values")
    empty = ~torch.isfinite(ref_lse)
    if (o.detach()[empty] != 0).any():
        return fail("mismatch", "o", float(o.detach()[empty].abs().max()), "rows without keys are not 0")
    err = _rel(o, ref)
    worst = float((o.detach().double() - ref.detach()).abs().max()) if o.numel() else 0.0
    if err > REL_TOL[dt] or worst > 50 * REL_TOL[dt]:
        return fail("mismatch", "o", err, f"rel {err:.3g}, max abs {worst:.3g}, {_where_worst(o, ref)}")
    if lse is not None:
        if lse.dtype != torch.float32 or tuple(lse.shape) != tuple(ref_lse.shape):
            return fail("mismatch", "lse", math.inf, f"lse shape/dtype {tuple(lse.shape)} {lse.dtype}")
        if not torch.equal(torch.isfinite(lse), ~empty):
            return fail("mismatch", "lse", math.inf, f"rows without keys: kernel {int((~torch.isfinite(lse)).sum())}, "
                                                      f"reference {int(empty.sum())}")
        if (lse[empty] != -math.inf).any():
            return fail("mismatch", "lse", math.inf, "lse of rows without keys is not -inf")
        diff = (lse[~empty].double() - ref_lse[~empty]).abs()
        bound = LSE_TOL[dt] + 1e-5 * ref_lse[~empty].abs()
        if diff.numel() and (diff > bound).any():
            return fail("mismatch", "lse", float(diff.max()), "lse differs")
    return None


def _where_worst(o, ref) -> str:
    if not o.numel():
        return ""
    idx = torch.nonzero((o.detach().double() - ref.detach()).abs() == (o.detach().double() - ref.detach()).abs().max())[0]
    return f"worst at [b, h, row] = {idx[:3].tolist()}"


def _decode_cache(plan: CallPlan, k: torch.Tensor, v: torch.Tensor):
    """(k_cache, v_cache, kv_len, block_table) holding the logical k, v [B, Hkv, capacity, D] of a
    decode plan: as they are, or scattered over shuffled pages; kv_len and block_table as views
    (strided: every other element of a wider tensor whose other elements are wrong values)."""
    dp = plan.decode
    gen = torch.Generator().manual_seed(plan.seed + 1)
    lens = torch.tensor(dp.kv_lens, dtype=torch.int64 if dp.kv_len_form == "int64" else torch.int32)
    if dp.kv_len_layout == "strided":
        wide = torch.stack([lens, torch.randint(0, dp.capacity + 1, (plan.B,), generator=gen, dtype=lens.dtype)], 1)
        lens = wide[:, 0]
    if dp.kv_len_form == "list":
        lens = [int(x) for x in lens]
    if not dp.page_size:
        return k, v, lens, None
    pages = -(-dp.capacity // dp.page_size)
    num_pages = plan.B * pages + 1  # one page no row uses
    table = torch.randperm(num_pages, generator=gen)[:plan.B * pages].view(plan.B, pages).to(torch.int32)
    caches = []
    for x in (k, v):
        cache = torch.randn(num_pages, dp.page_size, plan.Hkv, x.shape[-1], generator=gen).to(x.dtype)
        padded = torch.zeros(plan.B, plan.Hkv, pages * dp.page_size, x.shape[-1], dtype=x.dtype)
        padded[:, :, :dp.capacity] = x
        for b in range(plan.B):
            for p in range(pages):
                cache[int(table[b, p])] = padded[b, :, p * dp.page_size:(p + 1) * dp.page_size].transpose(0, 1)
        caches.append(cache)
    if dp.table_layout == "strided":
        wide = torch.stack([table, torch.randint(0, num_pages, table.shape, generator=gen, dtype=torch.int32)], 2)
        table = wide.view(plan.B, 2 * pages)[:, ::2]
    if dp.table_form == "int64_wide":  # columns past a row's pages are not read (the docs): wrong values there
        table = table.to(torch.int64).clone()
        for row, n in enumerate(dp.kv_lens):
            table[row, -(-max(n, 0) // dp.page_size):] = 10**6
    return caches[0], caches[1], lens, table


def _run_decode(pattern, mod, draft: Draft, plan: CallPlan, reference: Reference, fail) -> Optional[Failure]:
    """decode() against the reference row by row: batch row b is attention() on its first
    kv_lens[b] cached positions with the queries at the end (q_offset = kv_lens[b] - Nq)."""
    a = call_arguments(draft, plan)
    k = a.k
    if pattern.rope is not None:  # decode() reads keys rotated at their positions, as attention() makes them
        from attncc._reference import rotary

        rope = pattern.rope
        k = rotary(k.double(), torch.arange(plan.Nk), rope.theta, rope.style, rope.rotary_dim or plan.D).to(k.dtype)
    kc, vc, kv_len, table = _decode_cache(plan, k, a.v)
    extra = {} if plan.scale is None else {"scale": plan.scale}
    try:
        with torch.no_grad():
            o, lse = mod.decode(a.q, kc, vc, kv_len=kv_len, block_table=table, return_lse=True,
                                **a.params, **a.inputs, **extra)
    except (ValueError, TypeError) as e:
        if _refuses_wide_ints(draft, plan, e) or _refused_alike(pattern, a, plan, reference, e):
            return None  # (a divisor of params that is 0: the reference refuses it too)
        return fail("raise", "decode()", math.inf, f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001
        return fail("raise", "decode()", math.inf, f"{type(e).__name__}: {str(e)[:300]}")
    refs, ref_lses = [], []
    try:
        for b, n in enumerate(plan.decode.kv_lens):
            # query rows at negative positions (kv_len < Nq; extend_call) see no key: o = 0, lse = -inf
            neg = min(plan.Nq, max(0, plan.Nq - n))
            r = a.q.new_zeros(plan.B, plan.Hq, neg, plan.Dv, dtype=torch.float64)
            r_lse = a.q.new_full((plan.B, plan.Hq, neg), -math.inf, dtype=torch.float64)
            if neg < plan.Nq:
                rest, rest_lse = reference(pattern, a.q[:, :, neg:].double(), a.k[:, :, :n].double(), a.v[:, :, :n].double(),
                                           return_lse=True, q_offset=n - plan.Nq + neg, **a.params, **a.inputs, **extra)
                r, r_lse = torch.cat([r, rest], 2), torch.cat([r_lse, rest_lse], 2)
            refs.append(r[b])
            ref_lses.append(r_lse[b])
    except Exception as e:  # noqa: BLE001
        return fail("reference", "reference()", math.inf, f"{type(e).__name__}: {str(e)[:300]}")
    ref, ref_lse = torch.stack(refs), torch.stack(ref_lses)
    dt = _DT[plan.dtype]
    if tuple(o.shape) != tuple(ref.shape) or o.dtype != dt:
        return fail("mismatch", "o", math.inf, f"shape/dtype {tuple(o.shape)} {o.dtype}, expected {tuple(ref.shape)} {dt}")
    return _compare_forward(o, lse, ref, ref_lse, dt, fail)


def lse_in_loss(plan: CallPlan) -> bool:
    """Whether a backward case's loss reads the LSE too (its gradient enters every score's through
    delta): half of them, by the tensor seed, so that the cases the seeds drew before stay the same."""
    return plan.backward and plan.seed % 2 == 1


def _lse_term(lse):
    """The LSE's part of the loss: its finite rows weighted from -1 to 1 along the rows (rows without
    an allowed key are -inf in both; they have no score to pass a gradient to)."""
    w = torch.linspace(-1.0, 1.0, lse.shape[-1], dtype=lse.dtype)
    return (torch.where(torch.isfinite(lse), lse, 0.0) * w).sum()


def _check_backward(plan, a: Arguments, o, ref, ref_in, ref_inputs, fail, lse=None, ref_lse=None) -> Optional[Failure]:
    tables = [a.inputs[n] for n in a.grad_tables]
    g = a.g.to(o.dtype)
    try:
        loss = (o * g).sum() + (_lse_term(lse) if lse is not None else 0.0)
        grads = torch.autograd.grad(loss, [a.q, a.k, a.v, *tables], allow_unused=True)
    except Exception as e:  # noqa: BLE001
        return fail("raise", "backward", math.inf, f"{type(e).__name__}: {str(e)[:300]}")
    ref_tables = [ref_inputs[n] for n in a.grad_tables]
    if ref.requires_grad:
        ref_loss = (ref * a.g).sum() + (_lse_term(ref_lse) if lse is not None else 0.0)
        ref_grads = torch.autograd.grad(ref_loss, [*ref_in, *ref_tables], allow_unused=True)
    else:  # a packed call without a query that has keys: o is zeros, made without q, k, v
        ref_grads = (None,) * (3 + len(ref_tables))
    labels = ["dq", "dk", "dv"] + [f"grad {n}" for n in a.grad_tables]
    targets = [a.q, a.k, a.v, *tables]
    for label, x, r, t in zip(labels, grads, ref_grads, targets):
        r = torch.zeros_like(t, dtype=torch.float64) if r is None else r
        x = torch.zeros_like(t) if x is None else x
        if x.shape != t.shape or x.dtype != t.dtype:
            return fail("mismatch", label, math.inf, f"shape/dtype {tuple(x.shape)} {x.dtype}, expected {tuple(t.shape)} {t.dtype}")
        if not torch.isfinite(x).all():
            return fail("nan", label, math.inf, f"{int((~torch.isfinite(x)).sum())} non-finite values")
        tol = GRAD_TOL[_DT[plan.dtype]]  # a table's gradient is no more precise than the scores
        if label not in ("dq", "dk", "dv"):
            tol = max(tol, TABLE_GRAD_TOL[t.dtype])
        # an entry sums products over keys (dq), over the rows of every head that shares it (dk, dv)
        # or over up to every (b, h, i, j) pair (a table): a gradient that is zero in exact arithmetic
        # (one key per row: dS = p (dP - delta) = 0) is a sum of that many roundings (fuzz seed 120540)
        per_entry = {"dq": plan.Nk, "dk": plan.Hq // plan.Hkv * plan.Nq, "dv": plan.Hq // plan.Hkv * plan.Nq}
        if plan.kv_batch1:  # (and over q's batch rows)
            per_entry = {k: n * (plan.B if k != "dq" else 1) for k, n in per_entry.items()}
        # (a table: also each dP is a sum over the head dim, and delta comes from the rounded o: a
        # query-only term's gradient, zero in exact arithmetic, is that rounding; fuzz seed 200061)
        # (and a table multiplied by a distance, x[h] * (j - i), scales each rounding by |j - i|: with one
        # key per row its exact gradient is 0 and the kernel's is ~3e-5 at 27 rows; fuzz seed 110044)
        terms = (t.numel() * per_entry[label] if label in per_entry
                 else plan.B * plan.Hq * plan.Nq * plan.Nk * plan.D * _distance_rms(plan) ** 2)
        err = _rel(x, r, terms, floor=1e-3 if plan.dtype == "float32" else 1e-2)
        if err > tol:
            return fail("mismatch", label, err, f"rel {err:.3g} (tol {tol})")
    return None


def _distance_rms(plan) -> float:
    """The root mean square of ``j - i`` over the call's pairs, at least 1 and at most ``Nq + Nk``
    (a chunk far from its keys does not loosen a table gradient's tolerance past its lengths')."""
    mean = (plan.k_offset - plan.q_offset) + (plan.Nk - plan.Nq) / 2
    var = max(plan.Nk ** 2 - 1, 0) / 12 + max(plan.Nq ** 2 - 1, 0) / 12  # (a side of 0 rows: extend_call)
    return max(1.0, min(math.sqrt(mean * mean + var), plan.Nq + plan.Nk))


def _check_nan(pattern, plan, a: Arguments, o, ref, ref_lse, fail) -> Optional[Failure]:
    """Contract v1: output rows that attend to a NaN are NaN, in the kernel and in the reference;
    rows that only share a tile with it may be NaN in the kernel; every other row is exact."""
    from attncc._reference import pair_mask

    allowed = pair_mask(pattern, q_rows=plan.Nq, k_rows=plan.Nk, q_offset=plan.q_offset, k_offset=plan.k_offset,
                        n_q=a.positions["n_q"], n_k=a.positions["n_k"], batch=plan.B, heads=plan.Hq,
                        inputs=a.inputs, params=a.params)
    group = plan.Hq // plan.Hkv
    if plan.nan == "q":
        bad_q = torch.isnan(a.q).any(-1)  # [B, Hq, Nq]
        must = bad_q & allowed.any(-1)
    else:
        bad_k = torch.isnan(a.k).any(-1).repeat_interleave(group, dim=1)  # [B, Hq, Nk]
        must = (allowed & bad_k[:, :, None, :]).any(-1)
    o_nan = torch.isnan(o.detach()).any(-1)
    ref_nan = torch.isnan(ref.detach()).any(-1)
    if (must & ~ref_nan).any():
        return fail("nan", "reference", math.inf, f"{int((must & ~ref_nan).sum())} rows attend to a NaN but the "
                                                  "reference is not NaN there (it must not hide a NaN)")
    if (must & ~o_nan).any():
        return fail("nan", "o", math.inf, f"{int((must & ~o_nan).sum())} rows attend to a NaN but are not NaN")
    # rows of a (batch row, kv head) that holds the NaN may be NaN too (they share tiles with it)
    src = torch.isnan(a.q).any(-1).any(-1) if plan.nan == "q" else \
        torch.isnan(a.k).any(-1).any(-1).repeat_interleave(group, dim=1)  # [B, Hq]
    exact = ~o_nan & ~ref_nan
    stray = o_nan & ~must & ~src[:, :, None]
    if stray.any():
        return fail("nan", "o", math.inf, f"{int(stray.sum())} NaN rows far from the NaN input")
    if exact.any():
        err = _rel(o.detach()[exact], ref.detach()[exact])
        if err > REL_TOL[_DT[plan.dtype]]:
            return fail("mismatch", "o", err, "rows without NaN differ")
    return None


# ---------------------------------------------------------------------------------------------
# one seed, shrinking, the command line
# ---------------------------------------------------------------------------------------------

def draw_case(seed: int, backward: Optional[bool] = None, avoid=frozenset(),
              varlen: Optional[bool] = None, extend: Optional[bool] = False,
              extend2: Optional[bool] = False, extend3: bool = False) -> Tuple[Draft, CallPlan]:
    """The spec and call of ``seed``; ``varlen``: None packs the call now and then (VARLEN_RATE
    of the attention() calls), True always, False never (the cases seeds drew before varlen calls);
    ``extend``: the same for the constructs of :func:`extend_draft` and :func:`extend_call`
    (EXTEND_RATE; False, the default here: the cases seeds drew before them)."""
    rng = random.Random(seed)
    _, draft = random_spec(rng, avoid)
    plan = random_call(rng, draft, backward=backward, avoid=avoid)
    if plan.decode is None and varlen is not False and "varlen" not in avoid:
        vrng = varlen_rng(seed)  # its own stream: the draws above are those of seeds before varlen
        # a spec whose mask (or mod) reads [inputs] or random_blocks() must refuse cu_seqlens: checked
        # now and then (draws of such specs are mostly packed calls of specs that take them)
        if varlen or vrng.random() < (VARLEN_RATE if varlen_allowed(draft) else VARLEN_REFUSAL_RATE):
            plan = random_varlen(vrng, plan)
    if extend is not False:
        erng = extend_rng(seed)  # its own stream again: every draw above stays as it was
        if extend or erng.random() < EXTEND_RATE:
            old, draft = draft, extend_draft(erng, draft, avoid)
            plan = extend_call(erng, old, draft, plan)
    if extend2 is not False:  # (extend2: the same for extend2_draft and extend2_call, EXTEND2_RATE)
        x2rng = extend2_rng(seed)  # and again: every draw above stays as it was
        if extend2 or x2rng.random() < EXTEND2_RATE:
            old, draft = draft, extend2_draft(x2rng, draft, avoid)
            plan = extend2_call(x2rng, old, draft, plan)
    if extend3:  # (extend3: extend3_draft and extend3_call always; draw_linear takes the other seeds)
        x3rng = extend3_rng(seed)
        x3rng.random()  # (draw_linear's coin)
        old, draft = draft, extend3_draft(x3rng, draft)
        plan = extend3_call(x3rng, old, draft, plan)
    return draft, plan


def check_case(seed: int, backward: Optional[bool] = None, *, avoid=frozenset(),
               reference: Optional[Reference] = None, varlen: Optional[bool] = None,
               extend: Optional[bool] = False, extend2: Optional[bool] = False,
               extend3: bool = False) -> Optional[Union[Failure, "LinearFailure"]]:
    """Draw the case of ``seed`` and run it: None, or the :class:`Failure` (``str()`` describes it).
    ``extend3``: a linear-attention case (:func:`draw_linear`) for half the seeds, the others'
    softmax cases extended by :func:`extend3_draft` and :func:`extend3_call`."""
    if extend3:
        lp = draw_linear(seed)
        if lp is not None:
            lf = run_linear_case(lp)
            return None if lf is None else replace(lf, seed=seed)
    draft, plan = draw_case(seed, backward, avoid, varlen, extend, extend2, extend3)
    failure = run_case(draft, plan, reference)
    return None if failure is None else replace(failure, seed=seed)


def _draft_reductions(d: Draft):
    """Smaller drafts, most promising first."""
    if d.mask is not None:
        yield replace(d, mask=None)
        if isinstance(d.mask, Node):
            for k in d.mask.kids:
                yield replace(d, mask=k)
            if len(d.mask.kids) > 2:
                for n in range(len(d.mask.kids)):
                    yield replace(d, mask=replace(d.mask, kids=d.mask.kids[:n] + d.mask.kids[n + 1:]))
            for n, k in enumerate(d.mask.kids):
                if isinstance(k, Node):
                    for kk in k.kids:
                        yield replace(d, mask=replace(d.mask, kids=d.mask.kids[:n] + (kk,) + d.mask.kids[n + 1:]))
    for n in range(len(d.bias)):
        yield replace(d, bias=d.bias[:n] + d.bias[n + 1:])
    if d.mod is not None:
        yield replace(d, mod=None)
    for fld in ("softcap", "scale", "rope", "heads_q", "heads_kv", "value_dim", "dropout"):
        if getattr(d, fld) is not None:
            yield replace(d, **{fld: None})
    if len(d.head_dims) > 1:
        yield replace(d, head_dims=d.head_dims[:1])
    if len(d.dtypes) > 1:
        yield replace(d, dtypes=("float32",))
    for n, x in enumerate(d.inputs):
        simpler = x.dtype not in ("float32", "int32", "bool") or x.grad
        if simpler:
            plain = replace(x, dtype="int32" if _is_int(x) and x.dtype != "bool" else
                            ("bool" if x.dtype == "bool" else "float32"), grad=False)
            yield replace(d, inputs=d.inputs[:n] + (plain,) + d.inputs[n + 1:])


def _plan_reductions(p: CallPlan):
    if p.backward:
        yield replace(p, backward=False)
    if p.varlen is not None:
        vp = p.varlen
        if len(vp.lens_q) == 1 and not (vp.pad_q or vp.pad_k):  # the same as a plain call: is packing the cause?
            yield replace(p, varlen=None)
        yield from (with_varlen(p, vp) for vp in _varlen_reductions(vp))
    if p.B > 1 and p.decode is None:
        yield replace(p, B=1)
    if p.Hq > 1:
        yield replace(p, Hq=1, Hkv=1)
        if p.Hkv < p.Hq:
            yield replace(p, Hq=p.Hkv)
    if p.Hkv > 1:
        yield replace(p, Hkv=1)
    if p.nan:
        yield replace(p, nan=None)
    if p.int64_values:
        yield replace(p, int64_values=False)
    if p.layouts != ("contiguous",) * 3:
        yield replace(p, layouts=("contiguous",) * 3)
    for n in range(len(p.input_layouts)):
        yield replace(p, input_layouts=p.input_layouts[:n] + p.input_layouts[n + 1:])
    for n in range(len(p.overrides)):
        yield replace(p, overrides=p.overrides[:n] + p.overrides[n + 1:])
    if p.tiles is not None:
        yield replace(p, tiles=None)
    for fld, plain in (("param_forms", ()), ("input_casts", ()), ("magnitude", 1.0), ("number_forms", ()),
                       ("kv_batch1", False), ("splits", False), ("no_lse", False), ("dropout", None)):
        if getattr(p, fld) != plain:
            yield replace(p, **{fld: plain})
    if p.decode is not None:
        dp = p.decode
        if dp.kv_len_layout != "contiguous" or dp.table_layout != "contiguous":
            yield replace(p, decode=replace(dp, kv_len_layout="contiguous", table_layout="contiguous"))
        if dp.kv_len_form != "tensor" or dp.table_form != "int32":
            yield replace(p, decode=replace(dp, kv_len_form="tensor", table_form="int32"))
        if dp.page_size:
            yield replace(p, decode=replace(dp, page_size=0, table_layout="contiguous", table_form="int32"))
        if p.B > 1:
            yield replace(p, B=1, decode=replace(dp, kv_lens=dp.kv_lens[:1]))
    if p.scale is not None:
        yield replace(p, scale=None)
    if p.n_q_extra is not None:
        yield replace(p, n_q_extra=None)
    if p.n_k_extra is not None:
        yield replace(p, n_k_extra=None)
    if p.dtype != "float32":
        yield replace(p, dtype="float32")
    if p.D != 16:
        yield replace(p, D=16, Dv=16 if p.Dv == p.D else p.Dv)
    if p.Dv != p.D:
        yield replace(p, Dv=p.D)
    # Offsets shrink together: a query far from its keys makes a relative bias large, and float32
    # scores of magnitude 1e5 are imprecise in any kernel (not the bug being shrunk).
    common = min(p.q_offset, p.k_offset)
    if common:
        yield replace(p, q_offset=p.q_offset - common, k_offset=p.k_offset - common)
        if common >= 2**20:
            yield replace(p, q_offset=p.q_offset - 2**20 * (common // 2**20), k_offset=p.k_offset - 2**20 * (common // 2**20))
    for fld in ("q_offset", "k_offset"):
        if 0 < getattr(p, fld) < 2**10:
            yield replace(p, **{fld: 0})
    if p.varlen is not None:
        lengths = ()  # a packed call's lengths are its sequences' (_varlen_reductions)
    elif p.decode is not None:
        lengths = ("Nq",)  # Nk is a decode cache's capacity
    else:
        lengths = ("Nq", "Nk")
    for fld in lengths:
        x = getattr(p, fld)
        if x > 1:
            yield replace(p, **{fld: max(1, x // 2)})
            yield replace(p, **{fld: x - 1})


def _varlen_reductions(vp: VarlenPlan):
    """Smaller packed calls: fewer sequences, shorter ones, no unused rows, computed max_seqlen,
    plain int32 cu_seqlens."""
    S = len(vp.lens_q)
    for s in range(S) if S > 1 else ():
        yield replace(vp, lens_q=vp.lens_q[:s] + vp.lens_q[s + 1:], lens_k=vp.lens_k[:s] + vp.lens_k[s + 1:])
    if vp.pad_q or vp.pad_k:
        yield replace(vp, pad_q=0, pad_k=0)
    if vp.max_q is not None or vp.max_k is not None:
        yield replace(vp, max_q=None, max_k=None)
    if vp.cu_dtype != "int32" or vp.cu_layout != "contiguous":
        yield replace(vp, cu_dtype="int32", cu_layout="contiguous")
    for fld in ("lens_q", "lens_k"):
        lens = getattr(vp, fld)
        for s, n in enumerate(lens):
            for m in ((n // 2, n - 1) if n > 1 else ()):
                yield replace(vp, **{fld: lens[:s] + (m,) + lens[s + 1:]})


def _consistent(d: Draft, p: CallPlan) -> bool:
    """What the generator guarantees of a case: a call the spec accepts (a smaller case that is
    refused shows nothing about the failure being shrunk)."""
    vp = p.varlen
    packed = vp is None or (
        (p.Nq, p.Nk) == vp.totals  # a max_seqlen that shrinking made too small would be refused
        and all(m is None or m >= max(lens) for m, lens in ((vp.max_q, vp.lens_q), (vp.max_k, vp.lens_k))))
    return (1 <= p.D <= 256 and p.Hq % p.Hkv == 0 and d.heads_q in (None, p.Hq) and d.heads_kv in (None, p.Hkv)
            and d.value_dim in (None, p.Dv) and (d.rope is None or (d.rope[2] or p.D) <= p.D) and packed)


def _drop_unused(d: Draft) -> Draft:
    used = {x.name for x in d.used_params}, {x.name for x in d.used_inputs}
    return replace(d, params=tuple(x for x in d.params if x.name in used[0]),
                   inputs=tuple(x for x in d.inputs if x.name in used[1]))


def minimize(failure: Failure, reference: Optional[Reference] = None, budget_s: float = 120.0) -> Failure:
    """Shrink a failing case greedily while it keeps failing the same way (:attr:`Failure.signature`)."""
    best = failure
    deadline = time.monotonic() + budget_s
    progress = True
    while progress and time.monotonic() < deadline:
        progress = False
        candidates = [(d, best.plan) for d in _draft_reductions(best.draft)]
        candidates += [(best.draft, p) for p in _plan_reductions(best.plan)]
        for d, p in candidates:
            if time.monotonic() > deadline:
                break
            d = _drop_unused(d)
            if not _consistent(d, p):
                continue
            try:
                f = run_case(d, p, reference)
            except Exception:  # noqa: BLE001 - a reduction the reference refuses: not smaller
                continue
            if f is not None and f.signature == best.signature:
                best = replace(f, seed=failure.seed)
                progress = True
                break
    return best


def poison_empty() -> None:
    """Make torch.empty and torch.empty_like fill what they allocate (floats NaN, integers 113) for
    the rest of the process, so that a kernel reading memory it did not write fails every time
    (fuzz seed 40003's read past a table failed now and then, with the allocator's leftovers)."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(math.nan)
        elif t.dtype != torch.bool and not t.is_complex():
            t.fill_(113)
        return t

    torch.empty = lambda *a, **k: fill(empty(*a, **k))
    torch.empty_like = lambda *a, **k: fill(empty_like(*a, **k))


# ---------------------------------------------------------------------------------------------
# the third layer's softmax half (--extend3, extend3_rng): what neither layer above draws
# ---------------------------------------------------------------------------------------------

X3_VALUE_DIMS = (1, 3, 5, 24, 40, 64, 100)


def extend3_draft(rng: random.Random, draft: Draft) -> Draft:
    """``draft`` with a value dim other than the head dims (odd, wider, narrower) and more query
    heads fixed per key/value head (groups of 5 to 8: decode's programs cut a group in two)."""
    out = draft
    if out.value_dim is None and rng.random() < 0.3:
        out = replace(out, value_dim=rng.choice(X3_VALUE_DIMS))
    if out.heads_q is None and out.heads_kv is None and rng.random() < 0.25:
        hkv = rng.choice((1, 1, 2))
        out = replace(out, heads_q=hkv * rng.choice((5, 6, 7, 8)), heads_kv=hkv)
    return out


def extend3_call(rng: random.Random, old: Draft, draft: Draft, plan: CallPlan) -> CallPlan:
    """``plan`` for :func:`extend3_draft`'s ``draft``: its value dim and head counts (Dv drawn
    apart from D now and then without a spec value dim too), float params overridden by ints
    (Python, numpy and tensor ints), and calls of ``decode`` that the draws above never make:
    speculative rows (Nq up to 16) of large GQA groups against long caches (up to 300 rows), the
    splits of the key blocks (``ATTNCC_DECODE_SPLITS``) and the key tile (``ATTNCC_DECODE_CONFIG``)
    forced, pages of 16-48 rows, rows of kv_len 0, Nq - 1, Nq and the capacity."""
    out = plan
    if draft.heads_q is not None and old.heads_q is None:
        out = replace(out, Hq=draft.heads_q, Hkv=draft.heads_kv)
    if draft.value_dim is not None:
        out = replace(out, Dv=draft.value_dim)
    elif rng.random() < 0.25:
        out = replace(out, Dv=rng.choice(X3_VALUE_DIMS))
    overrides = dict(out.overrides)
    forms = dict(out.param_forms)
    for p in draft.used_params:
        if isinstance(p.default, float) and rng.random() < 0.4:
            value = rng.choice((0, 1, 2, -1, 3))
            overrides[p.name] = value
            if rng.random() < 0.5:
                forms[p.name] = rng.choice(("numpy", "tensor0", "tensor1"))
    out = replace(out, overrides=tuple(overrides.items()), param_forms=tuple(forms.items()))
    decode_ok = (not out.backward and out.nan is None and out.varlen is None and out.dropout is None
                 and "random_blocks" not in draft.tags and "random_blocks" not in " ".join(draft.expressions().values()))
    if decode_ok and rng.random() < 0.4:
        Nq = rng.choice((1, 4, 8, 9, 15, 16))
        page_size = rng.choice((0, 0, 16, 17, 32, 48))
        capacity = rng.randint(Nq, 300)
        if page_size:
            capacity = -(-capacity // page_size) * page_size
        B = rng.choice((1, 2, 3))
        lens = tuple(rng.choice((0, max(Nq - 1, 0), Nq, capacity, rng.randint(Nq, capacity))) for _ in range(B))
        dp = DecodePlan(kv_lens=lens, capacity=capacity, page_size=page_size,
                        kv_len_form=rng.choice(("tensor", "list", "int64")))
        env = []
        if rng.random() < 0.5:
            env.append(("ATTNCC_DECODE_SPLITS", str(rng.choice((1, 2, 3, 7, 200)))))
        if rng.random() < 0.5:
            env.append(("ATTNCC_DECODE_CONFIG", f"BLOCK_N={rng.choice((16, 32, 64))}"))
        out = replace(out, decode=dp, Nq=Nq, Nk=capacity, B=B, q_offset=0, k_offset=0, n_q_extra=None,
                      n_k_extra=None, kv_batch1=False, splits=False, no_lse=False, number_forms=(),
                      tiles=None, environment=tuple(env))
    return out


# ---------------------------------------------------------------------------------------------
# a third layer (--extend3): linear attention, which no draw above makes (kind = "linear")
# ---------------------------------------------------------------------------------------------

# How often an --extend3 case is a linear-attention one (extend3_rng; the softmax draws otherwise).
LINEAR_RATE = 0.5
FEATURE_MAPS = ("elu+1", "relu", "identity", "performer", "cosformer", "taylor")
LINEAR_LAYOUTS = ("contiguous", "bnhd", "rows_step", "padded_d", "heads_step", "batch_broadcast", "d_strided",
                  "rows_expand", "n_first")
LINEAR_TOL = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def extend3_rng(seed: int) -> random.Random:
    return random.Random(seed * 104729 + 29)


@dataclass(frozen=True)
class LinearPlan:
    """A linear-attention spec and one way of calling it, as data.

    ``mode``: "whole" (one call), "state" (``return_state=True``, the state compared too), "init"
    (an ``initial_state`` drawn at random, with gradient), "chunks" (a first call's returned state
    into a second one at its offset: the keys split at ``cut``; causal specs split the queries there
    too), "step" (causal: ``step`` token by token from the state of the first ``cut`` rows)."""

    seed: int
    fmap: str = "elu+1"
    causal: bool = True
    normalize: bool = True
    features: Optional[int] = None  # performer
    spec_seed: Optional[int] = None  # performer [feature_map].seed
    call_seed: Optional[int] = None  # performer attention(seed=)
    head_dims: Tuple[int, ...] = (16,)
    value_dim: Optional[int] = None
    heads_q: Optional[int] = None
    heads_kv: Optional[int] = None
    B: int = 1
    Hq: int = 1
    Hkv: int = 1
    Nq: int = 16
    Nk: int = 16
    D: int = 16
    Dv: int = 16
    dtype: str = "float32"
    q_offset: int = 0
    k_offset: int = 0
    n_q_extra: Optional[int] = None
    n_k_extra: Optional[int] = None
    layouts: Tuple[str, str, str] = ("contiguous",) * 3
    kv_batch1: bool = False
    positive: bool = False  # q, k drawn positive (a normalizer of relu/identity features far from 0)
    magnitude: float = 1.0
    backward: bool = False
    mode: str = "whole"
    cut: int = 0

    @property
    def text(self) -> str:
        lines = ['kind = "linear"', f"head_dim = {_toml_list(self.head_dims)}"]
        if self.value_dim is not None:
            lines.append(f"value_dim = {self.value_dim}")
        if self.heads_q is not None or self.heads_kv is not None:
            lines.append("[heads]")
            lines += [f"{k} = {v}" for k, v in (("q", self.heads_q), ("kv", self.heads_kv)) if v is not None]
        lines += ["[feature_map]", f'name = "{self.fmap}"', f"causal = {str(self.causal).lower()}",
                  f"normalize = {str(self.normalize).lower()}"]
        if self.features is not None:
            lines.append(f"features = {self.features}")
        if self.spec_seed is not None:
            lines.append(f"seed = {self.spec_seed}")
        return "\n".join(lines) + "\n"

    def describe(self) -> str:
        parts = [f"linear B={self.B} Hq={self.Hq} Hkv={self.Hkv} Nq={self.Nq} Nk={self.Nk} D={self.D} Dv={self.Dv}",
                 self.dtype, f"q_offset={self.q_offset} k_offset={self.k_offset}", f"mode={self.mode} cut={self.cut}"]
        if self.n_q_extra is not None:
            parts.append(f"n_q={self.q_offset + self.Nq + self.n_q_extra}")
        if self.n_k_extra is not None:
            parts.append(f"n_k={self.k_offset + self.Nk + self.n_k_extra}")
        if self.layouts != ("contiguous",) * 3:
            parts.append("q/k/v layouts " + "/".join(self.layouts))
        if self.kv_batch1:
            parts.append("k, v of batch 1")
        if self.positive:
            parts.append("q, k positive")
        if self.magnitude != 1.0:
            parts.append(f"q, k x{self.magnitude}")
        if self.call_seed is not None:
            parts.append(f"seed={self.call_seed}")
        parts.append(f"tensor seed {self.seed}" + (", backward" if self.backward else ""))
        return "; ".join(parts)


def random_linear(rng: random.Random) -> LinearPlan:
    """A random linear spec and call: every feature map, causal or not, normalized or not, fixed head
    counts, Dv != D, GQA/MQA, odd lengths, Nq != Nk and offsets (non-causal), n_q/n_k (cosFormer's
    period), non-contiguous and stride-0 q/k/v, k and v of batch 1, half precision, the state in and
    out (chunks carrying it, ``step``), the performer's seed in the spec and in the call, backward."""
    fmap = rng.choice(FEATURE_MAPS)
    causal = rng.random() < 0.6
    normalize = rng.random() < 0.7
    dims = (1, 2, 3, 5, 8, 16, 17, 24, 32, 40, 64)
    if fmap == "taylor":
        dims = tuple(d for d in dims if d <= 32)
    head_dims = tuple(sorted(set(rng.choice(dims) for _ in range(rng.choice((1, 1, 2))))))
    D = rng.choice(head_dims)
    value_dim = rng.choice((1, 3, 8, 16, 33)) if rng.random() < 0.3 else None
    Dv = value_dim or (rng.choice((1, 5, 16, 24)) if rng.random() < 0.15 else D)
    hq = rng.choice((1, 2, 3, 4, 6))
    hkv = rng.choice([d for d in (1, 2, 3, 4, 6) if hq % d == 0])
    heads_q = heads_kv = None
    if rng.random() < 0.3:
        heads_q, heads_kv = rng.choice(((hq, hkv), (hq, None), (None, hkv)))
    backward = rng.random() < 0.4
    if fmap in ("performer", "taylor"):
        dtype = "float32" if rng.random() < 0.8 else "bfloat16"
    else:
        dtype = "float32" if rng.random() < 0.75 else rng.choice(("bfloat16", "float16"))
    length = lambda: rng.choice((1, 2, 3, 7, 15, 16, 17, 33)) if rng.random() < 0.3 else rng.randint(1, 70)  # noqa: E731
    Nq = length()
    Nk = Nq if causal or rng.random() < 0.3 else length()
    off = lambda: 0 if rng.random() < 0.5 else rng.choice((rng.randint(1, 40), rng.randint(100, 5000)))  # noqa: E731
    q_offset = off()
    k_offset = q_offset if causal or rng.random() < 0.3 else off()
    n_q_extra = rng.randint(0, 30) if rng.random() < 0.3 else None
    n_k_extra = rng.randint(0, 30) if rng.random() < 0.3 else None
    layouts = tuple(rng.choice(LINEAR_LAYOUTS) if rng.random() < 0.35 else "contiguous" for _ in range(3))
    modes = ["whole", "whole", "state", "init", "chunks"] + (["step"] if causal else [])
    mode = rng.choice(modes)
    if mode == "step":
        backward = False
        Nq = Nk = max(Nq, 2)
    if mode == "chunks" and Nk < 2:
        Nk = 2 if not causal else Nk
        if causal:
            Nq = Nk = 2
    cut = rng.randint(1, Nk - 1) if mode in ("chunks", "step") else 0
    positive = normalize and fmap in ("relu", "identity", "cosformer") or (fmap == "identity" and rng.random() < 0.5)
    magnitude = rng.choice((0.5, 1.0)) if fmap in ("performer", "taylor") else rng.choice((1.0, 1.0, 3.0))
    return LinearPlan(
        seed=rng.randrange(2**31), fmap=fmap, causal=causal, normalize=normalize,
        features=rng.choice((1, 7, 16, 64)) if fmap == "performer" and rng.random() < 0.7 else None,
        spec_seed=rng.randrange(1000) if fmap == "performer" and rng.random() < 0.5 else None,
        call_seed=rng.choice((0, 5, 2**40)) if fmap == "performer" and rng.random() < 0.3 else None,
        head_dims=head_dims, value_dim=value_dim, heads_q=heads_q, heads_kv=heads_kv,
        B=rng.choice((1, 2, 3)), Hq=hq, Hkv=hkv, Nq=Nq, Nk=Nk, D=D, Dv=Dv, dtype=dtype,
        q_offset=q_offset, k_offset=k_offset, n_q_extra=n_q_extra, n_k_extra=n_k_extra, layouts=layouts,
        kv_batch1=rng.random() < 0.1, positive=positive, magnitude=magnitude, backward=backward, mode=mode, cut=cut)


@dataclass(frozen=True)
class LinearFailure:
    kind: str
    what: str
    error: float
    detail: str
    plan: LinearPlan
    seed: Optional[int] = None

    @property
    def signature(self):
        message = re.sub(r"fz_[0-9a-f]+|\d+", "", self.detail)[:50] if self.kind == "raise" else ""
        return self.kind, self.what.split(" ")[0], message

    def __str__(self) -> str:
        head = f"seed {self.seed}: " if self.seed is not None else ""
        return (f"{head}{self.kind} in {self.what}: error {self.error:.3g} ({self.detail})\n"
                f"  call: {self.plan.describe()}\n" + "".join(f"  | {line}\n" for line in self.plan.text.splitlines()))


def _linear_tensors(p: LinearPlan):
    gen = torch.Generator().manual_seed(p.seed)
    dt = _DT[p.dtype]
    Bk = 1 if p.kv_batch1 else p.B
    shapes = ((p.B, p.Hq, p.Nq, p.D), (Bk, p.Hkv, p.Nk, p.D), (Bk, p.Hkv, p.Nk, p.Dv))
    out = []
    for i, (shape, lay) in enumerate(zip(shapes, p.layouts)):
        view, leaf = _qkv(gen, shape, dt, lay, p.backward, p.magnitude if i < 2 else 1.0)
        if p.positive and i < 2:
            with torch.no_grad():
                leaf.abs_().add_(0.1)
        out.append(view)
    return out, gen


def _linear_grads(tensors, outputs, cotangents):
    live = [(o, g) for o, g in zip(outputs, cotangents) if o is not None]
    loss = sum((o.double() * g).sum() for o, g in live)
    want = [t for t in tensors if t.requires_grad]
    return torch.autograd.grad(loss, want, allow_unused=True)


def run_linear_case(p: LinearPlan) -> Optional[LinearFailure]:
    """Build, call and compare one linear case against ``attncc.reference``."""
    fail = lambda kind, what, err, detail: LinearFailure(kind, what, err, detail, p)  # noqa: E731
    built = build_spec(p.text)
    if isinstance(built, Exception):
        return fail("build", "spec", math.inf, f"{type(built).__name__}: {str(built)[:300]}")
    pattern, mod = built
    (q, k, v), gen = _linear_tensors(p)
    dt = _DT[p.dtype]
    tol = LINEAR_TOL[dt]
    pos = dict(q_offset=p.q_offset, k_offset=p.k_offset,
               n_q=None if p.n_q_extra is None else p.q_offset + p.Nq + p.n_q_extra,
               n_k=None if p.n_k_extra is None else p.k_offset + p.Nk + p.n_k_extra)
    extra = {} if p.call_seed is None else {"seed": p.call_seed}
    Fdim = None
    init = None
    if p.mode in ("init",):
        # F: the state's feature count, from a call that returns it
        with torch.no_grad():
            _, (S1, _) = mod.attention(q.detach()[:, :, :1], k.detach()[:, :, :1], v.detach()[:, :, :1],
                                       return_state=True, **extra)
        Fdim = S1.shape[2]
        s0 = torch.randn(p.B, p.Hkv, Fdim, p.Dv, generator=gen, dtype=torch.float32) * 0.3
        z0 = torch.rand(p.B, p.Hkv, Fdim, generator=gen, dtype=torch.float32) + 0.5
        if p.fmap in ("relu", "identity", "cosformer", "performer"):
            s0, z0 = s0.abs(), z0.abs()
        init = (s0.requires_grad_(p.backward), z0.requires_grad_(p.backward))
    ref_in = [t.detach().double().requires_grad_(p.backward) for t in (q, k, v)]
    ref_init = None if init is None else tuple(t.detach().double().requires_grad_(p.backward) for t in init)
    want_state = p.mode in ("state", "init", "chunks")
    try:
        kw = dict(pos, **extra)
        if init is not None:
            kw["initial_state"] = ref_init
        ref = attncc.reference(pattern, *ref_in, return_state=want_state, **kw)
    except Exception as e:  # noqa: BLE001
        return fail("reference", "reference", math.inf, f"{type(e).__name__}: {str(e)[:300]}")
    ref_o, ref_state = (ref if want_state else (ref, None))
    try:
        if p.mode in ("chunks", "step"):  # each part takes the whole call's n_q, n_k (cosFormer's M)
            kw = dict(kw, n_q=p.q_offset + p.Nq if kw["n_q"] is None else kw["n_q"],
                      n_k=p.k_offset + p.Nk if kw["n_k"] is None else kw["n_k"])
        if p.mode == "chunks":
            c = p.cut
            if p.causal:
                o1, st = mod.attention(q[:, :, :c], k[:, :, :c], v[:, :, :c], return_state=True, **kw)
                kw2 = dict(kw, q_offset=p.q_offset + c, k_offset=p.k_offset + c)
                o2, st2 = mod.attention(q[:, :, c:], k[:, :, c:], v[:, :, c:], initial_state=st, return_state=True, **kw2)
                o = torch.cat([o1, o2], dim=2)
            else:
                kw1 = dict(kw)
                _, st = mod.attention(q, k[:, :, :c], v[:, :, :c], return_state=True, **kw1)
                kw2 = dict(kw, k_offset=p.k_offset + c)
                o, st2 = mod.attention(q, k[:, :, c:], v[:, :, c:], initial_state=st, return_state=True, **kw2)
            state = st2
        elif p.mode == "step":
            c = p.cut
            with torch.no_grad():
                o1, st = mod.attention(q[:, :, :c], k[:, :, :c], v[:, :, :c], return_state=True, **kw)
                rows = [o1]
                n = max(p.q_offset + p.Nq + (p.n_q_extra or 0), p.k_offset + p.Nk + (p.n_k_extra or 0))
                skw = dict(extra, n=n) if pattern.feature_map.name == "cosformer" else dict(extra)
                for t in range(c, p.Nq):
                    ot, st = mod.step(q[:, :, t], k[:, :, t], v[:, :, t], st, position=p.q_offset + t, **skw)
                    rows.append(ot[:, :, None])
                o = torch.cat(rows, dim=2)
            state = None
        else:
            kw1 = dict(kw)
            if init is not None:
                kw1["initial_state"] = init
            out = mod.attention(q, k, v, return_state=want_state, **kw1)
            o, state = out if want_state else (out, None)
    except Exception as e:  # noqa: BLE001
        return fail("raise", "call", math.inf, f"{type(e).__name__}: {str(e)[:300]}")
    if o.shape != ref_o.shape or o.dtype != dt:
        return fail("mismatch", "o", math.inf, f"shape/dtype {tuple(o.shape)} {o.dtype}, want {tuple(ref_o.shape)} {dt}")
    err = _rel(o, ref_o)
    if not err <= tol:
        return fail("mismatch", "o", err, f"tolerance {tol}")
    if ref_state is not None and state is not None:
        for name, x, r in zip(("S", "z"), state, ref_state):
            if tuple(x.shape) != tuple(r.shape) or x.dtype != torch.float32:
                return fail("mismatch", f"state {name}", math.inf, f"{tuple(x.shape)} {x.dtype}, want {tuple(r.shape)} float32")
            e = _rel(x, r)
            if not e <= tol:
                return fail("mismatch", f"state {name}", e, f"tolerance {tol}")
    if not p.backward or p.mode == "step":
        return None
    g = torch.randn(ref_o.shape, generator=gen, dtype=torch.float64)
    cots = [g]
    if ref_state is not None and state is not None:
        cots += [torch.randn(r.shape, generator=gen, dtype=torch.float64) for r in ref_state]
    outs = [o] + (list(state) if ref_state is not None and state is not None else [])
    ref_outs = [ref_o] + (list(ref_state) if ref_state is not None and state is not None else [])
    tensors = [q, k, v] + (list(init) if init is not None else [])
    ref_tensors = ref_in + (list(ref_init) if ref_init is not None else [])
    try:
        grads = _linear_grads(tensors, outs, cots)
    except Exception as e:  # noqa: BLE001
        return fail("raise", "backward", math.inf, f"{type(e).__name__}: {str(e)[:300]}")
    ref_grads = _linear_grads(ref_tensors, ref_outs, cots)
    gtol = GRAD_TOL[dt] * (3 if p.dtype == "float32" else 1)
    # one feature, normalized: o = phi(q) S / (phi(q) z) does not depend on q (but for the 1e-6), so dq
    # is 0 in exact arithmetic and the kernels' is the rounding of the 16-bit features: nothing to compare
    one_feature = (p.fmap == "performer" and p.features == 1) or (p.fmap in ("elu+1", "relu", "identity") and p.D == 1)
    for name, x, r in zip(("dq", "dk", "dv", "dS0", "dz0"), grads, ref_grads):
        if x is None:
            x = torch.zeros_like(r)
        if r is None or (name == "dq" and one_feature and p.normalize):
            continue
        e = _rel(x, r)
        if not e <= gtol:
            return fail("mismatch", name, e, f"tolerance {gtol}")
    return None


def draw_linear(seed: int) -> Optional[LinearPlan]:
    """The linear case of ``seed`` under --extend3 (None: the seed draws a softmax case)."""
    rng = extend3_rng(seed)
    if rng.random() >= LINEAR_RATE:
        return None
    return random_linear(rng)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--seed", type=int, help="run one seed (verbose)")
    ap.add_argument("--backward", choices=("auto", "yes", "no"), default="auto")
    ap.add_argument("--varlen", choices=("auto", "yes", "no"), default="auto",
                    help="packed (cu_seqlens) calls: now and then, always (attention() calls), never")
    ap.add_argument("--extend", choices=("auto", "yes", "no"), default="auto",
                    help="the constructs of extend_draft/extend_call: now and then, always, never "
                         "(no: the cases seeds drew before them)")
    ap.add_argument("--extend2", choices=("auto", "yes", "no"), default="auto",
                    help="the second layer (extend2_draft/extend2_call): now and then, always, never")
    ap.add_argument("--extend3", action="store_true",
                    help="the third layer: half the seeds draw linear-attention cases (random_linear), "
                         "the others softmax cases of extend3_draft/extend3_call")
    ap.add_argument("--avoid", default="", help="comma-separated tags the generator must not produce")
    ap.add_argument("--poison", action="store_true",
                    help="torch.empty / empty_like fill their memory (NaN, 113): a read of memory nothing wrote "
                         "(or of memory past a tensor) fails every run, not now and then")
    ap.add_argument("--no-minimize", action="store_true")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.poison:
        poison_empty()
    avoid = frozenset(t for t in args.avoid.split(",") if t)
    backward = {"auto": None, "yes": True, "no": False}[args.backward]
    varlen = {"auto": None, "yes": True, "no": False}[args.varlen]
    extend = {"auto": None, "yes": True, "no": False}[args.extend]
    extend2 = {"auto": None, "yes": True, "no": False}[args.extend2]
    seeds = [args.seed] if args.seed is not None else range(args.start, args.start + args.cases)
    failures = 0
    t0 = time.monotonic()
    for seed in seeds:
        if args.verbose or args.seed is not None:
            lp = draw_linear(seed) if args.extend3 else None
            if lp is not None:
                print(f"seed {seed}: {lp.describe()}\n{lp.text}")
            else:
                draft, plan = draw_case(seed, backward, avoid, varlen, extend, extend2, args.extend3)
                print(f"seed {seed}: {plan.describe()}\n{draft.text}")
        f = check_case(seed, backward, avoid=avoid, varlen=varlen, extend=extend, extend2=extend2, extend3=args.extend3)
        if f is None:
            if args.verbose or args.seed is not None:
                print(f"seed {seed}: ok")
            continue
        failures += 1
        if not args.no_minimize and isinstance(f, Failure):
            f = minimize(f)
        print(f"FAIL {f}", flush=True)
    n = len(seeds)
    print(f"{failures} of {n} cases failed ({time.monotonic() - t0:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
