"""A catalogue of outside attention patterns, each written twice: as an attncc spec and as an
independent float64 oracle in plain torch.

The patterns are those an outside reviewer checks attncc with: the score and mask functions of
FlexAttention's own tests (``_times_two``, ``_squared``, ``_trig``, ``_rel_causal``, the ALiBi
generator, captured buffers, document and NJT masks, ...) and the masks and score mods of the
attention-gym catalogue (sliding window, prefix LM, document masks, NATTEN plain / tiled / Morton,
sliding tile attention, global tokens, block diffusion, JetSpec, Sparse VideoGen, VSA, Graphormer,
Sandwich, MLA, softcapping, activations). Their semantics are re-derived here from what the
original functions compute (torch integer ``//`` and ``%`` floor, like Python), never from
``attncc.reference``: the oracle of :func:`oracle` shares no parser, evaluator or semantics module
with attncc, so it also catches a wrong reading of the spec language.

Each :class:`Case` holds the spec (a dict for ``attncc.compile``), the oracle's mask and score as
functions of an :class:`Env` (broadcast index tensors ``b, h, i, j``, ``n_q``, ``n_k``, params,
inputs), a generator of the inputs and the calls to try (odd lengths, Nq != Nk, offsets,
param overrides). ``python tests/catalogue.py`` runs every case and prints the failures.
"""
from __future__ import annotations

import math
import os
import random
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

