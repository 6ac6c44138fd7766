"""Probe flexport 21 (a third port of FlexAttention's tests, test_flex_attention.py and
test_flex_decoding.py, and of attention-gym's mods/): what tests/test_probe_flex16.py,
test_probe_flex19.py, test_probe_gym18.py, test_probe_port20.py and tests/catalogue.py had not
ported. Each pattern is an attncc spec checked three ways at small odd sizes: the kernels
(in-process ``attncc.compile``, TRITON_INTERPRET) and ``attncc.reference`` against a dense float64
oracle written here from the Flex semantics (``s = q k^T * scale``, ``score_mod``, ``mask_mod`` ->
-inf, softmax; a row without an allowed key gives o = 0, lse = -inf; GQA by repeating k/v heads,
k/v batch 1 broadcast): o, the LSE and the gradients of q, k, v and of learned captured tensors,
from a loss on o and on the LSE.

Ported and probed (about 150 kernel calls in the probe, 13 kept here, one more slow):
- test_flex_decoding's builtin score mods (_identity, _times_two, _squared, _causal,
  _inverse_causal, _rel_bias, _rel_causal, _generate_alibi_bias(8), _generate_windowed(1000),
  _trig, _trig2 with ``tan(b)``) on one query row, GQA 8:1, k/v batch 3 and 1, with backward
  (22 cases); test_strided_inputs' four k / v stride layouts (offset, transposed dims, padded
  rows, a batch stride of 1 that overlaps the head dim) with q a transposed view, Nq 1 and 5,
  ``attention`` and ``decode`` (16 + 16); test_captured_buffers_all_dims with Q_S = 1 (a
  ``q_scale`` of one entry) learned; test_non_divisible_offset_mask(_with_captured_buffer) and
  the multi-token variant (a bfloat16 ``offset_kv`` / ``offset_q``, a 0-d int32 offset, Nk = S - 3);
  test_head_dependent_mask_mod (a bool ``head_type[h]`` under GQA 4:1, one query row);
  test_non_pow_2_headdim / test_non_equal_head_dims (D 17, 24, 3 with Dv 9, 5, 33);
  test_fully_masked_out_rows_0_check_gqa (``o.sum() + lse.sum()``); test_mixed_dtypes_fails;
  ``decode`` with GQA 8:1, a captured ``head_offset[h]`` and kv_len 1 / 17 / 41 against the Flex
  oracle on each row's prefix;
- captured tensors of odd layouts and dtypes: learned tables passed transposed, expanded (stride
  0), sliced with a step, as an offset view of a bigger buffer; learned bfloat16 / float16 tables
  (gradient in their own dtype, as documented); int16, uint8, int64, int8, int32 and bool id
  tensors declared int32 / uint8 / int16 / bool, expanded over the batch (16 cases);
- 47 Flex / attention-gym function bodies pasted as written (torch.*, F.*, math.*, tensor methods).

Found (fixed): attention-gym's default activation mod, ``torch.log(F.gelu(score) + 1.0)``
(mods/activation.py), pasted as written was refused with "only the language's functions can be
called, by their bare names" and no word of what to write; so were ``F.softplus``, ``torch.rsqrt``,
``torch.sign``, ``torch.fmod``, ``x.item()`` and others. And a pasted reduction over a captured
tensor's axis (``scale[b].sum(dim=-1)``, FlexAttention's test_captured_reduction; ``torch.any(...)``,
``torch.dot``) was told "write sum(...)", which the parser then refuses ("sum() takes one
generator"); ``x @ y`` got "operator MatMult is not part of the expression language". Each now
names the language's spelling (attncc/spec/expr.py ``_TORCH_SPELLINGS``), checked here to compute
torch's function (the spelling taken from the error message, run by ``attncc.reference`` and, for
the gym activation, by the kernels with attention-gym's ``undo_softmax`` recovering
``gelu(S) @ V`` from o and the LSE). A first draft's ``torch.isnan(x)`` -> ``x != x`` gave another
answer (the language simplifies ``x != x`` to false, §1): it has no spelling and no hint.

Found (fixed): the limits of reductions, as FlexAttention's test_cant_lower_error_message /
test_reduction_unrolled reach them (a Euclidean distance or a dot product over a captured
embedding). ``score + dot(x[q_idx, :], x[kv_idx, :])`` over 256 entries (§4.1: "at most 256 terms
each") was refused as 257 terms with "write the power or product of sums differently", of an
expression with neither; the message now says that a reduction's terms count and that an added
term can go to ``[score].bias``, counted apart (that port builds and is Flex's: checked by the
reference here and by the kernels in a slow test, 200 s), and the §4.1 table says how the
expansion limit counts. Nested reductions past the written-out limit (§3.3's 31 x 32 shape) were
told of conditions and index reads only; the message now names the reductions.

Found (fixed): a Flex function pasted whole, as test_flex_attention writes them: ``return ...``,
local names (test_dependent_causal_bidirectional's ``causal_attention = q >= kv``) and ``def f(score,
b, h, m, n): ...`` were "syntax error: invalid syntax"; a ``lambda`` was "lambda is not part of the
expression language"; ``-math.inf`` / ``-torch.inf`` / ``torch.finfo(torch.float32).min`` were
"attribute access is not part of the expression language"; the function's own parameter names
(``q``, ``kv``, ``m``, ``n``, ``token_q``, ``qk``) were "unknown variable" with a list of known names
that left out q_idx and kv_idx; ``torch.tensor(2.0)`` had no hint. Each now says what to write (the
returned value alone; the parameters renamed by place, naming each rename; inf; the finfo value)
(12 messages; the finfo value checked to build and drop its pairs in the kernels).

Probed clean: everything else above; 70 seeds of a random elementwise score_mod (sin, cos, tanh,
sigmoid, erf, abs, powers, exp, softplus, sqrt, exp2, min / max kinks, a where on the score)
around terms in b, h, the positions and two learned tables, GQA and k/v batch 1: o, lse and the
gradients of q, k, v and both tables; 60 seeds of a random mask_mod over captured id / offset /
permutation / flag tensors of random integer dtypes (int8 ... int64, uint8, bool) and layouts
(transposed, expanded, stepped, offset views), chained reads (``doc[b, perm[kv_idx]]``), Nq != Nk,
one query row, GQA, k/v batch 1; ``decode`` (contiguous and paged) of a document mask with a
transposed head table, an int16 id tensor expanded over the batch and a 0-stride batch scale;
test_flex_decoding's builtin score mods in float16 and bfloat16 with backward, GQA 2:1, k/v
batch 1 (18 cases: o and grads within 1e-3 / 8e-3 of the float64 oracle); empty shapes (Nq = 0,
Nk = 0, B = 0) and the shape refusals (k/v batch neither 1 nor q's, Hq not a multiple of Hkv,
k / v lengths, head dims or heads that differ, 3-d q); test_strided_inputs of test_flex_attention (two q, four
k / v and three grad-output layouts, with backward: 24 cases); chained calls
(test_multiple_score_mod_calls2, with backward); float64 q, k, v refused naming the dtypes (and
``attncc.reference`` passing torch.autograd.gradcheck of _trig with the LSE, as
test_aot_eager_gradcheck); permuted q, k, v (test_flex_attention_stride_ordering: o is contiguous,
as §6 says); the Euclidean-distance mod at 3 and 64 dims (64 in the dot form loses float32
precision near distance 0, as any float32 a^2 + b^2 - 2ab does: not attncc's).
"""
from __future__ import annotations