os.environ.setdefault("TRITON_INTERPRET", "1")
_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (_HERE, os.path.dirname(_HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

import attncc  # noqa: E402

NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------
# the oracle
# ---------------------------------------------------------------------------------------------

class Env:
    """What a mask or score function of the oracle sees: ``b h i j`` as broadcastable int64
    tensors ``[B,1,1,1] [1,H,1,1] [.,1,Nq,1] [1,1,1,Nk]``, ``n_q``, ``n_k`` (ints, or ``[B,1,1,1]``
    tensors in decode), the call's params and the inputs (float inputs in float64)."""

    def __init__(self, b, h, i, j, n_q, n_k, values):
        self.b, self.h, self.i, self.j, self.n_q, self.n_k = b, h, i, j, n_q, n_k
        self.__dict__.update(values)


def rotate(x: torch.Tensor, pos: torch.Tensor, theta: float, style: str, rot: int) -> torch.Tensor:
    """RoPE as the papers write it: pair m turns by pos * theta^(-2m/rot); float64."""
    m = torch.arange(rot // 2, dtype=torch.float64)
    ang = pos.to(torch.float64).view(-1, 1) * theta ** (-2.0 * m / rot)  # [N, rot/2]
    cos, sin = ang.cos(), ang.sin()
    out = x.clone()
    if style == "neox":
        a, b = x[..., : rot // 2], x[..., rot // 2: rot]
        out[..., : rot // 2] = a * cos - b * sin
        out[..., rot // 2: rot] = b * cos + a * sin
    else:
        a, b = x[..., 0:rot:2], x[..., 1:rot:2]
        out[..., 0:rot:2] = a * cos - b * sin
        out[..., 1:rot:2] = b * cos + a * sin
    return out


def oracle(case: "Case", q, k, v, values, *, q_offset=0, k_offset=0, n_q=None, n_k=None, scale=None,
           q_pos=None, k_valid=None, b_first=0):
    """(o, lse) of ``case`` in float64, straight from the original functions' semantics.

    ``q_pos`` ([B, Nq] int64) replaces ``q_offset + r`` (decode: each batch row at its own
    positions, ``n_q = n_k`` given per row as ``[B]`` tensors); ``k_valid`` ([B, Nk] bool) keys
    that exist (decode: ``j < kv_len[b]``); ``b_first`` the value of ``b`` in batch row 0 (a
    packed batch's sequence index)."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    qd, kd, vd = q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    if q_pos is None:
        q_pos = (q_offset + torch.arange(Nq)).view(1, Nq).expand(B, Nq)
    k_pos = k_offset + torch.arange(Nk)
    if case.rope is not None:
        theta, style, rot = case.rope
        rot = rot or D
        qd = torch.stack([rotate(qd[bb], q_pos[bb], theta, style, rot) for bb in range(B)])
        kd = rotate(kd, k_pos, theta, style, rot)
    b = (b_first + torch.arange(B)).view(B, 1, 1, 1)
    h = torch.arange(Hq).view(1, Hq, 1, 1)
    i = q_pos.view(B, 1, Nq, 1)
    j = k_pos.view(1, 1, 1, Nk)
    if n_q is None:
        n_q = q_offset + Nq
    if n_k is None:
        n_k = k_offset + Nk
    env = Env(b, h, i, j, n_q, n_k, values)
    if scale is None:
        scale = case.spec.get("score", {}).get("scale", 1 / math.sqrt(D))
    s = scale * (qd @ kd.transpose(-1, -2))
    if case.score is not None:
        s = case.score(env, s)
    if case.softcap is not None:  # a -inf the transform wrote stays -inf (docs §1, step 3)
        s = torch.where(s == NEG_INF, s, case.softcap * torch.tanh(s / case.softcap))
    allowed = torch.ones(B, Hq, Nq, Nk, dtype=torch.bool)
    if case.mask is not None:
        allowed = allowed & case.mask(env)
    if k_valid is not None:
        allowed = allowed & k_valid.view(B, 1, 1, Nk)
    s = torch.where(allowed, s, NEG_INF)
    # IEEE softmax with the row maximum subtracted (NaN and +inf propagate as in FlashAttention);
    # rows without keys give o = 0, lse = -inf and zero gradients
    if Nk == 0:
        return s.new_zeros(B, Hq, Nq, vd.shape[-1]) + 0 * s.sum(), s.new_full((B, Hq, Nq), NEG_INF) + 0 * s.sum()
    top = s.detach().amax(-1, keepdim=True)
    empty = top == NEG_INF
    top = torch.where(empty, torch.zeros_like(top), top)
    e = torch.where(s == NEG_INF, torch.zeros_like(s), torch.exp(s - top))
    total = e.sum(-1, keepdim=True)
    safe = torch.where(empty, torch.ones_like(total), total)
    lse = torch.where(empty, torch.full_like(total, NEG_INF), torch.log(safe) + top).squeeze(-1)
    return (e / safe) @ vd, lse


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

def doc_ids(gen: torch.Generator, n: int, max_len: int = 12) -> torch.Tensor:
    """Document id per position: runs of random lengths 1..max_len (some of length 1)."""
    ids, doc = [], 0
    while len(ids) < n:
        size = int(torch.randint(1, max_len + 1, (1,), generator=gen))
        ids += [doc] * size
        doc += 1
    return torch.tensor(ids[:n], dtype=torch.int32)


def offsets_of(ids: torch.Tensor) -> torch.Tensor:
    """attention-gym's ``offsets`` (cumulative document starts, [ndocs + 1]) of sorted ids."""
    counts = torch.bincount(ids.long())
    return torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32)


def morton_decode(code: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """attention-gym's Morton decode, cut to 8-bit codes as the spec's text is (:func:`_spread`)."""
    def squeeze(c):
        c = c & 0x5555
        c = (c | (c >> 1)) & 0x3333
        c = (c | (c >> 2)) & 0x0F0F
        return (c | (c >> 4)) & 0x00FF
    return squeeze(code), squeeze(code >> 1)


def _spread(expr: str) -> str:
    """attncc text of attention-gym's de-interleave of ``expr`` (its even bits), cut to the three
    steps that codes below 2**8 need (canvases up to 16 x 16): the language has no local names, so
    each step writes its operand twice, and gym's five steps exceed the 2000-character limit."""
    c = f"(({expr}) & 21845)"
    c = f"(({c} | ({c} >> 1)) & 13107)"
    c = f"(({c} | ({c} >> 2)) & 3855)"
    return f"(({c} | ({c} >> 4)) & 255)"


def alibi_slopes(H: int) -> torch.Tensor:
    """ALiBi slopes (Press et al.): the geometric sequence for the closest power of two P <= H,
    then every other slope of the 2P sequence (the paper's reference code)."""
    def pow2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** k for k in range(n)]
    P = 2 ** int(math.floor(math.log2(H)))
    slopes = pow2(P)
    if P < H:
        slopes += pow2(2 * P)[0::2][: H - P]
    return torch.tensor(slopes, dtype=torch.float64)


def t5_bucket(d: torch.Tensor, num_buckets=32, max_distance=128, bidirectional=True) -> torch.Tensor:
    """T5's relative_position_bucket (Raffel et al.) of d = key - query, in float64."""
    ret = torch.zeros_like(d)
    n = -d
    if bidirectional:
        num_buckets //= 2
        ret = ret + (n < 0).long() * num_buckets
        n = n.abs()
    else:
        n = torch.clamp(n, min=0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    val = max_exact + (torch.log(n.double().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).long()
    val = torch.clamp(val, max=num_buckets - 1)
    return ret + torch.where(is_small, n, val)


def bigbird_blocks(qb: int, K: int, r: int, seed: int):
    """The documented random_blocks choice (docs/spec-language.md §3.4)."""
    return sorted(random.Random(f"attncc.random_blocks:{seed}:{qb}:{K}").sample(range(K), min(r, K)))


# ---------------------------------------------------------------------------------------------
# the catalogue
# ---------------------------------------------------------------------------------------------

Inputs = Callable[[torch.Generator, int, int, int], Dict[str, torch.Tensor]]


def _none(gen, B, H, n):
    return {}


@dataclass(frozen=True)
class Call:
    """One call: lengths, offsets, n_q/n_k, param overrides."""
    nq: int
    nk: int
    q_offset: int = 0
    k_offset: int = 0
    n_q: Optional[int] = None
    n_k: Optional[int] = None
    params: Tuple[Tuple[str, Any], ...] = ()


DEFAULT_CALLS = (Call(37, 37), Call(23, 61), Call(45, 19, q_offset=30, k_offset=5))


@dataclass(frozen=True)
class Case:
    name: str
    source: str                          # where the pattern comes from
    spec: Dict[str, Any]                 # params / inputs / mask / score / rope / heads
    mask: Optional[Callable] = None      # Env -> bool
    score: Optional[Callable] = None     # (Env, s) -> scores (bias and mod, as the original)
    softcap: Optional[float] = None
    rope: Optional[Tuple[float, str, Optional[int]]] = None
    inputs: Inputs = _none
    heads: Tuple[int, int] = (4, 2)
    batch: int = 2
    calls: Tuple[Call, ...] = DEFAULT_CALLS
    decode: bool = True                  # try decode too
    varlen: bool = True                  # try cu_seqlens too (no inputs, no random_blocks)
    tol: float = 1e-4
    slow: bool = False                   # only in the full sweep (a near duplicate of another case)
    quick: Optional[int] = None          # the call of the default run (else one by rotation)
    bf16: bool = True                    # bfloat16 comparable (no condition on the score itself)
    dyadic: bool = False                 # q, k on a grid of quarters: every score exact (see _operand)


def _operand(c: "Case", shape, gen: torch.Generator) -> torch.Tensor:
    """A q or k of ``shape``: standard normal, or for a ``dyadic`` case quarters in [-0.75, 0.75], whose
    products and their sums over any head dim up to 2**12 are exact in float32 (and bfloat16 holds
    them): a condition on the score itself (``score <= seq_len[b]``) then takes the same side in the
    kernels, whatever their order of summation, as in the float64 oracle. With normal draws some of a
    large call's million scores sit within float32 rounding of the threshold and flip (H100,
    padded_dense_causal, N = 1024, D = 128: o 2e-3 off in float32)."""
    if c.dyadic:
        return torch.randint(-3, 4, shape, generator=gen).float() / 4
    return torch.randn(shape, generator=gen)


def _inp(**decls):
    return {name: dict(zip(("dims", "dtype", "grad"), d)) if isinstance(d, tuple) else d for name, d in decls.items()}


def _at_least_1(n):
    return n.clamp(min=1) if isinstance(n, torch.Tensor) else max(n, 1)


def _w(c, s):
    return torch.where(c, s, torch.full_like(s, NEG_INF))


CASES = []


def case(**kw):
    CASES.append(Case(**kw))


FLEX = "pytorch test/inductor/test_flex_attention.py"
GYM = "attention-gym"

# --- FlexAttention's score mods (test_score_mods and captured buffers) -----------------------
case(name="identity", source=FLEX, spec={})
case(name="times_two", slow=True, source=FLEX, spec={"score": {"mod": "score * 2"}}, score=lambda E, s: s * 2)
case(name="squared", source=FLEX, spec={"score": {"mod": "score * score"}}, score=lambda E, s: s * s)
case(name="causal_score", slow=True, source=FLEX, spec={"score": {"mod": "where(q_idx >= kv_idx, score, -inf)"}},
     score=lambda E, s: _w(E.i >= E.j, s))
case(name="inverse_causal", slow=True, source=FLEX, spec={"score": {"mod": "where(q_idx <= kv_idx, score, -inf)"}},
     score=lambda E, s: _w(E.i <= E.j, s))
case(name="rel_bias", slow=True, source=FLEX, spec={"score": {"mod": "score + (q_idx - kv_idx)", "scale": 0.3}},
     score=lambda E, s: s + (E.i - E.j))
case(name="rel_causal", source=FLEX, spec={"score": {"mod": "where(q_idx >= kv_idx, score + (q_idx - kv_idx), -inf)"}},
     score=lambda E, s: _w(E.i >= E.j, s + (E.i - E.j)))
case(name="alibi_gen8", source=FLEX,
     spec={"params": {"num_heads": 8}, "score": {"mod": "score + (kv_idx - q_idx) * exp2(-((h + 1) * 8.0 / num_heads))"}},
     score=lambda E, s: s + (E.j - E.i) * torch.exp2(-((E.h + 1) * 8.0 / E.num_heads)),
     calls=DEFAULT_CALLS + (Call(29, 29, params=(("num_heads", 3),)),))
case(name="head_offset", source=FLEX,
     spec={"inputs": _inp(head_offset=(["h"], "float32", True)), "score": {"mod": "score * head_offset[h]"}},
     score=lambda E, s: s * E.head_offset[E.h], inputs=lambda g, B, H, n: {"head_offset": torch.rand(H, generator=g)})
case(name="trig", source=FLEX, spec={"score": {"mod": "sin(cos(score)) + tan(b)", "scale": 0.7}},
     score=lambda E, s: torch.sin(torch.cos(s)) + torch.tan(E.b.double()), batch=3)
case(name="trig2", slow=True, source=FLEX, spec={"score": {"mod": "cos(score) * sin(score) + tan(b)", "scale": 0.7}},
     score=lambda E, s: torch.cos(s) * torch.sin(s) + torch.tan(E.b.double()), batch=3)
case(name="skip_odd_keys", source=FLEX, spec={"score": {"mod": "where(kv_idx % 2 == 0, score, -inf)"}},
     score=lambda E, s: _w(E.j % 2 == 0, s))
case(name="composition", source=FLEX, spec={"score": {"mod": "where(q_idx <= kv_idx, score + (q_idx - kv_idx), -inf)"}},
     score=lambda E, s: _w(E.i <= E.j, s + (E.i - E.j)))
case(name="captured_all_dims", source=FLEX,
     spec={"inputs": _inp(tok_scale=(["n"], "float32", True), batch_scale=(["b"], "float32", True),
                          head_scale=(["h"], "float32", True)),
           "score": {"mod": "score + tok_scale[q_idx] + batch_scale[b] + head_scale[h]"}},
     score=lambda E, s: s + E.tok_scale[E.i] + E.batch_scale[E.b] + E.head_scale[E.h],
     inputs=lambda g, B, H, n: {"tok_scale": torch.randn(n, generator=g), "batch_scale": torch.randn(B, generator=g),
                                "head_scale": torch.randn(H, generator=g)})
case(name="seq_masking", source=FLEX,
     spec={"inputs": _inp(seq_idx=(["n"], "bool")), "score": {"mod": "where(seq_idx[q_idx] == seq_idx[kv_idx], score, -inf)"}},
     score=lambda E, s: _w(E.seq_idx[E.i] == E.seq_idx[E.j], s),
     inputs=lambda g, B, H, n: {"seq_idx": torch.arange(n) >= n // 2})
case(name="bias_seq_only", source=FLEX,
     spec={"inputs": _inp(bias=(["n", "n"], "float32", True)), "score": {"mod": "score + bias[q_idx, kv_idx]"}},
     score=lambda E, s: s + E.bias[E.i, E.j], inputs=lambda g, B, H, n: {"bias": torch.randn(n, n, generator=g)})
case(name="bias_seq_batch", slow=True, source=FLEX,
     spec={"inputs": _inp(bias=(["b", "n", "n"], "float32", True)), "score": {"mod": "score + bias[b, q_idx, kv_idx]"}},
     score=lambda E, s: s + E.bias[E.b, E.i, E.j], inputs=lambda g, B, H, n: {"bias": torch.randn(B, n, n, generator=g)})
case(name="bias_head_seq_batch", source=FLEX,
     spec={"inputs": _inp(bias=(["b", "h", "n", "n"], "float32", True)), "score": {"mod": "score + bias[b, h, q_idx, kv_idx]"}},
     score=lambda E, s: s + E.bias[E.b, E.h, E.i, E.j],
     inputs=lambda g, B, H, n: {"bias": torch.randn(B, H, n, n, generator=g)})
case(name="rel_bias_table", source=FLEX,
     spec={"params": {"S": 100}, "inputs": _inp(rel_bias=([200], "float32", True)),
           "score": {"mod": "score + rel_bias[(q_idx - kv_idx) + S]"}},
     score=lambda E, s: s + E.rel_bias[(E.i - E.j) + E.S], inputs=lambda g, B, H, n: {"rel_bias": torch.randn(200, generator=g)})
case(name="dependent_causal_bidirectional", source=FLEX,
     spec={"inputs": _inp(nbi=(["b"], "int32")),
           "score": {"mod": "where((q_idx <= nbi[b]) & (kv_idx <= nbi[b]) | (q_idx >= kv_idx), score, -inf)"}},
     score=lambda E, s: _w((E.i <= E.nbi[E.b]) & (E.j <= E.nbi[E.b]) | (E.i >= E.j), s),
     inputs=lambda g, B, H, n: {"nbi": torch.randint(0, n, (B,), generator=g, dtype=torch.int32)})
# test_natten_2d: the coordinates are a float division (idx / W), as the test writes it
case(name="natten_float_div", source=FLEX,
     spec={"params": {"W": 7, "WINDOW": 1},
           "score": {"mod": "where((abs(q_idx / W - kv_idx / W) <= WINDOW) | (abs(q_idx % W - kv_idx % W) <= WINDOW), score, -inf)"}},
     # (torch divides int32 indices in float32; the language's / is float64 at every position)
     score=lambda E, s: _w(((E.i.double() / E.W - E.j.double() / E.W).abs() <= E.WINDOW)
                           | ((E.i % E.W - E.j % E.W).abs() <= E.WINDOW), s))
case(name="floordiv_score", source=FLEX, spec={"score": {"mod": "score - q_idx // (1 + kv_idx)"}},
     score=lambda E, s: s - torch.div(E.i, 1 + E.j, rounding_mode="floor"))
case(name="silu", source=FLEX, spec={"score": {"mod": "score * sigmoid(score)", "scale": 0.8}},
     score=lambda E, s: torch.nn.functional.silu(s))
# test_padded_dense_causal compares the score itself with an integer length
case(name="padded_dense_causal", bf16=False, dyadic=True, source=FLEX,
     spec={"inputs": _inp(seq_len=(["b"], "int32")),
           "score": {"mod": "where(score <= seq_len[b], where(q_idx >= kv_idx, score, -inf), -inf)", "scale": 1.0}},
     score=lambda E, s: _w(s <= E.seq_len[E.b], _w(E.i >= E.j, s)),
     inputs=lambda g, B, H, n: {"seq_len": (torch.arange(B, dtype=torch.int32) - 1)})
case(name="captured_scale_0d", source=FLEX,
     spec={"inputs": _inp(scale0=([], "int32")), "score": {"mod": "score + scale0"}},
     score=lambda E, s: s + E.scale0, inputs=lambda g, B, H, n: {"scale0": torch.tensor(3, dtype=torch.int32)})
case(name="index_multiple", source=FLEX,
     spec={"inputs": _inp(bias=(["b", "n"], "float32", True)), "score": {"mod": "score + bias[b, q_idx]"}},
     score=lambda E, s: s + E.bias[E.b, E.i], inputs=lambda g, B, H, n: {"bias": torch.randn(B, n, generator=g)})
case(name="index_weird1", slow=True, source=FLEX,
     spec={"inputs": _inp(bias=([4, "b", "h", "n"], "float32", True)), "score": {"mod": "score + bias[0, b, h, q_idx]"}},
     score=lambda E, s: s + E.bias[0, E.b, E.h, E.i], inputs=lambda g, B, H, n: {"bias": torch.randn(4, B, H, n, generator=g)})
case(name="index_weird2", source=FLEX,
     spec={"inputs": _inp(bias=(["b", "h", 4, "n"], "float32"), which=([], "int64")),
           "score": {"mod": "score + bias[b, h, which, q_idx]"}},
     score=lambda E, s: s + E.bias[E.b, E.h, E.which, E.i],
     inputs=lambda g, B, H, n: {"bias": torch.randn(B, H, 4, n, generator=g), "which": torch.tensor(2)})
case(name="njt_causal", source=FLEX,
     spec={"inputs": _inp(offsets=([32], "int32"), seq_idx=(["n"], "int32")),
           "score": {"mod": "where(q_idx - offsets[seq_idx[q_idx]] >= kv_idx - offsets[seq_idx[kv_idx]], score, -inf)"}},
     score=lambda E, s: _w(E.i - E.offsets[E.seq_idx[E.i]].long() >= E.j - E.offsets[E.seq_idx[E.j]].long(), s),
     inputs=lambda g, B, H, n: (lambda ids: {"seq_idx": ids, "offsets": torch.nn.functional.pad(
         offsets_of(ids), (0, 32 - len(offsets_of(ids))), value=0)})(doc_ids(g, n, 20)))
case(name="doc_mask_sparse", source=FLEX,
     spec={"inputs": _inp(document_id=(["n"], "int32")),
           "score": {"mod": "where((q_idx >= kv_idx) & (document_id[q_idx] == document_id[kv_idx]), score, -inf)"}},
     score=lambda E, s: _w((E.i >= E.j) & (E.document_id[E.i] == E.document_id[E.j]), s),
     inputs=lambda g, B, H, n: {"document_id": (torch.arange(n) // 16).to(torch.int32)})
case(name="offset_q_kv_causal", source=FLEX,
     spec={"inputs": _inp(offset_q=(["n"], "float32", True), offset_kv=(["n"], "float32", True)),
           "mask": {"where": "q_idx >= kv_idx"}, "score": {"mod": "score + offset_q[q_idx] + offset_kv[kv_idx]"}},
     mask=lambda E: E.i >= E.j, score=lambda E, s: s + E.offset_q[E.i] + E.offset_kv[E.j],
     inputs=lambda g, B, H, n: {"offset_q": torch.randn(n, generator=g), "offset_kv": torch.randn(n, generator=g)})
case(name="multiplicative_bias", slow=True, source=FLEX,
     spec={"inputs": _inp(multiplier=(["n"], "float32", True)), "score": {"mod": "score * multiplier[q_idx]"}},
     score=lambda E, s: s * E.multiplier[E.i], inputs=lambda g, B, H, n: {"multiplier": torch.randn(n, generator=g)})
case(name="fully_masked_rows", source=FLEX, spec={"params": {"M": 20}, "mask": {"where": "q_idx < M"}},
     mask=lambda E: E.i < E.M)
case(name="seq_blocks_non_divisible", source=FLEX, spec={"mask": {"where": "q_idx // 13 == kv_idx // 13"}},
     mask=lambda E: E.i // 13 == E.j // 13)
case(name="and_causal_window", slow=True, source=FLEX, spec={"params": {"w": 11}, "mask": {"where": "(q_idx >= kv_idx) & ((q_idx - kv_idx) <= w)"}},
     mask=lambda E: (E.i >= E.j) & ((E.i - E.j) <= E.w))
case(name="and_causal_anticausal", source=FLEX, spec={"mask": {"where": "(q_idx >= kv_idx) & (q_idx < kv_idx)"}},
     mask=lambda E: (E.i >= E.j) & (E.i < E.j))
case(name="or_causal_anticausal", slow=True, source=FLEX, spec={"mask": {"where": "(q_idx >= kv_idx) | (q_idx < kv_idx)"}},
     mask=lambda E: (E.i >= E.j) | (E.i < E.j))
case(name="rel_pos_1d", source=FLEX,
     spec={"inputs": _inp(bias=(["n"], "float32", True)), "score": {"mod": "score + bias[q_idx + kv_idx]"}},
     score=lambda E, s: s + E.bias[E.i + E.j], inputs=lambda g, B, H, n: {"bias": torch.randn(2 * n, generator=g)},
     decode=False)
case(name="rel_pos_2d_transposed", slow=True, source=FLEX,
     spec={"inputs": _inp(bias=(["n", "n"], "float32", True)), "score": {"mod": "score + bias[kv_idx, q_idx]"}},
     score=lambda E, s: s + E.bias[E.j, E.i], inputs=lambda g, B, H, n: {"bias": torch.randn(n, n, generator=g)})
case(name="rel_pos_3d_transposed", source=FLEX,
     spec={"inputs": _inp(bias=(["h", "n", "n"], "float32", True)), "score": {"mod": "score + bias[h, kv_idx, q_idx]"}},
     score=lambda E, s: s + E.bias[E.h, E.j, E.i], inputs=lambda g, B, H, n: {"bias": torch.randn(H, n, n, generator=g)})
case(name="euclidean_dist", source=FLEX,
     spec={"inputs": _inp(means=(["n", 3], "float32"), length_scales=(["h"], "float32", True)),
           "score": {"mod": "exp(-sqrt(sum((means[q_idx, t] - means[kv_idx, t]) ** 2 for t in range(3))) / length_scales[h]) * score"}},
     score=lambda E, s: torch.exp(-((E.means[E.i] - E.means[E.j]) ** 2).sum(-1).sqrt() / E.length_scales[E.h]) * s,
     inputs=lambda g, B, H, n: {"means": torch.randn(n, 3, generator=g),
                                "length_scales": torch.logspace(0.001, 0.1, H)})
case(name="padding_q_and_kv", source=FLEX,
     spec={"inputs": _inp(input_lengths=(["b"], "int32")), "mask": {"where": "(q_idx < input_lengths[b]) & (kv_idx < input_lengths[b])"}},
     mask=lambda E: (E.i < E.input_lengths[E.b]) & (E.j < E.input_lengths[E.b]),
     inputs=lambda g, B, H, n: {"input_lengths": torch.randint(0, n, (B,), generator=g, dtype=torch.int32)})
case(name="batch_flip_causal", source=FLEX, spec={"mask": {"where": "(q_idx >= kv_idx) & (b % 2 == 0)"}},
     mask=lambda E: (E.i >= E.j) & (E.b % 2 == 0), batch=3)
case(name="not_rand_mask", source=FLEX,
     spec={"inputs": _inp(rand_mask=(["b", "n"], "bool")), "mask": {"where": "~rand_mask[b, q_idx]"}},
     mask=lambda E: ~E.rand_mask[E.b, E.i],
     inputs=lambda g, B, H, n: {"rand_mask": torch.randint(0, 2, (B, n), generator=g).bool()})
case(name="symbol_closure", slow=True, source=FLEX, spec={"params": {"Bsz": 4}, "score": {"mod": "score + Bsz"}},
     score=lambda E, s: s + E.Bsz)
case(name="float_offset_causal", source=FLEX,
     spec={"inputs": _inp(offset=(["b"], "float32")), "mask": {"where": "(q_idx + (offset[b] * 8)) >= kv_idx"}},
     mask=lambda E: (E.i + (E.offset[E.b] * 8)) >= E.j,
     inputs=lambda g, B, H, n: {"offset": torch.arange(B, dtype=torch.float32) - 1.5})

# --- attention-gym masks ------------------------------------------------------------------------
case(name="gym_causal", source=GYM, spec={"mask": {"where": "q_idx >= kv_idx"}}, mask=lambda E: E.i >= E.j)
case(name="gym_sliding_window", source=GYM, spec={"params": {"window_size": 7},
                                                  "mask": {"where": "(q_idx - kv_idx <= window_size) & (q_idx >= kv_idx)"}},
     mask=lambda E: (E.i - E.j <= E.window_size) & (E.i >= E.j),
     calls=DEFAULT_CALLS + (Call(33, 33, params=(("window_size", 0),)), Call(33, 33, params=(("window_size", -3),)),
                            Call(33, 33, params=(("window_size", 1000),))))
case(name="gym_prefix_lm", source=GYM, spec={"params": {"prefix_length": 9}, "mask": {"where": "(kv_idx < prefix_length) | (q_idx >= kv_idx)"}},
     mask=lambda E: (E.j < E.prefix_length) | (E.i >= E.j),
     calls=DEFAULT_CALLS + (Call(33, 33, params=(("prefix_length", 0),)), Call(33, 33, params=(("prefix_length", 500),))))
case(name="gym_document_causal", source=GYM,
     spec={"inputs": _inp(document_id=(["n"], "int32"), offsets=([64], "int32")),
           "mask": {"where": "(document_id[q_idx] == document_id[kv_idx]) & "
                             "(q_idx - offsets[document_id[q_idx]] >= kv_idx - offsets[document_id[kv_idx]])"}},
     mask=lambda E: (E.document_id[E.i] == E.document_id[E.j])
     & (E.i - E.offsets[E.document_id[E.i]].long() >= E.j - E.offsets[E.document_id[E.j]].long()),
     inputs=lambda g, B, H, n: (lambda ids: {"document_id": ids, "offsets": torch.nn.functional.pad(
         offsets_of(ids), (0, 64 - len(offsets_of(ids))))})(doc_ids(g, n)))
case(name="gym_packed_causal_doc", slow=True, source=GYM,
     spec={"inputs": _inp(document_id=(["n"], "int32"), offsets=([64], "int32")),
           "mask": {"where": "(kv_idx >= offsets[document_id[q_idx]]) & (q_idx >= kv_idx)"}},
     mask=lambda E: (E.j >= E.offsets[E.document_id[E.i]].long()) & (E.i >= E.j),
     inputs=lambda g, B, H, n: (lambda ids: {"document_id": ids, "offsets": torch.nn.functional.pad(
         offsets_of(ids), (0, 64 - len(offsets_of(ids))))})(doc_ids(g, n)))


def _shared_prefix_inputs(g, B, H, n):
    ids = doc_ids(g, n, 9)
    offs = offsets_of(ids)
    ndoc = len(offs) - 1
    pdoc = torch.arange(ndoc, dtype=torch.int32)
    for d in range(ndoc):  # every third document is a prefix of the next two
        pdoc[d] = d - d % 3
    return {"document_id": ids, "offsets": torch.nn.functional.pad(offs, (0, 64 - len(offs))),
            "prefix_document_id": torch.nn.functional.pad(pdoc, (0, 63 - ndoc))}


case(name="gym_shared_prefix", source=GYM,
     spec={"inputs": _inp(document_id=(["n"], "int32"), offsets=([64], "int32"), prefix_document_id=([63], "int32")),
           "mask": {"where": "((kv_idx >= offsets[document_id[q_idx]]) & (q_idx >= kv_idx)) | "
                             "((document_id[q_idx] != prefix_document_id[document_id[q_idx]]) & "
                             "(kv_idx >= offsets[prefix_document_id[document_id[q_idx]]]) & "
                             "(kv_idx < offsets[prefix_document_id[document_id[q_idx]] + 1]))"}},
     mask=lambda E: ((E.j >= E.offsets[E.document_id[E.i]].long()) & (E.i >= E.j))
     | ((E.document_id[E.i] != E.prefix_document_id[E.document_id[E.i]])
        & (E.j >= E.offsets[E.prefix_document_id[E.document_id[E.i]]].long())
        & (E.j < E.offsets[E.prefix_document_id[E.document_id[E.i]].long() + 1].long())),
     inputs=_shared_prefix_inputs)
case(name="gym_global_sliding_window", source=GYM,
     spec={"params": {"window_size": 3}, "inputs": _inp(is_global=(["n"], "bool")),
           "mask": {"where": "(abs(q_idx - kv_idx) <= window_size) | (is_global[q_idx] | is_global[kv_idx])"}},
     mask=lambda E: ((E.i - E.j).abs() <= E.window_size) | (E.is_global[E.i] | E.is_global[E.j]),
     inputs=lambda g, B, H, n: {"is_global": (torch.arange(n) % 17 == 0) | (torch.arange(n) == 8)})


def _natten(x_of, y_of):
    def mask(E):
        qx, qy, kx, ky = x_of(E, E.i), y_of(E, E.i), x_of(E, E.j), y_of(E, E.j)
        cx = qx.clamp(E.kw // 2, (E.cw - 1) - E.kw // 2)
        cy = qy.clamp(E.kh // 2, (E.ch - 1) - E.kh // 2)
        return ((cx - kx).abs() <= E.kw // 2) & ((cy - ky).abs() <= E.kh // 2)
    return mask


def _natten_where(x_i, y_i, x_j, y_j):
    return (f"(abs(min(max({x_i}, kw // 2), (cw - 1) - kw // 2) - {x_j}) <= kw // 2) & "
            f"(abs(min(max({y_i}, kh // 2), (ch - 1) - kh // 2) - {y_j}) <= kh // 2)")


NATTEN_PARAMS = {"cw": 9, "ch": 7, "kw": 3, "kh": 5}
case(name="gym_natten", quick=1, source=GYM,
     spec={"params": NATTEN_PARAMS, "mask": {"where": _natten_where("q_idx // cw", "q_idx % cw", "kv_idx // cw", "kv_idx % cw")}},
     mask=_natten(lambda E, t: t // E.cw, lambda E, t: t % E.cw),
     calls=(Call(63, 63), Call(40, 63, q_offset=23), Call(63, 63, params=(("kw", 13), ("kh", 9))),
            Call(63, 63, params=(("kw", 4), ("kh", 2)))))


def _tiled(E, t, which):
    t_id = t // (E.th * E.tw)
    t_y, t_x = t_id // (E.cw // E.tw), t_id % (E.cw // E.tw)
    off = t % (E.th * E.tw)
    i_y, i_x = off // E.tw, off % E.tw
    return t_x * E.tw + i_x if which == "x" else t_y * E.th + i_y


def _tiled_text(t):
    x = f"((({t}) // (th * tw)) % (cw // tw) * tw + (({t}) % (th * tw)) % tw)"
    y = f"((({t}) // (th * tw)) // (cw // tw) * th + (({t}) % (th * tw)) // tw)"
    return x, y


case(name="gym_tiled_natten", quick=1, source=GYM,
     spec={"params": {"cw": 6, "ch": 8, "kw": 3, "kh": 3, "tw": 2, "th": 4},
           "mask": {"where": _natten_where(*_tiled_text("q_idx"), *_tiled_text("kv_idx"))}},
     mask=_natten(lambda E, t: _tiled(E, t, "x"), lambda E, t: _tiled(E, t, "y")),
     calls=(Call(48, 48), Call(31, 48, q_offset=17)))
case(name="gym_morton_natten", quick=1, source=GYM,
     spec={"params": {"cw": 8, "ch": 8, "kw": 3, "kh": 3},
           "mask": {"where": _natten_where(_spread("i"), _spread("i >> 1"), _spread("j"), _spread("j >> 1"))}},
     mask=_natten(lambda E, t: morton_decode(t)[0], lambda E, t: morton_decode(t)[1]),
     calls=(Call(64, 64), Call(29, 64, q_offset=35), Call(64, 64, params=(("kw", 5), ("kh", 1)))))


def _sta2d(E):
    numel = E.th * E.tw
    ctw, cth = E.cw // E.tw, E.ch // E.th
    kth, ktw = E.kh // E.th, E.kw // E.tw
    vis = E.ch * E.cw

    def tile(t):
        tid = t // numel
        return tid // ctw, tid % ctw
    qh, qw = tile(E.i)
    kh, kw = tile(E.j)
    lh, rh = kth // 2, kth // 2 + (kth % 2 - 1)
    lw, rw = ktw // 2, ktw // 2 + (ktw % 2 - 1)
    ch_ = qh.clamp(lh, (cth - 1) - rh)
    cw_ = qw.clamp(lw, (ctw - 1) - rw)
    hm = (kh >= ch_ - lh) & (kh <= ch_ + rh)
    wm = (kw >= cw_ - lw) & (kw <= cw_ + rw)
    vm = (E.i < vis) & (E.j < vis)
    v2t = (E.i < vis) & (E.j >= vis) & (E.j < vis + E.text)
    t2a = (E.i >= vis) & (E.j < vis + E.text)
    return (vm & hm & wm) | v2t | t2a


STA2D_WHERE = """((
    (q_idx < ch * cw) & (kv_idx < ch * cw)
    & (kv_idx // (th * tw) // (cw // tw) >= min(max(q_idx // (th * tw) // (cw // tw), (kh // th) // 2),
                                               (ch // th - 1) - ((kh // th) // 2 + ((kh // th) % 2 - 1))) - (kh // th) // 2)
    & (kv_idx // (th * tw) // (cw // tw) <= min(max(q_idx // (th * tw) // (cw // tw), (kh // th) // 2),
                                               (ch // th - 1) - ((kh // th) // 2 + ((kh // th) % 2 - 1)))
                                           + ((kh // th) // 2 + ((kh // th) % 2 - 1)))
    & (kv_idx // (th * tw) % (cw // tw) >= min(max(q_idx // (th * tw) % (cw // tw), (kw // tw) // 2),
                                              (cw // tw - 1) - ((kw // tw) // 2 + ((kw // tw) % 2 - 1))) - (kw // tw) // 2)
    & (kv_idx // (th * tw) % (cw // tw) <= min(max(q_idx // (th * tw) % (cw // tw), (kw // tw) // 2),
                                              (cw // tw - 1) - ((kw // tw) // 2 + ((kw // tw) % 2 - 1)))
                                          + ((kw // tw) // 2 + ((kw // tw) % 2 - 1)))
) | ((q_idx < ch * cw) & (kv_idx >= ch * cw) & (kv_idx < ch * cw + text))
  | ((q_idx >= ch * cw) & (kv_idx < ch * cw + text)))"""
case(name="gym_sta_2d", quick=1, source=GYM,
     spec={"params": {"ch": 8, "cw": 8, "kh": 4, "kw": 6, "th": 2, "tw": 2, "text": 9}, "mask": {"where": STA2D_WHERE}},
     mask=_sta2d, calls=(Call(73, 73), Call(40, 73, q_offset=33), Call(73, 73, params=(("kh", 2), ("kw", 2)))))


def _sta3d(E):
    numel = E.tt * E.th * E.tw
    ctt, cth, ctw = E.ct // E.tt, E.ch // E.th, E.cw // E.tw
    ks = (E.kt // E.tt, E.kh // E.th, E.kw // E.tw)
    cs = (ctt, cth, ctw)
    vis = E.ct * E.ch * E.cw

    def tile(t):
        tid = t // numel
        return tid // (cth * ctw), (tid % (cth * ctw)) // ctw, tid % ctw
    qt, kt_ = tile(E.i), tile(E.j)
    m = (E.i < vis) & (E.j < vis)
    for a in range(3):
        lb, rb = ks[a] // 2, ks[a] // 2 + (ks[a] % 2 - 1)
        c = qt[a].clamp(lb, (cs[a] - 1) - rb)
        m = m & (kt_[a] >= c - lb) & (kt_[a] <= c + rb)
    return m | ((E.i < vis) & (E.j >= vis) & (E.j < vis + E.text)) | ((E.i >= vis) & (E.j < vis + E.text))


def _sta3d_where():
    numel = "(tt * th * tw)"
    coords = {"t": ("{x} // {numel} // ((ch // th) * (cw // tw))", "kt", "tt", "ct"),
              "h": ("({x} // {numel} % ((ch // th) * (cw // tw))) // (cw // tw)", "kh", "th", "ch"),
              "w": ("{x} // {numel} % (cw // tw)", "kw", "tw", "cw")}
    parts = ["(q_idx < ct * ch * cw) & (kv_idx < ct * ch * cw)"]
    for form, k, t, c in coords.values():
        qv, kv = form.format(x="q_idx", numel=numel), form.format(x="kv_idx", numel=numel)
        lb = f"(({k} // {t}) // 2)"
        rb = f"(({k} // {t}) // 2 + (({k} // {t}) % 2 - 1))"
        center = f"min(max({qv}, {lb}), ({c} // {t} - 1) - {rb})"
        parts.append(f"({kv} >= {center} - {lb}) & ({kv} <= {center} + {rb})")
    vis = "ct * ch * cw"
    return (f"({' & '.join(parts)}) | ((q_idx < {vis}) & (kv_idx >= {vis}) & (kv_idx < {vis} + text))"
            f" | ((q_idx >= {vis}) & (kv_idx < {vis} + text))")


case(name="gym_sta_3d", source=GYM,
     spec={"params": {"ct": 4, "ch": 4, "cw": 4, "kt": 2, "kh": 4, "kw": 2, "tt": 2, "th": 2, "tw": 2, "text": 5},
           "mask": {"where": _sta3d_where()}},
     mask=_sta3d, calls=(Call(69, 69), Call(30, 69, q_offset=39)), slow=True)
case(name="gym_block_diffusion", source=GYM,
     spec={"params": {"seq_len": 24, "block_size": 5},
           "mask": {"where": "(((q_idx % seq_len) // block_size == (kv_idx % seq_len) // block_size) & ((q_idx < seq_len) == (kv_idx < seq_len)))"
                             " | (((q_idx % seq_len) // block_size > (kv_idx % seq_len) // block_size) & (q_idx < seq_len) & ~(kv_idx < seq_len))"
                             " | (((q_idx % seq_len) // block_size >= (kv_idx % seq_len) // block_size) & ~(q_idx < seq_len) & ~(kv_idx < seq_len))"}},
     mask=lambda E: (((E.i % E.seq_len) // E.block_size == (E.j % E.seq_len) // E.block_size) & ((E.i < E.seq_len) == (E.j < E.seq_len)))
     | (((E.i % E.seq_len) // E.block_size > (E.j % E.seq_len) // E.block_size) & (E.i < E.seq_len) & ~(E.j < E.seq_len))
     | (((E.i % E.seq_len) // E.block_size >= (E.j % E.seq_len) // E.block_size) & ~(E.i < E.seq_len) & ~(E.j < E.seq_len)),
     calls=(Call(48, 48), Call(30, 48, q_offset=18), Call(48, 48, params=(("block_size", 64),))))


def _ancestors(g, n):
    parents = [-1] + [int(torch.randint(0, t, (1,), generator=g)) for t in range(1, n)]
    anc = torch.eye(n, dtype=torch.bool)
    for node in range(1, n):
        anc[node] |= anc[parents[node]]
    return anc


case(name="gym_jetspec_tree", source=GYM,
     spec={"params": {"prefix_length": 11, "nodes": 24}, "inputs": _inp(ancestor=([40, 24], "bool")),
           "mask": {"where": "(kv_idx < prefix_length) | ((kv_idx >= prefix_length) & (kv_idx < prefix_length + nodes) & "
                             "ancestor[q_idx, min(max(kv_idx - prefix_length, 0), nodes - 1)])"}},
     mask=lambda E: (E.j < E.prefix_length) | ((E.j >= E.prefix_length) & (E.j < E.prefix_length + E.nodes)
                                                & E.ancestor[E.i.clamp(max=39), (E.j - E.prefix_length).clamp(0, E.nodes - 1)]),
     inputs=lambda g, B, H, n: {"ancestor": torch.nn.functional.pad(_ancestors(g, 24), (0, 0, 0, 16))},
     calls=(Call(24, 35), Call(13, 35, q_offset=11)), decode=False)
case(name="gym_jetspec_training", source=GYM,
     spec={"params": {"prefix_length": 5, "block_size": 4},
           "mask": {"where": "(kv_idx < prefix_length) | ((kv_idx >= prefix_length) & (q_idx // block_size == (kv_idx - prefix_length) // block_size)"
                             " & ((kv_idx - prefix_length) % block_size <= q_idx % block_size))"}},
     mask=lambda E: (E.j < E.prefix_length) | ((E.j >= E.prefix_length) & (E.i // E.block_size == (E.j - E.prefix_length) // E.block_size)
                                                & ((E.j - E.prefix_length) % E.block_size <= E.i % E.block_size)),
     calls=(Call(36, 41), Call(17, 41, q_offset=19), Call(36, 41, params=(("block_size", 7), ("prefix_length", 0))),
            Call(36, 41, params=(("block_size", -3),))))
case(name="gym_svg_spatial", source=GYM,
     spec={"params": {"prompt_length": 3, "token_per_frame": 7, "mask_width": 12},
           "mask": {"where": "(kv_idx < (prompt_length + token_per_frame)) | (q_idx < prompt_length) | (abs(q_idx - kv_idx) < mask_width)"}},
     mask=lambda E: (E.j < (E.prompt_length + E.token_per_frame)) | (E.i < E.prompt_length) | ((E.i - E.j).abs() < E.mask_width))
case(name="gym_svg_temporal", source=GYM,
     spec={"params": {"prompt_length": 3, "token_per_frame": 7, "mask_width": 2},
           "mask": {"where": "(kv_idx < prompt_length) | (q_idx < prompt_length) | "
                             "(abs((q_idx - prompt_length) % token_per_frame - (kv_idx - prompt_length) % token_per_frame) < mask_width)"}},
     mask=lambda E: (E.j < E.prompt_length) | (E.i < E.prompt_length)
     | (((E.i - E.prompt_length) % E.token_per_frame - (E.j - E.prompt_length) % E.token_per_frame).abs() < E.mask_width),
     calls=DEFAULT_CALLS + (Call(40, 40, params=(("prompt_length", 0),)), Call(40, 40, params=(("prompt_length", 13), ("token_per_frame", 5)))))
case(name="gym_batchify_causal", source=GYM,
     spec={"params": {"batchify_size": 6},
           "mask": {"where": "(q_idx // batchify_size == kv_idx // batchify_size) & (q_idx % batchify_size >= kv_idx % batchify_size)"}},
     mask=lambda E: (E.i // E.batchify_size == E.j // E.batchify_size) & (E.i % E.batchify_size >= E.j % E.batchify_size),
     calls=DEFAULT_CALLS + (Call(40, 40, params=(("batchify_size", 1),)), Call(40, 40, params=(("batchify_size", -7),)),
                            Call(40, 40, params=(("batchify_size", 100),))))
case(name="gym_vsa_fine", source=GYM,
     spec={"params": {"T": 8, "K": 3}, "inputs": _inp(topk=(["b", "h", 16, 4], "int32")),
           "mask": {"where": "any(kv_idx // T == topk[b, h, q_idx // T, t] for t in range(K))"}},
     mask=lambda E: ((E.j // E.T).unsqueeze(-1) == E.topk[E.b, E.h, E.i // E.T][..., : E.K]).any(-1),
     inputs=lambda g, B, H, n: {"topk": torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(B * H * 16)])
                                .view(B, H, 16, 4).to(torch.int32)},
     calls=(Call(64, 64), Call(33, 57, q_offset=7), Call(64, 64, params=(("K", 1),)), Call(64, 64, params=(("K", 0),))))
# Longformer with its global tokens as params, BigBird with the built-in random blocks
case(name="longformer", source=GYM, spec={"params": {"g": 5, "w": 4}, "mask": {"where": "i < g or j < g or abs(i - j) <= w"}},
     mask=lambda E: (E.i < E.g) | (E.j < E.g) | ((E.i - E.j).abs() <= E.w))


def _bigbird(E):
    Nk = E.j.shape[-1]
    K = -(-E.n_k // 16)
    qb = E.i // 16
    sel = torch.zeros(E.i.shape[0], 1, E.i.shape[2], Nk, dtype=torch.bool)
    for bb in range(E.i.shape[0]):
        for r in range(E.i.shape[2]):
            blocks = bigbird_blocks(int(qb[bb, 0, r, 0]), K, 2, 5)
            sel[bb, 0, r] = torch.isin(E.j[0, 0, 0] // 16, torch.tensor(blocks, dtype=torch.long))
    return ((E.i // 16 - E.j // 16).abs() <= 1) | (E.i < 16) | (E.j < 16) | sel


case(name="bigbird", quick=1, source="attncc built-in random_blocks", spec={"mask": {"where": "abs(i // 16 - j // 16) <= 1 or i < 16 or j < 16 or random_blocks(2, 16, 5)"}},
     mask=_bigbird, calls=(Call(80, 80), Call(33, 80, q_offset=40), Call(30, 50, q_offset=20, k_offset=10, n_k=96)),
     decode=False, varlen=False)
case(name="flamingo_cross", source="Flamingo-style vision cross attention",
     spec={"inputs": _inp(text_image=(["b", "n"], "int32"), key_image=(["b", "n"], "int32")),
           "mask": {"where": "text_image[b, i] == key_image[b, j] and text_image[b, i] >= 0"}},
     mask=lambda E: (E.text_image[E.b, E.i] == E.key_image[E.b, E.j]) & (E.text_image[E.b, E.i] >= 0),
     inputs=lambda g, B, H, n: {"text_image": (torch.arange(n).repeat(B, 1) // 9 - 1).to(torch.int32),
                                "key_image": (torch.arange(n).repeat(B, 1) // 13).to(torch.int32)},
     calls=(Call(37, 29), Call(60, 20)), decode=False)

# --- attention-gym score mods ------------------------------------------------------------------
case(name="gym_alibi", source=GYM, spec={"params": {"H": 4},
                                         "score": {"mod": "score + (kv_idx - q_idx) * exp2(-((h + 1) * 8.0 / H))"}},
     score=lambda E, s: s + (E.j - E.i) * torch.exp2(-((E.h + 1) * 8.0 / E.H)))
case(name="alibi_builtin", source="ALiBi paper slopes", spec={"mask": {"where": "causal"}, "score": {"bias": "alibi"}},
     mask=lambda E: E.j <= E.i, score=lambda E, s: s + alibi_slopes(E.h.shape[1])[E.h] * (E.j - E.i), heads=(6, 3))
case(name="alibi_builtin_12", slow=True, source="ALiBi paper slopes", spec={"score": {"bias": "alibi"}},
     score=lambda E, s: s + alibi_slopes(E.h.shape[1])[E.h] * (E.j - E.i), heads=(12, 4), batch=1)
case(name="gym_softcap_mod", source=GYM, spec={"params": {"soft_cap": 2.0}, "score": {"mod": "soft_cap * tanh(score / soft_cap)", "scale": 1.5}},
     score=lambda E, s: E.soft_cap * torch.tanh(s / E.soft_cap))
case(name="softcap_builtin", source="Gemma 2", spec={"mask": {"where": "causal"}, "score": {"softcap": 2.5, "scale": 1.5}},
     mask=lambda E: E.j <= E.i, softcap=2.5)
case(name="softcap_window_gqa", source="Gemma 2 local layers",
     spec={"params": {"window": 9}, "mask": {"where": "j <= i and i - j < window"}, "score": {"softcap": 3.0, "scale": 1.2}},
     mask=lambda E: (E.j <= E.i) & (E.i - E.j < E.window), softcap=3.0, heads=(6, 2))
case(name="gym_gelu_activation", source=GYM,
     spec={"score": {"mod": "log(0.5 * score * (1 + erf(score / sqrt(2))) + 1.0)", "scale": 0.9}},
     score=lambda E, s: torch.log(torch.nn.functional.gelu(s) + 1.0))
case(name="gym_relu_activation", slow=True, source=GYM, spec={"score": {"mod": "log(max(score, 0) + 1.0)", "scale": 0.9}},
     score=lambda E, s: torch.log(torch.relu(s) + 1.0))
case(name="gym_graphormer_spatial", source=GYM,
     spec={"inputs": _inp(spatial_bias=(["h", 6], "float32", True), distances=(["b", "n", "n"], "int32")),
           "score": {"mod": "score + spatial_bias[h, distances[b, q_idx, kv_idx]]"}},
     score=lambda E, s: s + E.spatial_bias[E.h, E.distances[E.b, E.i, E.j]],
     inputs=lambda g, B, H, n: {"spatial_bias": torch.randn(H, 6, generator=g),
                                "distances": torch.randint(0, 6, (B, n, n), generator=g, dtype=torch.int32)})
case(name="gym_graphormer_edge", quick=2, source=GYM,
     spec={"inputs": _inp(edge_bias=(["h", 3, 5], "float32", True), path_types=(["b", "n", "n", 3], "int32"),
                          path_lengths=(["b", "n", "n"], "int32")),
           "score": {"mod": "score + sum(where(path_lengths[b, q_idx, kv_idx] > t, edge_bias[h, t, path_types[b, q_idx, kv_idx, t]], 0.0)"
                            " for t in range(3)) / max(path_lengths[b, q_idx, kv_idx], 1)"}},
     score=lambda E, s: s + sum(torch.where(E.path_lengths[E.b, E.i, E.j] > t,
                                            E.edge_bias[E.h, t, E.path_types[E.b, E.i, E.j, t]], 0.0) for t in range(3))
     / torch.clamp(E.path_lengths[E.b, E.i, E.j], min=1),
     inputs=lambda g, B, H, n: {"edge_bias": torch.randn(H, 3, 5, generator=g),
                                "path_types": torch.randint(0, 5, (B, n, n, 3), generator=g, dtype=torch.int32),
                                "path_lengths": torch.randint(0, 5, (B, n, n), generator=g, dtype=torch.int32)})


def _sandwich_inputs(g, B, H, n):
    d_bar, max_len = 16, 128
    freqs = 1.0 / 10000 ** (2 * torch.arange(d_bar // 2, dtype=torch.float32) / d_bar)
    dist = torch.arange(2 * max_len, dtype=torch.float32) - (max_len - 1)
    return {"rel": torch.cos(dist.abs()[:, None] * freqs).sum(-1),
            "head_scale": H / (8.0 * torch.arange(1, H + 1, dtype=torch.float32))}


case(name="gym_sandwich", source=GYM,
     spec={"params": {"offset": 127}, "inputs": _inp(rel=([256], "float32"), head_scale=(["h"], "float32")),
           "mask": {"where": "q_idx >= kv_idx"}, "score": {"mod": "score + rel[q_idx - kv_idx + offset] * head_scale[h]"}},
     mask=lambda E: E.i >= E.j, score=lambda E, s: s + E.rel[E.i - E.j + E.offset] * E.head_scale[E.h],
     inputs=_sandwich_inputs)
case(name="gym_mla_rope", quick=2, source=GYM,
     spec={"params": {"num_heads": 4, "rs": 0.25},
           "inputs": _inp(query_rope=(["b", "h", "n", 8], "float32", True), key_rope=(["b", 1, "n", 8], "float32", True)),
           "score": {"mod": "score + rs * dot(query_rope[b, h, q_idx, :], key_rope[b, h // num_heads, kv_idx, :])"}},
     score=lambda E, s: s + E.rs * (E.query_rope[E.b, E.h, E.i] * E.key_rope[E.b, E.h // E.num_heads, E.j]).sum(-1),
     inputs=lambda g, B, H, n: {"query_rope": torch.randn(B, H, n, 8, generator=g), "key_rope": torch.randn(B, 1, n, 8, generator=g)})
case(name="t5_bucket", slow=True, source="T5 relative position bucket",
     spec={"inputs": _inp(rel_bias=(["h", 32], "float32", True)), "score": {"bias": "rel_bias[h, bucket(j - i, 32, 20)]"}},
     score=lambda E, s: s + E.rel_bias[E.h, t5_bucket(E.j - E.i, 32, 20)],
     inputs=lambda g, B, H, n: {"rel_bias": torch.randn(H, 32, generator=g)})
case(name="t5_bucket_causal", source="T5 relative position bucket",
     spec={"inputs": _inp(rel_bias=(["h", 16], "float32", True)), "mask": {"where": "causal"},
           "score": {"bias": "rel_bias[h, bucket(j - i, 16, 40, False)]"}},
     mask=lambda E: E.j <= E.i, score=lambda E, s: s + E.rel_bias[E.h, t5_bucket(E.j - E.i, 16, 40, False)],
     inputs=lambda g, B, H, n: {"rel_bias": torch.randn(H, 16, generator=g)})
case(name="rope_neox_causal", source="RoPE (GPT-NeoX)", spec={"mask": {"where": "causal"}, "rope": {"theta": 500.0}},
     mask=lambda E: E.j <= E.i, rope=(500.0, "neox", None))
case(name="rope_gptj_partial", source="RoPE (GPT-J, partial)", spec={"rope": {"theta": 10000.0, "style": "gptj", "rotary_dim": 8}},
     rope=(10000.0, "gptj", 8))

# --- edge values an attacker tries -------------------------------------------------------------
case(name="neg_chunk", source="edge: floor division by a negative param",
     spec={"params": {"c": -5}, "mask": {"where": "i // c == j // c"}}, mask=lambda E: E.i // E.c == E.j // E.c,
     calls=DEFAULT_CALLS + (Call(37, 37, params=(("c", -1),)), Call(37, 37, params=(("c", 1),)),
                            Call(37, 37, params=(("c", 1000),)), Call(37, 37, params=(("c", -1000),))))
case(name="neg_mod", source="edge: modulo by a negative param",
     spec={"params": {"d": -3, "r": -1}, "mask": {"where": "(i - j) % d == r and j <= i + 5"}},
     mask=lambda E: ((E.i - E.j) % E.d == E.r) & (E.j <= E.i + 5),
     calls=DEFAULT_CALLS + (Call(37, 37, params=(("d", 4), ("r", 1))), Call(37, 37, params=(("d", -7), ("r", -6)))))
case(name="chunk_start", source="edge: chunk starts of a negative distance",
     spec={"params": {"c": 6}, "mask": {"where": "j >= i - i % c and j <= i"}}, mask=lambda E: (E.j >= E.i - E.i % E.c) & (E.j <= E.i),
     calls=DEFAULT_CALLS + (Call(37, 37, params=(("c", -6),)), Call(37, 37, params=(("c", 1),))))
case(name="float_window", source="edge: float params in a band",
     spec={"params": {"w": 4.5, "p": 2.25}, "mask": {"where": "i - j < w and j * p <= i * 1.5"}},
     mask=lambda E: (E.i - E.j < E.w) & (E.j * E.p <= E.i * 1.5),
     calls=DEFAULT_CALLS + (Call(37, 37, params=(("w", -0.5), ("p", 0.1))), Call(37, 37, params=(("w", 1e9), ("p", -2.0)))))
case(name="shift_param", source="edge: shifts by a param (negative shifts the other way)",
     spec={"params": {"lvl": 2}, "mask": {"where": "i >> lvl == j >> lvl"}},
     mask=lambda E: torch.floor(E.i.double() * 2.0 ** -E.lvl) == torch.floor(E.j.double() * 2.0 ** -E.lvl),
     calls=DEFAULT_CALLS + (Call(37, 37, params=(("lvl", 0),)), Call(37, 37, params=(("lvl", -1),)),
                            Call(37, 37, params=(("lvl", 40),))))
case(name="bitand_negative", source="edge: bitwise and of a negative distance",
     spec={"mask": {"where": "((i - j - 20) & 7) == 3 or i == j"}},
     mask=lambda E: (((E.i - E.j - 20) & 7) == 3) | (E.i == E.j))
case(name="bottom_right_nq_nk", source="edge: n_q / n_k larger than the call",
     spec={"mask": {"where": "j - n_k <= i - n_q"}}, mask=lambda E: E.j - E.n_k <= E.i - E.n_q,
     calls=(Call(37, 29), Call(29, 37), Call(20, 30, q_offset=10, k_offset=3, n_q=64, n_k=50), Call(1, 33, q_offset=32)))
case(name="window_nk", source="edge: window on n_k",
     spec={"params": {"w": 6}, "mask": {"where": "j < n_k - w or i % n_k == j % n_k"}},
     # (a decode row with kv_len 0 has n_k = 0 and no key to divide for)
     mask=lambda E: (E.j < E.n_k - E.w) | (E.i % _at_least_1(E.n_k) == E.j % _at_least_1(E.n_k)),
     calls=(Call(37, 29), Call(20, 30, q_offset=10, k_offset=3, n_q=64, n_k=50)))
case(name="length_one", source="edge: length-1 calls",
     spec={"params": {"w": 3}, "mask": {"where": "j <= i and i - j <= w"}}, mask=lambda E: (E.j <= E.i) & (E.i - E.j <= E.w),
     calls=(Call(1, 1), Call(1, 17, q_offset=16), Call(17, 1), Call(1, 1, q_offset=5, k_offset=5), Call(1, 1, q_offset=5, k_offset=1)))
case(name="huge_param", source="edge: int params past int32",
     spec={"params": {"big": 3}, "mask": {"where": "i * big - j * big <= big * 4 and j <= i"}},
     mask=lambda E: (E.i * E.big - E.j * E.big <= E.big * 4) & (E.j <= E.i),
     calls=(Call(37, 37, params=(("big", 2 ** 40),)), Call(37, 37, params=(("big", -(2 ** 31)),))))
case(name="sinks_window_score", source="attention sinks + window, score condition",
     spec={"params": {"sinks": 2, "window": 6}, "score": {"mod": "where(j < sinks or (j <= i and i - j < window), score, -inf)"}},
     score=lambda E, s: _w((E.j < E.sinks) | ((E.j <= E.i) & (E.i - E.j < E.window)), s))


# --- found by this port (each failed before its fix) ---------------------------------------------
# the derivative of a kink of a piecewise score (abs / max / min of a where) held a boolean ITE
# that no printer rendered: the module had no backward
case(name="abs_of_where", source="found: a kink of a piecewise score",
     spec={"score": {"mod": "abs(where(j <= i, s, -1.5))", "scale": 1.0}},
     score=lambda E, s: torch.where(E.j <= E.i, s, torch.full_like(s, -1.5)).abs())
case(name="max_of_masked", source="found: a kink of a piecewise score",
     spec={"inputs": _inp(t=(["h"], "float32", True)), "score": {"mod": "max(where(j <= i, s * t[h], -inf), t[h])"}},
     score=lambda E, s: torch.maximum(_w(E.j <= E.i, s * E.t[E.h]), E.t[E.h] + 0 * s),
     inputs=lambda g, B, H, n: {"t": torch.randn(H, generator=g)})
# a condition on a per-head float, hoisted out of the key loop as a scalar and met with a tile's
# condition (c0 & (j <= i)), stopped the interpreter (bitwise_and of floats)
case(name="per_head_causal", source="found: a scalar condition meets a tile's",
     spec={"inputs": _inp(causal_heads=(["h"], "float32")), "mask": {"where": "causal_heads[h] <= 0 or j <= i"}},
     mask=lambda E: (E.causal_heads[E.h] <= 0) | (E.j <= E.i),
     inputs=lambda g, B, H, n: {"causal_heads": torch.randn(H, generator=g)})
case(name="per_head_score_cond", bf16=False, source="found: a scalar condition meets a tile's",
     spec={"inputs": _inp(x=(["h"], "float32")), "score": {"mod": "s * where(x[h] > 0 and s > 0, 2, 1)", "scale": 1.0}},
     score=lambda E, s: s * torch.where((E.x[E.h] > 0) & (s > 0), 2.0, 1.0),
     inputs=lambda g, B, H, n: {"x": torch.randn(H, generator=g)})
# steps of float arithmetic in a score (a condition, a floor), free of s, were float32: a branch or
# a unit of score off where float32 rounds the other way (13 * 0.7 // 1.3: 7.0, Python 6.0)
case(name="float_steps_in_score", source="found: float steps in a score",
     spec={"params": {"a": 0.1, "c": 0.3, "t": 0.7},
           "score": {"mod": "where(i * a > j * c, s, s - 5) + (i - j) * t // 1.3"}},
     score=lambda E, s: torch.where(E.i.double() * E.a > E.j.double() * E.c, s, s - 5) + ((E.i - E.j).double() * E.t) // 1.3,
     calls=(Call(40, 40), Call(29, 50, q_offset=11)))


def by_name(name: str) -> Case:
    for c in CASES:
        if c.name == name:
            return c
    raise KeyError(name)


# ---------------------------------------------------------------------------------------------
# running a case
# ---------------------------------------------------------------------------------------------

_MODULES: Dict[str, Any] = {}


def module(c: Case, head_dim: int = 16):
    key = f"{c.name}:{head_dim}"
    if key not in _MODULES:
        spec = {"name": f"cat_{c.name}", "head_dim": head_dim, "dtypes": ["float32"], **c.spec}
        _MODULES[key] = attncc.compile(spec)
    return _MODULES[key]


def learned(c: Case):
    return [n for n, d in c.spec.get("inputs", {}).items() if d.get("grad")]


def params_of(c: Case, call: Call) -> Dict[str, Any]:
    return {**c.spec.get("params", {}), **dict(call.params)}


def _layout(x: torch.Tensor, how: int) -> torch.Tensor:
    """The same values in another memory layout: 0 contiguous, 1 heads/rows transposed storage,
    2 a slice of a wider head dim."""
    if how == 1:
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if how == 2:
        wide = torch.zeros(*x.shape[:-1], x.shape[-1] + 5, dtype=x.dtype)
        wide[..., 2: 2 + x.shape[-1]] = x
        return wide[..., 2: 2 + x.shape[-1]]
    return x


def _input_layout(t: torch.Tensor, how: int) -> torch.Tensor:
    """An input's values in another memory layout: 1 its first two dims' storage swapped, 2 every
    other element of a wider buffer along its last dim (0-d inputs stay)."""
    if how == 0 or t.dim() == 0:
        return t
    if how == 1 and t.dim() >= 2:
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def varlen_ready(c: Case) -> bool:
    """Whether cu_seqlens take the pattern: its mask (the spec's, or one taken out of its mod)
    reads no input and draws no random blocks (documented refusals)."""
    from sympy.core.function import AppliedUndef

    from attncc.module_cache import toml_text
    from attncc.spec.builtins import RandomBlocks

    mask = attncc.parse_spec(toml_text({"name": c.name, **c.spec})).mask
    return c.varlen and (mask is None or not mask.atoms(AppliedUndef, RandomBlocks))


def uses_batch(c: Case) -> bool:
    """Whether the pattern reads ``b`` (directly or through an input's "b" dim)."""
    return c.batch != 2 or bool(re.search(r"\bb\b", repr(c.spec)))


def check_call(c: Case, call: Call, seed: int = 0, *, head_dim: int = 16, grads: bool = True, layout: int = 0,
               dtype=torch.float32, batch: Optional[int] = None, heads: Optional[Tuple[int, int]] = None,
               device: str = "cpu") -> None:
    """The module against the oracle on one call: o, lse, dq, dk, dv and learned inputs' grads.
    q, k, v in ``dtype`` on ``device`` for the module; the oracle takes the same values (rounded
    to ``dtype``) in float64 on the CPU."""
    m = module(c, head_dim)
    gen = torch.Generator().manual_seed(seed)
    Hq, Hkv = heads or c.heads
    B = batch or c.batch
    n = max(call.q_offset + call.nq, call.k_offset + call.nk, call.n_q or 0, call.n_k or 0)
    q = _operand(c, (B, Hq, call.nq, head_dim), gen)
    k = _operand(c, (B, Hkv, call.nk, head_dim), gen)
    v = torch.randn(B, Hkv, call.nk, head_dim, generator=gen)
    go = torch.randn(B, Hq, call.nq, head_dim, generator=gen)
    gl = torch.randn(B, Hq, call.nq, generator=gen)
    inputs = c.inputs(gen, B, Hq, n)
    params = params_of(c, call)
    names = learned(c)
    pos = dict(q_offset=call.q_offset, k_offset=call.k_offset, n_q=call.n_q, n_k=call.n_k)

    def run(fn, leaf, value, lay):
        leaves = [leaf(_layout(t, lay)).requires_grad_() for t in (q, k, v)]
        ins = {name: (value(t).requires_grad_() if name in names else value(t)) for name, t in inputs.items()}
        o, lse = fn(*leaves, ins)
        if not grads:
            return o.detach().cpu(), lse.detach().cpu(), []
        wrt = leaves + [ins[name] for name in names]
        finite = torch.isfinite(lse)
        loss = (o * value(go).to(o.dtype)).sum() + (torch.where(finite, lse, 0) * value(gl)).sum()
        found = torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True)
        return o.detach().cpu(), lse.detach().cpu(), [g.cpu() for g in found]

    def kernel_value(t):  # floats as declared (float32), on the device, in the call's layout
        return _input_layout(t.detach().clone(), layout).to(device)

    o, lse, got = run(lambda q_, k_, v_, ins: m.attention(q_, k_, v_, return_lse=True, **pos, **params, **ins),
                      lambda t: t.detach().clone().to(dtype).to(device), kernel_value, layout)
    o_ref, lse_ref, want = run(lambda q_, k_, v_, ins: oracle(c, q_, k_, v_, {**params, **ins}, **pos),
                               lambda t: t.detach().clone().to(dtype).double(),
                               lambda t: t.detach().clone().double() if t.is_floating_point() else t, 0)
    label = f"{c.name} {call} seed={seed} layout={layout} {dtype}"
    tol, grad_tol = (c.tol, max(10 * c.tol, 1e-3)) if dtype == torch.float32 else (2e-2, 5e-2)
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), finite), f"{label}: rows without keys differ"
    assert rel_err(o, o_ref) < tol, f"{label}: o rel err {rel_err(o, o_ref):.2e}"
    if finite.any():
        assert rel_err(lse[finite], lse_ref[finite]) < tol, f"{label}: lse rel err"
    for name, x, r in zip(["dq", "dk", "dv"] + [f"d{n}" for n in names], got, want):
        assert torch.isfinite(x).all(), f"{label}: {name} not finite"
        err = rel_err(x, r)
        assert err < grad_tol, f"{label}: {name} rel err {err:.2e}"


def check_decode(c: Case, seed: int = 0, *, nq: int = 3, head_dim: int = 16, paged: bool = False,
                 heads: Optional[Tuple[int, int]] = None, dtype=torch.float32, device: str = "cpu") -> None:
    """``decode`` against the oracle at the documented positions (i = kv_len[b] - Nq + t)."""
    m = module(c, head_dim)
    gen = torch.Generator().manual_seed(seed)
    Hq, Hkv = heads or c.heads
    B = c.batch + 1
    cap = 48
    kv_len = torch.randint(0, cap + 1, (B,), generator=gen, dtype=torch.int32)
    kv_len[0] = cap
    kv_len[-1] = min(int(kv_len[-1]), nq - 1)  # a row whose first queries sit before position 0
    q, k = (_operand(c, (B, h, n, head_dim), gen).to(dtype).float()  # (values dtype holds)
            for h, n in ((Hq, nq), (Hkv, cap)))
    v = torch.randn(B, Hkv, cap, head_dim, generator=gen).to(dtype).float()
    inputs = c.inputs(gen, B, Hq, cap)
    params = params_of(c, Call(1, 1))
    k_cache = k
    if c.rope is not None:  # the cache holds rotated keys
        theta, style, rot = c.rope
        k_cache = rotate(k.double(), torch.arange(cap), theta, style, rot or head_dim).float()
    kw = dict(kv_len=kv_len.to(device))
    inputs = {name: t.to(device) for name, t in inputs.items()}

    def dev(*ts):
        return [t.to(dtype).to(device) for t in ts]

    if paged:
        page = 16
        pages = cap // page
        perm = torch.randperm(B * pages, generator=gen)
        table = perm.view(B, pages).to(torch.int32)
        kp = torch.zeros(B * pages, page, Hkv, head_dim)
        vp = torch.zeros(B * pages, page, Hkv, head_dim)
        for bb in range(B):
            for p in range(pages):
                kp[table[bb, p]] = k_cache[bb, :, p * page:(p + 1) * page].transpose(0, 1)
                vp[table[bb, p]] = v[bb, :, p * page:(p + 1) * page].transpose(0, 1)
        o, lse = m.decode(*dev(q, kp, vp), block_table=table.to(device), return_lse=True, **kw, **params, **inputs)
    else:
        o, lse = m.decode(*dev(q, k_cache, v), return_lse=True, **kw, **params, **inputs)
    o, lse = o.cpu(), lse.cpu()
    q_pos = kv_len.long().view(B, 1) - nq + torch.arange(nq).view(1, nq)
    n = kv_len.long().view(B, 1, 1, 1)
    values = {**params, **{name: (t.cpu().double() if t.is_floating_point() else t.cpu()) for name, t in inputs.items()}}
    o_ref, lse_ref = oracle(c, q, k, v, values, q_pos=q_pos, n_q=n, n_k=n,
                            k_valid=torch.arange(cap).view(1, cap) < kv_len.long().view(B, 1))
    neg = (q_pos < 0).view(B, 1, nq).expand_as(lse_ref)  # documented: a row before position 0 sees nothing
    o_ref = torch.where(neg.unsqueeze(-1), 0.0, o_ref)
    lse_ref = torch.where(neg, NEG_INF, lse_ref)
    label = f"{c.name} decode seed={seed} paged={paged} kv_len={kv_len.tolist()} {dtype}"
    tol = c.tol if dtype == torch.float32 else 2e-2
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), finite), f"{label}: rows without keys differ"
    assert rel_err(o, o_ref) < tol, f"{label}: o rel err {rel_err(o, o_ref):.2e}"
    if finite.any():
        assert rel_err(lse[finite], lse_ref[finite]) < tol, f"{label}: lse rel err"


def check_varlen(c: Case, seed: int = 0, *, head_dim: int = 16, heads: Optional[Tuple[int, int]] = None) -> None:
    """cu_seqlens against separate oracle calls per sequence (positions from 0, n_q/n_k its own)."""
    m = module(c, head_dim)
    gen = torch.Generator().manual_seed(seed)
    Hq, Hkv = heads or c.heads
    lq = [int(x) for x in torch.randint(1, 30, (3,), generator=gen)] + [1]
    lk = [int(x) for x in torch.randint(1, 30, (3,), generator=gen)] + [17]
    cu_q = torch.tensor([0] + list(torch.tensor(lq).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lk).cumsum(0)), dtype=torch.int32)
    q = torch.randn(1, Hq, int(cu_q[-1]) + 2, head_dim, generator=gen)  # two rows past the last sequence
    k = torch.randn(1, Hkv, int(cu_k[-1]), head_dim, generator=gen)
    v = torch.randn(1, Hkv, int(cu_k[-1]), head_dim, generator=gen)
    params = params_of(c, Call(1, 1))
    # inputs of the score (a mask's refuse cu_seqlens): "b" is the sequence, "n" covers max_seqlen
    inputs = c.inputs(gen, len(lq), Hq, max(lq + lk))
    o, lse = m.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True, **params, **inputs)
    values = {**params, **{name: (t.double() if t.is_floating_point() else t) for name, t in inputs.items()}}
    for s in range(len(lq)):
        qs, ks = slice(int(cu_q[s]), int(cu_q[s + 1])), slice(int(cu_k[s]), int(cu_k[s + 1]))
        o_ref, lse_ref = oracle(c, q[:, :, qs], k[:, :, ks], v[:, :, ks], values, b_first=s)
        finite = torch.isfinite(lse_ref)
        label = f"{c.name} varlen seed={seed} seq={s} lq={lq} lk={lk}"
        assert torch.equal(torch.isfinite(lse[:, :, qs]), finite), f"{label}: rows without keys differ"
        assert rel_err(o[:, :, qs], o_ref) < c.tol, f"{label}: o"
    assert (o[:, :, int(cu_q[-1]):] == 0).all() and (lse[:, :, int(cu_q[-1]):] == NEG_INF).all()


if __name__ == "__main__":
    import argparse
    import traceback

    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--no-grad", action="store_true")
    ap.add_argument("--layouts", default="0")
    ap.add_argument("--decode", action="store_true")
    ap.add_argument("--varlen", action="store_true")
    ap.add_argument("--no-calls", action="store_true")
    ap.add_argument("--tiles", default="", help="fwd;dkdv;dq tile shapes MxN, e.g. 64x32;16x64;64x16")
    args = ap.parse_args()
    if args.tiles:
        for kernel, shape in zip(("", "_DKDV", "_DQ"), args.tiles.split(";")):
            bm, bn = shape.split("x")
            os.environ[f"ATTNCC_CONFIG{kernel}"] = f"BLOCK_M={bm},BLOCK_N={bn},num_warps=4,num_stages=1"
    fails = 0
    for c in CASES:
        if args.names and c.name not in args.names:
            continue
        for seed in range(args.seeds):
            for call in (() if args.no_calls else c.calls):
                for lay in map(int, args.layouts.split(",")):
                    try:
                        check_call(c, call, seed, grads=not args.no_grad, layout=lay)
                    except Exception as e:  # noqa: BLE001
                        fails += 1
                        print("FAIL", c.name, call, seed, lay, type(e).__name__, str(e)[:300])
            if args.decode and c.decode:
                for paged in (False, True):
                    try:
                        check_decode(c, seed, paged=paged)
                    except Exception as e:  # noqa: BLE001
                        fails += 1
                        print("FAIL decode", c.name, seed, paged, type(e).__name__, str(e)[:300])
            if args.varlen and varlen_ready(c):
                try:
                    check_varlen(c, seed)
                except Exception as e:  # noqa: BLE001
                    fails += 1
                    print("FAIL varlen", c.name, seed, type(e).__name__, str(e)[:300])
        print("done", c.name, flush=True)
    print("failures:", fails)