import ast
import math
import os
import re

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import attncc
from attncc.module_cache import toml_text
from cases import flex_softmax

NEG = float("-inf")
F = torch.nn.functional


def flex(q, k, v, score_mod=None, mask_mod=None, scale=None):
    """(o, lse) in float64 with FlexAttention's semantics for q, k, v of any strides."""
    B, Hq, Nq, D = q.shape
    Nk, g = k.shape[2], Hq // k.shape[1]
    kd = k.double().repeat_interleave(g, 1).expand(B, Hq, Nk, -1)
    vd = v.double().repeat_interleave(g, 1).expand(B, Hq, Nk, -1)
    s = (q.double() @ kd.transpose(-1, -2)) * (1 / math.sqrt(D) if scale is None else scale)
    b, h = torch.arange(B).view(B, 1, 1, 1), torch.arange(Hq).view(1, Hq, 1, 1)
    i, j = torch.arange(Nq).view(1, 1, Nq, 1), torch.arange(Nk).view(1, 1, 1, Nk)
    if score_mod is not None:
        s = score_mod(s, b, h, i, j)
    s = s.expand(B, Hq, Nq, Nk)
    if mask_mod is not None:
        s = torch.where(mask_mod(b, h, i, j).expand(B, Hq, Nq, Nk), s, NEG)
    return flex_softmax(s, vd)


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    assert torch.equal(torch.isfinite(a), torch.isfinite(b)), "non-finite entries differ"
    fin = torch.isfinite(b)
    return float((a[fin] - b[fin]).norm() / b[fin].norm().clamp_min(1e-30))


def _leaf(t, dtype=None):
    """A leaf with ``t``'s values and strides (a view's layout is what the call sees)."""
    x = torch.empty_strided(t.shape, t.stride(), dtype=dtype or t.dtype)
    x.copy_(t)
    return x.requires_grad_()


def check(spec, score_mod=None, mask_mod=None, *, q, k, v, inputs=None, learned=(), grad=True, seed=0):
    """Kernels and attncc.reference against the Flex oracle: o, lse and (``grad``) the gradients of
    <o, go> + <lse, gl> in q, k, v and the ``learned`` inputs. An input is a tensor or a pair
    (base, view function): a learned one's gradient is taken at the base. ``score_mod`` /
    ``mask_mod`` take the inputs (float64 where learned) and return the Flex function."""
    gen = torch.Generator().manual_seed(seed)
    inputs = inputs or {}
    full = {"head_dim": q.shape[-1], "dtypes": ["float32"], **spec}
    m = attncc.compile(full)
    pattern = attncc.parse_spec(toml_text(full))
    go = torch.randn(*q.shape[:3], v.shape[-1], generator=gen)
    gl = torch.randn(*q.shape[:3], generator=gen)

    def run(fn, dtype):
        qkv = [_leaf(t, dtype) if grad else t.to(dtype or t.dtype) for t in (q, k, v)]
        bases, ins = {}, {}
        for name, t in inputs.items():
            base, view = t if isinstance(t, tuple) else (t, lambda x: x)
            if name in learned:
                base = base.detach().to(dtype or base.dtype).requires_grad_()
            bases[name], ins[name] = base, view(base)
        o, lse = fn(qkv, ins)
        out = [o, lse]
        if grad:
            loss = (o.double() * go).sum() + (torch.where(torch.isfinite(lse), lse, 0).double() * gl).sum()
            out += torch.autograd.grad(loss, qkv + [bases[n] for n in learned])
        return out

    got = run(lambda qkv, ins: m.attention(*qkv, return_lse=True, **ins), None)
    ref = run(lambda qkv, ins: attncc.reference(pattern, *qkv, return_lse=True, **ins), None)
    want = run(lambda qkv, ins: flex(*qkv, score_mod and score_mod(ins), mask_mod and mask_mod(ins)), torch.float64)
    names = ["o", "lse", "dq", "dk", "dv"] + ["d" + n for n in learned]
    for name, a, r, w in zip(names, got, ref, want):
        assert _rel(r, w) < 1e-6, f"attncc.reference {name}"
        assert _rel(a, w) < 2e-4, f"kernels {name}"


# --- pasted torch functions: the refusal names the spelling, and the spelling is torch's ---------

HINTS = [  # (pasted text, what the message must say)
    ("log(F.gelu(score) + 1.0)", "write 0.5 * x * (1 + erf(x / sqrt(2)))"),
    ("torch.nn.functional.gelu(score, approximate='tanh')", "approximate='tanh': 0.5 * x * (1 + tanh("),
    ("F.softplus(score)", "write log(1 + exp(x))"),
    ("score * torch.rsqrt(q_idx + 1.0)", "write 1 / sqrt(x)"),
    ("score * torch.sign(q_idx - kv_idx)", "write where(x > 0, 1, where(x < 0, -1, 0))"),
    ("score + torch.fmod(q_idx - kv_idx, 3)", "write where(a >= 0, abs(a) % abs(b), -(abs(a) % abs(b)))"),
    ("score + head_offset[h].item()", "write x (an input's element is a number already)"),
    ("score + scale[b].sum(dim=-1)", "write sum(x[..., t] for t in range(K))"),
    ("score + scale[b].mean()", "write sum(x[..., t] for t in range(K)) / K"),
    ("where(torch.any(scale[b] > q_idx), score, -inf)", "write any(c[..., t] for t in range(K))"),
    ("score + torch.dot(scale[b, :], scale[b, :])", "write dot(x[..., :], y[..., :])"),
    ("score + scale[b, :] @ scale[b, :]", "write dot(x[..., :], y[..., :])"),
]
_HINT_INPUTS = {"scale": {"dims": ["b", 8]}, "head_offset": {"dims": ["h"]}}


@pytest.mark.parametrize("text, says", HINTS)
def test_pasted_torch_function_names_what_to_write(text, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        attncc.parse_spec(toml_text({"inputs": _HINT_INPUTS, "score": {"mod": text}}))


def _ported(text: str) -> str:
    """``text`` (one pasted torch call around the score) rewritten by the spelling its refusal gives:
    the hint with its x / a / b replaced by the call's arguments, a trailing remark dropped (the
    tanh form of gelu is the remark, taken when the call asks for it)."""
    with pytest.raises(ValueError) as err:
        attncc.parse_spec(toml_text({"score": {"mod": text}}))
    hint = re.search(r"write (.*) for \S+\(\.\.\.\)$", str(err.value)).group(1)
    call = ast.parse(text, mode="eval").body
    if any(kw.arg == "approximate" for kw in call.keywords):
        hint = hint.split("approximate='tanh': ")[1][:-1]
    else:
        hint = re.sub(r" \((?=[A-Za-z_]{2,}[ =:']).*\)$", "", hint)
    for name, arg in zip("xa" if len(call.args) == 1 else "ab", call.args):
        hint = re.sub(rf"\b{name}\b", f"({ast.unparse(arg)})", hint)
    return hint


SPELLINGS = [  # (pasted Flex score_mod body, the same in torch on float64 scores / int64 grids)
    ("F.gelu(score)", lambda s, i, j: F.gelu(s)),
    ("F.gelu(score, approximate='tanh')", lambda s, i, j: F.gelu(s, approximate="tanh")),
    ("F.softplus(score)", lambda s, i, j: F.softplus(s)),
    ("F.logsigmoid(score)", lambda s, i, j: F.logsigmoid(s)),
    ("F.elu(score)", lambda s, i, j: F.elu(s)),
    ("F.leaky_relu(score)", lambda s, i, j: F.leaky_relu(s)),
    ("F.hardtanh(score)", lambda s, i, j: F.hardtanh(s)),
    ("torch.expm1(score)", lambda s, i, j: torch.expm1(s)),
    ("torch.log10(score * score + 1)", lambda s, i, j: torch.log10(s * s + 1)),
    ("torch.rsqrt(score * score + 1)", lambda s, i, j: torch.rsqrt(s * s + 1)),
    ("torch.reciprocal(score * score + 1)", lambda s, i, j: torch.reciprocal(s * s + 1)),
    ("torch.sinh(score)", lambda s, i, j: torch.sinh(s)),
    ("torch.cosh(score)", lambda s, i, j: torch.cosh(s)),
    ("torch.sign(score)", lambda s, i, j: torch.sign(s)),
    ("torch.sgn(q_idx - kv_idx)", lambda s, i, j: s + torch.sgn(i - j)),
    ("torch.fmod(q_idx - kv_idx, 3)", lambda s, i, j: s + torch.fmod(i - j, 3)),
    ("torch.fmod(kv_idx - q_idx, -4)", lambda s, i, j: s + torch.fmod(j - i, -4)),
    ("torch.fmod(kv_idx - q_idx, 2.5)", lambda s, i, j: s + torch.fmod((j - i).double(), 2.5)),
]


@pytest.mark.parametrize("text, fn", SPELLINGS, ids=[t for t, _ in SPELLINGS])
def test_the_named_spelling_computes_torchs_function(text, fn):
    """The spelling the refusal gives, as a score mod (fmod, sgn of positions added to the score),
    against torch's function in the Flex oracle (attncc.reference, float64)."""
    body = _ported(text)
    mod = f"score + {body}" if "idx" in text else body
    gen = torch.Generator().manual_seed(len(text))
    q, k, v = (2 * torch.randn(1, 2, 11, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    o, lse = attncc.reference(attncc.parse_spec(toml_text({"head_dim": 8, "score": {"mod": mod}})), q, k, v,
                              return_lse=True)
    wo, wl = flex(q, k, v, lambda s, b, h, i, j: fn(s, i, j))
    assert _rel(o, wo) < 1e-12 and _rel(lse, wl) < 1e-12, mod


def test_gym_gelu_activation_as_hinted_and_undo_softmax():
    """attention-gym mods/activation.py: ``torch.log(F.gelu(score) + 1.0)``, ported by the hint, in
    the kernels (forward and backward, GQA, Nq != Nk), and its undo_softmax: o * exp(lse) - V.sum
    recovers gelu(S) @ V."""
    mod = "log(" + _ported("F.gelu(score)") + " + 1.0)"
    gen = torch.Generator().manual_seed(21)
    q, k, v = torch.randn(2, 4, 13, 16, generator=gen), torch.randn(2, 2, 19, 16, generator=gen), \
        torch.randn(2, 2, 19, 16, generator=gen)
    check({"score": {"mod": mod}}, lambda c: lambda s, b, h, i, j: torch.log(F.gelu(s) + 1.0), q=q, k=k, v=v)
    o, lse = attncc.compile({"head_dim": 16, "dtypes": ["float32"], "score": {"mod": mod}}).attention(
        q, k, v, return_lse=True)
    vv, kk = v.double().repeat_interleave(2, 1), k.double().repeat_interleave(2, 1)
    want = F.gelu(q.double() @ kk.transpose(-1, -2) / 4) @ vv
    got = o.double() * lse.double().exp()[..., None] - vv.sum(-2, keepdim=True)
    assert _rel(got, want) < 1e-4


# --- test_flex_decoding / test_flex_attention patterns, probed clean (regression cover) ----------

G = torch.Generator().manual_seed(2021)


def _r(*shape):
    return torch.randn(*shape, generator=G)


def test_decoding_one_row_gqa_trig_with_batch_and_backward():
    """_trig2 (``cos(score) * sin(score) + tan(b)``) on one query row, 8 query heads on one k/v head
    of batch 1 (test_kv_batch_broadcast of test_flex_decoding), with its backward."""
    check({"score": {"mod": "cos(score) * sin(score) + tan(b)"}},
          lambda c: lambda s, b, h, i, j: torch.cos(s) * torch.sin(s) + torch.tan(b.double()),
          q=_r(3, 8, 1, 16), k=_r(1, 1, 29, 16), v=_r(1, 1, 29, 16))


@pytest.mark.parametrize("layout", ["transposed", "shared"])
def test_strided_inputs(layout):
    """test_strided_inputs: q a transposed view, k, v with the test's strides: transposed batch and
    head dims at an offset, or a batch stride of 1 overlapping the head dim (forward: an overlapping
    tensor has no gradient), with _generate_alibi_bias(8); attention and decode."""
    B, Hq, Hkv, S, D = 3, 4, 2, 37, 16
    strides = {"transposed": ((Hkv * D, D, B * Hkv * D, 1), 499), "shared": ((1, D, (B + 1) * (Hkv + 1) * D, 1), 97)}
    q = _r(B * Hq * D).view(1, Hq, B, D).transpose(0, 2)
    k, v = (torch.as_strided(_r(B * Hkv * S * D * 4), (B, Hkv, S, D), *strides[layout]) for _ in range(2))
    alibi = "score + (kv_idx - q_idx) * exp2(-((h + 1) * 8.0 / 8))"
    fn = lambda c: lambda s, b, h, i, j: s + (j - i) * torch.exp2(-((h + 1) * 8.0 / 8))  # noqa: E731
    check({"score": {"mod": alibi}}, fn, q=q, k=k, v=v, grad=False)
    o = attncc.compile({"head_dim": D, "dtypes": ["float32"], "score": {"mod": alibi}}).decode(
        q, k, v, kv_len=torch.full((B,), S, dtype=torch.int32))
    want, _ = flex(q, k, v, lambda s, b, h, i, j: s + (j - i - (S - 1)) * torch.exp2(-((h + 1) * 8.0 / 8)))
    assert _rel(o, want) < 2e-4


def test_captured_buffers_all_dims_one_query_row_learned():
    """test_captured_buffers_all_dims with Q_S = 1: ``q_scale`` has one entry, every table learned."""
    B, Hq, S = 2, 4, 23
    check({"inputs": {"kv_scale": {"dims": ["n"], "grad": True}, "q_scale": {"dims": [1], "grad": True},
                      "head_scale": {"dims": ["h"], "grad": True}, "batch_scale": {"dims": ["b"], "grad": True}},
           "score": {"mod": "score + kv_scale[kv_idx] + q_scale[q_idx] + head_scale[h] + batch_scale[b]"}},
          lambda c: lambda s, b, h, i, j: s + c["kv_scale"][j] + c["q_scale"][i] + c["head_scale"][h] + c["batch_scale"][b],
          q=_r(B, Hq, 1, 16), k=_r(B, 2, S, 16), v=_r(B, 2, S, 16),
          inputs={"kv_scale": _r(S), "q_scale": _r(1), "head_scale": _r(Hq), "batch_scale": _r(B)},
          learned=("kv_scale", "q_scale", "head_scale", "batch_scale"))


def test_non_divisible_multi_token_offset_mask_bf16_buffers():
    """test_non_divisible_multi_token_offset_mask_with_captured_buffer: bfloat16 ``offset_kv``,
    ``offset_q`` and a 0-d int32 offset in the mask, three query rows on S - 3 keys."""
    S = 40
    off = torch.tensor(S // 2 - 3, dtype=torch.int32)
    okv, oq = _r(S - 3).bfloat16(), _r(3).bfloat16()
    check({"inputs": {"offset_kv": {"dims": ["n"], "dtype": "bfloat16"}, "offset_q": {"dims": ["n"], "dtype": "bfloat16"},
                      "off": {"dims": [], "dtype": "int32"}},
           "mask": {"where": "kv_idx >= q_idx + off"}, "score": {"mod": "score + offset_kv[kv_idx] + offset_q[q_idx]"}},
          lambda c: lambda s, b, h, i, j: s + c["offset_kv"][j].double() + c["offset_q"][i].double(),
          lambda c: lambda b, h, i, j: j >= i + c["off"],
          q=_r(2, 4, 3, 16), k=_r(2, 2, S - 3, 16), v=_r(2, 2, S - 3, 16),
          inputs={"offset_kv": okv, "offset_q": oq, "off": off})


@pytest.mark.parametrize("view", ["transposed", "expanded", "stepped", "offset"])
def test_learned_captured_views(view):
    """A learned captured tensor passed as a view: its gradient lands on the base as torch's."""
    B, Hq, S = 2, 4, 21
    base, fn, dims, mod, flex_mod = {
        "transposed": (_r(S, Hq), lambda t: t.t(), ["h", "n"], "score + tab[h, kv_idx]",
                       lambda t: lambda s, b, h, i, j: s + t[h, j]),
        "expanded": (_r(1, S), lambda t: t.expand(B, S), ["b", "n"], "score * tab[b, kv_idx]",
                     lambda t: lambda s, b, h, i, j: s * t[b, j]),
        "stepped": (_r(B, 2 * S), lambda t: t[:, ::2], ["b", "n"], "score + tab[b, q_idx] * tab[b, kv_idx]",
                    lambda t: lambda s, b, h, i, j: s + t[b, i] * t[b, j]),
        "offset": (_r(4, B, Hq, S + 5), lambda t: t[2, :, :, 3:3 + S], ["b", "h", "n"], "score + tab[b, h, kv_idx]",
                   lambda t: lambda s, b, h, i, j: s + t[b, h, j]),
    }[view]
    check({"inputs": {"tab": {"dims": dims, "grad": True}}, "score": {"mod": mod}}, lambda c: flex_mod(c["tab"]),
          q=_r(B, Hq, 7, 8), k=_r(B, 2, S, 8), v=_r(B, 2, S, 8), inputs={"tab": (base, fn)}, learned=("tab",))


def test_decode_gqa_captured_head_offset_per_row_prefix():
    """test_flex_decoding's _head_offset on one query row, 8 query heads on 1 k/v head, through
    ``decode``: row b is the Flex call on its kv_len[b] keys (the query at the last position)."""
    Hq, S = 8, 41
    ho = torch.rand(Hq, generator=G)
    q, kc, vc = _r(3, Hq, 1, 16), _r(3, 1, S, 16), _r(3, 1, S, 16)
    lens = torch.tensor([1, 17, 41], dtype=torch.int32)
    m = attncc.compile({"head_dim": 16, "dtypes": ["float32"], "inputs": {"head_offset": {"dims": ["h"]}},
                        "score": {"mod": "score * head_offset[h]"}})
    o, lse = m.decode(q, kc, vc, kv_len=lens, return_lse=True, head_offset=ho)
    for b, n in enumerate(lens.tolist()):
        wo, wl = flex(q[b:b + 1], kc[b:b + 1, :, :n], vc[b:b + 1, :, :n], lambda s, bb, h, i, j: s * ho.double()[h])
        assert _rel(o[b:b + 1], wo) < 2e-4 and _rel(lse[b:b + 1], wl) < 2e-4


# --- reductions at the limits (test_cant_lower_error_message / test_reduction_unrolled) -----------

_EMB = {"x": {"dims": ["n", 256], "grad": True}, "y": {"dims": ["n", 64]}}


def test_score_plus_a_256_term_dot_says_what_counts_and_where_it_builds():
    """``score + dot(x[q], x[kv])`` over a 256-entry embedding (the limit of one reduction) is 257
    terms: the refusal says that a reduction's terms count and that the added term can go to
    [score].bias, counted apart (it said "write the power or product of sums differently", of an
    expression with neither)."""
    with pytest.raises(ValueError, match=re.escape("each term of a reduction counted") + ".*"
                       + re.escape("an added term without the score can go to [score].bias")):
        attncc.parse_spec(toml_text({"inputs": _EMB, "score": {"mod": "score + dot(x[q_idx, :], x[kv_idx, :])"}}))
    with pytest.raises(ValueError, match=re.escape("each term of a reduction counted")):
        attncc.parse_spec(toml_text({"inputs": _EMB, "score": {
            "mod": "score + sum((x[q_idx, t] - x[kv_idx, t]) ** 2 for t in range(90))"}}))


def _bias_dot_port(fn, dtype):
    gen = torch.Generator().manual_seed(256)
    x = torch.randn(13, 256, generator=gen, dtype=dtype) / 16
    q, k, v = (torch.randn(1, 2, n, 8, generator=gen, dtype=dtype) for n in (9, 13, 13))
    return fn(q, k, v, x)


def test_the_bias_port_of_a_256_term_dot_is_flexs():
    """The port the message names, ``bias = "dot(x[q_idx, :], x[kv_idx, :])"``, computes Flex's
    ``score + (x[q_idx] * x[kv_idx]).sum(-1)`` (attncc.reference, float64, with the table's gradient;
    the kernels: test_the_bias_port_of_a_256_term_dot_in_the_kernels, slow)."""
    spec = {"head_dim": 8, "inputs": _EMB, "score": {"bias": "dot(x[q_idx, :], x[kv_idx, :])"}}
    pattern = attncc.parse_spec(toml_text(spec))

    def run(q, k, v, x):
        x.requires_grad_()
        o, lse = attncc.reference(pattern, q, k, v, return_lse=True, x=x, y=torch.zeros(13, 64))
        wo, wl = flex(q, k, v, lambda s, b, h, i, j: s + (x @ x.t())[:9][None, None])
        return o, lse, wo, wl, x

    o, lse, wo, wl, x = _bias_dot_port(run, torch.float64)  # (x is read at its declared float32)
    assert _rel(o, wo) < 1e-6 and _rel(lse, wl) < 1e-6
    got, = torch.autograd.grad(o.sum() + lse.sum(), x, retain_graph=True)
    want, = torch.autograd.grad(wo.sum() + wl.sum(), x)
    assert _rel(got, want) < 1e-6


@pytest.mark.slow
def test_the_bias_port_of_a_256_term_dot_in_the_kernels():
    """The same in the kernels (about 200 s under the interpreter: 256 unrolled terms; runs with
    ``-m slow``)."""
    def run(q, k, v, x):
        check({"inputs": _EMB, "score": {"bias": "dot(x[q_idx, :], x[kv_idx, :])"}},
              lambda c: lambda s, b, h, i, j: s + (c["x"] @ c["x"].t())[:9][None, None],
              q=q, k=k, v=v, inputs={"x": x, "y": torch.zeros(13, 64)}, learned=("x",))
    _bias_dot_port(run, torch.float32)


def test_nested_reductions_past_the_written_out_limit_name_the_reductions():
    """§3.3's nesting shape (a 31-term sum around 32-term sums) of two embedding reads is past the
    written-out limit: the message names the reductions (it named only conditions and index reads,
    of an expression with neither)."""
    with pytest.raises(ValueError, match=re.escape("a reduction is written out term by term")):
        attncc.parse_spec(toml_text({"inputs": _EMB, "score": {
            "mod": "score + sum(sum(y[q_idx, u] * y[kv_idx, t] for u in range(32)) for t in range(31))"}}))


# --- a Flex function pasted whole ------------------------------------------------------------------

PASTED = [  # (key, text, what the message must say)
    ("mod", "return score * 2", "write the returned value alone, without 'return'"),
    ("mod", "causal = q_idx >= kv_idx\nreturn where(causal, score, -inf)", "each local name (x = ...) replaced by its value"),
    ("mod", "def _inverse_causal(score, b, h, m, n):\n    return where(m <= n, score, -inf)",
     "write what it returns, its parameters renamed: m as q_idx, n as kv_idx"),
    ("where", "def causal_mask(b, h, q, kv):\n    return q >= kv", "renamed: q as q_idx, kv as kv_idx"),
    ("mod", "lambda qk, b, h, q, kv: qk * 2", "write its body alone, its parameters renamed: qk as score, q as q_idx"),
    ("mod", "where(m <= n, score, -inf)", "(score, b, h, q_idx, kv_idx) for a score_mod"),
    ("where", "token_q >= token_kv", "(b, h, q_idx, kv_idx) for a mask_mod"),
    ("where", "q >= kv", "kv_idx, n_k, n_q, q_idx)"),
    ("mod", "where(q_idx >= kv_idx, score, -math.inf)", "write inf for math.inf"),
    ("mod", "where(q_idx >= kv_idx, score, -torch.inf)", "write inf for torch.inf"),
    ("mod", "where(q_idx >= kv_idx, score, torch.finfo(torch.float32).min)", "write -3.4028234663852886e+38"),
    ("mod", "score + torch.tensor(2.0)", "write the value for torch.tensor(...)"),
]


@pytest.mark.parametrize("key, text, says", PASTED)
def test_a_function_pasted_whole_says_what_to_keep(key, text, says):
    """test_flex_attention's score_mods are written ``def f(score, b, h, m, n): return ...`` (or with
    ``q, kv``, ``token_q, token_kv``, ``qk``), their masks with ``-float("inf")`` or ``-math.inf``:
    pasted so, each was refused with "syntax error: invalid syntax", "lambda / attribute access is
    not part of the expression language" or an unknown name whose list of known names left out
    q_idx and kv_idx."""
    spec = {"score": {"mod": text}} if key == "mod" else {"mask": {"where": text}}
    with pytest.raises(ValueError, match=re.escape(says)):
        attncc.parse_spec(toml_text(spec))


def test_the_finfo_min_spelling_is_a_number_the_language_takes():
    """The value the finfo hint gives builds, and the pairs it is given to drop out as with -inf (a
    score of -3.4e38 is -inf in the kernels' log2 units, §1)."""
    with pytest.raises(ValueError) as err:
        attncc.parse_spec(toml_text({"score": {"mod": "where(q_idx >= kv_idx, score, torch.finfo(torch.float32).min)"}}))
    value = re.search(r"write (\S+) ", str(err.value)).group(1)
    assert float(value) == torch.finfo(torch.float32).min
    m = attncc.compile({"head_dim": 8, "dtypes": ["float32"], "score": {"mod": f"where(q_idx >= kv_idx, score, {value})"}})
    q, k, v = (torch.randn(1, 2, n, 8, generator=G) for n in (5, 9, 9))
    o, lse = m.attention(q, k, v, return_lse=True)
    want, wl = flex(q, k, v, lambda s, b, h, i, j: torch.where(i >= j, s, NEG))
    assert _rel(o, want) < 2e-4 and _rel(lse, wl) < 2e-4
